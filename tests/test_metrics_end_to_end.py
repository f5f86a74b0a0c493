"""/metrics around scripted calls: each family moves by exactly what happened.

The whole deployment runs on 127.0.0.1 (the bot under uvicorn, the phone, the Realtime and Twilio
simulators, a webhook receiver); the test scrapes /metrics over HTTP before and after, the way
Prometheus would, and reads the figures with Prometheus's own text parser.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from scrape import Scrape, scrape
from standardwebhooks import Webhook

from bot.settings import SAMPLE_CATALOG_PATH
from bot.sim.phone import PhoneCall
from bot.sim.realtime import Scenario, ToolCall, Turn
from bot.sim.stack import CALLER, SimStack
from bot.wav import read_wav

pytestmark = pytest.mark.anyio

AUDIO = SAMPLE_CATALOG_PATH.parent.parent / "sim" / "audio"
SKUS = ["WM-2024-X500", "WM-2025-0001"]
REPLY_MS = 800
TWO_TURNS = Scenario(
    greeting="Hi, how can I help?",
    turns=[
        Turn(
            hears="Show me washing machines.",
            tool_calls=[ToolCall("search_products", {"query": "washing machines"})],
            say="{summary} Shall I text you the details?",
            audio_ms=REPLY_MS,
        ),
        Turn(
            hears="Yes, text me.",
            tool_calls=[ToolCall("send_product_details", {"skus": SKUS})],
            say="{message}",
            audio_ms=REPLY_MS,
        ),
    ],
)
ONE_TEXT = Scenario(greeting="Hi, how can I help?", turns=TWO_TURNS.turns[1:])
TOKEN_KINDS = [(m, k) for m in ("text", "audio") for k in ("input", "cached", "output")]


async def take_turn(call: PhoneCall, wav: str | None) -> None:
    if wav is not None:
        await call.say(read_wav(AUDIO / wav).data)
    await call.wait_for_audio(timeout=15)
    await call.wait_until_quiet(quiet_ms=700, timeout=15)


async def scrape_when(stack: SimStack, done: Any, what: str) -> Scrape:
    """Scrapes until `done(scrape)`: the bridge records a call's end just after its socket closes."""
    for _ in range(200):
        scraped = await scrape(stack.app_url)
        if done(scraped):
            return scraped
        await asyncio.sleep(0.05)
    raise AssertionError(f"/metrics never showed {what}: {scraped.samples}")


def completed_record(stack: SimStack) -> dict[str, Any]:
    [delivery] = [d for d in stack.receiver.acknowledged() if d.event["type"] == "call.completed"]
    data: dict[str, Any] = Webhook(stack.webhook_secret).verify(delivery.body, delivery.headers)["data"]
    return data


