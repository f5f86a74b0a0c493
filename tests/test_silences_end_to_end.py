"""No stuck lines and no dead air, on the simulators' clocks, through the whole deployment.

A caller who says nothing is asked whether they are still there, then told goodbye and hung up
through the Calls API at the configured times; one who answers carries on. A tool slow to answer
(Twilio taking 3 s to accept a text) gets a short line said over it, and the text still goes out
once. Times are what the simulated phone heard (`PhoneCall.utterances`), the Realtime stand-in's
end of the caller's turn (`turns_ended_at`) and when the Twilio stand-in got the hang-up, all on
the monotonic clock.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from polling import until

from bot.settings import SAMPLE_CATALOG_PATH
from bot.sim.phone import PhoneCall
from bot.sim.realtime import Scenario, ToolCall, Turn
from bot.sim.stack import CALLER, SimStack
from bot.wav import read_wav
from bot.words import en

pytestmark = pytest.mark.anyio

AUDIO = SAMPLE_CATALOG_PATH.parent.parent / "sim" / "audio"
IDLE_S = 2.0
# What the stand-ins and the bot's pacer may add to a configured time on a busy machine.
SLACK_S = 0.5
# The phone plays a frame when it arrives: on a loaded machine a late last frame ends a line
# later than the bot's clock has it, so the next line may seem to start that much early.
EARLY_S = 0.15
TOOL_WAIT_BOUND_S = 1.5


class Recorder:
    """The Twilio stand-in's records, each with when it arrived (monotonic seconds)."""

    def __init__(self) -> None:
        self.entries: list[tuple[float, str, dict[str, Any]]] = []

    def __call__(self, kind: str, entry: dict[str, Any]) -> None:
        self.entries.append((time.monotonic(), kind, entry))

    def call_updates(self) -> list[tuple[float, dict[str, Any]]]:
        return [(at, entry) for at, kind, entry in self.entries if kind == "call_update"]


async def call_record(stack: SimStack) -> dict[str, Any]:
    await stack.receiver.wait_until(
        lambda: any(d.event["type"] == "call.completed" for d in stack.receiver.acknowledged()), 15
    )
    [record] = [d.event["data"] for d in stack.receiver.acknowledged() if d.event["type"] == "call.completed"]
    assert isinstance(record, dict)
    return record


# --- a silent caller ----------------------------------------------------------------------


async def test_a_silent_caller_is_asked_once_then_told_goodbye_and_hung_up_at_the_configured_times() -> None:
    twilio = Recorder()
    env = {"IDLE_PROMPT_S": str(IDLE_S), "IDLE_HANGUP_S": str(IDLE_S)}
    scenario = Scenario(greeting="Hi, how can I help?", turns=[], fallback_say="Hello, are you there?")
    async with SimStack(scenario, env=env, on_twilio_record=twilio) as stack:
        call = await stack.dial(CALLER)  # paced: silence frames in real time, as a real line
        await call.wait_closed(timeout=10 + 3 * IDLE_S)
        record = await call_record(stack)
    greeting, question, goodbye = call.utterances()
    assert IDLE_S - EARLY_S <= question[0] - greeting[1] <= IDLE_S + SLACK_S
    assert IDLE_S - EARLY_S <= goodbye[0] - question[1] <= IDLE_S + SLACK_S
    [(hung_up_at, update)] = twilio.call_updates()
    assert update["Status"] == "completed"
    assert 0 <= hung_up_at - call.dialled_at - goodbye[1] <= SLACK_S, "hung up once the goodbye was heard"
    session = stack.realtime.sessions[0]
    creates = [e for e in session.events_received if e.get("type") == "response.create"]
    asked = [e["response"]["instructions"] for e in creates]
    assert en.LINES.still_there in asked[1] and en.LINES.idle_goodbye in asked[2]
    assert record["outcome"] == "caller_idle" and record["idle_prompts"] == 1
    events = [turn["text"] for turn in record["transcript"] if turn["role"] == "event"]
    assert events == ["idle_prompt", "idle_hang_up"]


