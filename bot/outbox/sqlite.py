"""The SQLite store: one file and no set-up, safe for several processes on one machine.

All SQLite work runs on one dedicated thread per process, never on the event loop. WAL lets
readers run beside the one writer; claims and settlements are `BEGIN IMMEDIATE` transactions,
so two processes never lease the same row. Not for a network filesystem or several machines:
use PostgreSQL (DATABASE_URL) there. Commits are fsync'd (synchronous=FULL): a row the model was
told about survives a power cut.

`max_size_bytes` caps the file (SQLite's max_page_count): past it, writes fail with "database or
disk is full" exactly as on a full disk.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from bot.outbox.rows import (
    COLUMNS,
    COUNTS_SQL,
    Channel,
    DisabledEndpoint,
    NewRow,
    OutboxCounts,
    OutboxRow,
    RowKey,
    State,
)
from bot.outbox.store import OutboxStore
from bot.tools import OutboxUnavailable

SQLITE_BUSY_TIMEOUT_S = 5.0
PROBE_BYTES = 16 * 1024
SELECT = f"SELECT {', '.join(COLUMNS)} FROM outbox"
# Schema versions (PRAGMA user_version), applied in order inside one write transaction.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE IF NOT EXISTS outbox (
            message_id      TEXT NOT NULL,
            channel         TEXT NOT NULL CHECK (channel IN ('sms', 'webhook')),
            kind            TEXT NOT NULL,
            call_sid        TEXT NOT NULL,
            recipient       TEXT,
            payload         TEXT NOT NULL,
            body            TEXT,
            state           TEXT NOT NULL,
            attempts        INTEGER NOT NULL DEFAULT 0,
            next_attempt_at REAL,
            created_at      REAL NOT NULL,
            updated_at      REAL NOT NULL,
            last_error      TEXT,
            error_code      INTEGER,
            result          TEXT NOT NULL DEFAULT '[]',
            PRIMARY KEY (message_id, channel)
        )""",
        "CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_attempt_at)",
    ),
    (
        "ALTER TABLE outbox ADD COLUMN lease_owner TEXT",
        "ALTER TABLE outbox ADD COLUMN lease_expires_at REAL",
        # Rows a version-1 relay left mid-attempt belong to nobody now: taken over at once.
        "UPDATE outbox SET lease_expires_at = 0 WHERE state = 'sending'",
        "CREATE INDEX outbox_settled ON outbox (state, updated_at)",
        """CREATE TABLE outbox_endpoints (
            url         TEXT PRIMARY KEY,
            disabled_at REAL NOT NULL,
            reason      TEXT NOT NULL
        )""",
        "CREATE TABLE outbox_probe (data BLOB)",
    ),
    (
        # Stores: each row names its store, SMS sender and webhook URL (NULL: the settings').
        "ALTER TABLE outbox ADD COLUMN store_id TEXT",
        "ALTER TABLE outbox ADD COLUMN sender TEXT",
        "ALTER TABLE outbox ADD COLUMN endpoint TEXT",
    ),
)
# A webhook row whose URL (its own, else the relay's WEBHOOK_URL) answered 410 waits.
ENDPOINT_ENABLED = (
    "(channel = 'sms' OR NOT EXISTS (SELECT 1 FROM outbox_endpoints AS e "
    "WHERE e.url = COALESCE(outbox.endpoint, ?)))"
)
RELEASED_STATE = "CASE channel WHEN 'sms' THEN 'ambiguous' ELSE 'pending' END"
INTERRUPTED = "interrupted mid-attempt: look up before resending"

T = TypeVar("T")


def placeholders(count: int) -> str:
    return ", ".join("?" * count)


