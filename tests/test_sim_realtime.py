"""The Realtime simulator over real sockets: handshake, schema, VAD, responses, tools, faults.

Every server event a test receives is validated against `openai.types.realtime`'s
`RealtimeServerEvent` and checked for fields the schema does not know.
"""

from __future__ import annotations

import asyncio
import audioop
import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import websockets
from openai import AsyncOpenAI
from openai.types.realtime import RealtimeConversationItemUserMessageParam, RealtimeServerEvent
from pydantic import BaseModel, TypeAdapter, ValidationError
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidStatus
from websockets.typing import Subprotocol

from bot.sim.realtime import RealtimeSimulator, Scenario, ToolCall, Turn
from bot.wav import read_wav

pytestmark = pytest.mark.anyio

AUDIO_DIR = Path(__file__).parent.parent / "bot" / "sim" / "audio"
KEY = "sk-sim-test"
SERVER_EVENTS: TypeAdapter[Any] = TypeAdapter(RealtimeServerEvent)
# The real service sends these session fields; the SDK's session models do not declare them.
SESSION_EXTRAS = {"id", "object", "expires_at"}
SEARCH = ToolCall("search_products", {"query": "washing machine"})
SCENARIO = Scenario(
    greeting="Hello, how can I help?",
    turns=[
        Turn(say="{summary} Shall I text you?", tool_calls=[SEARCH], hears="washers please"),
        Turn(say="Sure thing.", audio_ms=1000),
    ],
)
SESSION = {
    "type": "realtime",
    "instructions": "You are a store assistant.",
    "output_modalities": ["audio"],
    "audio": {
        "input": {
            "format": {"type": "audio/pcm", "rate": 24000},
            "turn_detection": {"type": "server_vad", "threshold": 0.5, "silence_duration_ms": 500},
            "transcription": {"model": "gpt-4o-mini-transcribe"},
        },
        "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "marin"},
    },
    "tools": [
        {
            "type": "function",
            "name": "search_products",
            "description": "Search the catalog",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
        }
    ],
}


