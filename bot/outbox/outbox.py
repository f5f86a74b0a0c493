"""The outbox's front door: what tools, the bridge and the relay ask of it, over either store.

`Outbox` builds rows, tracks whether the database can be written right now (for /healthz),
wakes the local relay, and lets a tool wait for its SMS. The SQL lives in the store.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from typing import Any, TypeVar

from bot.logs import mask_phone
from bot.outbox.messages import SmsStyle, event_body, parts_json
from bot.outbox.rows import (
    SETTLED_STATES,
    UPDATABLE,
    Channel,
    DisabledEndpoint,
    NewRow,
    OutboxCounts,
    OutboxRow,
    RowKey,
    State,
    new_message_id,
)
from bot.outbox.sqlite import SqliteStore
from bot.outbox.store import OutboxStore
from bot.products import ProductsCollection
from bot.settings import DEFAULT_MEDIA_BASE_URL, Settings
from bot.stores import Destination
from bot.tools import OutboxUnavailable, SmsOutcome

log = logging.getLogger(__name__)

DEFAULT_SMS_STYLE = SmsStyle(DEFAULT_MEDIA_BASE_URL)
# A tool waiting for its SMS re-reads the row this often: another process's relay may settle it.
SMS_OUTCOME_POLL_S = 0.25

T = TypeVar("T")


class Outbox:
    """The durable outbox of product details and call records. See the package docstring.

    Each message goes where its `Destination` says (its store's texting number and call
    center); without one, where the deployment's settings say. `webhooks`: whether those
    settings have a call center; when a destination has none, no webhook row is queued (it would
    pile up unsent), only the caller's SMS. The SMS text is written in `sms_style` and the
    destination's language when the message is queued, so every attempt sends the same text.
    """

    def __init__(
        self,
        store: OutboxStore,
        *,
        clock: Callable[[], float] = time.time,
        webhooks: bool = True,
        sms_style: SmsStyle = DEFAULT_SMS_STYLE,
    ) -> None:
        self.store = store
        self.webhooks = webhooks
        self.sms_style = sms_style
        self._clock = clock
        self._listeners: list[Callable[[], None]] = []
        self._sms_waiters: dict[str, list[asyncio.Future[SmsOutcome]]] = {}
        self.problem: str | None = None
        self.disabled_webhooks: list[DisabledEndpoint] = []

    async def open(self) -> Outbox:
        await self.store.open()
        self.store.subscribe(self._notify)
        return self

    async def close(self) -> None:
        await self.store.close()

    async def __aenter__(self) -> Outbox:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Called (on the event loop) when work is queued here or, where the store can tell, elsewhere."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _notify(self) -> None:
        for listener in list(self._listeners):
            listener()

    def problems(self) -> dict[str, str]:
        """What is wrong right now, for /healthz."""
        found: dict[str, str] = {}
        if self.problem:
            found["outbox"] = self.problem
        if self.disabled_webhooks:
            held = "; ".join(f"{endpoint.url}: {endpoint.reason}" for endpoint in self.disabled_webhooks)
            found["webhooks"] = f"{held}; re-enable with `python -m bot outbox enable-webhooks`"
        return found

    # -- queueing (the tools and the bridge)

    def _destination(self, destination: Destination | None) -> Destination:
        return destination if destination is not None else Destination(webhooks=self.webhooks)

    async def add_product_details(
        self,
        *,
        call_sid: str,
        caller: str,
        collection: ProductsCollection,
        destination: Destination | None = None,
    ) -> str:
        """Queue the SMS (and the `products.sent` webhook) in one transaction; returns the message id."""
        to = self._destination(destination)
        message_id = new_message_id()
        now = self._clock()
        data = {
            "call_sid": call_sid,
            "caller": mask_phone(caller),
            "message_id": message_id,
            "collection": collection.model_dump(mode="json"),
        }
        payload = json.dumps({"data": data}, separators=(",", ":"))
        text = parts_json(self.sms_style.render(message_id, collection, to.sms))
        rows = [
            NewRow(
                message_id, "sms", "products.sent", call_sid, caller, payload, text, "pending", now,
                now, store_id=to.store_id, sender=to.sms_from,
            )
        ]  # fmt: skip
        if to.webhooks:
            hook = NewRow(
                message_id, "webhook", "products.sent", call_sid, None, payload, None, "waiting",
                None, now, store_id=to.store_id, endpoint=to.webhook_url,
            )  # fmt: skip
            rows.append(hook)
        await self._insert(rows)
        return message_id

    async def add_call_completed(
        self,
        *,
        call_sid: str,
        caller: str,
        record: dict[str, Any],
        destination: Destination | None = None,
    ) -> str | None:
        """Queue a `call.completed` webhook (transcript, duration, metrics); None when webhooks are off."""
        to = self._destination(destination)
        if not to.webhooks:
            return None
        message_id = new_message_id()
        now = self._clock()
        data = {**record, "call_sid": call_sid, "caller": mask_phone(caller), "message_id": message_id}
        try:
            body = event_body("call.completed", now, data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"call record is not JSON-serializable: {exc}") from exc
        payload = json.dumps({"data": data}, separators=(",", ":"))
        await self._insert(
            [
                NewRow(
                    message_id,
                    "webhook",
                    "call.completed",
                    call_sid,
                    None,
                    payload,
                    body,
                    "pending",
                    now,
                    now,
                    store_id=to.store_id,
                    endpoint=to.webhook_url,
                )
            ]
        )
        return message_id

    async def _insert(self, rows: list[NewRow]) -> None:
        try:
            await self._write(self.store.insert(rows), proves_room=True)
        except OutboxUnavailable as exc:
            log.error("outbox write failed: nothing queued", extra={"reason": str(exc)})
            raise
        self._notify()

    async def sms_outcome(self, message_id: str, timeout_s: float) -> SmsOutcome | None:
        """The SMS's first settled outcome (sent, failed, dead), or None if it takes longer.

        Lets a tool tell the caller the truth ("I couldn't text that number") while they are
        still on the line, without holding the call for a slow Twilio. The relay of this process
        answers at once; another process's is seen by re-reading the row.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        waiter: asyncio.Future[SmsOutcome] = loop.create_future()
        self._sms_waiters.setdefault(message_id, []).append(waiter)
        try:
            while True:
                try:
                    row = await self.store.get(message_id, "sms")
                except OutboxUnavailable:
                    row = None
                if row is not None and row.state in SETTLED_STATES:
                    return SmsOutcome(row.state, row.error_code, row.last_error)
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return None
                try:
                    return await asyncio.wait_for(asyncio.shield(waiter), min(remaining, SMS_OUTCOME_POLL_S))
                except TimeoutError:
                    continue
        finally:
            waiters = self._sms_waiters.get(message_id, [])
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self._sms_waiters.pop(message_id, None)

    # -- reading (operators and tests)

    async def list_rows(
        self, states: Iterable[State] | None = None, latest: int | None = None
    ) -> list[OutboxRow]:
        """Rows, oldest first; all of them when `states` is None; the `latest` queued when given."""
        return await self._read(self.store.list_rows(tuple(states) if states is not None else None, latest))

    async def get(self, message_id: str, channel: Channel) -> OutboxRow | None:
        return await self._read(self.store.get(message_id, channel))

    async def counts(self) -> OutboxCounts:
        return await self._read(self.store.counts())

    async def disabled_endpoints(self) -> list[DisabledEndpoint]:
        return await self._read(self.store.disabled_endpoints())

    # -- relaying (the relay)

    async def claim(
        self,
        now: float,
        limit: int,
        channels: Sequence[Channel],
        owner: str,
        lease_until: float,
        default_endpoint: str | None = None,
    ) -> list[OutboxRow]:
        if not channels or limit <= 0:
            return []
        return await self._write(
            self.store.claim(now, limit, tuple(channels), owner, lease_until, default_endpoint)
        )

    async def next_due_at(
        self, channels: Sequence[Channel], default_endpoint: str | None = None
    ) -> float | None:
        if not channels:
            return None
        return await self._read(self.store.next_due_at(tuple(channels), default_endpoint))

    async def renew(self, key: RowKey, owner: str, lease_until: float) -> bool:
        return await self._write(self.store.renew(key, owner, lease_until, self._clock()))

    async def record(self, key: RowKey, owner: str, **fields: Any) -> bool:
        """Write fields on a row `owner` holds; a settled or re-queued row is no longer leased."""
        unknown = set(fields) - UPDATABLE
        if unknown:
            raise ValueError(f"not updatable: {sorted(unknown)}")
        if fields.get("state", "sending") != "sending":
            fields.update(lease_owner=None, lease_expires_at=None)
        return await self._write(self.store.record(key, owner, fields, self._clock()))

    async def settle_sms(
        self,
        message_id: str,
        owner: str,
        *,
        state: State,
        sids: list[str | None],
        error_code: int | None = None,
        last_error: str | None = None,
        hook_body: Callable[[dict[str, Any]], str],
    ) -> bool:
        """Record the SMS outcome and, in the same transaction, release its webhook with that status."""
        settled = await self._write(
            self.store.settle_sms(
                message_id, owner, state, sids, error_code, last_error, self._clock(), hook_body
            )
        )
        if settled:
            outcome = SmsOutcome(state, error_code, last_error)
            for waiter in self._sms_waiters.pop(message_id, []):
                if not waiter.done():
                    waiter.set_result(outcome)
        return settled

    async def release(self, owner: str, keys: Collection[RowKey] | None = None) -> int:
        return await self._write(self.store.release(owner, keys, self._clock()))

    async def requeue(self, message_id: str) -> list[OutboxRow]:
        """Failed or dead rows of a message due again, the local relay woken; returns them as they were."""
        requeued = await self._write(self.store.requeue(message_id, self._clock()))
        if requeued:
            self._notify()
        return requeued

    async def purge(self, settled_before: float, limit: int) -> int:
        return await self._write(self.store.purge(settled_before, limit))

    async def disable_endpoint(self, url: str, reason: str) -> bool:
        return await self._write(self.store.disable_endpoint(url, reason, self._clock()))

    async def enable_endpoints(self, url: str | None) -> list[str]:
        return await self._write(self.store.enable_endpoints(url))

    async def probe(self) -> None:
        await self._write(self.store.probe(), proves_room=True)

    # -- whether the database works right now

    async def _write(self, operation: Awaitable[T], *, proves_room: bool = False) -> T:
        """A write that fails says why the outbox is unusable.

        Only a write the size of a message (an insert, the probe) proves it usable again: on a
        nearly full disk, small in-place updates still succeed while a message would not fit.
        """
        try:
            result = await operation
        except OutboxUnavailable as exc:
            self.problem = str(exc)
            raise
        if proves_room:
            self.problem = None
        return result

    async def _read(self, operation: Awaitable[T]) -> T:
        try:
            return await operation
        except OutboxUnavailable as exc:
            self.problem = str(exc)
            raise


def open_store(settings: Settings, *, max_size_bytes: int | None = None) -> OutboxStore:
    """PostgreSQL when DATABASE_URL is set, else the SQLite file at DATABASE_PATH (not yet opened)."""
    if settings.database_url:
        # Imported here: asyncpg is only needed (and only installed) where PostgreSQL is used.
        from bot.outbox.postgres import PostgresStore

        return PostgresStore(settings.database_url)
    return SqliteStore(settings.database_path, max_size_bytes=max_size_bytes)


async def open_outbox(settings: Settings, *, clock: Callable[[], float] = time.time) -> Outbox:
    """The configured outbox, connected and migrated; OutboxUnavailable names the setting if not."""
    style = SmsStyle(settings.media_base_url, settings.sms_include_picture)
    outbox = Outbox(open_store(settings), clock=clock, webhooks=settings.webhook_enabled, sms_style=style)
    return await outbox.open()
