"""The durable outbox: product details promised on a call reach the caller and the call center.

A tool writes the message into SQLite (WAL, fsync'd) before it answers the model; a background
`DeliveryWorker` then relays each row, surviving crashes, restarts and flaky peers:

- SMS to the caller through Twilio: readable text with each product's name, price after
  discount and absolute links, split to fit Twilio's 1600-character body, each part ending with
  a short reference ("Ref K7Q2"). Twilio's message creation is not idempotent, so a 5xx or a
  timeout marks the row *ambiguous* and the next attempt first lists the caller's recent
  messages and looks for the reference: found means sent, not found means send. A 429 is retried
  after its Retry-After. Twilio's refusals (21211, 21610, 21614...) are recorded, never retried.
- Webhooks to WEBHOOK_URL, signed the Standard Webhooks way: `webhook-id` is the message id on
  every attempt (receivers de-duplicate on it), `webhook-timestamp` and `webhook-signature` are
  fresh per attempt. The `products.sent` event waits for its SMS to settle so it can report the
  SMS status. Timeouts, connection errors, 3xx (never followed), 408, 429 and 5xx are retried on
  WEBHOOK_RETRY_SCHEDULE_S with jitter (Retry-After honoured when longer); 410 and other 4xx are
  recorded as permanent; an exhausted schedule dead-letters the row with an alert log.

WEBHOOK_SECRET: `whsec_<base64>` is base64-decoded, as every Standard Webhooks library does;
any other string is used as its UTF-8 bytes (verify with `Webhook(secret.encode())`).

A row caught mid-attempt by a crash is resumed on start: an SMS is looked up before any resend,
a webhook is simply re-sent with the same id. Texting disabled (no Twilio credentials or sender)
settles SMS rows as failed; webhooks disabled leaves webhook rows pending until configured.
One worker per database file: two processes relaying the same outbox would double-send.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import logging
import random
import secrets
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx

from bot import __version__
from bot.logs import CallLog, mask_phone
from bot.products import Product, ProductsCollection, absolute_url
from bot.settings import Settings, SettingsError, load_settings
from bot.tools import OutboxUnavailable, SmsOutcome, can_receive_sms
from bot.twilio_rest import (
    TwilioAmbiguousError,
    TwilioPermanentError,
    TwilioRest,
    TwilioRetryableError,
    retry_after_seconds,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SQLITE_BUSY_TIMEOUT_S = 5.0
SMS_MAX_CHARS = 1600
SMS_RETRY_SCHEDULE_S = (2.0, 10.0, 30.0, 120.0, 600.0, 1800.0)
SMS_LOOKUP_MARGIN_S = 3600.0
JITTER_FRACTION = 0.2
RETRY_AFTER_MAX_S = 86400.0
MAX_CONCURRENT_DELIVERIES = 8
ERROR_SNIPPET_BYTES = 300
STOP_GRACE_S = 5.0
DB_ERROR_BACKOFF_S = 5.0
REF_CHARS = 4
ID_ALPHABET = "23456789ABCDEFGHJKMNPQRSTVWXYZ"
ID_CHARS = 24
WHSEC_PREFIX = "whsec_"

Channel = Literal["sms", "webhook"]
State = Literal["waiting", "pending", "sending", "ambiguous", "sent", "failed", "dead"]
OPEN_STATES: tuple[State, ...] = ("waiting", "pending", "sending", "ambiguous", "failed", "dead")
DUE_STATES: tuple[State, ...] = ("pending", "ambiguous")
SETTLED_STATES: tuple[State, ...] = ("sent", "failed", "dead")

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
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
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_attempt_at);
"""
COLUMNS = (
    "message_id, channel, kind, call_sid, recipient, payload, body, state, attempts, "
    "next_attempt_at, created_at, updated_at, last_error, error_code, result"
)
UPDATABLE = frozenset({"body", "state", "attempts", "next_attempt_at", "last_error", "error_code", "result"})

T = TypeVar("T")


