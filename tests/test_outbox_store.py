"""Several relays on one outbox, leases, retention, retries and schema versions, on both stores.

The relays here share one database the way processes do (separate stores, separate owners);
tests/test_outbox_processes.py does the same with real `serve` processes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from pathlib import Path

import asyncpg
import httpx
import pytest
from outbox_rig import (
    CALL_SID,
    CALLER,
    FakeClock,
    Rig,
    collection,
    drain,
    empty_postgres,
    opened,
)

from bot.outbox import Outbox
from bot.outbox.messages import SmsPart, parts_from_json
from bot.outbox.postgres import MIGRATIONS as POSTGRES_MIGRATIONS
from bot.outbox.postgres import PostgresStore
from bot.outbox.relay import SECONDS_PER_DAY
from bot.outbox.sqlite import MIGRATIONS, SqliteStore
from bot.sim.postgres import LocalPostgres, free_port
from bot.sim.twilio_api import TwilioApiSimulator
from bot.sim.webhook_receiver import WebhookReceiver
from bot.tools import OutboxUnavailable

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """One event loop for the module, so the stand-ins start once, not once per test."""
    return "asyncio"


async def wait_for(condition: object, timeout_s: float = 10.0) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def stored_text(rig: Rig, message_id: str) -> list[SmsPart]:
    """The SMS parts written when the message was queued."""
    row = await rig.outbox.get(message_id, "sms")
    assert row is not None and row.body is not None
    return parts_from_json(row.body)


# ---------------------------------------------------------------- leases


async def test_a_relay_started_while_another_is_sending_never_sends_its_messages_again(rig: Rig) -> None:
    """The reported failure: 8 messages, Twilio slow to create, a second process started meanwhile."""
    rig.sim.create_delay_s = 0.5
    callers = [f"+1555123{n:04d}" for n in range(8)]
    for caller in callers:
        await rig.add(caller=caller)
    first = rig.relay()
    first.clock = time.time
    await first.start()
    async with opened(rig.stores, time.time) as elsewhere:
        second = rig.relay(outbox=elsewhere)
        second.clock = time.time
        try:
            await wait_for(lambda: rig.sim.request_count >= 8)
            await second.start()
            await rig.receiver.wait_until(lambda: len(rig.receiver.acknowledged()) == 8, 10)
        finally:
            await second.stop()
            await first.stop()
    assert [len(rig.sim.messages_to(caller)) for caller in callers] == [1] * 8


async def test_a_dead_relays_rows_wait_for_its_lease_then_the_sms_is_looked_up_and_the_webhook_resent(
    rig: Rig,
) -> None:
    sms_id = await rig.add()
    hook_id = await rig.add_record()
    survivor = rig.relay()
    lease_until = rig.clock() + survivor.lease_s
    dead = await rig.outbox.claim(rig.clock(), 10, ("sms", "webhook"), "dead-relay", lease_until)
    assert len(dead) == 2
    [part] = await stored_text(rig, sms_id)
    await rig.twilio().send_sms(CALLER, part.body)  # its request reached Twilio before it died

    assert await survivor.relay_due() == 0, "a live lease is never taken over"
    rig.clock.advance(survivor.lease_s)
    await drain(survivor, rig.clock)

    assert len(rig.sim.messages_to(CALLER)) == 1
    assert {d.headers["webhook-id"] for d in rig.receiver.acknowledged()} == {sms_id, hook_id}
    assert {r.state for r in await rig.outbox.list_rows()} == {"sent"}


async def test_a_relay_whose_lease_ran_out_sends_nothing_more_on_that_row(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    rig.sim.hang_next(1, seconds=0.5)  # the slow relay's first part: created, answered late
    parts = await stored_text(rig, await rig.add(products=12))
    assert len(parts) > 1
    slow = rig.relay()
    attempt = asyncio.create_task(slow.relay_due())
    await wait_for(lambda: len(rig.sim.messages) == 1)
    rig.clock.advance(slow.lease_s + 1)  # its lease runs out while Twilio holds the answer
    with caplog.at_level(logging.WARNING, logger="bot.outbox.relay"):
        await drain(rig.relay(), rig.clock)
        await attempt
    bodies = [m["body"] for m in rig.sim.messages_to(CALLER)]
    assert sorted(bodies) == sorted(p.body for p in parts), "each part once: the first was looked up"
    assert any("another relay took this delivery over" in r.getMessage() for r in caplog.records)


async def test_a_relay_that_stops_cleanly_hands_its_rows_back_at_once(rig: Rig) -> None:
    sms_id = await rig.add()
    hook_id = await rig.add_record()
    stopping = rig.relay()
    await rig.outbox.claim(rig.clock(), 10, ("sms", "webhook"), stopping.owner, rig.clock() + 60)
    await stopping.stop()
    rows = {r.key: r for r in await rig.outbox.list_rows()}
    assert rows[(sms_id, "sms")].state == "ambiguous", "it may have reached Twilio: look it up first"
    assert rows[(hook_id, "webhook")].state == "pending"
    assert all(r.lease_owner is None for r in rows.values())
    assert await rig.relay().relay_due() == 2


# ---------------------------------------------------------------- operators


async def test_settled_rows_past_the_retention_are_purged_in_batches_and_open_ones_kept(rig: Rig) -> None:
    relay = rig.relay(OUTBOX_RETENTION_DAYS="30")
    await rig.add()
    rig.sim.unsubscribed.add("+15551230009")
    await rig.add(caller="+15551230009")
    await drain(relay, rig.clock)
    rig.receiver.script = [(503, {})] * 5
    open_id = await rig.add_record()
    await relay.relay_due()
    rig.clock.advance(29 * SECONDS_PER_DAY)
    assert await relay.purge_settled() == 0
    rig.clock.advance(2 * SECONDS_PER_DAY)
    assert await relay.purge_settled(batch_rows=1) == 4
    assert [(r.message_id, r.state) for r in await rig.outbox.list_rows()] == [(open_id, "pending")]


async def test_a_retried_failed_sms_is_looked_up_first_and_sent_once(rig: Rig) -> None:
    rig.sim.unsubscribed.add(CALLER)
    message_id = await rig.add()
    relay = rig.relay()
    await drain(relay, rig.clock)
    rig.sim.unsubscribed.clear()
    [was] = await rig.outbox.requeue(message_id)
    assert (was.channel, was.state, was.error_code) == ("sms", "failed", 21610)
    await drain(relay, rig.clock)
    assert len(rig.sim.messages_to(CALLER)) == 1
    row = await rig.outbox.get(message_id, "sms")
    assert row is not None and (row.state, row.attempts) == ("sent", 1)
    assert await rig.outbox.requeue(message_id) == []


async def test_the_counts_show_rows_on_their_way_and_failed_ones_with_the_oldest_waiting(rig: Rig) -> None:
    empty = await rig.outbox.counts()
    assert (empty.undelivered, empty.failed, empty.oldest_undelivered_at) == (
        {"sms": 0, "webhook": 0},
        {"sms": 0, "webhook": 0},
        None,
    )
    rig.sim.unsubscribed.add("+15551230009")
    first_queued_at = rig.clock.now
    await rig.add(caller="+15551230009")
    rig.clock.advance(5)
    await rig.add()
    counts = await rig.outbox.counts()
    assert counts.undelivered == {"sms": 2, "webhook": 2}  # each webhook waits for its SMS
    assert counts.oldest_undelivered_at == pytest.approx(first_queued_at)
    await drain(rig.relay(), rig.clock)
    settled = await rig.outbox.counts()
    assert (settled.undelivered, settled.failed) == ({"sms": 0, "webhook": 0}, {"sms": 1, "webhook": 0})
    assert settled.oldest_undelivered_at is None


async def test_the_latest_rows_are_the_most_recently_queued_still_oldest_first(rig: Rig) -> None:
    ids = []
    for _ in range(3):
        ids.append(await rig.add())
        rig.clock.advance(1)
    latest = await rig.outbox.list_rows(("pending",), latest=2)
    assert [row.message_id for row in latest] == ids[1:]


async def test_a_database_newer_than_the_bot_refuses_to_open_naming_it(rig: Rig) -> None:
    store = rig.stores()
    if isinstance(store, SqliteStore):
        with sqlite3.connect(store.path) as conn:
            conn.execute("PRAGMA user_version = 99")
    else:
        assert isinstance(store, PostgresStore)
        conn = await asyncpg.connect(store.url)
        await conn.execute("INSERT INTO outbox_migrations (version) VALUES (99)")
        await conn.close()
    try:
        with pytest.raises(OutboxUnavailable, match=f"{store.setting} .*v99, newer"):
            await store.open()
    finally:
        if isinstance(store, PostgresStore):
            conn = await asyncpg.connect(store.url)
            await conn.execute("DELETE FROM outbox_migrations WHERE version = 99")
            await conn.close()


# ---------------------------------------------------------------- SQLite


async def test_a_full_database_raises_outbox_unavailable_and_leaves_no_partial_row(tmp_path: Path) -> None:
    path = tmp_path / "small.sqlite3"
    async with Outbox(SqliteStore(path, max_size_bytes=64 * 1024)) as outbox:
        await outbox.add_product_details(call_sid=CALL_SID, caller=CALLER, collection=collection(1))
        with pytest.raises(OutboxUnavailable, match="full"):
            for _ in range(100):
                await outbox.add_product_details(call_sid=CALL_SID, caller=CALLER, collection=collection(20))
        assert outbox.problems()["outbox"] == "database or disk is full"
        rows = await outbox.list_rows()
    by_id: dict[str, set[str]] = {}
    for row in rows:
        by_id.setdefault(row.message_id, set()).add(row.channel)
    assert all(channels == {"sms", "webhook"} for channels in by_id.values())
    async with Outbox(SqliteStore(path)) as outbox:
        await outbox.add_product_details(call_sid=CALL_SID, caller=CALLER, collection=collection(1))
        assert outbox.problems() == {}


async def test_a_result_the_full_disk_could_not_take_resumes_once_there_is_room_without_a_restart(
    tmp_path: Path, shared_sim: TwilioApiSimulator, shared_receiver: WebhookReceiver
) -> None:
    """The disk fills while Twilio is sending: the outcome cannot be written, /healthz is degraded,
    nothing more is claimed; once space returns the relay looks the SMS up and finishes."""
    shared_sim.reset()
    shared_receiver.received.clear()
    shared_sim.create_delay_s = 0.5
    path = tmp_path / "outbox.sqlite3"
    cap_bytes = 256 * 1024
    async with Outbox(SqliteStore(path, max_size_bytes=cap_bytes)) as outbox, httpx.AsyncClient() as http:
        rig = Rig(FakeClock(), shared_sim, shared_receiver, outbox, http, tmp_path, lambda: SqliteStore(path))
        message_id = await rig.add()
        relay = rig.relay()
        relay.clock, relay.db_retry_s = time.time, 0.1
        await relay.start()
        filler = sqlite3.connect(path, isolation_level=None)
        try:
            await wait_for(lambda: shared_sim.request_count == 1)  # the SMS is on its way
            page_size = filler.execute("PRAGMA page_size").fetchone()[0]
            while filler.execute("PRAGMA page_count").fetchone()[0] < cap_bytes // page_size:
                filler.execute("INSERT INTO outbox_probe (data) VALUES (randomblob(16384))")
            await wait_for(lambda: "outbox" in outbox.problems())
            await asyncio.sleep(0.5)
            sms = await outbox.get(message_id, "sms")
            assert sms is not None and sms.state == "sending", "left for this relay to finish"
            assert len(shared_sim.messages_to(CALLER)) == 1 and shared_receiver.received == []

            filler.execute("DELETE FROM outbox_probe")  # an operator frees space
            await shared_receiver.wait_acknowledged(1, timeout_s=10)
        finally:
            filler.close()
            await relay.stop()
        assert outbox.problems() == {}
        assert {r.state for r in await outbox.list_rows()} == {"sent"}
    assert len(shared_sim.messages_to(CALLER)) == 1


async def test_a_version_1_outbox_file_is_migrated_and_its_interrupted_sms_looked_up(
    tmp_path: Path, shared_sim: TwilioApiSimulator, shared_receiver: WebhookReceiver
) -> None:
    shared_sim.reset()
    shared_receiver.received.clear()
    path = tmp_path / "outbox.sqlite3"
    with sqlite3.connect(path) as conn:
        for statement in MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute("PRAGMA user_version = 1")
        conn.execute(
            "INSERT INTO outbox (message_id, channel, kind, call_sid, recipient, payload, state, "
            "attempts, next_attempt_at, created_at, updated_at) VALUES "
            "('msg_AAAABBBBCCCCDDDDEEEEFFFF', 'sms', 'products.sent', ?, ?, ?, 'sending', 1, 0, ?, ?)",
            (
                CALL_SID,
                CALLER,
                json.dumps({"data": {"collection": collection().model_dump(mode="json")}}),
                time.time(),
                0,
            ),
        )
    clock = FakeClock()
    async with Outbox(SqliteStore(path), clock=clock) as outbox, httpx.AsyncClient() as http:
        rig = Rig(clock, shared_sim, shared_receiver, outbox, http, tmp_path, lambda: SqliteStore(path))
        await drain(rig.relay(), clock)
        [row] = await outbox.list_rows()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert row.state == "sent"
    assert len(shared_sim.messages_to(CALLER)) == 1
    assert shared_sim.request_count == 2, "looked up (nothing found), then sent"


async def test_an_unusable_database_path_is_named_with_the_reason(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    store = SqliteStore(not_a_folder / "outbox.sqlite3")
    with pytest.raises(OutboxUnavailable, match=f"DATABASE_PATH {not_a_folder}/outbox.sqlite3: cannot open"):
        await store.open()


# ---------------------------------------------------------------- PostgreSQL


async def test_processes_starting_together_migrate_a_new_postgres_database_once(
    postgres: LocalPostgres,
) -> None:
    url = postgres.create_database()
    stores = [PostgresStore(url) for _ in range(4)]
    try:
        await asyncio.gather(*(store.open() for store in stores))
    finally:
        await asyncio.gather(*(store.close() for store in stores))
    conn = await asyncpg.connect(url)
    try:
        versions = await conn.fetch("SELECT version FROM outbox_migrations ORDER BY version")
    finally:
        await conn.close()
    assert [v["version"] for v in versions] == list(range(1, len(POSTGRES_MIGRATIONS) + 1))


async def test_a_message_queued_by_another_process_wakes_a_postgres_relay_at_once(
    postgres_url: str, shared_sim: TwilioApiSimulator, shared_receiver: WebhookReceiver, tmp_path: Path
) -> None:
    """NOTIFY, not the 5 s poll: the relay listening on another connection starts within a second."""
    shared_receiver.received.clear()
    listening = PostgresStore(postgres_url)
    async with Outbox(listening) as outbox, Outbox(PostgresStore(postgres_url)) as elsewhere:
        await empty_postgres(postgres_url)
        async with httpx.AsyncClient() as http:
            rig = Rig(FakeClock(), shared_sim, shared_receiver, outbox, http, tmp_path, lambda: listening)
            relay = rig.relay()
            relay.clock = time.time
            await relay.start()
            try:
                await wait_for(lambda: listening.listening)
                await asyncio.sleep(0.2)  # the relay is idle, its next poll seconds away
                assert listening.poll_interval_s >= 5
                queued = time.monotonic()
                await elsewhere.add_call_completed(call_sid=CALL_SID, caller=CALLER, record={})
                await shared_receiver.wait_acknowledged(1)
                assert time.monotonic() - queued < 2.5
            finally:
                await relay.stop()


async def test_an_unreachable_database_url_is_named_without_its_password() -> None:
    store = PostgresStore(f"postgresql://bot:hunter2@127.0.0.1:{free_port()}/voicebot")
    with pytest.raises(OutboxUnavailable) as raised:
        await store.open()
    message = str(raised.value)
    assert message.startswith("DATABASE_URL postgresql://bot:***@127.0.0.1:") and "hunter2" not in message
    assert "cannot open the outbox" in message
