"""A whole phone call through the real app under uvicorn: the simulated phone dials the signed
voice webhook and streams a caller recording, the Realtime simulator answers with a tool call,
the real tools search the sample catalog. What the caller heard must be the bot's voice."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from bot.audio import MULAW_SILENCE_BYTE, OutboundTranscoder, ulaw_to_pcm16
from bot.settings import PACKAGE_DIR
from bot.sim.realtime import DEFAULT_SPEECH_WAV, Scenario, ToolCall, Turn
from bot.sim.stack import SimStack
from bot.wav import read_wav

pytestmark = pytest.mark.anyio

WASHERS = read_wav(PACKAGE_DIR / "sim" / "audio" / "caller_washers.wav").data
SCENARIO = Scenario(
    greeting="Hello, thanks for calling the store. What are you looking for?",
    turns=[
        Turn(
            say="I found a few washers for you.",
            tool_calls=[ToolCall("search_products", {"query": "washer"})],
            hears="Do you have washing machines?",
        )
    ],
)
SPEECH_CORRELATION_MIN = 0.9


def ended_calls(stack: SimStack) -> float:
    return sum(stack.runtime.metrics.samples("voicebot_calls_total", "outcome").values())


def as_float(pcm16: bytes) -> np.ndarray:
    return np.frombuffer(pcm16, dtype="<i2").astype(np.float64)


def best_correlation(window: np.ndarray, source: np.ndarray) -> float:
    """The highest normalised correlation of `window` against any same-length part of `source`
    (1.0: the same waveform; speech against noise or another voice stays far below)."""
    dots = np.correlate(source, window, mode="valid")
    energies = np.convolve(source**2, np.ones(len(window)), mode="valid")
    return float(np.max(dots / (np.linalg.norm(window) * np.sqrt(energies) + 1e-9)))


def bot_voice_at_8khz() -> np.ndarray:
    """The simulator's voice (its bundled recording) as a phone line carries it."""
    transcoder = OutboundTranscoder()
    source = read_wav(DEFAULT_SPEECH_WAV).data
    ulaw = transcoder.convert(source) + transcoder.flush()
    return as_float(ulaw_to_pcm16(ulaw))


@pytest.mark.parametrize("audio_format", ["pcm16", "pcmu"])
async def test_a_scripted_call_from_greeting_to_hang_up(tmp_path: Path, audio_format: str) -> None:
    async with SimStack(SCENARIO, env={"AUDIO_FORMAT": audio_format}) as stack:
        call = await stack.dial(pace=False)
        await call.wait_for_audio(5.0, min_ms=1000)
        await call.wait_until_quiet(500, 10.0)
        greeting_ms = call.heard_ms()
        await call.say(WASHERS)
        await call.wait_for_audio(10.0, min_ms=1000)
        await call.wait_until_quiet(500, 15.0)
        answer_ms = call.heard_ms() - greeting_ms
        await call.hang_up()
        bridge = stack.runtime.bridge
        assert bridge is not None
        for _ in range(100):
            ended_cleanly = not bridge.active_calls and stack.realtime.open_connections == 0
            if ended_calls(stack) == 1 and ended_cleanly:
                break
            await asyncio.sleep(0.02)
        active_after, ended = len(bridge.active_calls), ended_calls(stack)
        realtime_open_after = stack.realtime.open_connections
        call.write_heard_wav(tmp_path / "heard.wav")
        played = call.played
        session = stack.realtime.sessions[0]

    assert greeting_ms > 1000
    assert session.input_audio_ms >= len(WASHERS) // 8 - 100
    assert ("user", "Do you have washing machines?") in session.transcript
    [(_, output)] = session.tool_outputs
    products = json.loads(output)
    assert "washer" in json.dumps(products).lower()
    assert answer_ms > 1000
    assert (active_after, ended) == (0, 1)
    assert realtime_open_after == 0
    heard = read_wav(tmp_path / "heard.wav")
    assert (heard.rate_hz, heard.encoding) == (8000, "mulaw")
    assert len(heard.data.replace(bytes([MULAW_SILENCE_BYTE]), b"")) <= len(played) <= len(heard.data)
    # The waveform as played back to back: a scheduling gap on a loaded test machine (the phone
    # waiting on the next chunk) is silence in `heard`, not a flaw in the audio.
    samples = as_float(ulaw_to_pcm16(played))
    loud = np.flatnonzero(np.abs(samples) > 500)
    greeting = samples[loud[0] : loud[0] + 4000]
    assert best_correlation(greeting, bot_voice_at_8khz()[:16000]) > SPEECH_CORRELATION_MIN


async def test_a_call_logs_the_catalog_load_and_each_tool_run_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with SimStack(SCENARIO) as stack:
        call = await stack.dial(pace=False)
        await call.wait_for_audio(5.0, min_ms=1000)
        await call.wait_until_quiet(500, 10.0)
        await call.say(WASHERS)
        await call.wait_for_audio(10.0, min_ms=1000)
        await call.hang_up()
        [(_, _)] = stack.realtime.sessions[0].tool_outputs
    messages = [record.getMessage() for record in caplog.records]
    assert messages.count("catalog loaded") == 1
    assert messages.count("tool ran") == 1


async def test_barge_in_truncates_at_what_the_phone_really_played_within_one_frame() -> None:
    """What the model is told the caller heard matches what the phone played, to 20 ms.

    The app runs as deployed, in its own process (`serve`), so the phone (Twilio) and the bot do
    not share one event loop's delays; the phone takes its times where the bytes arrive
    (bot.sim.phone), the bridge where its readers receive them; and the caller talks over the bot
    in real time, as callers do."""
    scenario = Scenario(greeting="Hi there!", turns=[Turn(say="A long answer.", audio_ms=6000)])
    async with SimStack(scenario, subprocess=True) as stack:
        call = await stack.dial(pace=False)
        await call.wait_for_audio(5.0)
        await call.wait_until_quiet(400, 10.0)
        await call.say(WASHERS)
        await call.wait_for_audio(10.0, min_ms=1500)
        call.pace = True
        await call.say(WASHERS)
        session = stack.realtime.sessions[0]
        for _ in range(250):
            if session.truncations:
                break
            await asyncio.sleep(0.02)
        [(item_id, content_index, audio_end_ms)] = session.truncations
        clears = [e for e in call.events if e.kind == "clear"]
        await call.hang_up()
    assert content_index == 0 and len(clears) == 1
    sent_ms = max(int(m.name.split(":")[1]) for m in call.marks if m.name.endswith(":" + item_id))
    flushed_ms = int(clears[0].detail.removesuffix("ms"))
    played_ms = sent_ms - flushed_ms
    assert audio_end_ms > 500
    assert abs(played_ms - audio_end_ms) <= 20