# ---------------------------------------------------------------- rows and ids


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One delivery: a message on one channel. `result` holds the Twilio SIDs, one per SMS part."""

    message_id: str
    channel: Channel
    kind: str
    call_sid: str
    recipient: str | None
    payload: dict[str, Any]
    body: str | None
    state: State
    attempts: int
    next_attempt_at: float | None
    created_at: float
    updated_at: float
    last_error: str | None
    error_code: int | None
    result: list[str | None]

    @classmethod
    def from_db(cls, record: sqlite3.Row) -> OutboxRow:
        return cls(
            message_id=record["message_id"],
            channel=record["channel"],
            kind=record["kind"],
            call_sid=record["call_sid"],
            recipient=record["recipient"],
            payload=json.loads(record["payload"]),
            body=record["body"],
            state=record["state"],
            attempts=record["attempts"],
            next_attempt_at=record["next_attempt_at"],
            created_at=record["created_at"],
            updated_at=record["updated_at"],
            last_error=record["last_error"],
            error_code=record["error_code"],
            result=json.loads(record["result"]),
        )


def new_message_id() -> str:
    """'msg_' and 24 unambiguous characters; its first four are the SMS reference."""
    return "msg_" + "".join(secrets.choice(ID_ALPHABET) for _ in range(ID_CHARS))


def sms_reference(message_id: str) -> str:
    return message_id.removeprefix("msg_")[:REF_CHARS]


def iso_utc(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# ---------------------------------------------------------------- the SMS text


@dataclass(frozen=True, slots=True)
class SmsPart:
    """One Twilio message: its body (reference line included) and optional picture URLs."""

    body: str
    media_urls: tuple[str, ...] = ()


def price_line(product: Product) -> str:
    """'$764.99, 15% off' (or just '$899.99' without a discount)."""
    price = f"${product.price_after_discount:,.2f}"
    return f"{price}, {product.discount:g}% off" if product.discount else price


def product_lines(product: Product, media_base_url: str) -> list[str]:
    """A product as short lines: name, price, then each link with a label."""
    lines = [product.name if product.brand in product.name else f"{product.name} ({product.brand})"]
    lines.append(price_line(product))
    pictures = [p for p in (product.profilePic, *product.images) if p]
    for n, picture in enumerate(dict.fromkeys(pictures), start=1):
        lines.append(f"Photo {n}: {absolute_url(picture, media_base_url)}")
    links = (
        ("3D view", product.Link3D),
        ("AR view", product.LinkAR),
        ("Video", product.LinkVideo),
        ("Specs", product.TechnicalSheet),
    )
    lines += [f"{label}: {absolute_url(link, media_base_url)}" for label, link in links if link]
    return lines


def render_sms(
    collection: ProductsCollection,
    *,
    reference: str,
    media_base_url: str,
    include_picture: bool = False,
) -> list[SmsPart]:
    """The caller's text, in as few parts as fit 1600 characters, each ending with its reference.

    Blocks (the intro, then one per product) are packed whole when they fit; a block longer than
    a part is split at line breaks, and a single over-long line is cut.
    """
    reserve = len(f"\n\nRef {reference} (99/99)")
    budget = SMS_MAX_CHARS - reserve
    blocks = [[collection.TextMessage.strip()]] if collection.TextMessage.strip() else []
    products = collection.JsonData.products
    blocks += [product_lines(p, media_base_url) for p in products]
    texts: list[str] = []
    current = ""
    for block in blocks:
        for chunk in _fit_block(block, budget):
            candidate = f"{current}\n\n{chunk}" if current else chunk
            if len(candidate) <= budget:
                current = candidate
            else:
                texts.append(current)
                current = chunk
    if current or not texts:
        texts.append(current)
    total = len(texts)
    parts = []
    for n, text in enumerate(texts, start=1):
        ref_line = sms_ref_line(reference, n, total)
        parts.append(SmsPart(f"{text}\n\n{ref_line}" if text else ref_line))
    if include_picture and products:
        first = products[0]
        picture = first.profilePic or next(iter(first.images), None)
        if picture:
            parts[0] = SmsPart(parts[0].body, (absolute_url(picture, media_base_url),))
    return parts


def sms_ref_line(reference: str, part: int, total: int) -> str:
    return f"Ref {reference}" if total == 1 else f"Ref {reference} ({part}/{total})"


def _fit_block(lines: list[str], budget: int) -> list[str]:
    """A block as one chunk when it fits, else as line groups that each fit."""
    whole = "\n".join(lines)
    if len(whole) <= budget:
        return [whole]
    chunks: list[str] = []
    current = ""
    for raw in lines:
        line = raw[:budget]
        candidate = f"{current}\n{line}" if current else line
        if len(candidate) <= budget:
            current = candidate
        else:
            chunks.append(current)
            current = line
    chunks.append(current)
    return chunks


# ---------------------------------------------------------------- webhooks


def webhook_key(secret: str) -> bytes:
    """The HMAC key: a `whsec_` secret is base64-decoded (as standardwebhooks does), else raw bytes."""
    if secret.startswith(WHSEC_PREFIX):
        return base64.b64decode(secret.removeprefix(WHSEC_PREFIX) + "==")
    return secret.encode()


def sign_webhook(key: bytes, message_id: str, timestamp: int, body: str) -> str:
    """The `webhook-signature` header: 'v1,' + base64(HMAC-SHA256 of 'id.timestamp.body')."""
    mac = hmac.new(key, f"{message_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def event_body(event_type: str, timestamp_s: float, data: dict[str, Any]) -> str:
    """A Standard Webhooks payload, serialized once so every attempt sends the same bytes."""
    event = {"type": event_type, "timestamp": iso_utc(timestamp_s), "data": data}
    return json.dumps(event, separators=(",", ":"))


def products_sent_body(row_payload: dict[str, Any], sms: dict[str, Any], timestamp_s: float) -> str:
    return event_body("products.sent", timestamp_s, {**row_payload, "sms": sms})


def sms_report(
    state: State, error_code: int | None, last_error: str | None, sids: list[str | None]
) -> dict[str, Any]:
    """The SMS outcome as the webhook reports it."""
    if state == "sent":
        return {"status": "sent", "message_sids": [s for s in sids if s]}
    return {"status": "failed", "error": {"code": error_code, "message": last_error or "not sent"}}


# ---------------------------------------------------------------- the outbox


class Outbox:
    """The SQLite outbox. All SQLite work runs on one dedicated thread, never on the event loop.

    `max_size_bytes` caps the database file (SQLite's max_page_count): past it, writes fail with
    "database or disk is full" like a full disk, and `add_*` raise OutboxUnavailable.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        clock: Callable[[], float] = time.time,
        max_size_bytes: int | None = None,
    ) -> None:
        self.path = Path(path)
        self._clock = clock
        self._max_size_bytes = max_size_bytes
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._listeners: list[Callable[[], None]] = []
        self._sms_waiters: dict[str, list[asyncio.Future[SmsOutcome]]] = {}
        self.write_error: str | None = None

    async def open(self) -> Outbox:
        await self._run(self._open)
        return self

    async def close(self) -> None:
        if self._conn is not None:
            await self._run(self._conn.close)
            self._conn = None
        self._executor.shutdown(wait=True)

    async def __aenter__(self) -> Outbox:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Called (on the event loop) after each new message is committed."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    async def add_product_details(self, *, call_sid: str, caller: str, collection: ProductsCollection) -> str:
        """Queue the SMS and the `products.sent` webhook in one transaction; returns the message id."""
        message_id = new_message_id()
        now = self._clock()
        data = {
            "call_sid": call_sid,
            "caller": mask_phone(caller),
            "message_id": message_id,
            "collection": collection.model_dump(mode="json"),
        }
        sms = _new_row(message_id, "sms", "products.sent", call_sid, caller, {"data": data}, now)
        hook = _new_row(message_id, "webhook", "products.sent", call_sid, None, {"data": data}, now)
        await self._insert([sms, {**hook, "state": "waiting", "next_attempt_at": None}])
        return message_id

    async def add_call_completed(self, *, call_sid: str, caller: str, record: dict[str, Any]) -> str:
        """Queue a `call.completed` webhook (transcript, duration, metrics in `record`)."""
        message_id = new_message_id()
        now = self._clock()
        data = {**record, "call_sid": call_sid, "caller": mask_phone(caller), "message_id": message_id}
        try:
            body = event_body("call.completed", now, data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"call record is not JSON-serializable: {exc}") from exc
        row = _new_row(message_id, "webhook", "call.completed", call_sid, None, {"data": data}, now)
        await self._insert([{**row, "body": body}])
        return message_id

    async def list_rows(self, states: Iterable[State] | None = None) -> list[OutboxRow]:
        """Rows, oldest first; all of them when `states` is None."""
        return await self._run(self._list, tuple(states) if states is not None else None)

    async def get(self, message_id: str, channel: Channel) -> OutboxRow | None:
        return await self._run(self._get, message_id, channel)

    async def recover(self, now: float) -> int:
        """Rows left mid-attempt by a crash: SMS become ambiguous (look up first), webhooks pending."""
        return await self._run(self._recover, now)

    async def claim_due(self, now: float, limit: int, channels: Sequence[Channel]) -> list[OutboxRow]:
        """Mark up to `limit` due rows as sending and return them as they were (prior state)."""
        return await self._run(self._claim_due, now, limit, tuple(channels))

    async def next_due_at(self, channels: Sequence[Channel]) -> float | None:
        return await self._run(self._next_due_at, tuple(channels))

    async def update(self, message_id: str, channel: Channel, **fields: Any) -> None:
        await self._run(self._update, message_id, channel, fields)

    async def settle_sms(
        self,
        row: OutboxRow,
        *,
        state: State,
        now: float,
        sids: list[str | None],
        error_code: int | None = None,
        last_error: str | None = None,
    ) -> None:
        """Record the SMS outcome and, in the same transaction, release its webhook with that status."""
        await self._run(self._settle_sms, row, state, now, sids, error_code, last_error)
        outcome = SmsOutcome(state, error_code, last_error)
        for waiter in self._sms_waiters.pop(row.message_id, []):
            if not waiter.done():
                waiter.set_result(outcome)

    async def sms_outcome(self, message_id: str, timeout_s: float) -> SmsOutcome | None:
        """The SMS's first settled outcome (sent, failed, dead), or None if it takes longer.

        Lets a tool tell the caller the truth ("I couldn't text that number") while they are
        still on the line, without holding the call for a slow Twilio.
        """
        waiter: asyncio.Future[SmsOutcome] = asyncio.get_running_loop().create_future()
        self._sms_waiters.setdefault(message_id, []).append(waiter)
        try:
            row = await self.get(message_id, "sms")
            if row is not None and row.state in SETTLED_STATES:
                return SmsOutcome(row.state, row.error_code, row.last_error)
            return await asyncio.wait_for(asyncio.shield(waiter), timeout_s)
        except TimeoutError:
            return None
        finally:
            waiters = self._sms_waiters.get(message_id, [])
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self._sms_waiters.pop(message_id, None)

    # -- below: runs on the SQLite thread

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, partial(fn, *args))

    async def _insert(self, rows: list[dict[str, Any]]) -> None:
        try:
            await self._run(self._insert_rows, rows)
        except (sqlite3.Error, RuntimeError) as exc:
            self.write_error = str(exc)
            log.error("outbox write failed: nothing queued", extra={"reason": str(exc)})
            raise OutboxUnavailable(str(exc)) from exc
        self.write_error = None
        for listener in list(self._listeners):
            listener()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            self.path, timeout=SQLITE_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            conn.close()
            raise RuntimeError(
                f"{self.path} has outbox schema v{version}; this version reads v{SCHEMA_VERSION}"
            )
        conn.executescript(SCHEMA)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        if self._max_size_bytes is not None:
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {max(1, self._max_size_bytes // page_size)}")
        self._conn = conn

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("the outbox is not open")
        return self._conn

    def _transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
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

    def _insert_rows(self, rows: list[dict[str, Any]]) -> None:
        names = [c.strip() for c in COLUMNS.split(",")]
        sql = f"INSERT INTO outbox ({COLUMNS}) VALUES ({', '.join('?' * len(names))})"

        def work(conn: sqlite3.Connection) -> None:
            conn.executemany(sql, [[row[name] for name in names] for row in rows])

        self._transaction(work)

    def _list(self, states: tuple[State, ...] | None) -> list[OutboxRow]:
        sql = f"SELECT {COLUMNS} FROM outbox"
        params: list[Any] = []
        if states is not None:
            sql += f" WHERE state IN ({', '.join('?' * len(states))})"
            params += states
        sql += " ORDER BY created_at, message_id, channel"
        return [OutboxRow.from_db(r) for r in self._db().execute(sql, params)]

    def _get(self, message_id: str, channel: Channel) -> OutboxRow | None:
        record = (
            self._db()
            .execute(
                f"SELECT {COLUMNS} FROM outbox WHERE message_id = ? AND channel = ?", (message_id, channel)
            )
            .fetchone()
        )
        return OutboxRow.from_db(record) if record else None

    def _recover(self, now: float) -> int:
        def work(conn: sqlite3.Connection) -> int:
            sms = conn.execute(
                "UPDATE outbox SET state = 'ambiguous', next_attempt_at = ?, updated_at = ?, "
                "last_error = 'interrupted mid-send: look up before resending' "
                "WHERE state = 'sending' AND channel = 'sms'",
                (now, now),
            ).rowcount
            hooks = conn.execute(
                "UPDATE outbox SET state = 'pending', next_attempt_at = ?, updated_at = ? "
                "WHERE state = 'sending' AND channel = 'webhook'",
                (now, now),
            ).rowcount
            return int(sms + hooks)

        return self._transaction(work)

    def _claim_due(self, now: float, limit: int, channels: tuple[Channel, ...]) -> list[OutboxRow]:
        if not channels or limit <= 0:
            return []

        def work(conn: sqlite3.Connection) -> list[OutboxRow]:
            records = conn.execute(
                f"SELECT {COLUMNS} FROM outbox WHERE state IN ('pending', 'ambiguous') "
                f"AND next_attempt_at <= ? AND channel IN ({', '.join('?' * len(channels))}) "
                "ORDER BY next_attempt_at LIMIT ?",
                (now, *channels, limit),
            ).fetchall()
            rows = [OutboxRow.from_db(r) for r in records]
            conn.executemany(
                "UPDATE outbox SET state = 'sending', attempts = attempts + 1, updated_at = ? "
                "WHERE message_id = ? AND channel = ?",
                [(now, row.message_id, row.channel) for row in rows],
            )
            return rows

        return self._transaction(work)

    def _next_due_at(self, channels: tuple[Channel, ...]) -> float | None:
        if not channels:
            return None
        record = (
            self._db()
            .execute(
                "SELECT MIN(next_attempt_at) FROM outbox WHERE state IN ('pending', 'ambiguous') "
                f"AND channel IN ({', '.join('?' * len(channels))})",
                channels,
            )
            .fetchone()
        )
        return None if record[0] is None else float(record[0])

    def _update(self, message_id: str, channel: Channel, fields: dict[str, Any]) -> None:
        unknown = set(fields) - UPDATABLE
        if unknown:
            raise ValueError(f"not updatable: {sorted(unknown)}")
        values = {k: json.dumps(v) if k == "result" else v for k, v in fields.items()}
        assignments = ", ".join(f"{name} = ?" for name in values)
        self._db().execute(
            f"UPDATE outbox SET {assignments}, updated_at = ? WHERE message_id = ? AND channel = ?",
            (*values.values(), self._clock(), message_id, channel),
        )

    def _settle_sms(
        self,
        row: OutboxRow,
        state: State,
        now: float,
        sids: list[str | None],
        error_code: int | None,
        last_error: str | None,
    ) -> None:
        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE outbox SET state = ?, next_attempt_at = NULL, result = ?, error_code = ?, "
                "last_error = ?, updated_at = ? WHERE message_id = ? AND channel = 'sms'",
                (state, json.dumps(sids), error_code, last_error, now, row.message_id),
            )
            hook = conn.execute(
                "SELECT payload FROM outbox WHERE message_id = ? AND channel = 'webhook' "
                "AND state = 'waiting'",
                (row.message_id,),
            ).fetchone()
            if hook is None:
                return
            data = json.loads(hook["payload"])["data"]
            body = products_sent_body(data, sms_report(state, error_code, last_error, sids), now)
            conn.execute(
                "UPDATE outbox SET state = 'pending', body = ?, next_attempt_at = ?, updated_at = ? "
                "WHERE message_id = ? AND channel = 'webhook'",
                (body, now, now, row.message_id),
            )

        self._transaction(work)


def _new_row(
    message_id: str,
    channel: Channel,
    kind: str,
    call_sid: str,
    recipient: str | None,
    payload: dict[str, Any],
    now: float,
) -> dict[str, Any]:
    return {
        "message_id": message_id,
        "channel": channel,
        "kind": kind,
        "call_sid": call_sid,
        "recipient": recipient,
        "payload": json.dumps(payload, separators=(",", ":")),
        "body": None,
        "state": "pending",
        "attempts": 0,
        "next_attempt_at": now,
        "created_at": now,
        "updated_at": now,
        "last_error": None,
        "error_code": None,
        "result": "[]",
    }


# ---------------------------------------------------------------- the worker


@dataclass(frozen=True, slots=True)
class WebhookOutcome:
    """One webhook attempt's result: delivered, retry (maybe after `retry_after_s`), or permanent."""

    verdict: Literal["delivered", "retry", "permanent"]
    reason: str
    status: int | None = None
    retry_after_s: float | None = None


def classify_webhook_response(status: int, headers: httpx.Headers, snippet: str) -> WebhookOutcome:
    """What a receiver's HTTP answer means for the delivery."""
    if 200 <= status < 300:
        return WebhookOutcome("delivered", f"HTTP {status}", status)
    if 300 <= status < 400:
        target = headers.get("location", "?")
        return WebhookOutcome("retry", f"HTTP {status} redirect to {target} (not followed)", status)
    if status in (408, 429) or status >= 500:
        wait_s = retry_after_seconds(headers.get("retry-after"))
        return WebhookOutcome("retry", f"HTTP {status} {snippet}".strip(), status, wait_s)
    if status == 410:
        return WebhookOutcome("permanent", "HTTP 410 Gone: the receiver retired this endpoint", status)
    return WebhookOutcome("permanent", f"HTTP {status} {snippet}".strip(), status)


def backoff_delay(
    schedule: Sequence[float], failures: int, rng: random.Random, retry_after_s: float | None
) -> float | None:
    """Seconds before the next attempt after `failures` failed ones; None when the schedule is spent."""
    if failures > len(schedule):
        return None
    delay = schedule[failures - 1] * rng.uniform(1 - JITTER_FRACTION, 1 + JITTER_FRACTION)
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, RETRY_AFTER_MAX_S))
    return delay


