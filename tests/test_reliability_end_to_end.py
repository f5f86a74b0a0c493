"""Rows of docs/reliability.md that need the whole deployment: the real app under uvicorn with its
outbox and relay, the Realtime simulator, the Twilio REST stand-in and a webhook receiver."""

from __future__ import annotations

import json
import sqlite3

import httpx
import pytest
from polling import until

from bot.settings import PACKAGE_DIR
from bot.sim.realtime import Scenario, ToolCall, Turn
from bot.sim.stack import CALLER, SimStack
from bot.wav import read_wav

pytestmark = pytest.mark.anyio

TEXT_ME = read_wav(PACKAGE_DIR / "sim" / "audio" / "caller_text_me.wav").data
SKUS = ["WM-2024-X500", "WM-2025-0001"]
SEND_DETAILS = Scenario(
    greeting="Hi, how can I help?",
    turns=[
        Turn(
            hears="Text me the washers.",
            tool_calls=[ToolCall("send_product_details", {"skus": SKUS})],
            say="Done, the details are on their way to your phone. Anything else?",
            audio_ms=6000,
        )
    ],
)
FAST_RETRIES = {"WEBHOOK_RETRY_SCHEDULE_S": "0.2,0.2,0.2"}


async def health(stack: SimStack) -> dict[str, object]:
    async with httpx.AsyncClient() as client:
        body: dict[str, object] = (await client.get(stack.app_url + "/healthz")).json()
        return body


def delivered(stack: SimStack) -> set[str]:
    return {d.event["type"] for d in stack.receiver.acknowledged()}


async def test_a_realtime_drop_mid_answer_clears_tries_twice_falls_back_and_loses_no_promised_text() -> None:
    async with SimStack(SEND_DETAILS, env=FAST_RETRIES) as stack:
        call = await stack.dial(CALLER, pace=False)
        await call.wait_for_audio(10.0)
        await call.wait_until_quiet(500, 10.0)
        await call.say(TEXT_ME)
        await call.wait_for_audio(15.0)
        stack.realtime.reject_handshake_status = 503
        stack.realtime.drop_after_events = 1
        await call.wait_closed(15.0)
        await stack.receiver.wait_until(lambda: delivered(stack) >= {"products.sent", "call.completed"}, 15)

        assert [e.kind for e in call.events if e.kind == "clear"] == ["clear"]
        assert stack.realtime.handshakes_refused == 2
        [update] = stack.twilio_api.call_updates
        assert update["call_sid"] == call.call_sid and "Sorry" in update["Twiml"]
        [sms] = stack.twilio_api.messages_to(CALLER)
        assert "SmartWash Pro 500 Front Load Washer" in sms["body"]
        [completed] = [d for d in stack.receiver.acknowledged() if d.event["type"] == "call.completed"]
        assert completed.event["data"]["outcome"] == "fallback"


async def test_a_database_refusing_writes_mid_call_is_spoken_about_shows_in_health_and_recovers() -> None:
    async with SimStack(SEND_DETAILS) as stack:
        assert stack.settings is not None
        call = await stack.dial(CALLER, pace=False)
        await call.wait_for_audio(10.0)
        await call.wait_until_quiet(500, 10.0)
        blocker = sqlite3.connect(stack.settings.database_path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            await call.say(TEXT_ME)
            session = stack.realtime.sessions[0]
            await until(lambda: bool(session.tool_outputs), timeout_s=15)
            during = await health(stack)
            await call.wait_for_audio(10.0)
            assert call.connected
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        await call.hang_up()
        await stack.receiver.wait_until(lambda: "call.completed" in delivered(stack), 15)
        after = await health(stack)

    [(_, output)] = session.tool_outputs
    assert json.loads(output)["sent"] is False
    assert "could not send the text" in json.loads(output)["message"]
    assert during["status"] == "degraded" and "outbox" in during["degraded"]  # type: ignore[operator]
    assert after["status"] == "ok"
    assert stack.twilio_api.messages_to(CALLER) == []
