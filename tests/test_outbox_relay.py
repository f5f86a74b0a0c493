"""The outbox delivers each promise once by SMS and at least once by signed webhook, through faults.

Real sockets: the Twilio stand-in and a scripted webhook receiver on 127.0.0.1. A fake clock
steps through retry schedules, so hours of retries take milliseconds.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from bot.delivery import (
    SMS_MAX_CHARS,
    DeliveryWorker,
    Outbox,
    main,
    render_sms,
    sms_reference,
)
from bot.products import ProductsCollection
from bot.settings import SAMPLE_CATALOG_PATH, Settings, load_settings
from bot.sim.twilio_api import TwilioApiSimulator
from bot.sim.webhook_receiver import Delivery, WebhookReceiver
from bot.tools import OutboxUnavailable
from bot.twilio_rest import TwilioRest

pytestmark = pytest.mark.anyio

CALLER = "+15551230001"
STORE = "+15557654321"
CALL_SID = "CA" + "a" * 32
SECRET = "whsec_" + base64.b64encode(b"a 32-byte secret for the tests!!").decode()
MEDIA = "https://cdn.example.com/media/"
CATALOG = json.loads(SAMPLE_CATALOG_PATH.read_text())


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


@dataclass
class Rig:
    clock: FakeClock
    sim: TwilioApiSimulator
    receiver: WebhookReceiver
    outbox: Outbox
    http: httpx.AsyncClient
    tmp_path: Path

    def worker(self, twilio_timeout_s: float = 5.0, **env: str) -> DeliveryWorker:
        env.setdefault("WEBHOOK_URL", self.receiver.url)
        settings = make_settings(self.tmp_path, **env)
        twilio = TwilioRest(
            account_sid=self.sim.account_sid,
            auth_token=self.sim.auth_token,
            http=self.http,
            from_number=STORE,
            api_base=self.sim.base_url,
            timeout_s=twilio_timeout_s,
        )
        return DeliveryWorker(
            self.outbox, settings, self.http, twilio, clock=self.clock, rng=random.Random(7)
        )

    async def add(self, caller: str = CALLER, products: int = 2) -> str:
        return await self.outbox.add_product_details(
            call_sid=CALL_SID, caller=caller, collection=collection(products)
        )


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """One event loop for the module, so the servers below start once, not once per test."""
    return "asyncio"


@pytest.fixture(scope="module")
async def shared_sim() -> AsyncIterator[TwilioApiSimulator]:
    async with TwilioApiSimulator("AC" + "0" * 32, "token") as sim:
        yield sim


@pytest.fixture(scope="module")
async def shared_receiver() -> AsyncIterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    await receiver.server.start()
    yield receiver
    await receiver.server.stop()


@pytest.fixture
async def rig(
    tmp_path: Path, shared_sim: TwilioApiSimulator, shared_receiver: WebhookReceiver
) -> AsyncIterator[Rig]:
    clock = FakeClock()
    shared_sim.reset()
    shared_receiver.script.clear()
    shared_receiver.received.clear()
    async with (
        Outbox(tmp_path / "outbox.sqlite3", clock=clock) as outbox,
        httpx.AsyncClient() as http,
    ):
        yield Rig(clock, shared_sim, shared_receiver, outbox, http, tmp_path)


async def drain(worker: DeliveryWorker, clock: FakeClock, max_rounds: int = 60) -> None:
    """Relay until nothing is left to do, jumping the clock to each next due row."""
    for _ in range(max_rounds):
        if await worker.relay_due():
            continue
        next_at = await worker.outbox.next_due_at(worker.channels)
        if next_at is None:
            return
        clock.now = max(clock.now, next_at)
    raise AssertionError("the outbox did not settle")


def verify(delivery: Delivery, secret: str = SECRET) -> Any:
    return Webhook(secret).verify(delivery.body, delivery.headers)


# ---------------------------------------------------------------- the SMS text


def test_the_sms_names_each_product_with_its_discounted_price_and_absolute_links() -> None:
    parts = render_sms(collection(2), reference="K7Q2", media_base_url=MEDIA)
    assert len(parts) == 1
    body = parts[0].body
    assert body.startswith("Here are the washers we talked about.")
    assert "SmartWash Pro 500 Front Load Washer (CleanTech)\n$764.99, 15% off" in body
    assert f"Photo 1: {MEDIA}smartwash_pro_500_front_load_washer_profile.jpg" in body
    assert f"Photo 2: {MEDIA}smartwash_pro_500_front_load_washer_front.jpg" in body
    assert "3D view: https://shop.example.com/3d/smartwash_pro_500_front_load_washer" in body
    assert "Specs: https://shop.example.com/tech/smartwash_pro_500_front_load_washer.pdf" in body
    assert CATALOG[1]["name"] in body
    assert body.endswith("\n\nRef K7Q2")
    assert "{" not in body and "sku" not in body.lower()
    assert parts[0].media_urls == ()


def test_a_long_collection_is_split_into_parts_within_1600_characters_each_with_its_reference() -> None:
    parts = render_sms(collection(12), reference="K7Q2", media_base_url=MEDIA)
    assert len(parts) > 1
    assert all(len(p.body) <= SMS_MAX_CHARS for p in parts)
    assert [p.body.rsplit("\n", 1)[-1] for p in parts] == [
        f"Ref K7Q2 ({n}/{len(parts)})" for n in range(1, len(parts) + 1)
    ]
    text = "\n".join(p.body for p in parts)
    assert all(product["name"] in text for product in CATALOG[:12])


def test_the_picture_option_attaches_the_first_products_picture_to_the_first_part() -> None:
    parts = render_sms(collection(12), reference="K7Q2", media_base_url=MEDIA, include_picture=True)
    assert parts[0].media_urls == (f"{MEDIA}smartwash_pro_500_front_load_washer_profile.jpg",)
    assert all(p.media_urls == () for p in parts[1:])


# ---------------------------------------------------------------- the outbox


async def test_adding_details_writes_the_sms_and_a_webhook_waiting_for_it_in_one_go(rig: Rig) -> None:
    message_id = await rig.add()
    rows = await rig.outbox.list_rows()
    assert [(r.message_id, r.channel, r.state) for r in rows] == [
        (message_id, "sms", "pending"),
        (message_id, "webhook", "waiting"),
    ]
    assert rows[0].recipient == CALLER
    assert rows[1].payload["data"]["caller"] == "***0001"


async def test_a_full_database_raises_outbox_unavailable_and_leaves_no_partial_row(tmp_path: Path) -> None:
    path = tmp_path / "small.sqlite3"
    async with Outbox(path, max_size_bytes=64 * 1024) as outbox:
        await outbox.add_product_details(call_sid=CALL_SID, caller=CALLER, collection=collection(1))
        with pytest.raises(OutboxUnavailable, match="full"):
            for _ in range(100):
                await outbox.add_product_details(call_sid=CALL_SID, caller=CALLER, collection=collection(20))
        assert outbox.write_error is not None
        rows = await outbox.list_rows()
    by_id: dict[str, set[str]] = {}
    for row in rows:
        by_id.setdefault(row.message_id, set()).add(row.channel)
    assert all(channels == {"sms", "webhook"} for channels in by_id.values())
    async with Outbox(path) as outbox:
        await outbox.add_product_details(call_sid=CALL_SID, caller=CALLER, collection=collection(1))
        assert outbox.write_error is None


# ---------------------------------------------------------------- SMS through Twilio


async def test_one_sms_reaches_the_caller_and_the_signed_webhook_reports_it(rig: Rig) -> None:
    message_id = await rig.add()
    await drain(rig.worker(), rig.clock)
    [sms] = rig.sim.messages_to(CALLER)
    assert sms["from"] == STORE and f"Ref {sms_reference(message_id)}" in sms["body"]
    [delivery] = rig.receiver.acknowledged()
    event = verify(delivery)
    assert delivery.headers["webhook-id"] == message_id
    assert event["type"] == "products.sent"
    assert event["data"]["sms"] == {"status": "sent", "message_sids": [sms["sid"]]}
    assert event["data"]["caller"] == "***0001" and event["data"]["call_sid"] == CALL_SID
    assert event["data"]["collection"] == collection(2).model_dump(mode="json")
    assert CALLER not in delivery.body.decode()
    assert {r.state for r in await rig.outbox.list_rows()} == {"sent"}


async def test_a_500_that_created_the_message_is_found_by_lookup_and_not_sent_again(rig: Rig) -> None:
    rig.sim.fail_next(2, status=500, create_anyway=True)
    await rig.add()
    worker = rig.worker()
    await worker.relay_due()
    row = (await rig.outbox.list_rows(["ambiguous"]))[0]
    assert "500" in (row.last_error or "")
    await drain(worker, rig.clock)
    assert len(rig.sim.messages_to(CALLER)) == 1
    sms_row = (await rig.outbox.list_rows())[0]
    assert sms_row.state == "sent" and sms_row.result == [rig.sim.messages[0]["sid"]]


async def test_a_500_that_created_nothing_is_sent_once_after_the_lookup(rig: Rig) -> None:
    rig.sim.fail_next(1, status=500)
    await rig.add()
    await drain(rig.worker(), rig.clock)
    assert len(rig.sim.messages_to(CALLER)) == 1
    assert len(rig.receiver.acknowledged()) == 1


async def test_a_twilio_timeout_is_settled_by_lookup_without_a_second_sms(rig: Rig) -> None:
    rig.sim.hang_next(1, seconds=1.0)
    await rig.add()
    await drain(rig.worker(twilio_timeout_s=0.3), rig.clock)
    assert len(rig.sim.messages_to(CALLER)) == 1
    assert verify(rig.receiver.acknowledged()[0])["data"]["sms"]["status"] == "sent"


async def test_a_429_is_retried_no_sooner_than_its_retry_after(rig: Rig) -> None:
    rig.sim.fail_next(1, status=429, retry_after=20)
    await rig.add()
    worker = rig.worker()
    start = rig.clock()
    await worker.relay_due()
    [row] = await rig.outbox.list_rows(["pending"])
    assert row.next_attempt_at is not None and row.next_attempt_at >= start + 20
    rig.clock.advance(19)
    assert await worker.relay_due() == 0
    rig.clock.advance(1)
    await drain(worker, rig.clock)
    assert len(rig.sim.messages_to(CALLER)) == 1


@pytest.mark.parametrize(
    ("caller", "code"), [("+15551230002", 21610), ("+15551230003", 21614), ("+15550000000", 21211)]
)
async def test_a_refusal_is_recorded_not_retried_and_the_webhook_still_reports_it(
    rig: Rig, caller: str, code: int
) -> None:
    rig.sim.unsubscribed.add("+15551230002")
    rig.sim.landlines.add("+15551230003")
    rig.sim.invalid_numbers.add("+15550000000")
    await rig.add(caller=caller)
    await drain(rig.worker(), rig.clock)
    sms_row = (await rig.outbox.list_rows())[0]
    assert (sms_row.state, sms_row.error_code, sms_row.attempts) == ("failed", code, 1)
    assert rig.sim.request_count == 1
    [delivery] = rig.receiver.acknowledged()
    sms = verify(delivery)["data"]["sms"]
    assert sms["status"] == "failed" and sms["error"]["code"] == code


async def test_a_tool_waiting_on_the_sms_learns_that_twilio_refused_the_number(rig: Rig) -> None:
    rig.sim.unsubscribed.add(CALLER)
    message_id = await rig.add()
    waiting = asyncio.create_task(rig.outbox.sms_outcome(message_id, timeout_s=5))
    await drain(rig.worker(), rig.clock)
    outcome = await waiting
    assert outcome is not None and (outcome.state, outcome.error_code) == ("failed", 21610)


async def test_a_tool_asking_after_the_sms_went_out_gets_the_outcome_at_once(rig: Rig) -> None:
    message_id = await rig.add()
    await drain(rig.worker(), rig.clock)
    outcome = await rig.outbox.sms_outcome(message_id, timeout_s=0.01)
    assert outcome is not None and outcome.state == "sent"


async def test_a_tool_waiting_on_an_unsent_sms_gives_up_after_its_timeout(rig: Rig) -> None:
    message_id = await rig.add()
    assert await rig.outbox.sms_outcome(message_id, timeout_s=0.05) is None


async def test_a_caller_without_a_textable_number_is_recorded_without_asking_twilio(rig: Rig) -> None:
    await rig.add(caller="client:alice")
    await drain(rig.worker(), rig.clock)
    sms_row = (await rig.outbox.list_rows())[0]
    assert sms_row.state == "failed" and sms_row.last_error == "the caller's number cannot get texts"
    assert rig.sim.request_count == 0
    assert len(rig.receiver.acknowledged()) == 1


async def test_sms_rows_fail_at_once_when_texting_is_not_configured(rig: Rig) -> None:
    await rig.add()
    worker = rig.worker()
    worker.twilio = None
    await drain(worker, rig.clock)
    assert rig.sim.messages == []
    assert verify(rig.receiver.acknowledged()[0])["data"]["sms"]["error"]["message"] == (
        "texting is not configured"
    )


# ---------------------------------------------------------------- webhooks


async def test_a_down_then_503_receiver_gets_one_acknowledged_delivery_with_one_id(rig: Rig) -> None:
    receiver = WebhookReceiver(script=[(503, {"Retry-After": "30"})])
    rig.receiver = receiver
    await rig.add()
    worker = rig.worker()
    for _ in range(3):  # the SMS, then two refused connections
        await drain_one(worker, rig.clock)
    hook = await rig.outbox.get((await rig.outbox.list_rows())[0].message_id, "webhook")
    assert hook is not None and hook.attempts == 2 and "ConnectError" in (hook.last_error or "")
    await receiver.server.start()
    try:
        await drain_one(worker, rig.clock)
        retry_at = (await rig.outbox.list_rows(["pending"]))[0].next_attempt_at
        assert retry_at is not None and retry_at - rig.clock() >= 30
        await drain(worker, rig.clock)
    finally:
        await receiver.server.stop()
    ids = {r.headers["webhook-id"] for r in receiver.received}
    stamps = [r.headers["webhook-timestamp"] for r in receiver.received]
    assert len(receiver.received) == 2 and ids == {hook.message_id}
    assert len(set(stamps)) == 2 and stamps == sorted(stamps)
    bodies = [r.body for r in receiver.received]
    assert bodies[0] == bodies[1]
    [delivery] = receiver.acknowledged()
    assert verify(delivery)["data"]["message_id"] == hook.message_id


async def drain_one(worker: DeliveryWorker, clock: FakeClock) -> None:
    """One round at the next due time."""
    next_at = await worker.outbox.next_due_at(worker.channels)
    assert next_at is not None
    clock.now = max(clock.now, next_at)
    assert await worker.relay_due() >= 1


async def test_a_tampered_body_a_wrong_secret_or_an_old_timestamp_fail_verification(rig: Rig) -> None:
    await rig.add()
    await drain(rig.worker(), rig.clock)
    headers, body = rig.receiver.acknowledged()[0].headers, rig.receiver.acknowledged()[0].body
    Webhook(SECRET).verify(body, headers)
    assert b"899.99" in body
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body.replace(b"899.99", b"1.00"), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + base64.b64encode(b"another secret").decode()).verify(body, headers)
    old = {**headers, "webhook-timestamp": str(int(headers["webhook-timestamp"]) - 6 * 60)}
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body, old)


async def test_a_secret_without_the_whsec_prefix_signs_as_stock_verifiers_read_it(rig: Rig) -> None:
    plain = SECRET.removeprefix("whsec_")
    await rig.outbox.add_call_completed(call_sid=CALL_SID, caller=CALLER, record={"duration_s": 42})
    await drain(rig.worker(WEBHOOK_SECRET=plain), rig.clock)
    headers, body = rig.receiver.acknowledged()[0].headers, rig.receiver.acknowledged()[0].body
    assert Webhook(plain).verify(body, headers)["data"]["duration_s"] == 42


async def test_call_completed_carries_the_transcript_and_duration(rig: Rig) -> None:
    record = {
        "duration_s": 73.5,
        "transcript": [{"role": "caller", "text": "washers"}],
        "metrics": {"turns": 3},
    }
    message_id = await rig.outbox.add_call_completed(call_sid=CALL_SID, caller=CALLER, record=record)
    await drain(rig.worker(), rig.clock)
    [delivery] = rig.receiver.acknowledged()
    event = verify(delivery)
    assert event["type"] == "call.completed" and delivery.headers["webhook-id"] == message_id
    assert event["data"] == {**record, "call_sid": CALL_SID, "caller": "***0001", "message_id": message_id}


async def test_a_410_is_recorded_as_permanent_and_raises_an_alert(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    rig.receiver.script = [(410, {})]
    await rig.add()
    with caplog.at_level(logging.ERROR, logger="bot.delivery"):
        await drain(rig.worker(), rig.clock)
    hook = (await rig.outbox.list_rows())[1]
    assert (hook.state, hook.error_code, hook.attempts) == ("failed", 410, 1)
    assert len(rig.receiver.received) == 1
    assert any(getattr(r, "alert", False) and "410" in r.getMessage() for r in caplog.records)


async def test_another_4xx_is_permanent_with_the_receivers_reason(rig: Rig) -> None:
    rig.receiver.script = [(422, {})]
    await rig.add()
    await drain(rig.worker(), rig.clock)
    hook = (await rig.outbox.list_rows())[1]
    assert hook.state == "failed" and hook.last_error == "HTTP 422 nope"
    assert len(rig.receiver.received) == 1


async def test_a_redirect_is_not_followed_and_counts_as_a_failed_attempt(rig: Rig) -> None:
    rig.receiver.script = [(307, {"Location": "http://127.0.0.1:9/elsewhere"})]
    await rig.add()
    await drain(rig.worker(), rig.clock)
    statuses = [r.status for r in rig.receiver.received]
    assert statuses == [307, 200]
    hook = (await rig.outbox.list_rows())[1]
    assert hook.state == "sent" and hook.attempts == 2


async def test_a_hanging_receiver_times_out_and_the_attempt_is_retried(rig: Rig) -> None:
    receiver = WebhookReceiver(script=[("hang", 1.0)])  # its own: the hung answer lands after the test
    rig.receiver = receiver
    await receiver.server.start()
    await rig.add()
    worker = rig.worker(WEBHOOK_TIMEOUT_S="0.3")
    try:
        await drain_one(worker, rig.clock)
        started = time.monotonic()
        await drain_one(worker, rig.clock)
        assert time.monotonic() - started < 0.9
        hook = (await rig.outbox.list_rows())[1]
        assert (hook.state, hook.last_error) == ("pending", "no answer within 0.3 s")
        await drain(worker, rig.clock)
    finally:
        await receiver.server.stop()
    assert (await rig.outbox.list_rows())[1].state == "sent"
    assert {r.headers["webhook-id"] for r in receiver.received} == {hook.message_id}


async def test_retries_follow_the_schedule_with_jitter_over_hours_until_the_receiver_returns(
    rig: Rig,
) -> None:
    receiver = WebhookReceiver()
    rig.receiver = receiver
    schedule = (5, 300, 1800, 7200, 18000)
    await rig.add()
    worker = rig.worker(WEBHOOK_RETRY_SCHEDULE_S=",".join(map(str, (*schedule, 36000))))
    await worker.relay_due()  # the SMS
    waits = []
    for _ in schedule:
        await drain_one(worker, rig.clock)
        hook = (await rig.outbox.list_rows())[1]
        assert hook.next_attempt_at is not None
        waits.append(hook.next_attempt_at - rig.clock())
    assert all(0.8 * s <= w <= 1.2 * s for w, s in zip(waits, schedule, strict=True))
    assert len(set(round(w / s, 3) for w, s in zip(waits, schedule, strict=True))) > 1
    await receiver.server.start()
    try:
        await drain(worker, rig.clock)
    finally:
        await receiver.server.stop()
    [delivery] = receiver.acknowledged()
    headers, body = delivery.headers, delivery.body
    stamp = int(headers["webhook-timestamp"])
    assert stamp >= time.time() + sum(schedule) * 0.8
    signed = Webhook(SECRET).sign(headers["webhook-id"], datetime.fromtimestamp(stamp, UTC), body.decode())
    assert headers["webhook-signature"] == signed


async def test_an_exhausted_schedule_dead_letters_the_event_with_an_alert(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    rig.receiver.script = [(503, {})] * 4
    await rig.add()
    with caplog.at_level(logging.ERROR, logger="bot.delivery"):
        await drain(rig.worker(), rig.clock)
    hook = (await rig.outbox.list_rows())[1]
    assert (hook.state, hook.attempts, hook.error_code) == ("dead", 4, 503)
    assert any(getattr(r, "alert", False) and "dead-lettered" in r.getMessage() for r in caplog.records)


async def test_webhook_rows_stay_pending_while_no_webhook_url_is_configured(rig: Rig) -> None:
    await rig.add()
    await drain(rig.worker(WEBHOOK_URL=""), rig.clock)
    rows = await rig.outbox.list_rows()
    assert [(r.channel, r.state) for r in rows] == [("sms", "sent"), ("webhook", "pending")]
    await drain(rig.worker(), rig.clock)
    assert len(rig.receiver.acknowledged()) == 1


# ---------------------------------------------------------------- restarts and the running worker


async def test_rows_caught_mid_attempt_resume_sms_by_lookup_and_webhooks_by_resend(rig: Rig) -> None:
    sms_id = await rig.add()
    hook_id = await rig.outbox.add_call_completed(call_sid=CALL_SID, caller=CALLER, record={})
    claimed = await rig.outbox.claim_due(rig.clock(), 10, ("sms", "webhook"))
    assert {r.message_id for r in claimed} == {sms_id, hook_id}
    assert await rig.outbox.recover(rig.clock()) == 2
    states = {(r.message_id, r.channel): r.state for r in await rig.outbox.list_rows()}
    assert states[(sms_id, "sms")] == "ambiguous" and states[(hook_id, "webhook")] == "pending"
    await drain(rig.worker(), rig.clock)
    assert len(rig.sim.messages_to(CALLER)) == 1
    assert {r.headers["webhook-id"] for r in rig.receiver.acknowledged()} == {sms_id, hook_id}


async def test_the_running_worker_relays_a_new_row_at_once(tmp_path: Path) -> None:
    receiver = WebhookReceiver()
    await receiver.server.start()
    settings = make_settings(tmp_path, WEBHOOK_URL=receiver.url)
    try:
        async with Outbox(settings.database_path) as outbox, httpx.AsyncClient() as http:
            worker = DeliveryWorker(outbox, settings, http, None)
            await worker.start()
            await asyncio.sleep(0.1)
            started = time.monotonic()
            await outbox.add_call_completed(call_sid=CALL_SID, caller=CALLER, record={})
            await receiver.wait_acknowledged(1)
            await worker.stop()
    finally:
        await receiver.server.stop()
    assert receiver.acknowledged() and time.monotonic() - started < 1.0


async def test_the_running_worker_never_has_more_attempts_in_flight_than_its_cap(tmp_path: Path) -> None:
    receiver = WebhookReceiver(script=[("hang", 0.2)] * 6)
    await receiver.server.start()
    settings = make_settings(tmp_path, WEBHOOK_URL=receiver.url)
    try:
        async with Outbox(settings.database_path) as outbox, httpx.AsyncClient() as http:
            for _ in range(6):
                await outbox.add_call_completed(call_sid=CALL_SID, caller=CALLER, record={})
            worker = DeliveryWorker(outbox, settings, http, None, max_concurrent=2)
            await worker.start()
            await receiver.wait_acknowledged(6)
            await worker.stop()
    finally:
        await receiver.server.stop()
    assert len(receiver.acknowledged()) == 6 and receiver.peak == 2


# ---------------------------------------------------------------- python -m bot outbox


async def test_the_outbox_command_lists_open_rows_with_masked_numbers(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    rig.sim.unsubscribed.add(CALLER)
    failed_id = await rig.add()
    await rig.worker().relay_due()
    pending_id = await rig.add()
    await asyncio.to_thread(main, ["--db", str(rig.outbox.path)])
    out = capsys.readouterr().out
    assert failed_id in out and pending_id in out and "[21610]" in out
    assert "***0001" in out and CALLER not in out
    assert "sent" not in out.split()
