"""Shared by the outbox tests: a fake clock, settings, both stores, and a rig of stand-ins.

The stores are the real ones: SQLite in the test's folder, PostgreSQL on the session's server
(tests/conftest.py), emptied before each test. The fixtures are in tests/outbox/conftest.py.
"""

from __future__ import annotations

import base64
import json
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from standardwebhooks import Webhook

from bot.outbox import Outbox, Relay
from bot.outbox.postgres import PostgresStore
from bot.outbox.sqlite import SqliteStore
from bot.outbox.store import OutboxStore
from bot.products import ProductsCollection
from bot.settings import SAMPLE_CATALOG_PATH, Settings, load_settings
from bot.sim.twilio_api import TwilioApiSimulator
from bot.sim.webhook_receiver import Delivery, WebhookReceiver
from bot.twilio_rest import TwilioRest

CALLER = "+15551230001"
STORE = "+15557654321"
CALL_SID = "CA" + "a" * 32
SECRET = "whsec_" + base64.b64encode(b"a 32-byte secret for the tests!!").decode()
MEDIA = "https://cdn.example.com/media/"
CATALOG = json.loads(SAMPLE_CATALOG_PATH.read_text())
STORES = ["sqlite", "postgres"]


def collection(count: int = 2, text: str = "Here are the washers we talked about.") -> ProductsCollection:
    document = {
        "TextMessage": text,
        "JsonData": {"jsonType": "ProductsCollection", "products": CATALOG[:count]},
    }
    return ProductsCollection.model_validate_json(json.dumps(document))


class FakeClock:
    """Epoch seconds that only move when told (starts at the real time, so signatures verify)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_settings(tmp_path: Path, **env: str) -> Settings:
    base = {
        "TWILIO_ACCOUNT_SID": "AC" + "0" * 32,
        "TWILIO_AUTH_TOKEN": "token",
        "TWILIO_FROM_NUMBER": STORE,
        "WEBHOOK_SECRET": SECRET,
        "WEBHOOK_RETRY_SCHEDULE_S": "1,2,4",
        "WEBHOOK_TIMEOUT_S": "2",
        "MEDIA_BASE_URL": MEDIA,
        "DATABASE_PATH": str(tmp_path / "outbox.sqlite3"),
    }
    base.update(env)
    return load_settings(base, dotenv=None)


async def empty_postgres(url: str) -> None:
    """The schema stays (the store creates it once); the rows of the previous test go."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("TRUNCATE outbox, outbox_endpoints")
    finally:
        await conn.close()


StoreFactory = Callable[[], OutboxStore]


def store_factory(kind: str, tmp_path: Path, postgres_url: Callable[[], str]) -> StoreFactory:
    """Makes stores that all open the same outbox: several relays sharing it, as processes do."""
    if kind == "sqlite":
        return lambda: SqliteStore(tmp_path / "outbox.sqlite3")
    url = postgres_url()
    return lambda: PostgresStore(url)


@asynccontextmanager
async def opened(factory: StoreFactory, clock: Callable[[], float], **options: Any) -> AsyncIterator[Outbox]:
    async with Outbox(factory(), clock=clock, **options) as outbox:
        yield outbox


@dataclass
class Rig:
    clock: FakeClock
    sim: TwilioApiSimulator
    receiver: WebhookReceiver
    outbox: Outbox
    http: httpx.AsyncClient
    tmp_path: Path
    stores: StoreFactory

    def twilio(self, timeout_s: float = 5.0) -> TwilioRest:
        return TwilioRest(
            account_sid=self.sim.account_sid,
            auth_token=self.sim.auth_token,
            http=self.http,
            from_number=STORE,
            api_base=self.sim.base_url,
            timeout_s=timeout_s,
        )

    def relay(self, twilio_timeout_s: float = 5.0, outbox: Outbox | None = None, **env: str) -> Relay:
        env.setdefault("WEBHOOK_URL", self.receiver.url)
        env.setdefault("TWILIO_TIMEOUT_S", str(twilio_timeout_s))
        settings = make_settings(self.tmp_path, **env)
        return Relay(
            outbox or self.outbox,
            settings,
            self.http,
            self.twilio(twilio_timeout_s),
            clock=self.clock,
            rng=random.Random(7),
            endpoint_check_s=0,
        )

    async def add(self, caller: str = CALLER, products: int = 2) -> str:
        return await self.outbox.add_product_details(
            call_sid=CALL_SID, caller=caller, collection=collection(products)
        )

    async def add_record(self, **record: Any) -> str:
        """A call.completed event (webhooks are on in the rig's outbox, so it is queued)."""
        message_id = await self.outbox.add_call_completed(call_sid=CALL_SID, caller=CALLER, record=record)
        assert message_id is not None
        return message_id


async def drain(relay: Relay, clock: FakeClock, max_rounds: int = 60) -> None:
    """Relay until nothing is left to do, jumping the clock to each next due row."""
    for _ in range(max_rounds):
        if await relay.relay_due():
            continue
        next_at = await relay.next_due_at()
        if next_at is None:
            return
        clock.now = max(clock.now, next_at)
    raise AssertionError("the outbox did not settle")


async def drain_one(relay: Relay, clock: FakeClock) -> None:
    """One round at the next due time."""
    next_at = await relay.next_due_at()
    assert next_at is not None
    clock.now = max(clock.now, next_at)
    assert await relay.relay_due() >= 1


def verify(delivery: Delivery, secret: str = SECRET) -> Any:
    return Webhook(secret).verify(delivery.body, delivery.headers)
