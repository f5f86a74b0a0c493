"""The SQL side of the outbox: one interface, two stores that differ only in their SQL.

`SqliteStore` (bot/outbox/sqlite.py) is one file, the embedded default; `PostgresStore`
(bot/outbox/postgres.py, DATABASE_URL) is shared by any number of processes and machines. Each
method is one statement or one transaction and raises OutboxUnavailable when the database cannot
be reached or written; everything above it (bot/outbox/outbox.py, relay.py) is shared.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Sequence
from typing import Any

from bot.outbox.rows import Channel, DisabledEndpoint, NewRow, OutboxCounts, OutboxRow, RowKey, State


class OutboxStore(ABC):
    """The SQL side. Times are epoch seconds from the caller's clock, so tests can drive them.

    `setting` and `target` name the database for operators (DATABASE_PATH and the file, or
    DATABASE_URL without its password). `poll_interval_s`: how often a relay looks for work that
    other processes queued, since it cannot be told.
    """

    setting: str
    target: str

    @property
    def poll_interval_s(self) -> float:
        return 1.0

    @abstractmethod
    async def open(self) -> None:
        """Connect and migrate the schema; raise OutboxUnavailable naming the setting if impossible."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    def subscribe(self, wake: Callable[[], None]) -> None:
        """Call `wake` when another process queues or releases work, if the database can tell."""

    @abstractmethod
    async def insert(self, rows: Sequence[NewRow]) -> None:
        """All rows in one transaction: a message is queued whole or not at all."""

    @abstractmethod
    async def list_rows(self, states: tuple[State, ...] | None, latest: int | None = None) -> list[OutboxRow]:
        """Oldest first; only the `latest` most recently queued ones when given."""

    @abstractmethod
    async def get(self, message_id: str, channel: Channel) -> OutboxRow | None: ...

    @abstractmethod
    async def counts(self) -> OutboxCounts:
        """Rows still on their way and rows that failed, per channel (one indexed query)."""

    @abstractmethod
    async def claim(
        self,
        now: float,
        limit: int,
        channels: tuple[Channel, ...],
        owner: str,
        lease_until: float,
        default_endpoint: str | None = None,
    ) -> list[OutboxRow]:
        """Lease up to `limit` due rows (and `sending` rows whose lease expired) to `owner`.

        A webhook row whose URL is disabled (its `endpoint`, else `default_endpoint`) is left to
        wait. Returns the rows as they were before the claim: a `sending` one was abandoned
        mid-attempt.
        """

    @abstractmethod
    async def next_due_at(
        self, channels: tuple[Channel, ...], default_endpoint: str | None = None
    ) -> float | None:
        """When the next row `claim` would take falls due, or the next lease expires."""

    @abstractmethod
    async def renew(self, key: RowKey, owner: str, lease_until: float, now: float) -> bool:
        """Extend `owner`'s lease; False if it no longer holds the row."""

    @abstractmethod
    async def record(self, key: RowKey, owner: str, fields: dict[str, Any], now: float) -> bool:
        """Write an attempt's result on a row `owner` holds; False if it no longer holds it."""

    @abstractmethod
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
        """Record the SMS outcome and release its waiting webhook (body from its payload data)."""

    @abstractmethod
    async def release(self, owner: str, keys: Collection[RowKey] | None, now: float) -> int:
        """Give back rows `owner` holds (all, or `keys`): SMS become ambiguous, webhooks pending."""

    @abstractmethod
    async def requeue(self, message_id: str, now: float) -> list[OutboxRow]:
        """Failed or dead rows of a message due again with fresh attempts; returns them as they were."""

    @abstractmethod
    async def purge(self, settled_before: float, limit: int) -> int:
        """Delete up to `limit` settled rows last changed before `settled_before`."""

    @abstractmethod
    async def disable_endpoint(self, url: str, reason: str, now: float) -> bool:
        """True when this call disabled it (False: it already was)."""

    @abstractmethod
    async def enable_endpoints(self, url: str | None) -> list[str]:
        """Re-enable one URL (or every one); returns those that were disabled."""

    @abstractmethod
    async def disabled_endpoints(self) -> list[DisabledEndpoint]: ...

    @abstractmethod
    async def probe(self) -> None:
        """A write of a few kilobytes, rolled back: raises OutboxUnavailable while writes fail."""
