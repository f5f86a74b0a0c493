"""The outbox's rows: one delivery of one message on one channel, and the states it moves through.

    pending --claim--> sending --sent / failed / dead
       ^                  |  retry later: pending; Twilio may have sent it: ambiguous
       |                  v
    ambiguous <--- a lease that expired (its relay died) or was released mid-attempt

`waiting` is a `products.sent` webhook held until its SMS settles, so it can report the SMS
status. A `sending` row is leased: `lease_owner` is the relay working on it and nobody else
touches it before `lease_expires_at`.

A row names its store (`store_id`), the number its SMS goes from (`sender`) and the URL its
webhook goes to (`endpoint`), so a store's messages reach only its own call center. None in any
of them means the deployment's own setting, read at delivery: the default store,
TWILIO_FROM_NUMBER, WEBHOOK_URL. No secret is ever stored: the relay asks for the store's.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any, Literal, Protocol

ID_ALPHABET = "23456789ABCDEFGHJKMNPQRSTVWXYZ"
ID_CHARS = 24

Channel = Literal["sms", "webhook"]
State = Literal["waiting", "pending", "sending", "ambiguous", "sent", "failed", "dead"]
RowKey = tuple[str, Channel]
OPEN_STATES: tuple[State, ...] = ("waiting", "pending", "sending", "ambiguous", "failed", "dead")
SETTLED_STATES: tuple[State, ...] = ("sent", "failed", "dead")
RETRYABLE_STATES: tuple[State, ...] = ("failed", "dead")
# Not delivered yet, and still on its way: what an operator watches grow when a peer is down.
UNDELIVERED_STATES: tuple[State, ...] = ("waiting", "pending", "sending", "ambiguous")
CHANNELS: tuple[Channel, ...] = ("sms", "webhook")
# The statement both stores run for `OutboxCounts` (SQLite and PostgreSQL both read it as is).
COUNTS_SQL = (
    "SELECT channel, state, COUNT(*) AS rows, MIN(created_at) AS oldest FROM outbox "
    f"WHERE state IN ({', '.join(repr(s) for s in UNDELIVERED_STATES + RETRYABLE_STATES)}) "
    "GROUP BY channel, state"
)

COLUMNS = (
    "message_id",
    "channel",
    "kind",
    "call_sid",
    "recipient",
    "payload",
    "body",
    "state",
    "attempts",
    "next_attempt_at",
    "created_at",
    "updated_at",
    "last_error",
    "error_code",
    "result",
    "lease_owner",
    "lease_expires_at",
    "store_id",
    "sender",
    "endpoint",
)
# What a relay may change on a row it holds (anything else is fixed at insert).
UPDATABLE = frozenset({"body", "state", "attempts", "next_attempt_at", "last_error", "error_code", "result"})


class Record(Protocol):
    """A database row by column name: sqlite3.Row and asyncpg.Record both are."""

    def __getitem__(self, key: str, /) -> Any: ...


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
    lease_owner: str | None = None
    lease_expires_at: float | None = None
    store_id: str | None = None
    sender: str | None = None
    endpoint: str | None = None

    @property
    def key(self) -> RowKey:
        return (self.message_id, self.channel)

    @classmethod
    def from_db(cls, record: Record) -> OutboxRow:
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
            lease_owner=record["lease_owner"],
            lease_expires_at=record["lease_expires_at"],
            store_id=record["store_id"],
            sender=record["sender"],
            endpoint=record["endpoint"],
        )


@dataclass(frozen=True, slots=True)
class NewRow:
    """A row as first written: due at once (or `waiting` for its SMS), never attempted."""

    message_id: str
    channel: Channel
    kind: str
    call_sid: str
    recipient: str | None
    payload: str
    body: str | None
    state: State
    next_attempt_at: float | None
    created_at: float
    store_id: str | None = None
    sender: str | None = None
    endpoint: str | None = None

    def values(self) -> tuple[Any, ...]:
        """In COLUMNS order."""
        return (
            self.message_id,
            self.channel,
            self.kind,
            self.call_sid,
            self.recipient,
            self.payload,
            self.body,
            self.state,
            0,
            self.next_attempt_at,
            self.created_at,
            self.created_at,
            None,
            None,
            "[]",
            None,
            None,
            self.store_id,
            self.sender,
            self.endpoint,
        )


@dataclass(frozen=True, slots=True)
class DisabledEndpoint:
    """A webhook URL that answered 410 Gone: nothing is sent to it until an operator re-enables it."""

    url: str
    disabled_at: float
    reason: str


def new_message_id() -> str:
    """'msg_' and 24 unambiguous characters; its first four are the SMS reference."""
    return "msg_" + "".join(secrets.choice(ID_ALPHABET) for _ in range(ID_CHARS))


@dataclass(frozen=True, slots=True)
class OutboxCounts:
    """The outbox at a glance, for /metrics: rows still on their way, rows that failed, per channel.

    `oldest_undelivered_at` is when the oldest row still on its way was queued (None: none is).
    """

    undelivered: dict[Channel, int]
    failed: dict[Channel, int]
    oldest_undelivered_at: float | None

    @classmethod
    def from_groups(cls, groups: list[Record]) -> OutboxCounts:
        """From the rows of COUNTS_SQL: (channel, state, rows, oldest) per group."""
        undelivered = dict.fromkeys(CHANNELS, 0)
        failed = dict.fromkeys(CHANNELS, 0)
        oldest: float | None = None
        for group in groups:
            channel, state, rows = group["channel"], group["state"], int(group["rows"])
            if state in RETRYABLE_STATES:
                failed[channel] += rows
                continue
            undelivered[channel] += rows
            if oldest is None or group["oldest"] < oldest:
                oldest = float(group["oldest"])
        return cls(undelivered, failed, oldest)