def unknown_fields(value: Any, path: str = "") -> list[str]:
    """Fields of a validated event that the GA schema does not declare."""
    found: list[str] = []
    if isinstance(value, BaseModel):
        found += [f"{path}.{key}".lstrip(".") for key in value.model_extra or {}]
        for name in type(value).model_fields:
            found += unknown_fields(getattr(value, name), f"{path}.{name}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += unknown_fields(item, f"{path}[{index}]")
    return found


class Client:
    """A test client that checks every server event against the GA server-event models."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.received: list[dict[str, Any]] = []

    async def send(self, event: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(event))

    async def recv(self) -> dict[str, Any]:
        event: dict[str, Any] = json.loads(await asyncio.wait_for(self.ws.recv(), 5))
        model = SERVER_EVENTS.validate_python(event)
        extras = [f for f in unknown_fields(model) if f.removeprefix("session.") not in SESSION_EXTRAS]
        assert not extras, f"{event['type']} has fields outside the schema: {extras}"
        self.received.append(event)
        return event

    async def until(self, event_type: str) -> list[dict[str, Any]]:
        events = [await self.recv()]
        while events[-1]["type"] != event_type:
            events.append(await self.recv())
        return events

    async def error(self) -> dict[str, Any]:
        event = await self.recv()
        assert event["type"] == "error", event
        error: dict[str, Any] = event["error"]
        return error

    async def append(self, pcm: bytes, frame_bytes: int = 960) -> None:
        for start in range(0, len(pcm), frame_bytes):
            chunk = base64.b64encode(pcm[start : start + frame_bytes]).decode()
            await self.send({"type": "input_audio_buffer.append", "audio": chunk})


def caller_pcm24k(name: str = "caller_washers") -> bytes:
    wav = read_wav(AUDIO_DIR / f"{name}.wav")
    pcm8k = audioop.ulaw2lin(wav.data, 2)
    return audioop.ratecv(pcm8k, 2, 1, 8000, 24000, None)[0]


def types(events: list[dict[str, Any]]) -> list[str]:
    """Event types with runs of the same delta type collapsed into one."""
    out: list[str] = []
    for event in events:
        if not (out and out[-1] == event["type"] and event["type"].endswith(".delta")):
            out.append(event["type"])
    return out


@pytest.fixture
async def sim() -> AsyncIterator[RealtimeSimulator]:
    simulator = RealtimeSimulator(SCENARIO, api_key=KEY, audio_speed=float("inf"))
    await simulator.start()
    yield simulator
    await simulator.stop()


@contextlib.asynccontextmanager
async def connect(
    sim: RealtimeSimulator, session: dict[str, Any] | None = SESSION, key: str = KEY
) -> AsyncIterator[Client]:
    # max_queue=None: a test that stops reading early must still see the server's close frame.
    async with websockets.connect(
        f"{sim.url}?model=gpt-realtime",
        additional_headers={"Authorization": f"Bearer {key}"},
        max_queue=None,
    ) as ws:
        client = Client(ws)
        assert (await client.recv())["type"] == "session.created"
        if session is not None:
            await client.send({"type": "session.update", "session": session})
            assert (await client.recv())["type"] == "session.updated"
        yield client


@pytest.fixture
async def client(sim: RealtimeSimulator) -> AsyncIterator[Client]:
    async with connect(sim) as c:
        yield c


async def refusal(url: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    with pytest.raises(InvalidStatus) as info:
        async with websockets.connect(url, additional_headers=headers):
            pass
    return info.value.response.status_code, json.loads(info.value.response.body or b"{}")


# --- handshake ------------------------------------------------------------------------------


async def test_handshake_without_a_key_is_refused_with_401(sim: RealtimeSimulator) -> None:
    status, body = await refusal(f"{sim.url}?model=gpt-realtime", {})
    assert status == 401
    assert "didn't provide an API key" in body["error"]["message"]


async def test_handshake_with_a_wrong_key_is_refused_with_401(sim: RealtimeSimulator) -> None:
    status, body = await refusal(
        f"{sim.url}?model=gpt-realtime", {"Authorization": "Bearer sk-wrong-key-1234"}
    )
    assert (status, body["error"]["code"]) == (401, "invalid_api_key")
    assert "sk-wrong-key-1234" not in body["error"]["message"]


async def test_handshake_without_a_model_is_refused_with_400(sim: RealtimeSimulator) -> None:
    status, body = await refusal(sim.url, {"Authorization": f"Bearer {KEY}"})
    assert (status, body["error"]["param"]) == (400, "model")


async def test_beta_header_gets_beta_api_shape_disabled_then_close(sim: RealtimeSimulator) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "OpenAI-Beta": "realtime=v1"}
    async with websockets.connect(f"{sim.url}?model=gpt-realtime", additional_headers=headers) as ws:
        error = await Client(ws).error()
        assert error["code"] == "beta_api_shape_disabled"
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)


@pytest.mark.parametrize("status", [401, 403, 429, 500])
async def test_handshake_status_switch_refuses_connections(sim: RealtimeSimulator, status: int) -> None:
    sim.reject_handshake_status = status
    got, body = await refusal(f"{sim.url}?model=gpt-realtime", {"Authorization": f"Bearer {KEY}"})
    assert got == status and body["error"]["message"]
    sim.reject_handshake_status = None
    async with connect(sim):
        pass
    assert len(sim.sessions) == 1


# --- session --------------------------------------------------------------------------------


async def test_session_update_answers_the_full_effective_config(sim: RealtimeSimulator) -> None:
    async with connect(sim, session=None) as client:
        await client.send({"type": "session.update", "session": SESSION})
        session = (await client.recv())["session"]
    detection = session["audio"]["input"]["turn_detection"]
    assert detection["prefix_padding_ms"] == 300 and detection["interrupt_response"] is True
    assert session["audio"]["output"]["voice"] == "marin"
    assert session["tools"][0]["name"] == "search_products"
    assert session["model"] == "gpt-realtime" and session == sim.sessions[0].session


async def test_session_update_with_a_beta_field_is_an_unknown_parameter(client: Client) -> None:
    update = {"type": "realtime", "voice": "alloy"}
    await client.send({"type": "session.update", "event_id": "evt_1", "session": update})
    error = await client.error()
    assert (error["code"], error["param"], error["event_id"]) == (
        "unknown_parameter",
        "session.voice",
        "evt_1",
    )


async def test_session_update_without_a_type_is_a_missing_parameter(client: Client) -> None:
    await client.send({"type": "session.update", "session": {"instructions": "hi"}})
    error = await client.error()
    assert (error["code"], error["param"]) == ("missing_required_parameter", "session.type")


@pytest.mark.parametrize(
    ("event", "code", "param"),
    [
        ({"type": "response.craete"}, "invalid_value", "type"),
        ({"event_id": "x"}, "missing_required_parameter", "type"),
        (
            {"type": "conversation.item.truncate", "item_id": "i", "content_index": 0},
            "missing_required_parameter",
            "audio_end_ms",
        ),
        ({"type": "conversation.item.delete", "item_id": 7}, "invalid_type", "item_id"),
        (
            {"type": "input_audio_buffer.append", "audio": "AAAA", "format": "pcm16"},
            "unknown_parameter",
            "format",
        ),
        (
            {
                "type": "session.update",
                "session": {
                    "type": "realtime",
                    "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}},
                },
            },
            "invalid_value",
            "session.audio.input.format.rate",
        ),
    ],
)
async def test_client_events_failing_the_client_models_are_rejected(
    client: Client, event: dict[str, Any], code: str, param: str
) -> None:
    await client.send(event)
    error = await client.error()
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", code, param)


async def test_an_invalid_json_frame_is_an_error_and_the_session_goes_on(client: Client) -> None:
    await client.ws.send("{not json")
    assert (await client.error())["code"] == "invalid_json"
    await client.send({"type": "input_audio_buffer.clear"})
    assert (await client.recv())["type"] == "input_audio_buffer.cleared"


# --- VAD ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["audio/pcm", "audio/pcmu"])
async def test_vad_finds_the_caller_turn_in_the_fixture_recording(sim: RealtimeSimulator, fmt: str) -> None:
    session = json.loads(json.dumps(SESSION))
    session["audio"]["input"]["format"] = {"type": fmt}
    async with connect(sim, session) as client:
        if fmt == "audio/pcm":
            await client.append(caller_pcm24k())
        else:
            await client.append(read_wav(AUDIO_DIR / "caller_washers.wav").data, 160)
        events = await client.until("response.done")
    # Speech runs from 370 ms to 3270 ms in the recording; prefix 300 ms, silence 500 ms.
    started, stopped = events[0], events[1]
    assert started["type"] == "input_audio_buffer.speech_started"
    assert abs(started["audio_start_ms"] - 70) <= 20
    assert stopped["type"] == "input_audio_buffer.speech_stopped"
    assert abs(stopped["audio_end_ms"] - 3770) <= 20
    assert stopped["item_id"] == started["item_id"] == events[2]["item_id"]
    assert types(events)[2:8] == [
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
        "conversation.item.input_audio_transcription.delta",
        "conversation.item.input_audio_transcription.completed",
        "response.created",
    ]
    assert events[6]["transcript"] == "washers please"


async def test_silence_produces_no_vad_events(client: Client) -> None:
    await client.append(b"\x00\x00" * 24000 * 2)
    await client.send({"type": "input_audio_buffer.clear"})
    assert (await client.recv())["type"] == "input_audio_buffer.cleared"


async def test_appends_are_counted_not_stored(sim: RealtimeSimulator, client: Client) -> None:
    await client.append(b"\x00\x00" * 24000)
    await client.send({"type": "input_audio_buffer.clear"})
    await client.until("input_audio_buffer.cleared")
    record = sim.sessions[0]
    assert (record.audio_appends, record.input_audio_ms) == (50, 1000)
    assert [e["type"] for e in record.events_received] == ["session.update", "input_audio_buffer.clear"]


async def test_input_audio_is_recorded_as_pcm16_when_asked(sim: RealtimeSimulator) -> None:
    sim.record_input_audio = True
    session = json.loads(json.dumps(SESSION))
    session["audio"]["input"]["format"] = {"type": "audio/pcmu"}
    mulaw = read_wav(AUDIO_DIR / "caller_washers.wav").data[:8000]
    async with connect(sim, session) as client:
        await client.append(mulaw, 160)
        await client.send({"type": "input_audio_buffer.clear"})
        await client.until("input_audio_buffer.cleared")
    assert bytes(sim.sessions[0].input_audio) == audioop.ulaw2lin(mulaw, 2)


async def test_semantic_vad_ends_the_turn_after_its_eagerness_wait(sim: RealtimeSimulator) -> None:
    session = json.loads(json.dumps(SESSION))
    session["audio"]["input"]["turn_detection"] = {"type": "semantic_vad", "eagerness": "low"}
    async with connect(sim, session) as client:
        await client.append(caller_pcm24k() + b"\x00\x00" * 24000)
        events = await client.until("input_audio_buffer.speech_stopped")
    assert abs(events[-1]["audio_end_ms"] - (3270 + 1500)) <= 20


async def test_vad_threshold_above_the_speech_level_hears_nothing(sim: RealtimeSimulator) -> None:
    session = json.loads(json.dumps(SESSION))
    session["audio"]["input"]["turn_detection"]["threshold"] = 1.0
    async with connect(sim, session) as client:
        await client.append(caller_pcm24k())
        await client.send({"type": "input_audio_buffer.clear"})
        assert (await client.recv())["type"] == "input_audio_buffer.cleared"


async def test_vad_honours_prefix_padding_and_silence_duration(sim: RealtimeSimulator) -> None:
    session = json.loads(json.dumps(SESSION))
    detection = {"type": "server_vad", "prefix_padding_ms": 0, "silence_duration_ms": 200}
    session["audio"]["input"]["turn_detection"] = {**detection, "create_response": False}
    async with connect(sim, session) as client:
        await client.append(caller_pcm24k())
        await client.send({"type": "input_audio_buffer.clear"})
        events = await client.until("input_audio_buffer.cleared")
    starts = [e["audio_start_ms"] for e in events if e["type"].endswith("speech_started")]
    stops = [e for e in events if e["type"].endswith("speech_stopped")]
    assert abs(starts[0] - 370) <= 20
    assert len(starts) >= 2, "a 200 ms silence limit splits the recording at its pauses"
    assert not [e for e in events if e["type"].startswith("response.")]
    assert len(stops) == len(starts)


# --- responses ------------------------------------------------------------------------------


def user_text(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


async def say_to(client: Client, text: str) -> list[dict[str, Any]]:
    """Sends a user text item and `response.create`; returns the events up to `response.done`."""
    await client.send({"type": "conversation.item.create", "item": user_text(text)})
    await client.until("conversation.item.done")
    await client.send({"type": "response.create"})
    return await client.until("response.done")


async def first_delta(client: Client) -> dict[str, Any]:
    events = await client.until("response.output_audio.delta")
    return events[-1]


async def test_greeting_is_the_full_ga_response_sequence(sim: RealtimeSimulator, client: Client) -> None:
    await client.send({"type": "response.create", "response": {"instructions": "Greet."}})
    events = await client.until("response.done")
    assert [t for t in types(events) if not t.endswith(".delta")] == [
        "response.created",
        "rate_limits.updated",
        "response.output_item.added",
        "conversation.item.added",
        "response.content_part.added",
        "response.output_audio.done",
        "response.output_audio_transcript.done",
        "response.content_part.done",
        "response.output_item.done",
        "conversation.item.done",
        "response.done",
    ]
    transcript = "".join(e["delta"] for e in events if e["type"] == "response.output_audio_transcript.delta")
    audio = b"".join(
        base64.b64decode(e["delta"]) for e in events if e["type"] == "response.output_audio.delta"
    )
    assert transcript == SCENARIO.greeting
    assert len(audio) == len(SCENARIO.greeting) * 65 * 48  # 65 ms per character, PCM16 24 kHz
    done = events[-1]["response"]
    assert done["status"] == "completed"
    assert done["output"][0]["content"][0]["transcript"] == SCENARIO.greeting
    assert done["usage"]["output_token_details"]["audio_tokens"] > 0
    assert sim.sessions[0].transcript == [("assistant", SCENARIO.greeting)]


async def test_audio_deltas_are_chunks_of_100_ms_in_the_output_format(sim: RealtimeSimulator) -> None:
    session = json.loads(json.dumps(SESSION))
    session["audio"]["output"]["format"] = {"type": "audio/pcmu"}
    async with connect(sim, session) as client:
        await client.send({"type": "response.create"})
        events = await client.until("response.done")
    sizes = [len(base64.b64decode(e["delta"])) for e in events if e["type"].endswith("audio.delta")]
    assert set(sizes[:-1]) == {800}  # mu-law 8 kHz: 8 bytes per ms
    assert sum(sizes) == len(SCENARIO.greeting) * 65 * 8


async def test_audio_is_paced_at_audio_speed_times_real_time(sim: RealtimeSimulator, client: Client) -> None:
    sim.audio_speed = 10.0
    started = time.monotonic()
    await client.send({"type": "response.create"})
    await client.until("response.done")
    elapsed = time.monotonic() - started
    spoken_s = len(SCENARIO.greeting) * 0.065
    assert spoken_s / 10 * 0.8 <= elapsed < spoken_s / 2


async def test_text_input_takes_the_next_turn(sim: RealtimeSimulator, client: Client) -> None:
    await say_to(client, "washers please")
    await client.send({"type": "conversation.item.create", "item": function_output(client, "{}")})
    await client.until("conversation.item.done")
    await client.send({"type": "response.create"})
    await client.until("response.done")
    events = await say_to(client, "yes")
    done = [e for e in events if e["type"] == "response.output_audio_transcript.done"]
    assert done[0]["transcript"] == "Sure thing."
    assert sim.sessions[0].transcript[-2:] == [("user", "yes"), ("assistant", "Sure thing.")]


def function_output(client: Client, output: str) -> dict[str, Any]:
    call = next(e for e in reversed(client.received) if e["type"] == "response.function_call_arguments.done")
    return {"type": "function_call_output", "call_id": call["call_id"], "output": output}


async def test_tool_call_round_trip_speaks_the_tool_summary(sim: RealtimeSimulator, client: Client) -> None:
    events = await say_to(client, "washers please")
    assert [t for t in types(events) if t.startswith("response.")] == [
        "response.created",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.done",
    ]
    call = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert (call["name"], json.loads(call["arguments"])) == (SEARCH.name, SEARCH.arguments)
    assert events[-1]["response"]["output"][0]["type"] == "function_call"
    output = json.dumps({"found": 2, "summary": "Two washers under $600."})
    await client.send({"type": "conversation.item.create", "item": function_output(client, output)})
    assert (await client.recv())["type"] == "conversation.item.added"
    await client.send({"type": "response.create"})
    events = await client.until("response.done")
    spoken = next(e for e in events if e["type"] == "response.output_audio_transcript.done")
    assert spoken["transcript"] == "Two washers under $600. Shall I text you?"
    assert sim.sessions[0].tool_outputs == [(call["call_id"], output)]


async def test_function_output_for_an_unknown_call_is_an_error(client: Client) -> None:
    item = {"type": "function_call_output", "call_id": "call_nope", "output": "{}"}
    await client.send({"type": "conversation.item.create", "item": item})
    assert (await client.error())["param"] == "item.call_id"


async def test_response_create_during_an_active_response_is_an_error(
    sim: RealtimeSimulator, client: Client
) -> None:
    sim.audio_speed = 1.0
    await client.send({"type": "response.create"})
    await first_delta(client)
    await client.send({"type": "response.create"})
    events = await client.until("error")
    assert events[-1]["error"]["code"] == "conversation_already_has_active_response"


async def test_response_cancel_stops_the_audio_and_reports_cancelled(
    sim: RealtimeSimulator, client: Client
) -> None:
    sim.audio_speed = 1.0
    await client.send({"type": "response.create"})
    await first_delta(client)
    await client.send({"type": "response.cancel"})
    events = await client.until("response.done")
    done = events[-1]["response"]
    assert (done["status"], done["status_details"]["reason"]) == ("cancelled", "client_cancelled")
    assert done["output"][0]["status"] == "incomplete"
    assert len([e for e in client.received if e["type"] == "response.output_audio.delta"]) < 5


async def test_response_cancel_with_nothing_active_is_an_error(client: Client) -> None:
    await client.send({"type": "response.cancel"})
    assert (await client.error())["code"] == "response_cancel_not_active"


async def test_caller_speech_interrupts_the_active_response(sim: RealtimeSimulator, client: Client) -> None:
    sim.audio_speed = 1.0
    await client.send({"type": "response.create"})
    response_id = (await first_delta(client))["response_id"]
    await client.append(caller_pcm24k())
    events = await client.until("input_audio_buffer.speech_stopped")
    started = next(i for i, e in enumerate(events) if e["type"].endswith("speech_started"))
    after = events[started:]
    assert not [e for e in after if e["type"] == "response.output_audio.delta"]
    done = next(e for e in after if e["type"] == "response.done")["response"]
    assert (done["id"], done["status"]) == (response_id, "cancelled")
    assert done["status_details"]["reason"] == "turn_detected"


async def test_truncate_is_recorded_and_confirmed(sim: RealtimeSimulator, client: Client) -> None:
    await client.send({"type": "response.create"})
    events = await client.until("response.done")
    item_id = events[-1]["response"]["output"][0]["id"]
    truncate = {"item_id": item_id, "content_index": 0, "audio_end_ms": 500}
    await client.send({"type": "conversation.item.truncate", **truncate})
    reply = await client.recv()
    assert reply["type"] == "conversation.item.truncated" and reply["audio_end_ms"] == 500
    assert sim.sessions[0].truncations == [(item_id, 0, 500)]


async def test_truncate_past_the_audio_sent_is_an_error(sim: RealtimeSimulator, client: Client) -> None:
    await client.send({"type": "response.create"})
    events = await client.until("response.done")
    item_id = events[-1]["response"]["output"][0]["id"]
    sent_ms = len(SCENARIO.greeting) * 65
    truncate = {"item_id": item_id, "content_index": 0, "audio_end_ms": sent_ms + 1}
    await client.send({"type": "conversation.item.truncate", **truncate})
    error = await client.error()
    assert f"Audio content of {sent_ms}ms is already shorter than {sent_ms + 1}ms" in error["message"]
    assert sim.sessions[0].truncations == []


async def test_truncate_of_an_unknown_item_is_an_error(client: Client) -> None:
    truncate = {"item_id": "item_nope", "content_index": 0, "audio_end_ms": 0}
    await client.send({"type": "conversation.item.truncate", **truncate})
    assert (await client.error())["param"] == "item_id"


async def test_output_audio_buffer_clear_is_refused_on_websocket(client: Client) -> None:
    await client.send({"type": "output_audio_buffer.clear"})
    assert "WebRTC" in (await client.error())["message"]


async def test_commit_with_too_little_audio_is_an_error(client: Client) -> None:
    await client.append(b"\x00\x00" * 240)
    await client.send({"type": "input_audio_buffer.commit"})
    assert (await client.error())["code"] == "input_audio_buffer_commit_empty"


# --- fault switches -------------------------------------------------------------------------


async def test_drop_after_events_resets_the_socket_after_n_events(
    sim: RealtimeSimulator, client: Client
) -> None:
    sim.drop_after_events = 3
    await client.send({"type": "response.create"})
    got = []
    with pytest.raises(ConnectionClosedError) as info:
        while True:
            got.append(await client.recv())
    assert len(got) == 3
    assert info.value.rcvd is None  # no close frame: the connection was reset
    assert sim.drop_after_events is None
    for _ in range(100):
        if sim.open_connections == 0:
            break
        await asyncio.sleep(0.01)
    assert sim.sessions[0].closed


@pytest.mark.parametrize("switch", ["event_delay_s", "read_delay_s"], ids=["write", "read"])
async def test_a_delay_switch_slows_every_exchange(
    sim: RealtimeSimulator, client: Client, switch: str
) -> None:
    setattr(sim, switch, 0.05)
    started = time.monotonic()
    for _ in range(2):
        await client.send({"type": "input_audio_buffer.clear"})
    await client.until("input_audio_buffer.cleared")
    await client.until("input_audio_buffer.cleared")
    assert time.monotonic() - started >= 0.1


async def test_injected_error_reaches_the_open_session(sim: RealtimeSimulator, client: Client) -> None:
    sim.inject_error("session_expired", "Your session hit the maximum duration.")
    error = await client.error()
    assert (error["code"], error["type"]) == ("session_expired", "invalid_request_error")


async def test_injected_error_waits_for_the_next_session(sim: RealtimeSimulator) -> None:
    sim.inject_error("rate_limit_exceeded", "Slow down.", error_type="server_error")
    async with connect(sim, session=None) as client:
        error = await client.error()
    assert (error["code"], error["type"]) == ("rate_limit_exceeded", "server_error")


async def test_close_with_closes_open_sessions_with_that_code(sim: RealtimeSimulator, client: Client) -> None:
    reason = "Your session hit the maximum duration of 60 minutes."
    sim.close_with(1001, reason)
    with pytest.raises(ConnectionClosed):
        await client.recv()
    assert (client.ws.close_code, client.ws.close_reason) == (1001, reason)


# --- REST: client secrets -------------------------------------------------------------------


async def mint(sim: RealtimeSimulator, body: dict[str, Any], key: str = KEY) -> httpx.Response:
    async with httpx.AsyncClient(base_url=sim.base_url) as http:
        return await http.post(
            "/v1/realtime/client_secrets", json=body, headers={"Authorization": f"Bearer {key}"}
        )


async def test_client_secret_opens_a_session_with_its_config(sim: RealtimeSimulator) -> None:
    session = {"type": "realtime", "instructions": "Be brief.", "audio": {"output": {"voice": "cedar"}}}
    reply = await mint(sim, {"expires_after": {"anchor": "created_at", "seconds": 60}, "session": session})
    assert reply.status_code == 200
    secret = reply.json()
    assert secret["value"].startswith("ek_") and secret["session"]["audio"]["output"]["voice"] == "cedar"
    async with connect(sim, session=None, key=secret["value"]) as client:
        created = client.received[0]["session"]
    assert (created["instructions"], created["audio"]["output"]["voice"]) == ("Be brief.", "cedar")


async def test_client_secret_needs_the_api_key(sim: RealtimeSimulator) -> None:
    reply = await mint(sim, {}, key="sk-wrong")
    assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"


async def test_client_secret_with_a_beta_session_field_is_refused(sim: RealtimeSimulator) -> None:
    reply = await mint(sim, {"session": {"type": "realtime", "input_audio_format": "pcm16"}})
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "session.input_audio_format"


async def test_expired_client_secret_is_refused_at_the_handshake() -> None:
    now = [1_000_000.0]
    sim = RealtimeSimulator(SCENARIO, clock=lambda: now[0])
    await sim.start()
    try:
        secret = (await mint(sim, {"expires_after": {"anchor": "created_at", "seconds": 10}})).json()
        now[0] += 11
        status, _ = await refusal(
            f"{sim.url}?model=gpt-realtime", {"Authorization": f"Bearer {secret['value']}"}
        )
        assert status == 401
    finally:
        await sim.stop()


async def test_a_refused_client_secret_gets_the_status_openai_would_send(sim: RealtimeSimulator) -> None:
    sim.reject_client_secrets_status = 503
    refused = await mint(sim, {})
    sim.reject_client_secrets_status = None
    assert refused.status_code == 503 and "overloaded" in refused.json()["error"]["message"]
    assert (await mint(sim, {})).status_code == 200


# --- browsers: the client secret in the subprotocol, REST and WebSocket on one port --------------


def browser_subprotocols(secret: str) -> list[Subprotocol]:
    return [Subprotocol("realtime"), Subprotocol(f"openai-insecure-api-key.{secret}")]


async def test_rest_and_websocket_share_one_port_as_on_openais_host(sim: RealtimeSimulator) -> None:
    assert urlsplit(sim.url).netloc == urlsplit(sim.base_url).netloc
    assert (await mint(sim, {})).status_code == 200


async def test_a_browser_opens_a_session_with_the_secret_in_the_subprotocol(sim: RealtimeSimulator) -> None:
    session = {"type": "realtime", "instructions": "Show products.", "audio": {"output": {"voice": "cedar"}}}
    secret = (await mint(sim, {"session": session})).json()["value"]
    url = f"{sim.url}?model=gpt-realtime"
    async with websockets.connect(url, subprotocols=browser_subprotocols(secret)) as ws:
        created = await Client(ws).recv()
        assert ws.subprotocol == "realtime", "only `realtime` is echoed, never the secret"
        assert secret not in str(ws.response.headers if ws.response else "")
    assert created["session"]["instructions"] == "Show products."
    assert sim.sessions[-1].client_secret == secret


@pytest.mark.parametrize("secret", ["ek_unknown", ""], ids=["unknown", "empty"])
async def test_a_browser_with_an_unknown_secret_is_refused_with_401(
    sim: RealtimeSimulator, secret: str
) -> None:
    url = f"{sim.url}?model=gpt-realtime"
    with pytest.raises(InvalidStatus) as info:
        async with websockets.connect(url, subprotocols=browser_subprotocols(secret)):
            pass
    assert info.value.response.status_code == 401


async def test_an_expired_secret_in_the_subprotocol_is_refused_with_401() -> None:
    now = [1_000_000.0]
    sim = RealtimeSimulator(SCENARIO, clock=lambda: now[0])
    await sim.start()
    try:
        secret = (await mint(sim, {"expires_after": {"anchor": "created_at", "seconds": 10}})).json()["value"]
        now[0] += 11
        with pytest.raises(InvalidStatus) as info:
            async with websockets.connect(
                f"{sim.url}?model=gpt-realtime", subprotocols=browser_subprotocols(secret)
            ):
                pass
        assert info.value.response.status_code == 401
    finally:
        await sim.stop()


async def test_the_key_subprotocol_without_realtime_is_refused_with_400(sim: RealtimeSimulator) -> None:
    secret = (await mint(sim, {})).json()["value"]
    with pytest.raises(InvalidStatus) as info:
        async with websockets.connect(
            f"{sim.url}?model=gpt-realtime", subprotocols=[Subprotocol(f"openai-insecure-api-key.{secret}")]
        ):
            pass
    assert info.value.response.status_code == 400


async def test_the_beta_subprotocol_gets_beta_api_shape_disabled(sim: RealtimeSimulator) -> None:
    secret = (await mint(sim, {})).json()["value"]
    offered = [*browser_subprotocols(secret), Subprotocol("openai-beta.realtime-v1")]
    async with websockets.connect(f"{sim.url}?model=gpt-realtime", subprotocols=offered) as ws:
        assert (await Client(ws).error())["code"] == "beta_api_shape_disabled"


async def test_the_openai_sdk_given_one_base_url_mints_a_secret_and_runs_a_text_turn() -> None:
    scenario = Scenario(greeting="Hello!", turns=[Turn(say="We have three washers.")])
    async with RealtimeSimulator(scenario, api_key=KEY, audio_speed=float("inf")) as sim:
        base_url = sim.base_url + "/v1"
        minted = await AsyncOpenAI(api_key=KEY, base_url=base_url).realtime.client_secrets.create(
            session={"type": "realtime", "model": "gpt-realtime", "output_modalities": ["text"]}
        )
        browser = AsyncOpenAI(api_key=minted.value, base_url=base_url)
        async with browser.realtime.connect(model="gpt-realtime") as connection:
            question: RealtimeConversationItemUserMessageParam = {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "Washers?"}],
            }
            await connection.conversation.item.create(item=question)
            await connection.response.create()
            text = ""
            async for event in connection:
                if event.type == "response.output_text.done":
                    text = event.text
                if event.type == "response.done":
                    break
    assert minted.value.startswith("ek_")
    assert text == "We have three washers."
    assert sim.sessions[0].client_secret == minted.value


# --- scenarios ------------------------------------------------------------------------------


def test_bundled_washers_scenario_loads_by_name() -> None:
    scenario = Scenario.from_json("washers")
    assert scenario.turns[0].tool_calls[0] == SEARCH
    assert "{summary}" in scenario.turns[0].say


def test_scenario_with_an_unknown_field_is_refused() -> None:
    with pytest.raises(ValidationError):
        Scenario.from_dict({"greeting": "hi", "turns": [{"say": "x", "tool": "search"}]})