async def test_a_caller_who_answers_the_question_carries_on_normally() -> None:
    twilio = Recorder()
    env = {"IDLE_PROMPT_S": "1.5", "IDLE_HANGUP_S": "1.5"}
    scenario = Scenario(
        greeting="Hi, how can I help?",
        turns=[Turn(hears="Yes, sorry. Do you have washers?", say="We do, three of them.", audio_ms=800)],
        fallback_say="Are you still there?",
    )
    async with SimStack(scenario, env=env, on_twilio_record=twilio) as stack:
        call = await stack.dial(CALLER)
        await until(lambda: len(call.utterances()) == 2, 15)  # the greeting, then the question
        await call.wait_until_quiet(quiet_ms=300, timeout=10)
        await call.say(read_wav(AUDIO / "caller_washers.wav").data)
        await call.wait_for_audio(timeout=10)
        await call.wait_until_quiet(quiet_ms=500, timeout=10)
        await call.hang_up()
        record = await call_record(stack)
    assert twilio.call_updates() == [], "nobody hung up on the caller"
    assert [latency is not None for latency in call.first_audio_latencies()] == [True]
    assert record["outcome"] == "caller_hung_up" and record["idle_prompts"] == 1
    assert "We do, three of them." in [turn["text"] for turn in record["transcript"]]


# --- a slow tool --------------------------------------------------------------------------


def slow_text_scenario() -> Scenario:
    return Scenario(
        greeting="Hi, how can I help?",
        turns=[
            Turn(
                hears="Text me the washer.",
                tool_calls=[ToolCall("send_product_details", {"skus": ["WM-2024-X500"]})],
                say="{message}",
                audio_ms=800,
            )
            for _ in range(2)
        ],
    )


async def ask_for_a_text(call: PhoneCall) -> None:
    await call.wait_for_audio(timeout=10)
    await call.wait_until_quiet(quiet_ms=400, timeout=10)
    await call.say(read_wav(AUDIO / "caller_text_me.wav").data)
    await call.wait_for_audio(timeout=10)


async def test_with_twilio_slow_to_accept_a_text_the_caller_hears_the_bot_within_1_5_s() -> None:
    async with SimStack(slow_text_scenario()) as stack:
        stack.twilio_api.create_delay_s = 3.0
        async with stack.dial(CALLER) as call:
            await ask_for_a_text(call)
            await until(lambda: len(call.utterances()) == 3, 15)  # the greeting, one moment, the answer
            await call.wait_until_quiet(quiet_ms=500, timeout=10)
        record = await call_record(stack)
        await until(
            lambda: any(d.event["type"] == "products.sent" for d in stack.receiver.acknowledged()), 15
        )
    session = stack.realtime.sessions[0]
    [asked_at] = session.turns_ended_at
    heard = [call.dialled_at + start for start, _ in call.utterances()]
    first_heard = min(at for at in heard if at > asked_at)
    assert first_heard - asked_at <= TOOL_WAIT_BOUND_S
    spoken = [text for role, text in session.transcript if role == "assistant"]
    assert spoken[1] == en.LINES.one_moment_words
    [(_, output)] = session.tool_outputs
    assert json.loads(output)["sms"] == "queued", "Twilio had not accepted it when the tool answered"
    assert spoken[2] == en.RESULTS.text_on_its_way, "the tool's output got its own response after the line"
    assert len(stack.twilio_api.messages_to(CALLER)) == 1, "the text still goes out, once"
    assert record["tool_wait_lines"] == 1


async def test_a_quick_tool_gets_no_line_said_over_it() -> None:
    async with SimStack(slow_text_scenario()) as stack:
        async with stack.dial(CALLER) as call:
            await ask_for_a_text(call)
            await call.wait_until_quiet(quiet_ms=500, timeout=10)
        record = await call_record(stack)
    assert len(call.utterances()) == 2, "the greeting and the answer"
    assert record["tool_wait_lines"] == 0
    spoken = [text for role, text in stack.realtime.sessions[0].transcript if role == "assistant"]
    assert en.LINES.one_moment_words not in spoken
