"""Each store's messages reach its caller from its number and only its call center, on both stores.

Rows name their store, SMS sender and webhook URL; the relay signs each store's webhooks with
that store's secret, asked for when it sends (no row holds one). A rig (tests/outbox_rig.py) on
SQLite and on a real PostgreSQL server; a second webhook receiver plays the store's call center.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from outbox_rig import CALL_SID, CALLER, STORE, FakeClock, Rig, collection, drain, make_settings, verify
from store_files import appliance_store, new_webhook_secret, write_stores

from bot.outbox import Outbox, Relay
from bot.outbox.postgres import MIGRATIONS as POSTGRES_MIGRATIONS
from bot.outbox.postgres import PostgresStore
from bot.outbox.sqlite import MIGRATIONS, SqliteStore
from bot.sim.postgres import LocalPostgres
from bot.sim.twilio_api import TwilioApiSimulator
from bot.sim.webhook_receiver import WebhookReceiver
from bot.stores import Stores
from bot.words import es

pytestmark = pytest.mark.anyio

GARDEN_NUMBER = "+15557650003"
GARDEN_SMS_FROM = "+15550002222"
GARDEN_SECRET = new_webhook_secret()


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def garden_receiver() -> AsyncIterator[WebhookReceiver]:
    async with WebhookReceiver() as receiver:
        yield receiver


def garden_stores(rig: Rig, receiver: WebhookReceiver, **overrides: object) -> Stores:
    """The deployment's stores: the garden center has its own number and call center."""
    store = appliance_store(
        GARDEN_NUMBER,
        name="Green Thumb Garden Center",
        language="es",
        sms_from=GARDEN_SMS_FROM,
        webhook_url=receiver.url,
        webhook_secret=GARDEN_SECRET,
        **overrides,
    )
    path = write_stores(rig.tmp_path / "stores.json", {"garden": store})
    return Stores.load(make_settings(rig.tmp_path, STORES_PATH=str(path), WEBHOOK_URL=rig.receiver.url))


def relay_with(rig: Rig, stores: Stores) -> Relay:
    relay = rig.relay()
    relay.stores = stores
    return relay


async def add_for(rig: Rig, stores: Stores, caller: str = CALLER) -> str:
    garden = stores.for_number(GARDEN_NUMBER)
    return await rig.outbox.add_product_details(
        call_sid=CALL_SID, caller=caller, collection=collection(1), destination=garden.destination(es.SMS)
    )


@pytest.fixture
def garden(garden_receiver: WebhookReceiver) -> WebhookReceiver:
    garden_receiver.script.clear()
    garden_receiver.received.clear()
    return garden_receiver


async def test_a_stores_message_goes_from_its_number_to_its_own_call_center_signed_with_its_secret(
    rig: Rig, garden: WebhookReceiver
) -> None:
    stores = garden_stores(rig, garden)
    message_id = await add_for(rig, stores)
    await drain(relay_with(rig, stores), rig.clock)
    [sms] = rig.sim.messages_to(CALLER)
    assert sms["from"] == GARDEN_SMS_FROM
    assert "Foto 1: " in sms["body"] and "% de descuento" in sms["body"], "written in the store's language"
    [delivery] = garden.acknowledged()
    event = verify(delivery, GARDEN_SECRET)
    assert event["type"] == "products.sent" and delivery.headers["webhook-id"] == message_id
    assert rig.receiver.received == [], "nothing reaches the deployment's own call center"


async def test_rows_name_the_store_its_number_and_its_url_and_never_hold_the_secret(
    rig: Rig, garden: WebhookReceiver
) -> None:
    stores = garden_stores(rig, garden)
    await add_for(rig, stores)
    sms, hook = await rig.outbox.list_rows()
    assert (sms.store_id, sms.sender, sms.endpoint) == ("garden", GARDEN_SMS_FROM, None)
    assert (hook.store_id, hook.sender, hook.endpoint) == ("garden", None, garden.url)
    assert GARDEN_SECRET.removeprefix("whsec_") not in repr(await rig.outbox.list_rows())


async def test_the_default_stores_rows_leave_numbers_and_urls_to_the_settings(rig: Rig) -> None:
    await rig.add()
    sms, hook = await rig.outbox.list_rows()
    assert (sms.store_id, sms.sender, hook.endpoint) == (None, None, None)
    await drain(rig.relay(), rig.clock)
    [sms_sent] = rig.sim.messages_to(CALLER)
    assert sms_sent["from"] == STORE and len(rig.receiver.acknowledged()) == 1