async def test_a_call_with_two_answered_turns_adds_one_call_two_turn_latencies_and_its_tokens(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="bot.bridge")
    async with SimStack(TWO_TURNS) as stack:
        before = await scrape(stack.app_url)
        async with stack.dial(CALLER, pace=False) as call:
            await take_turn(call, None)
            during = await scrape(stack.app_url)
            await take_turn(call, "caller_washers.wav")
            await take_turn(call, "caller_text_me.wav")
        after = await scrape_when(
            stack,
            lambda s: s.moved(before, "voicebot_calls_total", outcome="caller_hung_up"),
            "the call's end",
        )
        await stack.receiver.wait_until(
            lambda: any(d.event["type"] == "call.completed" for d in stack.receiver.acknowledged()), 15
        )
        record = completed_record(stack)

    assert during.moved(before, "voicebot_calls_active") == 1
    assert after.value("voicebot_calls_active") == before.value("voicebot_calls_active")
    assert after.moved(before, "voicebot_calls_started_total") == 1
    assert after.moved(before, "voicebot_calls_total", outcome="caller_hung_up") == 1
    assert after.moved(before, "voicebot_call_duration_seconds_count") == 1
    assert after.moved(before, "voicebot_call_duration_seconds_sum") == pytest.approx(record["duration_s"])

    waits = [
        r["first_audio_latency_ms"] for r in record["responses"] if r["first_audio_latency_ms"] is not None
    ]
    bot_parts = [r["bot_latency_ms"] for r in record["responses"] if r["bot_latency_ms"] is not None]
    assert len(waits) == len(bot_parts) == 2
    assert after.moved(before, "voicebot_turn_latency_seconds_count") == 2
    assert after.moved(before, "voicebot_turn_latency_seconds_sum") == pytest.approx(sum(waits) / 1000)
    assert after.moved(before, "voicebot_turn_bot_latency_seconds_count") == 2
    assert after.moved(before, "voicebot_turn_bot_latency_seconds_sum") == pytest.approx(
        sum(bot_parts) / 1000
    )

    tokens = {
        (m, k): after.moved(before, "voicebot_realtime_tokens_total", modality=m, kind=k)
        for m, k in TOKEN_KINDS
    }
    assert tokens == {(m, k): record["tokens"][f"{m}_{k}"] for m, k in TOKEN_KINDS}
    assert tokens[("audio", "output")] > 0 and tokens[("text", "input")] > 0
    assert record["cost_usd"] > 0
    [ended] = [r for r in caplog.records if r.getMessage() == "call ended"]
    assert ended.__dict__["cost_usd"] == record["cost_usd"]
    assert after.moved(before, "voicebot_realtime_cost_usd_total") == pytest.approx(
        record["cost_usd"], abs=1e-6
    )

    tools = after.by("voicebot_tool_calls_total", "tool")
    assert tools == {"search_products": 1, "send_product_details": 1}


async def test_an_opted_out_caller_adds_one_failed_sms_with_twilios_code_21610() -> None:
    async with SimStack(ONE_TEXT) as stack:
        stack.twilio_api.unsubscribed.add(CALLER)
        before = await scrape(stack.app_url)
        async with stack.dial(CALLER, pace=False) as call:
            await take_turn(call, None)
            await take_turn(call, "caller_text_me.wav")
        after = await scrape_when(stack, lambda s: s.by("voicebot_sms_total", "status"), "the SMS outcome")
    assert after.moved(before, "voicebot_sms_total", status="failed", code="21610") == 1
    assert after.by("voicebot_sms_total", "status") == {"failed": 1}


async def test_a_refused_stream_token_adds_one_rejection_with_its_reason() -> None:
    async with SimStack(ONE_TEXT) as stack:
        before = await scrape(stack.app_url)
        call = await stack.dial(custom_parameters={"caller": CALLER, "token": "not-a-token"})
        await call.wait_closed(5)
        after = await scrape(stack.app_url)
    assert call.close_code == 1008
    assert after.moved(before, "voicebot_stream_rejections_total", reason="malformed") == 1
    assert after.by("voicebot_stream_rejections_total", "reason") == {"malformed": 1}
    assert after.moved(before, "voicebot_calls_started_total") == 0


async def test_a_webhook_receiver_that_answers_500_once_adds_a_failed_attempt_then_a_delivered_one() -> None:
    async with SimStack(ONE_TEXT, env={"WEBHOOK_RETRY_SCHEDULE_S": "0.2"}) as stack:
        stack.receiver.script = [(500, {})]
        before = await scrape(stack.app_url)
        async with stack.dial(CALLER, pace=False) as call:
            await take_turn(call, None)
            await take_turn(call, "caller_text_me.wav")
        await stack.receiver.wait_until(lambda: len(stack.receiver.acknowledged()) == 2, 15)
        after = await scrape_when(
            stack,
            lambda s: sum(s.by("voicebot_webhook_attempts_total", "result").values()) == 3,
            "3 attempts",
        )
    [first, *_] = stack.receiver.received
    assert first.status == 500
    assert (
        after.moved(before, "voicebot_webhook_attempts_total", event=first.event["type"], result="failed")
        == 1
    )
    for event in ("products.sent", "call.completed"):
        assert after.moved(before, "voicebot_webhook_attempts_total", event=event, result="delivered") == 1
    assert after.by("voicebot_webhook_attempts_total", "result") == {"failed": 1, "delivered": 2}