class SqliteStore(OutboxStore):
    setting = "DATABASE_PATH"

    def __init__(self, path: Path | str, *, max_size_bytes: int | None = None) -> None:
        self.path = Path(path)
        self.target = str(self.path)
        self._max_size_bytes = max_size_bytes
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox-sqlite")
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        try:
            await self._run(self._open)
        except (OutboxUnavailable, OSError) as exc:
            reason = f"{exc.strerror}: {exc.filename}" if isinstance(exc, OSError) else str(exc)
            raise OutboxUnavailable(f"DATABASE_PATH {self.path}: cannot open the outbox ({reason})") from exc

    def subscribe(self, wake: Callable[[], None]) -> None:
        """SQLite cannot tell one process about another's writes: relays poll instead."""

    async def close(self) -> None:
        if self._conn is not None:
            await self._run(self._conn.close)
            self._conn = None
        self._executor.shutdown(wait=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs `fn` on the SQLite thread; a database error becomes OutboxUnavailable."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, partial(fn, *args))
        except sqlite3.Error as exc:
            raise OutboxUnavailable(str(exc)) from exc

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("the outbox is not open")
        return self._conn

    def _transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`work` inside BEGIN IMMEDIATE: the write lock is taken first, so reads inside see the truth."""
        conn = self._db()
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = work(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result

    # -- below: runs on the SQLite thread

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            self.path, timeout=SQLITE_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            self._conn = conn
            self._transaction(self._migrate)
            if self._max_size_bytes is not None:
                page_size = conn.execute("PRAGMA page_size").fetchone()[0]
                conn.execute(f"PRAGMA max_page_count = {max(1, self._max_size_bytes // page_size)}")
        except BaseException:
            self._conn = None
            conn.close()
            raise

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise OutboxUnavailable(
                f"its outbox schema is v{version}, newer than this version of the bot reads "
                f"(v{len(MIGRATIONS)}): upgrade the bot"
            )
        for statements in MIGRATIONS[version:]:
            for statement in statements:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")

    async def insert(self, rows: Sequence[NewRow]) -> None:
        sql = f"INSERT INTO outbox ({', '.join(COLUMNS)}) VALUES ({placeholders(len(COLUMNS))})"

        def work(conn: sqlite3.Connection) -> None:
            conn.executemany(sql, [row.values() for row in rows])

        await self._run(self._transaction, work)

    async def list_rows(self, states: tuple[State, ...] | None, latest: int | None = None) -> list[OutboxRow]:
        def read() -> list[OutboxRow]:
            sql, params = SELECT, list[object](states or ())
            if states is not None:
                sql += f" WHERE state IN ({placeholders(len(states))})"
            if latest is not None:
                sql += " ORDER BY created_at DESC, message_id DESC, channel DESC LIMIT ?"
                params.append(latest)
                return [OutboxRow.from_db(r) for r in self._db().execute(sql, params)][::-1]
            sql += " ORDER BY created_at, message_id, channel"
            return [OutboxRow.from_db(r) for r in self._db().execute(sql, params)]

        return await self._run(read)

    async def get(self, message_id: str, channel: Channel) -> OutboxRow | None:
        def read() -> OutboxRow | None:
            sql = f"{SELECT} WHERE message_id = ? AND channel = ?"
            record = self._db().execute(sql, (message_id, channel)).fetchone()
            return OutboxRow.from_db(record) if record else None

        return await self._run(read)

    async def counts(self) -> OutboxCounts:
        def read() -> OutboxCounts:
            return OutboxCounts.from_groups(self._db().execute(COUNTS_SQL).fetchall())

        return await self._run(read)

    async def claim(
        self,
        now: float,
        limit: int,
        channels: tuple[Channel, ...],
        owner: str,
        lease_until: float,
        default_endpoint: str | None = None,
    ) -> list[OutboxRow]:
        def work(conn: sqlite3.Connection) -> list[OutboxRow]:
            records = conn.execute(
                f"{SELECT} WHERE channel IN ({placeholders(len(channels))}) AND ("
                "(state IN ('pending', 'ambiguous') AND next_attempt_at <= ?) "
                f"OR (state = 'sending' AND lease_expires_at <= ?)) AND {ENDPOINT_ENABLED} "
                "ORDER BY next_attempt_at LIMIT ?",
                (*channels, now, now, default_endpoint, limit),
            ).fetchall()
            rows = [OutboxRow.from_db(r) for r in records]
            conn.executemany(
                "UPDATE outbox SET state = 'sending', attempts = attempts + 1, lease_owner = ?, "
                "lease_expires_at = ?, updated_at = ? WHERE message_id = ? AND channel = ?",
                [(owner, lease_until, now, row.message_id, row.channel) for row in rows],
            )
            return rows

        return await self._run(self._transaction, work)

    async def next_due_at(
        self, channels: tuple[Channel, ...], default_endpoint: str | None = None
    ) -> float | None:
        def read() -> float | None:
            among = f"channel IN ({placeholders(len(channels))}) AND {ENDPOINT_ENABLED}"
            record = (
                self._db()
                .execute(
                    "SELECT MIN(t) FROM (SELECT MIN(next_attempt_at) AS t FROM outbox "
                    f"WHERE state IN ('pending', 'ambiguous') AND {among} UNION ALL "
                    f"SELECT MIN(lease_expires_at) FROM outbox WHERE state = 'sending' AND {among})",
                    (*channels, default_endpoint, *channels, default_endpoint),
                )
                .fetchone()
            )
            return None if record[0] is None else float(record[0])

        return await self._run(read)

    async def renew(self, key: RowKey, owner: str, lease_until: float, now: float) -> bool:
        return await self.record(key, owner, {"lease_expires_at": lease_until}, now)

    async def record(self, key: RowKey, owner: str, fields: dict[str, Any], now: float) -> bool:
        values = {k: json.dumps(v) if k == "result" else v for k, v in fields.items()}
        assignments = ", ".join(f"{name} = ?" for name in values)

        def write() -> bool:
            cursor = self._db().execute(
                f"UPDATE outbox SET {assignments}, updated_at = ? "
                "WHERE message_id = ? AND channel = ? AND state = 'sending' AND lease_owner = ?",
                (*values.values(), now, *key, owner),
            )
            return cursor.rowcount == 1

        return await self._run(write)

    async def settle_sms(
        self,
        message_id: str,
        owner: str,
        state: State,
        sids: list[str | None],
        error_code: int | None,
        last_error: str | None,
        now: float,
        hook_body: Callable[[dict[str, Any]], str],
    ) -> bool:
        def work(conn: sqlite3.Connection) -> bool:
            settled = conn.execute(
                "UPDATE outbox SET state = ?, next_attempt_at = NULL, result = ?, error_code = ?, "
                "last_error = ?, updated_at = ?, lease_owner = NULL, lease_expires_at = NULL "
                "WHERE message_id = ? AND channel = 'sms' AND state = 'sending' AND lease_owner = ?",
                (state, json.dumps(sids), error_code, last_error, now, message_id, owner),
            ).rowcount
            if not settled:
                return False
            hook = conn.execute(
                "SELECT payload FROM outbox "
                "WHERE message_id = ? AND channel = 'webhook' AND state = 'waiting'",
                (message_id,),
            ).fetchone()
            if hook is not None:
                conn.execute(
                    "UPDATE outbox SET state = 'pending', body = ?, next_attempt_at = ?, updated_at = ? "
                    "WHERE message_id = ? AND channel = 'webhook'",
                    (hook_body(json.loads(hook["payload"])["data"]), now, now, message_id),
                )
            return True

        return await self._run(self._transaction, work)

    async def release(self, owner: str, keys: Collection[RowKey] | None, now: float) -> int:
        sql = (
            f"UPDATE outbox SET state = {RELEASED_STATE}, next_attempt_at = ?, updated_at = ?, "
            "lease_owner = NULL, lease_expires_at = NULL, "
            "last_error = CASE channel WHEN 'sms' THEN ? ELSE last_error END "
            "WHERE state = 'sending' AND lease_owner = ?"
        )

        def work(conn: sqlite3.Connection) -> int:
            if keys is None:
                return int(conn.execute(sql, (now, now, INTERRUPTED, owner)).rowcount)
            one = sql + " AND message_id = ? AND channel = ?"
            return sum(conn.execute(one, (now, now, INTERRUPTED, owner, *key)).rowcount for key in keys)

        return await self._run(self._transaction, work)

    async def requeue(self, message_id: str, now: float) -> list[OutboxRow]:
        def work(conn: sqlite3.Connection) -> list[OutboxRow]:
            where = "WHERE message_id = ? AND state IN ('failed', 'dead')"
            rows = [OutboxRow.from_db(r) for r in conn.execute(f"{SELECT} {where}", (message_id,))]
            conn.execute(
                f"UPDATE outbox SET state = {RELEASED_STATE}, attempts = 0, next_attempt_at = ?, "
                f"updated_at = ? {where}",
                (now, now, message_id),
            )
            return rows

        return await self._run(self._transaction, work)

    async def purge(self, settled_before: float, limit: int) -> int:
        def write() -> int:
            cursor = self._db().execute(
                "DELETE FROM outbox WHERE rowid IN (SELECT rowid FROM outbox "
                "WHERE state IN ('sent', 'failed', 'dead') AND updated_at < ? LIMIT ?)",
                (settled_before, limit),
            )
            return int(cursor.rowcount)

        return await self._run(write)

    async def disable_endpoint(self, url: str, reason: str, now: float) -> bool:
        def write() -> bool:
            cursor = self._db().execute(
                "INSERT INTO outbox_endpoints (url, disabled_at, reason) VALUES (?, ?, ?) "
                "ON CONFLICT (url) DO NOTHING",
                (url, now, reason),
            )
            return cursor.rowcount == 1

        return await self._run(write)

    async def enable_endpoints(self, url: str | None) -> list[str]:
        def work(conn: sqlite3.Connection) -> list[str]:
            where, params = ("WHERE url = ?", (url,)) if url is not None else ("", ())
            urls = [r["url"] for r in conn.execute(f"SELECT url FROM outbox_endpoints {where}", params)]
            conn.execute(f"DELETE FROM outbox_endpoints {where}", params)
            return urls

        return await self._run(self._transaction, work)

    async def disabled_endpoints(self) -> list[DisabledEndpoint]:
        def read() -> list[DisabledEndpoint]:
            records = self._db().execute("SELECT url, disabled_at, reason FROM outbox_endpoints ORDER BY url")
            return [DisabledEndpoint(r["url"], r["disabled_at"], r["reason"]) for r in records]

        return await self._run(read)

    async def probe(self) -> None:
        def write() -> None:
            conn = self._db()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("INSERT INTO outbox_probe (data) VALUES (randomblob(?))", (PROBE_BYTES,))
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")

        await self._run(write)