async def test_a_410_from_one_stores_call_center_holds_only_its_webhooks(
    rig: Rig, garden: WebhookReceiver
) -> None:
    stores = garden_stores(rig, garden)
    garden.script = [(410, {})]
    await add_for(rig, stores)
    relay = relay_with(rig, stores)
    await drain(relay, rig.clock)
    default_id = await rig.add_record()
    await drain(relay, rig.clock)
    assert [d.headers["webhook-id"] for d in rig.receiver.acknowledged()] == [default_id]
    assert len(garden.received) == 1, "nothing more goes to the URL that answered 410"
    assert garden.url in rig.outbox.problems()["webhooks"]


async def test_a_store_gone_from_the_file_holds_its_webhooks_with_the_reason(
    rig: Rig, garden: WebhookReceiver
) -> None:
    stores = garden_stores(rig, garden)
    await add_for(rig, stores)
    without = Stores.load(make_settings(rig.tmp_path, WEBHOOK_URL=rig.receiver.url))
    relay = relay_with(rig, without)
    await relay.relay_due()  # the SMS settles, which releases its webhook
    await relay.relay_due()
    hook = (await rig.outbox.list_rows())[1]
    assert hook.state == "pending" and hook.last_error is not None
    assert "store 'garden' has no call center configured" in hook.last_error
    assert garden.received == [] and rig.receiver.received == []
    await drain(relay_with(rig, stores), rig.clock)
    assert len(garden.acknowledged()) == 1, "delivered once the store is back"


# ---------------------------------------------------------------- upgrading the schema


async def test_a_sqlite_outbox_from_before_stores_is_migrated_and_its_rows_go_where_they_did(
    tmp_path: Path, shared_sim: TwilioApiSimulator, shared_receiver: WebhookReceiver
) -> None:
    shared_sim.reset()
    shared_receiver.received.clear()
    path = tmp_path / "outbox.sqlite3"
    with sqlite3.connect(path) as conn:
        for statements in MIGRATIONS[:2]:
            for statement in statements:
                conn.execute(statement)
        conn.execute("PRAGMA user_version = 2")
        conn.execute(
            "INSERT INTO outbox (message_id, channel, kind, call_sid, recipient, payload, body, state, "
            "attempts, next_attempt_at, created_at, updated_at) VALUES "
            "('msg_AAAABBBBCCCCDDDDEEEEFFFF', 'webhook', 'call.completed', ?, NULL, '{}', ?, 'pending', "
            "0, 0, ?, ?)",
            (CALL_SID, json.dumps({"type": "call.completed", "data": {}}), time.time(), time.time()),
        )
    clock = FakeClock()
    async with Outbox(SqliteStore(path), clock=clock) as outbox, httpx.AsyncClient() as http:
        rig = Rig(clock, shared_sim, shared_receiver, outbox, http, tmp_path, lambda: SqliteStore(path))
        await drain(rig.relay(), clock)
        [row] = await outbox.list_rows()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert (row.state, row.store_id, row.endpoint) == ("sent", None, None)
    assert len(shared_receiver.acknowledged()) == 1


async def test_a_postgres_outbox_from_before_stores_is_migrated_and_its_rows_go_where_they_did(
    postgres: LocalPostgres, shared_sim: TwilioApiSimulator, shared_receiver: WebhookReceiver, tmp_path: Path
) -> None:
    shared_sim.reset()
    shared_receiver.received.clear()
    url = postgres.create_database()
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "CREATE TABLE outbox_migrations (version integer PRIMARY KEY, applied_at timestamptz)"
        )
        for statement in POSTGRES_MIGRATIONS[0]:
            await conn.execute(statement)
        await conn.execute("INSERT INTO outbox_migrations (version, applied_at) VALUES (1, now())")
        await conn.execute(
            "INSERT INTO outbox (message_id, channel, kind, call_sid, recipient, payload, body, state, "
            "attempts, next_attempt_at, created_at, updated_at) VALUES "
            "('msg_AAAABBBBCCCCDDDDEEEEFFFF', 'webhook', 'call.completed', $1, NULL, '{}', $2, 'pending', "
            "0, 0, $3, $3)",
            CALL_SID,
            json.dumps({"type": "call.completed", "data": {}}),
            time.time(),
        )
    finally:
        await conn.close()
    clock = FakeClock()
    async with Outbox(PostgresStore(url), clock=clock) as outbox, httpx.AsyncClient() as http:
        rig = Rig(clock, shared_sim, shared_receiver, outbox, http, tmp_path, lambda: PostgresStore(url))
        await drain(rig.relay(), clock)
        [row] = await outbox.list_rows()
    assert (row.state, row.store_id, row.endpoint) == ("sent", None, None)
    assert len(shared_receiver.acknowledged()) == 1
