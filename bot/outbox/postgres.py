"""The PostgreSQL store (DATABASE_URL): one outbox shared by every process on every machine.

Built on asyncpg: native asyncio, a connection pool that reconnects by itself after a database
restart, and LISTEN/NOTIFY. Rows are leased with `SELECT ... FOR UPDATE SKIP LOCKED`, so relays
never wait on each other's rows. Every insert or release NOTIFYs, which wakes every relay at
once; polling stays as the fallback while the listening connection is down. The schema is
migrated at start-up under an advisory lock, so processes starting together apply each version
once.

Times are epoch seconds (double precision) from the relays' clocks, as in the SQLite store:
leases carry a margin of seconds, far above the skew of NTP-synchronized machines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

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

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
ACQUIRE_TIMEOUT_S = 5.0
COMMAND_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 5.0
POOL_MAX_SIZE = 10
LISTEN_RETRY_S = 2.0
POLL_WHILE_LISTENING_S = 5.0
POLL_WITHOUT_LISTENING_S = 1.0
NOTIFY_CHANNEL = "voicebot_outbox"
PROBE_BYTES = 16 * 1024
# pg_advisory_xact_lock key held while migrating: "voic" in ASCII, a constant the bot alone uses.
MIGRATION_LOCK_KEY = 0x766F6963
DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE outbox (
            message_id       text NOT NULL,
            channel          text NOT NULL CHECK (channel IN ('sms', 'webhook')),
            kind             text NOT NULL,
            call_sid         text NOT NULL,
            recipient        text,
            payload          text NOT NULL,
            body             text,
            state            text NOT NULL,
            attempts         integer NOT NULL DEFAULT 0,
            next_attempt_at  double precision,
            created_at       double precision NOT NULL,
            updated_at       double precision NOT NULL,
            last_error       text,
            error_code       integer,
            result           text NOT NULL DEFAULT '[]',
            lease_owner      text,
            lease_expires_at double precision,
            PRIMARY KEY (message_id, channel)
        )""",
        "CREATE INDEX outbox_due ON outbox (state, next_attempt_at)",
        "CREATE INDEX outbox_settled ON outbox (state, updated_at)",
        """CREATE TABLE outbox_endpoints (
            url         text PRIMARY KEY,
            disabled_at double precision NOT NULL,
            reason      text NOT NULL
        )""",
        "CREATE TABLE outbox_probe (data bytea)",
    ),
    (
        # Stores: each row names its store, SMS sender and webhook URL (NULL: the settings').
        "ALTER TABLE outbox ADD COLUMN store_id text",
        "ALTER TABLE outbox ADD COLUMN sender text",
        "ALTER TABLE outbox ADD COLUMN endpoint text",
    ),
)
# A webhook row whose URL (its own, else the relay's WEBHOOK_URL, the parameter) answered 410 waits.
ENDPOINT_ENABLED = (
    "(channel = 'sms' OR NOT EXISTS (SELECT 1 FROM outbox_endpoints AS e "
    "WHERE e.url = COALESCE(outbox.endpoint, {param}::text)))"
)
SELECT = f"SELECT {', '.join(COLUMNS)} FROM outbox"
RELEASED_STATE = "CASE channel WHEN 'sms' THEN 'ambiguous' ELSE 'pending' END"
INTERRUPTED = "interrupted mid-attempt: look up before resending"
CLAIM = f"""
WITH due AS (
    {SELECT}
    WHERE channel = ANY($1::text[])
      AND ((state IN ('pending', 'ambiguous') AND next_attempt_at <= $2)
           OR (state = 'sending' AND lease_expires_at <= $2))
      AND {ENDPOINT_ENABLED.format(param="$6")}
    ORDER BY next_attempt_at
    LIMIT $3
    FOR UPDATE SKIP LOCKED
)
UPDATE outbox AS o
SET state = 'sending', attempts = o.attempts + 1, lease_owner = $4, lease_expires_at = $5, updated_at = $2
FROM due
WHERE o.message_id = due.message_id AND o.channel = due.channel
RETURNING due.*
"""