@dataclass(slots=True)
class DeliveryWorker:
    """Relays due outbox rows: SMS through Twilio, webhooks to WEBHOOK_URL, at most N at a time.

    `clock` (epoch seconds) and `sleep` are injectable so tests step through hours of retries
    without waiting; `relay_due()` runs one round, `start()` runs rounds whenever rows fall due
    or are added.
    """

    outbox: Outbox
    settings: Settings
    http: httpx.AsyncClient
    twilio: TwilioRest | None
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    rng: random.Random = field(default_factory=random.Random)
    max_concurrent: int = MAX_CONCURRENT_DELIVERIES
    _wake: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _loop_task: asyncio.Task[None] | None = field(default=None, init=False)
    _inflight: set[asyncio.Task[None]] = field(default_factory=set, init=False)

    @property
    def channels(self) -> tuple[Channel, ...]:
        """Webhook rows wait (pending, not lost) while no webhook URL and secret are configured."""
        return ("sms", "webhook") if self.settings.webhook_enabled else ("sms",)

    async def start(self) -> None:
        recovered = await self.outbox.recover(self.clock())
        if recovered:
            log.warning("resuming deliveries interrupted by a restart", extra={"rows": recovered})
        if not self.settings.webhook_enabled:
            log.warning("webhooks are off: webhook rows stay pending until WEBHOOK_URL/SECRET are set")
        self.outbox.add_listener(self._wake.set)
        self._loop_task = asyncio.create_task(self._run(), name="outbox-relay")

    async def stop(self) -> None:
        """Stop taking rows; give in-flight attempts a moment, then cancel (they resume on start)."""
        self.outbox.remove_listener(self._wake.set)
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        if self._inflight:
            _, pending = await asyncio.wait(set(self._inflight), timeout=STOP_GRACE_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def relay_due(self) -> int:
        """One round: relay every row due now (up to the concurrency cap), wait, return how many."""
        rows = await self.outbox.claim_due(self.clock(), self.max_concurrent, self.channels)
        await asyncio.gather(*(self._relay(row) for row in rows))
        return len(rows)

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                free = self.max_concurrent - len(self._inflight)
                rows = await self.outbox.claim_due(self.clock(), free, self.channels)
                for row in rows:
                    task = asyncio.create_task(self._relay(row))
                    self._inflight.add(task)
                    task.add_done_callback(self._finished)
                next_at = await self.outbox.next_due_at(self.channels)
            except (sqlite3.Error, RuntimeError) as exc:
                log.error("outbox unreadable; retrying", extra={"reason": str(exc)})
                await self.sleep(DB_ERROR_BACKOFF_S)
                continue
            if len(self._inflight) >= self.max_concurrent or next_at is None:
                await self._wake.wait()
                continue
            delay = next_at - self.clock()
            if delay > 0:
                await self._wait_for_wake(delay)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._wake.set()

    async def _wait_for_wake(self, delay: float) -> None:
        waiter = asyncio.ensure_future(self._wake.wait())
        sleeper = asyncio.ensure_future(self.sleep(delay))
        try:
            await asyncio.wait({waiter, sleeper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            sleeper.cancel()

    async def _relay(self, row: OutboxRow) -> None:
        call_log = CallLog(log, call_sid=row.call_sid, message_id=row.message_id, channel=row.channel)
        try:
            if row.channel == "sms":
                await self._relay_sms(row, call_log)
            else:
                await self._relay_webhook(row, call_log)
        except Exception:
            call_log.exception("delivery attempt crashed; the row resumes after a restart")

    # -- SMS

    async def _relay_sms(self, row: OutboxRow, call_log: CallLog) -> None:
        if self.twilio is None or not self.twilio.from_number:
            await self._settle_sms(row, call_log, "failed", [], None, "texting is not configured")
            return
        if not row.recipient or not can_receive_sms(row.recipient):
            await self._settle_sms(row, call_log, "failed", [], None, "the caller's number cannot get texts")
            return
        parts = self._sms_parts(row)
        if row.body is None:
            await self.outbox.update(
                row.message_id, "sms", body=_parts_json(parts), result=[None] * len(parts)
            )
        sids: list[str | None] = list(row.result) or [None] * len(parts)
        reference = sms_reference(row.message_id)
        if row.state == "ambiguous":
            since = datetime.fromtimestamp(row.created_at - SMS_LOOKUP_MARGIN_S, UTC)
            try:
                recent = await self.twilio.recent_messages(row.recipient, since)
            except TwilioPermanentError as exc:
                await self._settle_sms(
                    row, call_log, "failed", sids, exc.code, f"lookup refused: {exc.message}"
                )
                return
            except (TwilioRetryableError, TwilioAmbiguousError) as exc:
                await self._retry_sms(row, call_log, "ambiguous", f"lookup failed: {exc}", None, sids)
                return
            for n, sid in enumerate(sids):
                ref_line = sms_ref_line(reference, n + 1, len(parts))
                match = next((m for m in recent if ref_line in m.body), None) if sid is None else None
                if match is not None:
                    sids[n] = match.sid
                    call_log.info("ambiguous SMS found already sent", extra={"sid": match.sid, "part": n + 1})
            await self.outbox.update(row.message_id, "sms", result=sids)
        for n, part in enumerate(parts):
            if sids[n] is not None:
                continue
            try:
                sids[n] = await self.twilio.send_sms(row.recipient, part.body, part.media_urls)
            except TwilioRetryableError as exc:
                await self._retry_sms(row, call_log, "pending", str(exc), exc.retry_after_s, sids)
                return
            except TwilioAmbiguousError as exc:
                await self._retry_sms(row, call_log, "ambiguous", str(exc), None, sids)
                return
            except TwilioPermanentError as exc:
                await self._settle_sms(row, call_log, "failed", sids, exc.code, exc.message)
                return
            await self.outbox.update(row.message_id, "sms", result=sids)
        await self._settle_sms(row, call_log, "sent", sids, None, None)

    def _sms_parts(self, row: OutboxRow) -> list[SmsPart]:
        if row.body is not None:
            return [SmsPart(p["body"], tuple(p["media_urls"])) for p in json.loads(row.body)]
        collection = ProductsCollection.model_validate(row.payload["data"]["collection"])
        return render_sms(
            collection,
            reference=sms_reference(row.message_id),
            media_base_url=self.settings.media_base_url,
            include_picture=self.settings.sms_include_picture,
        )

    async def _retry_sms(
        self,
        row: OutboxRow,
        call_log: CallLog,
        state: State,
        reason: str,
        retry_after_s: float | None,
        sids: list[str | None],
    ) -> None:
        delay = backoff_delay(SMS_RETRY_SCHEDULE_S, row.attempts + 1, self.rng, retry_after_s)
        if delay is None:
            give_up = f"gave up after {row.attempts + 1} attempts: {reason}"
            call_log.error("SMS dead-lettered", extra={"alert": True, "reason": give_up})
            await self._settle_sms(row, call_log, "dead", sids, None, give_up)
            return
        call_log.warning(
            "SMS attempt failed; will retry", extra={"reason": reason, "retry_in_s": round(delay, 1)}
        )
        await self.outbox.update(
            row.message_id,
            "sms",
            state=state,
            next_attempt_at=self.clock() + delay,
            last_error=reason,
            result=sids,
        )

    async def _settle_sms(
        self,
        row: OutboxRow,
        call_log: CallLog,
        state: State,
        sids: list[str | None],
        error_code: int | None,
        reason: str | None,
    ) -> None:
        await self.outbox.settle_sms(
            row, state=state, now=self.clock(), sids=sids, error_code=error_code, last_error=reason
        )
        to = mask_phone(row.recipient)
        if state == "sent":
            call_log.info("SMS sent", extra={"to": to, "parts": len(sids)})
        else:
            call_log.warning("SMS not sent", extra={"to": to, "code": error_code, "reason": reason})

    # -- webhooks

    async def _relay_webhook(self, row: OutboxRow, call_log: CallLog) -> None:
        url, secret = self.settings.webhook_url, self.settings.webhook_secret
        if not url or not secret or row.body is None:
            raise RuntimeError("a webhook row was claimed without a body or a configured endpoint")
        outcome = await self._post_webhook(url, webhook_key(secret), row.message_id, row.body)
        if outcome.verdict == "delivered":
            await self.outbox.update(
                row.message_id,
                "webhook",
                state="sent",
                next_attempt_at=None,
                last_error=None,
                error_code=None,
            )
            call_log.info("webhook delivered", extra={"status": outcome.status, "attempt": row.attempts + 1})
            return
        if outcome.verdict == "permanent":
            await self.outbox.update(
                row.message_id,
                "webhook",
                state="failed",
                next_attempt_at=None,
                last_error=outcome.reason,
                error_code=outcome.status,
            )
            if outcome.status == 410:
                call_log.error(
                    "webhook endpoint answered 410 Gone: event recorded as undeliverable; fix WEBHOOK_URL",
                    extra={"alert": True, "event": row.kind},
                )
            else:
                call_log.error("webhook refused", extra={"reason": outcome.reason, "event": row.kind})
            return
        delay = backoff_delay(
            self.settings.webhook_retry_schedule_s, row.attempts + 1, self.rng, outcome.retry_after_s
        )
        if delay is None:
            reason = f"gave up after {row.attempts + 1} attempts: {outcome.reason}"
            await self.outbox.update(
                row.message_id,
                "webhook",
                state="dead",
                next_attempt_at=None,
                last_error=reason,
                error_code=outcome.status,
            )
            call_log.error(
                "webhook dead-lettered", extra={"alert": True, "reason": reason, "event": row.kind}
            )
            return
        await self.outbox.update(
            row.message_id,
            "webhook",
            state="pending",
            next_attempt_at=self.clock() + delay,
            last_error=outcome.reason,
            error_code=outcome.status,
        )
        call_log.warning(
            "webhook attempt failed; will retry",
            extra={"reason": outcome.reason, "retry_in_s": round(delay, 1)},
        )

    async def _post_webhook(self, url: str, key: bytes, message_id: str, body: str) -> WebhookOutcome:
        timestamp = int(self.clock())
        headers = {
            "content-type": "application/json",
            "user-agent": f"voicebot-webhooks/{__version__}",
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign_webhook(key, message_id, timestamp, body),
        }
        timeout_s = self.settings.webhook_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                async with self.http.stream(
                    "POST",
                    url,
                    content=body.encode(),
                    headers=headers,
                    timeout=httpx.Timeout(timeout_s),
                    follow_redirects=False,
                ) as response:
                    snippet = await _read_snippet(response)
        except (TimeoutError, httpx.TimeoutException):
            return WebhookOutcome("retry", f"no answer within {timeout_s:g} s")
        except httpx.HTTPError as exc:
            return WebhookOutcome("retry", f"connection failed: {type(exc).__name__} {exc}".strip())
        return classify_webhook_response(response.status_code, response.headers, snippet)


async def _read_snippet(response: httpx.Response) -> str:
    """The start of a receiver's answer, for the error reason; the rest is not read."""
    data = b""
    async for chunk in response.aiter_bytes():
        data += chunk
        if len(data) >= ERROR_SNIPPET_BYTES:
            break
    return " ".join(data[:ERROR_SNIPPET_BYTES].decode("utf-8", errors="replace").split())


def _parts_json(parts: list[SmsPart]) -> str:
    return json.dumps([{"body": p.body, "media_urls": list(p.media_urls)} for p in parts])


@asynccontextmanager
async def running_delivery(
    settings: Settings, http: httpx.AsyncClient, *, twilio: TwilioRest | None = None
) -> AsyncIterator[Outbox]:
    """Open the outbox at DATABASE_PATH and relay it until the block exits (the app's lifespan)."""
    outbox = await Outbox(settings.database_path).open()
    worker = DeliveryWorker(outbox, settings, http, twilio or TwilioRest.from_settings(settings, http))
    await worker.start()
    try:
        yield outbox
    finally:
        await worker.stop()
        await outbox.close()


# ---------------------------------------------------------------- python -m bot outbox


def format_rows(rows: Sequence[OutboxRow]) -> str:
    """An operator's table: one line per delivery, phone numbers masked."""
    header = ("id", "kind", "channel", "to", "state", "tries", "next attempt (UTC)", "last error")
    lines = [header]
    for row in rows:
        lines.append(
            (
                row.message_id,
                row.kind,
                row.channel,
                mask_phone(row.recipient) if row.recipient else "-",
                row.state,
                str(row.attempts),
                iso_utc(row.next_attempt_at) if row.next_attempt_at is not None else "-",
                (f"[{row.error_code}] " if row.error_code else "") + (row.last_error or ""),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line[:-1], widths, strict=True)) + "  " + line[-1]
        for line in lines
    )


def main(argv: list[str]) -> int:
    """`python -m bot outbox [--all] [--db PATH]`: list deliveries not yet sent (or all)."""
    parser = argparse.ArgumentParser(prog="python -m bot outbox", description=main.__doc__)
    parser.add_argument("--all", action="store_true", help="include sent rows")
    parser.add_argument("--db", type=Path, default=None, help="default: DATABASE_PATH")
    args = parser.parse_args(argv)
    path: Path | None = args.db
    if path is None:
        try:
            path = load_settings().database_path
        except SettingsError as exc:
            print(exc, file=sys.stderr)
            return 2
    if not path.exists():
        print(f"no outbox at {path}: nothing has been queued yet")
        return 0

    async def read() -> list[OutboxRow]:
        async with Outbox(path) as outbox:
            return await outbox.list_rows(None if args.all else OPEN_STATES)

    rows = asyncio.run(read())
    if not rows:
        print(f"nothing pending or failed in {path}")
        return 0
    print(format_rows(rows))
    return 0
