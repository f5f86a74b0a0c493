"""The relay delivers each promise once by SMS and at least once by signed webhook, through faults.

Every behaviour runs on both stores (SQLite, and a real PostgreSQL server). Real sockets: the
Twilio stand-in and a scripted webhook receiver on 127.0.0.1. A fake clock steps through retry
schedules, so hours of retries take milliseconds.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from datetime import UTC, datetime

import pytest
from outbox_rig import (
    CALL_SID,
    CALLER,
    SECRET,
    STORE,
    Rig,
    collection,
    drain,
    drain_one,
    opened,
    verify,
)
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from bot.outbox.messages import sms_reference
from bot.sim.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """One event loop for the module, so the stand-ins start once, not once per test."""
    return "asyncio"


# ---------------------------------------------------------------- the outbox


async def test_adding_details_writes_the_sms_and_a_webhook_waiting_for_it_in_one_go(rig: Rig) -> None:
    message_id = await rig.add()
    rows = await rig.outbox.list_rows()
    assert [(r.message_id, r.channel, r.state) for r in rows] == [
        (message_id, "sms", "pending"),
        (message_id, "webhook", "waiting"),
    ]
    assert rows[0].recipient == CALLER
    assert rows[0].body is not None and f"Ref {sms_reference(message_id)}" in rows[0].body
    assert rows[1].payload["data"]["caller"] == "***0001"


# ---------------------------------------------------------------- SMS through Twilio


async def test_one_sms_reaches_the_caller_and_the_signed_webhook_reports_it(rig: Rig) -> None:
    message_id = await rig.add()
    await drain(rig.relay(), rig.clock)
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
    relay = rig.relay()
    await relay.relay_due()
    row = (await rig.outbox.list_rows(["ambiguous"]))[0]
    assert "500" in (row.last_error or "")
    await drain(relay, rig.clock)
    assert len(rig.sim.messages_to(CALLER)) == 1
    sms_row = (await rig.outbox.list_rows())[0]
    assert sms_row.state == "sent" and sms_row.result == [rig.sim.messages[0]["sid"]]


async def test_a_500_that_created_nothing_is_sent_once_after_the_lookup(rig: Rig) -> None:
    rig.sim.fail_next(1, status=500)
    await rig.add()
    await drain(rig.relay(), rig.clock)
    assert len(rig.sim.messages_to(CALLER)) == 1
    assert len(rig.receiver.acknowledged()) == 1


async def test_a_twilio_timeout_is_settled_by_lookup_without_a_second_sms(rig: Rig) -> None:
    rig.sim.hang_next(1, seconds=1.0)
    await rig.add()
    await drain(rig.relay(twilio_timeout_s=0.3), rig.clock)
    assert len(rig.sim.messages_to(CALLER)) == 1
    assert verify(rig.receiver.acknowledged()[0])["data"]["sms"]["status"] == "sent"


async def test_a_429_is_retried_no_sooner_than_its_retry_after(rig: Rig) -> None:
    rig.sim.fail_next(1, status=429, retry_after=20)
    await rig.add()
    relay = rig.relay()
    start = rig.clock()
    await relay.relay_due()
    [row] = await rig.outbox.list_rows(["pending"])
    assert row.next_attempt_at is not None and row.next_attempt_at >= start + 20
    rig.clock.advance(19)
    assert await relay.relay_due() == 0
    rig.clock.advance(1)
    await drain(relay, rig.clock)
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
    await drain(rig.relay(), rig.clock)
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
    await drain(rig.relay(), rig.clock)
    outcome = await waiting
    assert outcome is not None and (outcome.state, outcome.error_code) == ("failed", 21610)


async def test_a_tool_asking_after_the_sms_went_out_gets_the_outcome_at_once(rig: Rig) -> None:
    message_id = await rig.add()
    await drain(rig.relay(), rig.clock)
    outcome = await rig.outbox.sms_outcome(message_id, timeout_s=0.01)
    assert outcome is not None and outcome.state == "sent"


async def test_a_tool_waiting_on_an_unsent_sms_gives_up_after_its_timeout(rig: Rig) -> None:
    message_id = await rig.add()
    assert await rig.outbox.sms_outcome(message_id, timeout_s=0.05) is None


async def test_a_caller_without_a_textable_number_is_recorded_without_asking_twilio(rig: Rig) -> None:
    await rig.add(caller="client:alice")
    await drain(rig.relay(), rig.clock)
    sms_row = (await rig.outbox.list_rows())[0]
    assert sms_row.state == "failed" and sms_row.last_error == "the caller's number cannot get texts"
    assert rig.sim.request_count == 0
    assert len(rig.receiver.acknowledged()) == 1


async def test_sms_rows_fail_at_once_when_texting_is_not_configured(rig: Rig) -> None:
    await rig.add()
    relay = rig.relay()
    relay.twilio = None
    await drain(relay, rig.clock)
    assert rig.sim.messages == []
    assert verify(rig.receiver.acknowledged()[0])["data"]["sms"]["error"]["message"] == (
        "texting is not configured"
    )


# ---------------------------------------------------------------- webhooks


async def test_a_down_then_503_receiver_gets_one_acknowledged_delivery_with_one_id(rig: Rig) -> None:
    receiver = WebhookReceiver(script=[(503, {"Retry-After": "30"})])
    rig.receiver = receiver
    await rig.add()
    relay = rig.relay()
    for _ in range(3):  # the SMS, then two refused connections
        await drain_one(relay, rig.clock)
    hook = await rig.outbox.get((await rig.outbox.list_rows())[0].message_id, "webhook")
    assert hook is not None and hook.attempts == 2 and "ConnectError" in (hook.last_error or "")
    await receiver.server.start()
    try:
        await drain_one(relay, rig.clock)
        retry_at = (await rig.outbox.list_rows(["pending"]))[0].next_attempt_at
        assert retry_at is not None and retry_at - rig.clock() >= 30
        await drain(relay, rig.clock)
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


async def test_each_webhook_attempt_and_sms_outcome_is_counted_for_metrics(rig: Rig) -> None:
    relay = rig.relay()
    rig.receiver.script = [(500, {})]
    rig.sim.unsubscribed.add("+15551230009")
    await rig.add(caller="+15551230009")
    await drain(relay, rig.clock)
    attempts = relay.metrics.samples("voicebot_webhook_attempts_total", "result")
    assert attempts == {"failed": 1, "delivered": 1}
    assert relay.metrics.sample("voicebot_sms_total", status="failed", code="21610") == 1


async def test_a_tampered_body_a_wrong_secret_or_an_old_timestamp_fail_verification(rig: Rig) -> None:
    await rig.add()
    await drain(rig.relay(), rig.clock)
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
    await drain(rig.relay(WEBHOOK_SECRET=plain), rig.clock)
    headers, body = rig.receiver.acknowledged()[0].headers, rig.receiver.acknowledged()[0].body
    assert Webhook(plain).verify(body, headers)["data"]["duration_s"] == 42


async def test_call_completed_carries_the_transcript_and_duration(rig: Rig) -> None:
    record = {
        "duration_s": 73.5,
        "transcript": [{"role": "caller", "text": "washers"}],
        "metrics": {"turns": 3},
    }
    message_id = await rig.outbox.add_call_completed(call_sid=CALL_SID, caller=CALLER, record=record)
    await drain(rig.relay(), rig.clock)
    [delivery] = rig.receiver.acknowledged()
    event = verify(delivery)
    assert event["type"] == "call.completed" and delivery.headers["webhook-id"] == message_id
    assert event["data"] == {**record, "call_sid": CALL_SID, "caller": "***0001", "message_id": message_id}


async def test_a_410_disables_webhooks_to_that_url_with_one_alert_until_an_operator_re_enables_them(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    rig.receiver.script = [(410, {})]
    first = await rig.add()
    second = await rig.add_record()
    relay = rig.relay()
    with caplog.at_level(logging.INFO, logger="bot.outbox.relay"):
        await drain(relay, rig.clock)
        await drain(relay, rig.clock)
    assert len(rig.receiver.received) == 1, "nothing more goes to a URL that answered 410"
    hooks = [r for r in await rig.outbox.list_rows() if r.channel == "webhook"]
    assert [r.state for r in hooks] == ["pending", "pending"], "the events wait, none is failed"
    [gone] = [r for r in hooks if r.error_code == 410]
    assert gone.attempts == 0, "a held event keeps its whole retry schedule"
    alerts = [r for r in caplog.records if getattr(r, "alert", False)]
    assert len(alerts) == 1 and "410" in alerts[0].getMessage()
    assert "webhooks" in rig.outbox.problems()
    [endpoint] = await rig.outbox.disabled_endpoints()
    assert endpoint.url == rig.receiver.url

    await rig.outbox.enable_endpoints(None)
    await drain(relay, rig.clock)
    assert {d.headers["webhook-id"] for d in rig.receiver.acknowledged()} == {first, second}
    assert "webhooks" not in rig.outbox.problems()


async def test_a_410_seen_by_one_relay_holds_webhooks_for_every_relay_sharing_the_outbox(rig: Rig) -> None:
    rig.receiver.script = [(410, {})]
    await rig.add_record()
    await drain(rig.relay(), rig.clock)
    async with opened(rig.stores, rig.clock) as elsewhere:
        await elsewhere.add_call_completed(call_sid=CALL_SID, caller=CALLER, record={})
        other = rig.relay(outbox=elsewhere)
        await drain(other, rig.clock)
        assert await other.next_due_at() is None and "webhooks" in elsewhere.problems()
    assert len(rig.receiver.received) == 1


async def test_another_4xx_is_permanent_with_the_receivers_reason(rig: Rig) -> None:
    rig.receiver.script = [(422, {})]
    await rig.add()
    await drain(rig.relay(), rig.clock)
    hook = (await rig.outbox.list_rows())[1]
    assert hook.state == "failed" and hook.last_error == "HTTP 422 nope"
    assert len(rig.receiver.received) == 1


async def test_a_redirect_is_not_followed_and_counts_as_a_failed_attempt(rig: Rig) -> None:
    # The redirect points back at the receiver: followed, it would deliver in one attempt.
    rig.receiver.script = [(307, {"Location": rig.receiver.url})]
    await rig.add()
    await drain(rig.relay(), rig.clock)
    statuses = [r.status for r in rig.receiver.received]
    assert statuses == [307, 200]
    hook = (await rig.outbox.list_rows())[1]
    assert hook.state == "sent" and hook.attempts == 2


async def test_a_hanging_receiver_times_out_and_the_attempt_is_retried(rig: Rig) -> None:
    receiver = WebhookReceiver(script=[("hang", 1.0)])  # its own: the hung answer lands after the test
    rig.receiver = receiver
    await receiver.server.start()
    await rig.add()
    relay = rig.relay(WEBHOOK_TIMEOUT_S="0.3")
    try:
        await drain_one(relay, rig.clock)
        started = time.monotonic()
        await drain_one(relay, rig.clock)
        assert time.monotonic() - started < 0.9
        hook = (await rig.outbox.list_rows())[1]
        assert (hook.state, hook.last_error) == ("pending", "no answer within 0.3 s")
        await drain(relay, rig.clock)
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
    relay = rig.relay(WEBHOOK_RETRY_SCHEDULE_S=",".join(map(str, (*schedule, 36000))))
    await relay.relay_due()  # the SMS
    waits = []
    for _ in schedule:
        await drain_one(relay, rig.clock)
        hook = (await rig.outbox.list_rows())[1]
        assert hook.next_attempt_at is not None
        waits.append(hook.next_attempt_at - rig.clock())
    assert all(0.8 * s <= w <= 1.2 * s for w, s in zip(waits, schedule, strict=True))
    assert len(set(round(w / s, 3) for w, s in zip(waits, schedule, strict=True))) > 1
    await receiver.server.start()
    try:
        await drain(relay, rig.clock)
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
    with caplog.at_level(logging.ERROR, logger="bot.outbox.relay"):
        await drain(rig.relay(), rig.clock)
    hook = (await rig.outbox.list_rows())[1]
    assert (hook.state, hook.attempts, hook.error_code) == ("dead", 4, 503)
    assert any(getattr(r, "alert", False) and "dead-lettered" in r.getMessage() for r in caplog.records)


async def test_no_webhook_is_queued_while_webhooks_are_off_but_the_sms_still_is(rig: Rig) -> None:
    async with opened(rig.stores, rig.clock, webhooks=False) as outbox:
        message_id = await outbox.add_product_details(
            call_sid=CALL_SID, caller=CALLER, collection=collection()
        )
        assert await outbox.add_call_completed(call_sid=CALL_SID, caller=CALLER, record={}) is None
        relay = rig.relay(outbox=outbox, WEBHOOK_URL="")
        await drain(relay, rig.clock)
    rows = await rig.outbox.list_rows()
    assert [(r.message_id, r.channel, r.state) for r in rows] == [(message_id, "sms", "sent")]
    await drain(rig.relay(), rig.clock)
    assert rig.receiver.received == [], "configuring webhooks later sends nothing from before"


# ---------------------------------------------------------------- the running relay


async def test_the_running_relay_relays_a_new_row_at_once(rig: Rig) -> None:
    relay = rig.relay()
    relay.clock = time.time
    await relay.start()
    try:
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await rig.add_record()
        await rig.receiver.wait_acknowledged(1)
    finally:
        await relay.stop()
    assert time.monotonic() - started < 1.0


async def test_the_running_relay_never_has_more_attempts_in_flight_than_its_cap(rig: Rig) -> None:
    rig.receiver.script = [("hang", 0.2)] * 6
    for _ in range(6):
        await rig.add_record()
    relay = rig.relay()
    relay.clock, relay.max_concurrent = time.time, 2
    await relay.start()
    try:
        await rig.receiver.wait_acknowledged(6)
    finally:
        await relay.stop()
    assert len(rig.receiver.acknowledged()) == 6 and rig.receiver.peak == 2