def redact_url(url: str) -> str:
    """The URL as logs and messages may show it: the password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def affected(status: str) -> int:
    """Rows touched, from a command status like 'UPDATE 3' or 'INSERT 0 1'."""
    return int(status.rsplit(" ", 1)[-1])


class PostgresStore(OutboxStore):
    setting = "DATABASE_URL"

    def __init__(self, url: str) -> None:
        self.url = url
        self.target = redact_url(url)
        self.listening = False
        self._pool: asyncpg.Pool | None = None
        self._listen_task: asyncio.Task[None] | None = None

    @property
    def poll_interval_s(self) -> float:
        return POLL_WHILE_LISTENING_S if self.listening else POLL_WITHOUT_LISTENING_S

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=1,
                max_size=POOL_MAX_SIZE,
                timeout=CONNECT_TIMEOUT_S,
                command_timeout=COMMAND_TIMEOUT_S,
            )
            async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
                await migrate(conn)
        except (*DB_ERRORS, ValueError, OutboxUnavailable) as exc:
            await self.close()
            reason = str(exc) if isinstance(exc, OutboxUnavailable) else describe(exc)
            raise OutboxUnavailable(f"DATABASE_URL {self.target}: cannot open the outbox ({reason})") from exc

    async def close(self) -> None:
        if self._listen_task is not None:
            self._listen_task.cancel()
            await asyncio.gather(self._listen_task, return_exceptions=True)
            self._listen_task = None
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT_S)
            except DB_ERRORS:
                pool.terminate()

    def subscribe(self, wake: Callable[[], None]) -> None:
        self._listen_task = asyncio.create_task(self._listen(wake), name="outbox-listen")

    async def _listen(self, wake: Callable[[], None]) -> None:
        """Keeps one connection LISTENing; reconnects after a database restart."""
        while True:
            try:
                conn = await asyncpg.connect(self.url, timeout=CONNECT_TIMEOUT_S)
            except DB_ERRORS:
                await asyncio.sleep(LISTEN_RETRY_S)
                continue
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
            try:
                await conn.add_listener(NOTIFY_CHANNEL, lambda *_args: wake())
                self.listening = True
                wake()  # whatever was queued while nobody listened
                await lost.wait()
            except DB_ERRORS:
                pass
            finally:
                self.listening = False
                conn.terminate()
            log.warning("outbox notifications lost; polling until they are back")
            await asyncio.sleep(LISTEN_RETRY_S)

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        """A pooled connection; any database failure inside the block becomes OutboxUnavailable."""
        if self._pool is None:
            raise RuntimeError("the outbox is not open")
        try:
            async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
                yield conn
        except DB_ERRORS as exc:
            raise OutboxUnavailable(f"PostgreSQL: {describe(exc)}") from exc

    async def insert(self, rows: Sequence[NewRow]) -> None:
        sql = f"INSERT INTO outbox ({', '.join(COLUMNS)}) VALUES ({params(len(COLUMNS))})"
        async with self._connection() as conn, conn.transaction():
            await conn.executemany(sql, [row.values() for row in rows])
            await conn.execute(f"NOTIFY {NOTIFY_CHANNEL}")

    async def list_rows(self, states: tuple[State, ...] | None, latest: int | None = None) -> list[OutboxRow]:
        where = "" if states is None else "WHERE state = ANY($1::text[])"
        args: list[Any] = [] if states is None else [list(states)]
        if latest is None:
            order = "ORDER BY created_at, message_id, channel"
        else:
            order = f"ORDER BY created_at DESC, message_id DESC, channel DESC LIMIT ${len(args) + 1}"
            args.append(latest)
        async with self._connection() as conn:
            records = await conn.fetch(f"{SELECT} {where} {order}", *args)
        rows = [OutboxRow.from_db(r) for r in records]
        return rows if latest is None else rows[::-1]

    async def get(self, message_id: str, channel: Channel) -> OutboxRow | None:
        async with self._connection() as conn:
            record = await conn.fetchrow(
                f"{SELECT} WHERE message_id = $1 AND channel = $2", message_id, channel
            )
        return OutboxRow.from_db(record) if record is not None else None

    async def counts(self) -> OutboxCounts:
        async with self._connection() as conn:
            return OutboxCounts.from_groups(await conn.fetch(COUNTS_SQL))

    async def claim(
        self,
        now: float,
        limit: int,
        channels: tuple[Channel, ...],
        owner: str,
        lease_until: float,
        default_endpoint: str | None = None,
    ) -> list[OutboxRow]:
        async with self._connection() as conn:
            records = await conn.fetch(
                CLAIM, list(channels), now, limit, owner, lease_until, default_endpoint
            )
        rows = [OutboxRow.from_db(r) for r in records]
        return sorted(rows, key=lambda row: row.next_attempt_at or 0.0)

    async def next_due_at(
        self, channels: tuple[Channel, ...], default_endpoint: str | None = None
    ) -> float | None:
        enabled = ENDPOINT_ENABLED.format(param="$2")
        async with self._connection() as conn:
            due: float | None = await conn.fetchval(
                "SELECT LEAST("
                "(SELECT MIN(next_attempt_at) FROM outbox "
                f" WHERE state IN ('pending', 'ambiguous') AND channel = ANY($1::text[]) AND {enabled}), "
                "(SELECT MIN(lease_expires_at) FROM outbox "
                f" WHERE state = 'sending' AND channel = ANY($1::text[]) AND {enabled}))",
                list(channels),
                default_endpoint,
            )
        return due

    async def renew(self, key: RowKey, owner: str, lease_until: float, now: float) -> bool:
        return await self.record(key, owner, {"lease_expires_at": lease_until}, now)

    async def record(self, key: RowKey, owner: str, fields: dict[str, Any], now: float) -> bool:
        values = [json.dumps(v) if k == "result" else v for k, v in fields.items()]
        assignments = ", ".join(f"{name} = ${n}" for n, name in enumerate(fields, start=1))
        n = len(values)
        async with self._connection() as conn:
            status = await conn.execute(
                f"UPDATE outbox SET {assignments}, updated_at = ${n + 1} WHERE message_id = ${n + 2} "
                f"AND channel = ${n + 3} AND state = 'sending' AND lease_owner = ${n + 4}",
                *values,
                now,
                *key,
                owner,
            )
        return affected(status) == 1

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
        async with self._connection() as conn, conn.transaction():
            status = await conn.execute(
                "UPDATE outbox SET state = $1, next_attempt_at = NULL, result = $2, error_code = $3, "
                "last_error = $4, updated_at = $5, lease_owner = NULL, lease_expires_at = NULL "
                "WHERE message_id = $6 AND channel = 'sms' AND state = 'sending' AND lease_owner = $7",
                state,
                json.dumps(sids),
                error_code,
                last_error,
                now,
                message_id,
                owner,
            )
            if affected(status) != 1:
                return False
            payload = await conn.fetchval(
                "SELECT payload FROM outbox WHERE message_id = $1 AND channel = 'webhook' "
                "AND state = 'waiting' FOR UPDATE",
                message_id,
            )
            if payload is not None:
                await conn.execute(
                    "UPDATE outbox SET state = 'pending', body = $1, next_attempt_at = $2, updated_at = $2 "
                    "WHERE message_id = $3 AND channel = 'webhook'",
                    hook_body(json.loads(payload)["data"]),
                    now,
                    message_id,
                )
                await conn.execute(f"NOTIFY {NOTIFY_CHANNEL}")
        return True

    async def release(self, owner: str, keys: Collection[RowKey] | None, now: float) -> int:
        sql = (
            f"UPDATE outbox SET state = {RELEASED_STATE}, next_attempt_at = $1, updated_at = $1, "
            "lease_owner = NULL, lease_expires_at = NULL, "
            "last_error = CASE channel WHEN 'sms' THEN $2 ELSE last_error END "
            "WHERE state = 'sending' AND lease_owner = $3"
        )
        args: list[Any] = [now, INTERRUPTED, owner]
        if keys is not None:
            sql += " AND (message_id, channel) IN (SELECT * FROM unnest($4::text[], $5::text[]))"
            args += [[k[0] for k in keys], [k[1] for k in keys]]
        async with self._connection() as conn, conn.transaction():
            released = affected(await conn.execute(sql, *args))
            if released:
                await conn.execute(f"NOTIFY {NOTIFY_CHANNEL}")
        return released

    async def requeue(self, message_id: str, now: float) -> list[OutboxRow]:
        where = "WHERE message_id = $1 AND state IN ('failed', 'dead')"
        async with self._connection() as conn, conn.transaction():
            records = await conn.fetch(f"{SELECT} {where} FOR UPDATE", message_id)
            await conn.execute(
                f"UPDATE outbox SET state = {RELEASED_STATE}, attempts = 0, next_attempt_at = $2, "
                f"updated_at = $2 {where}",
                message_id,
                now,
            )
            await conn.execute(f"NOTIFY {NOTIFY_CHANNEL}")
        return [OutboxRow.from_db(r) for r in records]

    async def purge(self, settled_before: float, limit: int) -> int:
        async with self._connection() as conn:
            status = await conn.execute(
                "WITH old AS (SELECT message_id, channel FROM outbox "
                "  WHERE state IN ('sent', 'failed', 'dead') AND updated_at < $1 LIMIT $2 "
                "  FOR UPDATE SKIP LOCKED) "
                "DELETE FROM outbox AS o USING old "
                "WHERE o.message_id = old.message_id AND o.channel = old.channel",
                settled_before,
                limit,
            )
        return affected(status)

    async def disable_endpoint(self, url: str, reason: str, now: float) -> bool:
        async with self._connection() as conn:
            status = await conn.execute(
                "INSERT INTO outbox_endpoints (url, disabled_at, reason) VALUES ($1, $2, $3) "
                "ON CONFLICT (url) DO NOTHING",
                url,
                now,
                reason,
            )
        return affected(status) == 1

    async def enable_endpoints(self, url: str | None) -> list[str]:
        async with self._connection() as conn, conn.transaction():
            if url is None:
                records = await conn.fetch("DELETE FROM outbox_endpoints RETURNING url")
            else:
                records = await conn.fetch("DELETE FROM outbox_endpoints WHERE url = $1 RETURNING url", url)
            await conn.execute(f"NOTIFY {NOTIFY_CHANNEL}")
        return sorted(r["url"] for r in records)

    async def disabled_endpoints(self) -> list[DisabledEndpoint]:
        async with self._connection() as conn:
            records = await conn.fetch("SELECT url, disabled_at, reason FROM outbox_endpoints ORDER BY url")
        return [DisabledEndpoint(r["url"], r["disabled_at"], r["reason"]) for r in records]

    async def probe(self) -> None:
        async with self._connection() as conn:
            transaction = conn.transaction()
            await transaction.start()
            try:
                await conn.execute(
                    "INSERT INTO outbox_probe (data) VALUES (decode(repeat('00', $1), 'hex'))", PROBE_BYTES
                )
            finally:
                await transaction.rollback()


def params(count: int) -> str:
    return ", ".join(f"${n}" for n in range(1, count + 1))


async def migrate(conn: Any) -> None:
    """Applies the versions this database lacks, one process at a time (advisory lock)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS outbox_migrations "
            "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        version = await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM outbox_migrations")
        if version > len(MIGRATIONS):
            raise OutboxUnavailable(
                f"its outbox schema is v{version}, newer than this version of the bot reads "
                f"(v{len(MIGRATIONS)}): upgrade the bot"
            )
        for number, statements in enumerate(MIGRATIONS[version:], start=version + 1):
            for statement in statements:
                await conn.execute(statement)
            await conn.execute("INSERT INTO outbox_migrations (version) VALUES ($1)", number)
