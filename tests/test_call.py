"""The call state machine, as plain function calls: no sockets, no sleeps, time as an argument.

Every Realtime client event the call emits is checked against the openai package's GA
schema (and for fields the schema does not declare, which its models would silently keep).
"""

from __future__ import annotations

import base64
import json
from typing import Any, get_args

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.realtime import RealtimeClientEvent, RealtimeServerEvent
from pydantic import BaseModel, TypeAdapter

from bot.call import (
    CHUNK_MAX_MS,
    FRAME_MS,
    GAP_FILL_MAX_MS,
    INFLIGHT_MAX,
    INPUT_STALL_MS,
    PACE_BURST_MS,
    PACE_MAX_LEAD_MS,
    RESPONSE_HOLD_MS,
    Action,
    Call,
    HangUp,
    Note,
    Reconnect,
    RotateSession,
    RunTool,
    ToRealtime,
    ToTwilio,
    Transfer,
    TurnTimed,
)
from bot.call import (
    PCM24K_BYTES_PER_MS as PCM_BYTES_PER_MS,
)
from bot.realtime_events import Ignored, Malformed, parse_server_event
from bot.tools import ToolResult
from bot.twilio_stream import Dtmf, Mark, Media
from bot.words import en

SID = "MZ" + "1" * 32
CALL_SID = "CA" + "2" * 32
CLIENT_EVENT: TypeAdapter[RealtimeClientEvent] = TypeAdapter(RealtimeClientEvent)
# The GA model of each server event type, so a test's event is checked against its own schema.
SERVER_EVENT_MODELS: dict[str, type[BaseModel]] = {
    get_args(model.model_fields["type"].annotation)[0]: model
    for model in get_args(get_args(RealtimeServerEvent)[0])
}


def assert_no_undeclared_fields(model: BaseModel, path: str) -> None:
    assert not model.model_extra, f"{path}: fields the GA schema does not declare: {model.model_extra}"
    for name in type(model).model_fields:
        value = getattr(model, name)
        values = value if isinstance(value, list) else [value]
        for index, child in enumerate(values):
            if isinstance(child, BaseModel):
                assert_no_undeclared_fields(child, f"{path}.{name}[{index}]")


def realtime_events(actions: list[Action]) -> list[dict[str, Any]]:
    """The Realtime client events among the actions, each validated against the GA schema."""
    events = []
    for action in actions:
        if isinstance(action, ToRealtime):
            event = json.loads(action.text)
            model = CLIENT_EVENT.validate_python(event)
            assert_no_undeclared_fields(model, event["type"])
            events.append(event)
    return events


def feed(call: Call, event: dict[str, Any], now_ms: int) -> list[Action]:
    """A server event as OpenAI sends it (checked against the GA schema), through the edge parser."""
    wire = {"event_id": "event_test", **event}
    SERVER_EVENT_MODELS[wire["type"]].model_validate(wire)
    parsed = parse_server_event(json.dumps(wire))
    assert not isinstance(parsed, Malformed | Ignored), parsed
    return call.on_realtime(parsed, now_ms)


def twilio_frames(actions: list[Action]) -> list[dict[str, Any]]:
    return [json.loads(a.text) for a in actions if isinstance(a, ToTwilio)]


def of_type(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("type") == kind or e.get("event") == kind]


def new_call(**options: Any) -> Call:
    options.setdefault("audio_format", "pcmu")
    call = Call(call_sid=CALL_SID, stream_sid=SID, now_ms=0, **options)
    call.session_opened(0)
    feed(call, response_created("resp_greet"), 0)
    feed(call, response_done("resp_greet"), 0)
    return call


def media(ts: int, ms: int = FRAME_MS, byte: int = 0x7F) -> Media:
    audio = bytes([byte]) * (ms * 8)
    return Media(SID, ts, base64.b64encode(audio).decode(), audio)


def response_created(response_id: str) -> dict[str, Any]:
    return {"type": "response.created", "response": {"id": response_id, "status": "in_progress"}}


def response_done(
    response_id: str, status: str = "completed", usage: dict[str, Any] | None = None
) -> dict[str, Any]:
    response: dict[str, Any] = {"id": response_id, "status": status}
    if usage is not None:
        response["usage"] = usage
    return {"type": "response.done", "response": response}


def delta(item_id: str, response_id: str, ms: int) -> dict[str, Any]:
    audio = base64.b64encode(b"\x55" * (ms * 8)).decode()
    return {
        "type": "response.output_audio.delta",
        "response_id": response_id,
        "item_id": item_id,
        "output_index": 0,
        "content_index": 0,
        "delta": audio,
    }


def audio_done(item_id: str, response_id: str) -> dict[str, Any]:
    return {
        "type": "response.output_audio.done",
        "response_id": response_id,
        "item_id": item_id,
        "output_index": 0,
        "content_index": 0,
    }


def speech_started(item_id: str = "item_user") -> dict[str, Any]:
    return {"type": "input_audio_buffer.speech_started", "audio_start_ms": 0, "item_id": item_id}


def speech_stopped(item_id: str = "item_user") -> dict[str, Any]:
    return {"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 0, "item_id": item_id}


def output_transcript(item_id: str, text: str) -> dict[str, Any]:
    return {
        "type": "response.output_audio_transcript.done",
        "response_id": "resp_any",
        "item_id": item_id,
        "output_index": 0,
        "content_index": 0,
        "transcript": text,
    }


def input_transcript(item_id: str, text: str) -> dict[str, Any]:
    return {
        "type": "conversation.item.input_audio_transcription.completed",
        "item_id": item_id,
        "content_index": 0,
        "transcript": text,
        "usage": {"type": "duration", "seconds": 1.0},
    }


def marks(actions: list[Action]) -> list[str]:
    return [f["mark"]["name"] for f in twilio_frames(actions) if f["event"] == "mark"]


def media_ms(actions: list[Action]) -> list[int]:
    """Milliseconds of audio in each media message sent."""
    frames = twilio_frames(actions)
    return [len(base64.b64decode(f["media"]["payload"])) // 8 for f in frames if f["event"] == "media"]


def sent_ms(actions: list[Action]) -> int:
    return sum(media_ms(actions))


def echo(call: Call, names: list[str], now_ms: int) -> list[Action]:
    actions: list[Action] = []
    for name in names:
        actions += call.on_twilio(Mark(SID, name), now_ms)
    return actions


def speak(call: Call, item_id: str, response_id: str, ms: int, now_ms: int = 0) -> list[Action]:
    """A whole response of `ms` audio arriving at once (the model is faster than real time)."""
    actions = feed(call, response_created(response_id), now_ms)
    actions += feed(call, delta(item_id, response_id, ms), now_ms)
    actions += feed(call, audio_done(item_id, response_id), now_ms)
    return actions


def speak_in_frames(call: Call, item_id: str, response_id: str, ms: int, now_ms: int = 0) -> list[Action]:
    """Like `speak`, with the audio in 20 ms deltas: each goes out at once as its own message."""
    actions = feed(call, response_created(response_id), now_ms)
    for _ in range(ms // FRAME_MS):
        actions += feed(call, delta(item_id, response_id, FRAME_MS), now_ms)
    actions += feed(call, audio_done(item_id, response_id), now_ms)
    return actions


# --- greeting and up-link -------------------------------------------------------------


def test_the_first_session_greets_at_once_without_waiting_for_session_updated() -> None:
    call = Call(call_sid=CALL_SID, stream_sid=SID, now_ms=0, audio_format="pcmu")
    events = realtime_events(call.session_opened(0))
    assert [e["type"] for e in events] == ["response.create"]
    assert en.AGENT.greet in events[0]["response"]["instructions"]


def test_pcmu_media_is_passed_through_as_an_append_of_the_same_base64() -> None:
    call = new_call()
    frame = media(0)
    events = realtime_events(call.on_twilio(frame, 0))
    assert events == [{"type": "input_audio_buffer.append", "audio": frame.payload}]


def test_a_timestamp_jump_is_filled_with_mulaw_silence_before_the_frame() -> None:
    call = new_call()
    call.on_twilio(media(0), 0)
    events = realtime_events(call.on_twilio(media(100), 100))
    assert len(events) == 2
    assert base64.b64decode(events[0]["audio"]) == b"\xff" * (80 * 8)
    assert events[1]["audio"] == media(100).payload


def test_gap_fill_is_capped() -> None:
    call = new_call()
    call.on_twilio(media(0), 0)
    events = realtime_events(call.on_twilio(media(60_000), 60_000))
    assert len(base64.b64decode(events[0]["audio"])) == GAP_FILL_MAX_MS * 8


def test_contiguous_and_repeated_timestamps_get_no_silence() -> None:
    call = new_call()
    sent = []
    for ts in (0, 20, 40, 40, 20, 60):
        sent += realtime_events(call.on_twilio(media(ts), ts))
    assert len(sent) == 6
    assert call.gap_fill_ms == 0


def test_media_stopping_mid_speech_sends_silence_once_so_vad_can_close_the_turn() -> None:
    call = new_call()
    call.on_twilio(media(0), 0)
    feed(call, speech_started(), 10)
    assert call.next_deadline() == INPUT_STALL_MS
    assert realtime_events(call.tick(INPUT_STALL_MS - 1)) == []
    events = realtime_events(call.tick(INPUT_STALL_MS))
    assert len(events) == 1 and set(base64.b64decode(events[0]["audio"])) == {0xFF}
    assert realtime_events(call.tick(INPUT_STALL_MS * 3)) == []


def test_media_stopping_while_the_caller_is_silent_sends_nothing() -> None:
    call = new_call()
    call.on_twilio(media(0), 0)
    assert realtime_events(call.tick(5_000)) == []


def test_pcm16_media_is_transcoded_to_24khz_pcm_for_the_append() -> None:
    call = new_call(audio_format="pcm16")
    sent = 0
    for ts in range(0, 200, 20):
        [event] = realtime_events(call.on_twilio(media(ts, byte=0x00), ts))
        sent += len(base64.b64decode(event["audio"]))
    assert 200 * PCM_BYTES_PER_MS - 3 * 48 <= sent <= 200 * PCM_BYTES_PER_MS


def test_pcm16_gap_silence_goes_through_the_transcoder() -> None:
    call = new_call(audio_format="pcm16")
    call.on_twilio(media(0), 0)
    silence, _frame = realtime_events(call.on_twilio(media(120), 120))
    pcm = base64.b64decode(silence["audio"])
    assert len(pcm) == 100 * PCM_BYTES_PER_MS
    assert max(abs(v) for v in memoryview(pcm).cast("h")) < 2_000


# --- down-link and pacing -------------------------------------------------------------


def test_a_delta_goes_out_as_one_media_message_and_a_mark_naming_generation_offset_and_item() -> None:
    call = new_call()
    frames = twilio_frames(speak(call, "item_a", "resp_a", 60))
    assert [f["event"] for f in frames] == ["media", "mark"]
    assert frames[1]["mark"]["name"] == "0:60:item_a"
    assert len(base64.b64decode(frames[0]["media"]["payload"])) == 60 * 8


def test_a_long_delta_goes_out_in_messages_of_at_most_100ms_each_with_its_mark() -> None:
    call = new_call()
    feed(call, response_created("resp_a"), 0)
    actions = feed(call, delta("item_a", "resp_a", 2 * CHUNK_MAX_MS), 0)
    assert media_ms(actions) == [CHUNK_MAX_MS] * 2
    assert marks(actions) == ["0:100:item_a", "0:200:item_a"]


def test_pacing_sends_a_burst_then_at_most_twice_real_time() -> None:
    call = new_call()
    sent = sent_ms(speak(call, "item_a", "resp_a", 5_000))
    assert sent == PACE_BURST_MS
    now = 0
    while now < 300:
        deadline = call.next_deadline()
        assert deadline is not None and deadline > now
        now = deadline
        sent += sent_ms(call.tick(now))
        assert sent <= PACE_BURST_MS + 2 * now
    assert sent > PACE_BURST_MS


def test_pacing_never_runs_more_than_the_lead_ahead_of_playback() -> None:
    call = new_call()
    sent = sent_ms(speak(call, "item_a", "resp_a", 10_000))
    for now in range(40, 5_000, 40):
        sent += sent_ms(call.tick(now))
        assert sent - now <= PACE_MAX_LEAD_MS + FRAME_MS
    assert sent >= 5_000


def test_a_model_faster_than_real_time_still_gets_messages_of_100ms() -> None:
    call = new_call()
    speak(call, "item_a", "resp_a", 10_000)
    sizes: list[int] = []
    now = 0
    while now < 5_000:
        deadline = call.next_deadline()
        assert deadline is not None and deadline > now
        now = deadline
        actions = call.tick(now)
        sizes += media_ms(actions)
    assert sizes and set(sizes) == {CHUNK_MAX_MS}


def pcm_delta(item_id: str, response_id: str, ms: int) -> dict[str, Any]:
    event = delta(item_id, response_id, 0)
    event["delta"] = base64.b64encode(bytes(ms * PCM_BYTES_PER_MS)).decode()
    return event


def test_pcm16_model_audio_becomes_mulaw_messages_of_whole_20ms_frames() -> None:
    call = new_call(audio_format="pcm16")
    feed(call, response_created("resp_a"), 0)
    actions = feed(call, pcm_delta("item_a", "resp_a", 100), 0)
    actions += feed(call, audio_done("item_a", "resp_a"), 0)
    payloads = [
        base64.b64decode(f["media"]["payload"]) for f in twilio_frames(actions) if f["event"] == "media"
    ]
    assert sum(map(len, payloads)) == 100 * 8
    assert all(len(p) % 160 == 0 for p in payloads)
    assert marks(actions)[-1] == "0:100:item_a"


@settings(max_examples=60, deadline=None)
@given(
    chunks_ms=st.lists(st.integers(min_value=1, max_value=45), min_size=1, max_size=4),
    done=st.booleans(),
    echoed=st.integers(min_value=0, max_value=10),
)
def test_pcm16_truncation_is_the_last_echoed_mark_and_never_past_the_audio_received(
    chunks_ms: list[int], done: bool, echoed: int
) -> None:
    """Up to 180 ms of audio: under the pacing burst, so all of it is forwarded at once."""
    call = new_call(audio_format="pcm16")
    feed(call, response_created("resp_a"), 0)
    names: list[str] = []
    for ms in chunks_ms:
        names += marks(feed(call, pcm_delta("item_a", "resp_a", ms), 0))
    if done:
        names += marks(feed(call, audio_done("item_a", "resp_a"), 0))
    echo(call, names[:echoed], 1)
    truncates = of_type(realtime_events(feed(call, speech_started(), 1)), "conversation.item.truncate")
    heard = int(names[min(echoed, len(names)) - 1].split(":")[1]) if echoed and names else 0
    if heard and (not done or echoed < len(names)):
        assert truncates[0]["audio_end_ms"] == heard
        assert heard <= sum(chunks_ms)
    else:
        assert truncates == []


def test_an_idle_call_has_no_deadline_but_its_session_age() -> None:
    call = Call(call_sid=CALL_SID, stream_sid=SID, now_ms=0, audio_format="pcmu", session_max_ms=3_600_000)
    assert call.next_deadline() is None
    call.session_opened(0)
    feed(call, response_created("r"), 0)
    assert call.next_deadline() == 3_600_000


# --- barge-in -------------------------------------------------------------------------


def test_barge_in_clears_twilio_and_truncates_at_the_last_acknowledged_mark() -> None:
    call = new_call()
    names = marks(speak(call, "item_a", "resp_a", 200))
    echo(call, names[:1], 100)
    actions = feed(call, speech_started(), 100)
    assert of_type(twilio_frames(actions), "clear") == [{"event": "clear", "streamSid": SID}]
    assert of_type(realtime_events(actions), "conversation.item.truncate") == [
        {"type": "conversation.item.truncate", "item_id": "item_a", "content_index": 0, "audio_end_ms": 100}
    ]


@pytest.mark.parametrize(("since_echo_ms", "audio_end_ms"), [(0, 100), (7, 107), (73, 173), (500, 200)])
def test_playback_between_marks_is_credited_up_to_the_end_of_the_message_playing(
    since_echo_ms: int, audio_end_ms: int
) -> None:
    call = new_call()
    feed(call, response_created("resp_a"), 0)
    names = marks(feed(call, delta("item_a", "resp_a", 200), 0))
    feed(call, delta("item_a", "resp_a", 100), 0)
    echo(call, names[:1], 100)
    events = realtime_events(feed(call, speech_started(), 100 + since_echo_ms))
    assert of_type(events, "conversation.item.truncate")[0]["audio_end_ms"] == audio_end_ms


def test_a_message_sent_after_the_phone_ran_dry_is_credited_from_its_sending() -> None:
    call = new_call()
    feed(call, response_created("resp_a"), 0)
    echo(call, marks(feed(call, delta("item_a", "resp_a", 100), 0)), 100)
    feed(call, delta("item_a", "resp_a", 100), 160)
    events = realtime_events(feed(call, speech_started(), 190))
    assert of_type(events, "conversation.item.truncate")[0]["audio_end_ms"] == 130


def test_credit_between_marks_never_passes_the_audio_sent() -> None:
    call = new_call()
    feed(call, response_created("resp_a"), 0)
    names = marks(feed(call, delta("item_a", "resp_a", 100), 0))
    echo(call, names, 100)
    events = realtime_events(feed(call, speech_started(), 150))
    assert of_type(events, "conversation.item.truncate")[0]["audio_end_ms"] == 100


def test_heard_is_counted_from_marks_not_from_the_inbound_clock() -> None:
    call = new_call()
    names = marks(speak(call, "item_a", "resp_a", 200))
    for ts in range(0, 2_000, 20):
        call.on_twilio(media(ts), ts)
    echo(call, names[:1], 2_000)
    events = realtime_events(feed(call, speech_started(), 2_000))
    assert of_type(events, "conversation.item.truncate")[0]["audio_end_ms"] == 100


def test_no_clear_and_no_truncate_when_nothing_is_playing() -> None:
    call = new_call()
    names = marks(speak(call, "item_a", "resp_a", 100))
    feed(call, response_done("resp_a"), 0)
    echo(call, names, 100)
    actions = feed(call, speech_started(), 500)
    assert twilio_frames(actions) == []
    assert realtime_events(actions) == []


def test_marks_echoed_after_a_clear_belong_to_an_old_generation_and_are_ignored() -> None:
    call = new_call()
    names = marks(speak(call, "item_a", "resp_a", 200))
    echo(call, names[:1], 20)
    feed(call, speech_started(), 30)
    echo(call, names[1:], 30)
    new_names = marks(speak(call, "item_b", "resp_b", 200, now_ms=100))
    assert new_names and all(name.startswith("1:") for name in new_names)
    echo(call, new_names[:1], 200)
    events = realtime_events(feed(call, speech_started("item_user2"), 200))
    assert of_type(events, "conversation.item.truncate") == [
        {"type": "conversation.item.truncate", "item_id": "item_b", "content_index": 0, "audio_end_ms": 100}
    ]


def test_late_deltas_of_an_interrupted_response_are_dropped() -> None:
    call = new_call()
    feed(call, response_created("resp_a"), 0)
    feed(call, delta("item_a", "resp_a", 100), 0)
    feed(call, speech_started(), 10)
    assert twilio_frames(feed(call, delta("item_a", "resp_a", 100), 11)) == []
    assert twilio_frames(feed(call, delta("item_x", "resp_a", 100), 12)) == []
    feed(call, response_done("resp_a", "cancelled"), 13)
    assert marks(speak(call, "item_b", "resp_b", 40, now_ms=20)) == ["1:40:item_b"]


def test_a_response_interrupted_before_its_first_delta_is_never_played() -> None:
    call = new_call()
    feed(call, response_created("resp_a"), 0)
    actions = feed(call, speech_started(), 5)
    assert twilio_frames(actions) == [] and realtime_events(actions) == []
    assert twilio_frames(feed(call, delta("item_a", "resp_a", 100), 6)) == []


def test_an_item_of_which_nothing_was_heard_is_deleted_not_truncated() -> None:
    call = new_call()
    speak(call, "item_a", "resp_a", 100)
    events = realtime_events(feed(call, speech_started(), 5))
    assert events == [{"type": "conversation.item.delete", "item_id": "item_a"}]


def test_overlapping_items_are_each_cut_at_their_own_position() -> None:
    call = new_call()
    names_a = marks(speak_in_frames(call, "item_a", "resp_a", 100))
    feed(call, response_done("resp_a"), 0)
    names_b = marks(speak(call, "item_b", "resp_b", 100, now_ms=1))
    echo(call, names_a[:3], 60)
    assert names_b and all(name.endswith(":item_b") for name in names_b)
    events = realtime_events(feed(call, speech_started(), 60))
    assert events == [
        {"type": "conversation.item.truncate", "item_id": "item_a", "content_index": 0, "audio_end_ms": 60},
        {"type": "conversation.item.delete", "item_id": "item_b"},
    ]


def test_a_fully_heard_item_is_not_truncated_when_the_next_one_is_interrupted() -> None:
    call = new_call()
    names_a = marks(speak(call, "item_a", "resp_a", 60))
    echo(call, names_a, 60)
    names_b: list[str] = []
    for _ in range(3):
        names_b += marks(feed(call, delta("item_b", "resp_a", FRAME_MS), 61))
    echo(call, names_b[:1], 80)
    events = realtime_events(feed(call, speech_started(), 80))
    assert [e.get("item_id") for e in events] == ["item_b"]
    assert events[0]["audio_end_ms"] == 20


def test_barge_in_while_the_model_is_still_generating_truncates_even_if_the_buffer_ran_dry() -> None:
    call = new_call()
    feed(call, response_created("resp_a"), 0)
    names = marks(feed(call, delta("item_a", "resp_a", 40), 0))
    echo(call, names, 40)
    events = realtime_events(feed(call, speech_started(), 50))
    assert of_type(events, "conversation.item.truncate")[0]["audio_end_ms"] == 40


# --- tools ----------------------------------------------------------------------------


def function_call(call_id: str, name: str, arguments: str, response_id: str) -> dict[str, Any]:
    return {
        "type": "response.function_call_arguments.done",
        "call_id": call_id,
        "item_id": "item_fc",
        "name": name,
        "arguments": arguments,
        "output_index": 0,
        "response_id": response_id,
    }


def test_a_function_call_runs_the_tool_with_its_arguments() -> None:
    call = new_call()
    feed(call, response_created("resp_a"), 0)
    actions = feed(call, function_call("call_1", "search_products", '{"query":"washer"}', "resp_a"), 1)
    assert actions == [RunTool("call_1", "search_products", '{"query":"washer"}')]


def test_tool_output_goes_first_and_response_create_only_after_the_calling_response_is_done() -> None:
    call = new_call()
    feed(call, response_created("resp_a"), 0)
    feed(call, function_call("call_1", "search_products", "{}", "resp_a"), 1)
    events = realtime_events(call.on_tool_result("call_1", ToolResult('{"found":2}'), 2))
    assert events == [
        {
            "type": "conversation.item.create",
            "item": {"type": "function_call_output", "call_id": "call_1", "output": '{"found":2}'},
        }
    ]
    events = realtime_events(feed(call, response_done("resp_a"), 3))
    assert [e["type"] for e in events] == ["response.create"]


def test_a_tool_result_after_the_response_is_done_asks_for_the_answer_at_once() -> None:
    call = new_call()
    feed(call, response_created("resp_a"), 0)
    feed(call, function_call("call_1", "search_products", "{}", "resp_a"), 1)
    assert realtime_events(feed(call, response_done("resp_a"), 2)) == []
    events = realtime_events(call.on_tool_result("call_1", ToolResult("{}"), 3))
    assert [e["type"] for e in events] == ["conversation.item.create", "response.create"]


def test_parallel_tool_calls_get_one_response_create_after_the_last_output() -> None:
    call = new_call()
    feed(call, response_created("resp_a"), 0)
    feed(call, function_call("call_1", "search_products", "{}", "resp_a"), 1)
    feed(call, function_call("call_2", "search_products", "{}", "resp_a"), 1)
    feed(call, response_done("resp_a"), 2)
    first = realtime_events(call.on_tool_result("call_1", ToolResult("{}"), 3))
    second = realtime_events(call.on_tool_result("call_2", ToolResult("{}"), 4))
    assert [e["type"] for e in first] == ["conversation.item.create"]
    assert [e["type"] for e in second] == ["conversation.item.create", "response.create"]


def test_a_rejected_response_create_is_sent_again_once_the_other_response_ends() -> None:
    call = new_call()
    feed(call, response_created("resp_a"), 0)
    feed(call, function_call("call_1", "search_products", "{}", "resp_a"), 1)
    feed(call, response_done("resp_a"), 2)
    [request] = of_type(
        realtime_events(call.on_tool_result("call_1", ToolResult("{}"), 3)), "response.create"
    )
    error = {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "code": "conversation_already_has_active_response",
            "message": "busy",
            "event_id": request["event_id"],
        },
    }
    feed(call, response_created("resp_vad"), 4)
    assert realtime_events(feed(call, error, 4)) == []
    events = realtime_events(feed(call, response_done("resp_vad"), 5))
    assert [e["type"] for e in events] == ["response.create"]


def test_no_response_create_right_after_the_caller_stops_speaking() -> None:
    call = new_call()
    feed(call, response_created("resp_a"), 0)
    feed(call, function_call("call_1", "search_products", "{}", "resp_a"), 1)
    feed(call, response_done("resp_a"), 2)
    feed(call, speech_started(), 3)
    feed(call, speech_stopped(), 400)
    events = realtime_events(call.on_tool_result("call_1", ToolResult("{}"), 500))
    assert [e["type"] for e in events] == ["conversation.item.create"]
    assert call.next_deadline() == 400 + RESPONSE_HOLD_MS
    assert [e["type"] for e in realtime_events(call.tick(400 + RESPONSE_HOLD_MS))] == ["response.create"]


def test_a_response_the_server_starts_after_the_tool_output_replaces_the_follow_up() -> None:
    call = new_call()
    feed(call, response_created("resp_a"), 0)
    feed(call, function_call("call_1", "search_products", "{}", "resp_a"), 1)
    feed(call, response_done("resp_a"), 2)
    feed(call, speech_started(), 3)
    feed(call, speech_stopped(), 400)
    call.on_tool_result("call_1", ToolResult("{}"), 500)
    feed(call, response_created("resp_vad"), 600)
    later = feed(call, response_done("resp_vad"), 900) + call.tick(5_000)
    assert of_type(realtime_events(later), "response.create") == []


def test_transfer_waits_until_the_connecting_line_has_been_heard() -> None:
    call = new_call()
    names = marks(speak(call, "item_a", "resp_a", 100))
    feed(call, function_call("call_t", "transfer_to_person", '{"reason":"asked"}', "resp_a"), 1)
    feed(call, response_done("resp_a"), 2)
    actions = call.on_tool_result("call_t", ToolResult('{"ok":true}', "transfer"), 3)
    assert not any(isinstance(a, Transfer) for a in actions)
    assert of_type(realtime_events(actions), "response.create") == []
    assert not any(isinstance(a, Transfer) for a in echo(call, names[:-1], 80))
    assert [a for a in echo(call, names[-1:], 100) if isinstance(a, Transfer)] == [
        Transfer("tool transfer_to_person")
    ]
    assert call.record(100)["outcome"] == "transferred"


def test_a_transfer_is_cancelled_when_the_caller_talks_over_the_connecting_line() -> None:
    call = new_call()
    names = marks(speak(call, "item_a", "resp_a", 100))
    feed(call, function_call("call_t", "transfer_to_person", "{}", "resp_a"), 1)
    feed(call, response_done("resp_a"), 2)
    call.on_tool_result("call_t", ToolResult("{}", "transfer"), 3)
    actions = feed(call, speech_started(), 40)
    assert any(isinstance(a, Note) and a.event == "call_action_cancelled_by_caller" for a in actions)
    system = [
        e
        for e in of_type(realtime_events(actions), "conversation.item.create")
        if e["item"]["role"] == "system"
    ]
    assert len(system) == 1
    later = echo(call, names, 200) + call.tick(10_000)
    assert not any(isinstance(a, Transfer) for a in later)


def test_a_transfer_called_without_a_spoken_line_first_asks_the_model_to_say_it() -> None:
    call = new_call()
    feed(call, response_created("resp_a"), 0)
    feed(call, function_call("call_t", "transfer_to_person", "{}", "resp_a"), 1)
    feed(call, response_done("resp_a"), 2)
    events = realtime_events(call.on_tool_result("call_t", ToolResult("{}", "transfer"), 3))
    line = of_type(events, "response.create")
    assert len(line) == 1 and "connecting them" in line[0]["response"]["instructions"]
    names = marks(speak(call, "item_b", "resp_b", 40, now_ms=4))
    assert not any(isinstance(a, Transfer) for a in feed(call, response_done("resp_b"), 5))
    assert any(isinstance(a, Transfer) for a in echo(call, names, 50))


def test_end_call_hangs_up_after_the_goodbye_has_played() -> None:
    call = new_call()
    names = marks(speak(call, "item_a", "resp_a", 60))
    feed(call, function_call("call_e", "end_call", "{}", "resp_a"), 1)
    feed(call, response_done("resp_a"), 2)
    assert not any(
        isinstance(a, HangUp) for a in call.on_tool_result("call_e", ToolResult("{}", "end_call"), 3)
    )
    assert [a for a in echo(call, names, 60) if isinstance(a, HangUp)] == [HangUp("tool end_call")]


def test_a_goodbye_whose_last_frame_spends_the_pacing_credit_still_hangs_up() -> None:
    call = new_call()
    names = marks(speak(call, "item_a", "resp_a", PACE_BURST_MS))
    feed(call, function_call("call_e", "end_call", "{}", "resp_a"), 1)
    feed(call, response_done("resp_a"), 2)
    call.on_tool_result("call_e", ToolResult("{}", "end_call"), 3)
    assert [a for a in echo(call, names, PACE_BURST_MS) if isinstance(a, HangUp)] == [HangUp("tool end_call")]


def test_a_call_action_still_happens_when_twilio_never_echoes_the_marks() -> None:
    call = new_call()
    speak(call, "item_a", "resp_a", 60)
    feed(call, function_call("call_e", "end_call", "{}", "resp_a"), 1)
    feed(call, response_done("resp_a"), 2)
    call.on_tool_result("call_e", ToolResult("{}", "end_call"), 3)
    deadline = call.next_deadline()
    assert deadline is not None and deadline < 5_000
    assert any(isinstance(a, HangUp) for a in call.tick(deadline))


# --- DTMF -----------------------------------------------------------------------------


def test_the_transfer_key_takes_the_transfer_path_once_per_storm() -> None:
    call = new_call()
    actions: list[Action] = []
    for n in range(200):
        digit = "0" if n % 3 else "X"
        actions += call.on_twilio(Dtmf(SID, digit), n * 5)
    lines = of_type(realtime_events(actions), "response.create")
    assert len(lines) == 1 and "connecting them" in lines[0]["response"]["instructions"]
    names = marks(speak(call, "item_t", "resp_t", 40, now_ms=1_000))
    feed(call, response_done("resp_t"), 1_001)
    transfers = [a for a in echo(call, names, 1_100) if isinstance(a, Transfer)]
    transfers += [a for a in call.on_twilio(Dtmf(SID, "0"), 1_200) if isinstance(a, Transfer)]
    assert len(transfers) == 1


def test_the_transfer_key_stops_the_bot_mid_sentence() -> None:
    call = new_call()
    names = marks(speak(call, "item_a", "resp_a", 200))
    echo(call, names[:1], 100)
    events = call.on_twilio(Dtmf(SID, "0"), 105)
    assert of_type(twilio_frames(events), "clear")
    assert [e["type"] for e in realtime_events(events)] == ["conversation.item.truncate", "response.cancel"]


def test_other_digits_and_a_disabled_key_do_nothing() -> None:
    call = new_call(transfer_key=None)
    assert realtime_events(call.on_twilio(Dtmf(SID, "0"), 0)) == []
    call = new_call()
    assert call.on_twilio(Dtmf(SID, "5"), 0) == []


# --- transcript, metrics, record ------------------------------------------------------


def test_transcript_keeps_user_and_assistant_turns_in_time_order() -> None:
    call = new_call()
    feed(call, speech_started("item_u1"), 1_000)
    feed(call, speech_stopped("item_u1"), 2_000)
    names = marks(speak(call, "item_a", "resp_a", 40, now_ms=2_500))
    feed(call, output_transcript("item_a", "Hello there."), 2_501)
    feed(call, input_transcript("item_u1", "Hi, washers?"), 2_600)
    echo(call, names, 2_600)
    transcript = call.record(3_000)["transcript"]
    assert transcript == [
        {"role": "user", "text": "Hi, washers?", "at_ms": 1_000},
        {"role": "assistant", "text": "Hello there.", "at_ms": 2_500},
    ]


def test_transcript_times_count_from_the_start_of_the_call() -> None:
    call = Call(call_sid=CALL_SID, stream_sid=SID, now_ms=90_000, audio_format="pcmu")
    feed(call, speech_started("item_u1"), 91_000)
    feed(call, input_transcript("item_u1", "Hi, washers?"), 92_000)
    assert call.record(93_000)["transcript"] == [{"role": "user", "text": "Hi, washers?", "at_ms": 1_000}]


def test_an_interrupted_answer_is_kept_only_as_far_as_it_was_heard() -> None:
    call = new_call()
    names = marks(speak(call, "item_a", "resp_a", 200))
    feed(call, output_transcript("item_a", "one two three four five six seven eight nine ten"), 1)
    echo(call, names[:1], 100)
    feed(call, speech_started(), 100)
    [entry] = call.record(200)["transcript"]
    assert entry == {"role": "assistant", "text": "one two three four five", "at_ms": 0, "interrupted": True}


def test_latency_is_measured_from_speech_stopped_to_the_first_frame_sent() -> None:
    call = new_call()
    feed(call, speech_started(), 1_000)
    feed(call, speech_stopped(), 2_000)
    feed(call, response_created("resp_a"), 2_100)
    feed(call, delta("item_a", "resp_a", 40), 2_350)
    usage = {
        "total_tokens": 100,
        "input_tokens": 60,
        "output_tokens": 40,
        "input_token_details": {"text_tokens": 50, "audio_tokens": 10, "cached_tokens": 30},
        "output_token_details": {"text_tokens": 5, "audio_tokens": 35},
    }
    actions = feed(call, response_done("resp_a", usage=usage), 2_400)
    record = call.record(3_000)
    assert record["responses"][-1] == {
        "response_id": "resp_a",
        "status": "completed",
        "first_audio_latency_ms": 350,
        "bot_latency_ms": 0,
        "usage": {
            "input_text_tokens": 50,
            "input_audio_tokens": 10,
            "input_cached_tokens": 30,
            "output_text_tokens": 5,
            "output_audio_tokens": 35,
        },
    }
    assert record["usage"]["output_audio_tokens"] == 35
    assert any(isinstance(a, Note) and a.event == "response_done" for a in actions)


def test_a_phone_that_never_echoes_marks_keeps_a_bounded_record_of_what_is_in_flight() -> None:
    call = new_call()
    feed(call, response_created("resp_a"), 0)
    sent = 0
    for n in range(INFLIGHT_MAX + 200):  # 80 s of 100 ms deltas, played in real time, never echoed
        sent += sent_ms(feed(call, delta("item_a", "resp_a", 100), n * 100) + call.tick(n * 100))
    assert sent >= (INFLIGHT_MAX + 100) * 100
    assert len(call._inflight) == INFLIGHT_MAX


def test_a_turn_is_timed_once_when_its_first_frame_goes_out_with_the_bots_own_part() -> None:
    call = new_call()
    feed(call, speech_started(), 1_000)
    feed(call, speech_stopped(), 2_000)
    feed(call, response_created("resp_a"), 2_100)
    # Half a frame arrives first: the bot holds it until a whole frame is there.
    early = feed(call, delta("item_a", "resp_a", FRAME_MS // 2), 2_350)
    first = feed(call, delta("item_a", "resp_a", 60), 2_365)
    later = feed(call, delta("item_a", "resp_a", 60), 2_380)
    timed = [a for a in early + first + later if isinstance(a, TurnTimed)]
    assert timed == [TurnTimed(latency_ms=365, bot_ms=15)]


def test_the_greeting_is_not_a_turn_nobody_waited_for_it() -> None:
    call = Call(call_sid=CALL_SID, stream_sid=SID, now_ms=0, audio_format="pcmu")
    call.session_opened(0)
    feed(call, response_created("resp_greet"), 100)
    actions = feed(call, delta("item_greet", "resp_greet", 60), 500)
    assert not [a for a in actions if isinstance(a, TurnTimed)]


def test_the_record_has_duration_outcome_and_counts() -> None:
    call = new_call()
    call.on_twilio(media(0), 0)
    call.on_twilio(media(200), 200)
    record = call.record(61_500)
    assert record["call_sid"] == CALL_SID
    assert record["duration_s"] == 61.5
    assert record["outcome"] == "caller_hung_up"
    assert record["gap_fill_ms"] == 180
    assert record["realtime_sessions"] == 1


# --- sessions -------------------------------------------------------------------------


def seed_conversation(call: Call) -> None:
    feed(call, speech_started("item_u1"), 100)
    feed(call, speech_stopped("item_u1"), 800)
    feed(call, input_transcript("item_u1", "Any washers?"), 900)
    feed(call, response_created("resp_a"), 1_000)
    feed(call, function_call("call_1", "search_products", '{"query":"washer"}', "resp_a"), 1_001)
    feed(call, response_done("resp_a"), 1_002)
    call.on_tool_result("call_1", ToolResult('{"found":1}'), 1_003)
    names = marks(speak(call, "item_a", "resp_b", 40, now_ms=1_100))
    feed(call, output_transcript("item_a", "We have one."), 1_101)
    feed(call, response_done("resp_b"), 1_102)
    echo(call, names, 1_200)


def test_a_lost_session_mid_answer_clears_twilio_and_the_next_restores_and_resumes() -> None:
    call = new_call()
    seed_conversation(call)
    speak(call, "item_c", "resp_c", 500, now_ms=2_000)
    lost = call.session_lost(2_050)
    assert of_type(twilio_frames(lost), "clear")
    assert realtime_events(lost) == []
    events = realtime_events(call.session_opened(3_000))
    items = [e["item"] for e in of_type(events, "conversation.item.create")]
    assert items == [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Any washers?"}]},
        {
            "type": "function_call",
            "call_id": "call_1",
            "name": "search_products",
            "arguments": '{"query":"washer"}',
        },
        {"type": "function_call_output", "call_id": "call_1", "output": '{"found":1}'},
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "We have one."}],
        },
    ]
    resume = of_type(events, "response.create")
    assert len(resume) == 1 and "dropped" in resume[0]["response"]["instructions"]


def test_a_session_lost_while_idle_is_restored_without_a_word() -> None:
    call = new_call()
    seed_conversation(call)
    call.session_lost(5_000)
    events = realtime_events(call.session_opened(6_000))
    assert of_type(events, "response.create") == []
    assert len(of_type(events, "conversation.item.create")) == 4


def test_a_session_lost_while_the_caller_asks_resumes_so_the_question_gets_an_answer() -> None:
    call = new_call()
    seed_conversation(call)
    feed(call, speech_started("item_u2"), 5_000)
    call.session_lost(5_500)
    events = realtime_events(call.session_opened(6_000))
    assert len(of_type(events, "response.create")) == 1


def test_a_tool_answered_after_a_reconnect_recreates_its_call_item() -> None:
    call = new_call()
    feed(call, response_created("resp_a"), 0)
    feed(call, function_call("call_1", "search_products", "{}", "resp_a"), 1)
    call.session_lost(2)
    call.session_opened(3)
    events = realtime_events(call.on_tool_result("call_1", ToolResult("{}"), 4))
    assert [e["item"]["type"] for e in of_type(events, "conversation.item.create")] == [
        "function_call",
        "function_call_output",
    ]


def test_rotation_waits_for_a_turn_boundary_and_restores_silently() -> None:
    call = Call(call_sid=CALL_SID, stream_sid=SID, now_ms=0, audio_format="pcmu", session_max_ms=60_000)
    call.session_opened(0)
    seed_conversation(call)
    feed(call, response_created("resp_g"), 59_000)
    assert not any(isinstance(a, RotateSession) for a in call.tick(60_000))
    feed(call, response_done("resp_g"), 60_100)
    deadline = call.next_deadline()
    assert deadline is not None and deadline <= 60_600
    assert any(isinstance(a, RotateSession) for a in call.tick(deadline))
    assert not any(isinstance(a, RotateSession) for a in call.tick(deadline + 1_000))
    events = realtime_events(call.session_opened(deadline + 100))
    assert of_type(events, "response.create") == []
    restored = [e["item"]["type"] for e in of_type(events, "conversation.item.create")]
    assert restored == ["message", "function_call", "function_call_output", "message"]
    assert call.next_deadline() == deadline + 100 + 60_000


def test_session_expired_asks_the_bridge_to_reconnect() -> None:
    call = new_call()
    error = {
        "type": "error",
        "error": {"type": "invalid_request_error", "code": "session_expired", "message": "expired"},
    }
    assert Reconnect("session_expired") in feed(call, error, 0)


def test_a_new_realtime_session_is_noted_with_its_id_for_openais_logs() -> None:
    call = new_call()
    created = {"type": "session.created", "session": {"id": "sess_1", "type": "realtime"}}
    assert feed(call, created, 0) == [Note("realtime_session_created", {"session_id": "sess_1"})]


# --- a silent caller ------------------------------------------------------------------


def idle_call() -> Call:
    return new_call(idle_prompt_ms=10_000, idle_hang_up_ms=8_000)


def advance(call: Call, until_ms: int) -> list[Action]:
    """Ticks at each deadline up to `until_ms`, as the bridge's pacer does (and never spins)."""
    actions: list[Action] = []
    for _ in range(100):
        due = call.next_deadline()
        if due is None or due > until_ms:
            return actions
        actions += call.tick(due)
    raise AssertionError(f"the call keeps asking for a tick at {call.next_deadline()}")


def speak_and_play(call: Call, item_id: str, response_id: str, now_ms: int) -> list[Action]:
    """A 200 ms response (one burst) whose marks all come back as it finishes playing."""
    names = marks(speak(call, item_id, response_id, 200, now_ms))
    actions = feed(call, response_done(response_id), now_ms)
    return actions + echo(call, names, now_ms + 200)


def test_a_silent_caller_is_asked_once_whether_they_are_still_there() -> None:
    call = idle_call()
    assert call.next_deadline() == 10_000
    assert realtime_events(call.tick(9_999)) == []
    actions = call.tick(10_000)
    [ask] = of_type(realtime_events(actions), "response.create")
    assert en.LINES.still_there in ask["response"]["instructions"]
    assert any(isinstance(a, Note) and a.event == "caller_idle_prompted" for a in actions)
    assert call.record(10_000)["idle_prompts"] == 1
    assert [(e["role"], e["text"]) for e in call.record(10_000)["transcript"]] == [("event", "idle_prompt")]


def test_the_silence_counts_from_the_end_of_the_bots_words() -> None:
    call = idle_call()
    speak_and_play(call, "item_a", "resp_a", 3_000)
    assert call.next_deadline() == 3_200 + 10_000


def test_a_caller_silent_after_the_question_hears_goodbye_then_the_call_is_hung_up() -> None:
    call = idle_call()
    call.tick(10_000)
    speak_and_play(call, "item_ask", "resp_ask", 10_001)
    assert call.next_deadline() == 10_201 + 8_000
    actions = call.tick(18_201)
    [goodbye] = of_type(realtime_events(actions), "response.create")
    assert en.LINES.idle_goodbye in goodbye["response"]["instructions"]
    assert not any(isinstance(a, HangUp) for a in actions), "not before the goodbye is heard"
    hang_up = [a for a in speak_and_play(call, "item_bye", "resp_bye", 18_300) if isinstance(a, HangUp)]
    assert hang_up == [HangUp("the caller stayed silent")]
    record = call.record(20_000)
    assert record["outcome"] == "caller_idle" and record["idle_prompts"] == 1
    events = [e["text"] for e in record["transcript"] if e["role"] == "event"]
    assert events == ["idle_prompt", "idle_hang_up"]


def test_a_caller_who_answers_the_question_carries_on_and_a_later_silence_is_asked_about_again() -> None:
    call = idle_call()
    call.tick(10_000)
    speak_and_play(call, "item_ask", "resp_ask", 10_001)
    feed(call, speech_started("item_yes"), 12_000)
    feed(call, speech_stopped("item_yes"), 12_600)
    speak_and_play(call, "item_a", "resp_a", 13_000)
    assert call.next_deadline() == 13_200 + 10_000, "a question again, not the goodbye"
    [ask] = of_type(realtime_events(call.tick(23_200)), "response.create")
    assert en.LINES.still_there in ask["response"]["instructions"]


def test_no_idle_question_while_the_caller_speaks_or_a_tool_runs() -> None:
    speaking = idle_call()
    feed(speaking, speech_started(), 100)
    assert realtime_events(advance(speaking, 60_000)) == [], "a caller talking for a minute is not idle"
    waiting = idle_call()
    feed(waiting, response_created("resp_a"), 0)
    feed(waiting, function_call("call_1", "send_product_details", "{}", "resp_a"), 0)
    feed(waiting, response_done("resp_a"), 0)
    advance(waiting, 1_000)  # the tool's one-moment line
    feed(waiting, aside_created("resp_wait"), 1_000)
    feed(waiting, response_done("resp_wait"), 1_000)
    assert realtime_events(advance(waiting, 60_000)) == [], "a tool running for a minute is not idleness"


def test_idle_questions_are_off_at_zero() -> None:
    call = new_call(idle_prompt_ms=0)
    assert realtime_events(call.tick(3_000_000)) == []


# --- a slow tool ----------------------------------------------------------------------


def call_with_a_running_tool(now_ms: int = 100) -> Call:
    call = new_call()
    feed(call, response_created("resp_a"), now_ms)
    feed(call, function_call("call_1", "send_product_details", '{"skus":["A"]}', "resp_a"), now_ms)
    feed(call, response_done("resp_a"), now_ms + 20)
    return call


def aside_created(response_id: str) -> dict[str, Any]:
    event = response_created(response_id)
    event["response"].update(metadata={"purpose": "tool_wait"}, conversation_id=None)
    return event


def test_a_tool_silent_for_a_second_gets_one_line_said_out_of_band() -> None:
    call = call_with_a_running_tool()
    assert realtime_events(advance(call, 1_099)) == []
    assert call.next_deadline() == 1_100
    actions = advance(call, 1_100)
    [line] = of_type(realtime_events(actions), "response.create")
    response = line["response"]
    assert (response["conversation"], response["tool_choice"]) == ("none", "none")
    assert response["metadata"] == {"purpose": "tool_wait"}
    assert f'"{en.LINES.one_moment_words}"' in response["instructions"]
    assert any(isinstance(a, Note) and a.event == "tool_wait_line" for a in actions)
    feed(call, aside_created("resp_wait"), 1_150)
    speak_and_play(call, "item_wait", "resp_wait", 1_150)
    assert realtime_events(advance(call, 10_000)) == [], "never a second line for the same tool"
    assert call.record(10_000)["tool_wait_lines"] == 1


def test_a_tool_that_answers_within_the_second_gets_no_line() -> None:
    call = call_with_a_running_tool()
    actions = call.on_tool_result("call_1", ToolResult("{}"), 900)
    [answer] = of_type(realtime_events(actions), "response.create")
    assert "response" not in answer, "the follow-up is a plain response in the conversation"
    feed(call, response_created("resp_b"), 950)
    feed(call, response_done("resp_b"), 960)
    assert realtime_events(advance(call, 5_000)) == []
    assert call.record(2_000)["tool_wait_lines"] == 0


def test_the_tools_output_still_gets_its_own_response_once_the_line_is_done() -> None:
    call = call_with_a_running_tool()
    advance(call, 1_100)
    feed(call, aside_created("resp_wait"), 1_110)
    events = realtime_events(call.on_tool_result("call_1", ToolResult('{"sent":true}'), 1_200))
    assert [e["type"] for e in events] == ["conversation.item.create"], "not while the line is said"
    events = realtime_events(feed(call, response_done("resp_wait"), 1_300))
    [follow_up] = of_type(events, "response.create")
    assert "response" not in follow_up


def test_the_line_waits_for_the_bots_own_words_to_end() -> None:
    call = new_call()
    names = marks(speak(call, "item_a", "resp_a", 200, 0))
    feed(call, function_call("call_1", "send_product_details", "{}", "resp_a"), 10)
    feed(call, response_done("resp_a"), 20)
    echo(call, names, 200)
    assert call.next_deadline() == 200 + 1_000


def test_barge_in_over_the_line_stops_it_without_touching_the_conversation() -> None:
    call = call_with_a_running_tool()
    advance(call, 1_100)
    feed(call, aside_created("resp_wait"), 1_110)
    feed(call, delta("item_wait", "resp_wait", 200), 1_110)
    actions = feed(call, speech_started(), 1_150)
    assert of_type(twilio_frames(actions), "clear")
    events = realtime_events(actions)
    assert of_type(events, "conversation.item.truncate") == of_type(events, "conversation.item.delete") == []


# --- what the call is doing, for the console -------------------------------------------------


def test_a_call_connects_then_listens_once_the_session_is_up() -> None:
    call = Call(call_sid=CALL_SID, stream_sid=SID, now_ms=0, audio_format="pcmu")
    assert call.activity(0) == "connecting"
    assert new_call().activity(0) == "listening"


def test_the_bot_speaks_until_its_audio_has_played_then_listens() -> None:
    call = new_call()
    sent = speak(call, "item_a", "resp_a", 100, now_ms=1_000)
    feed(call, response_done("resp_a"), 1_000)
    assert call.activity(1_000) == "bot_speaking"
    echo(call, marks(sent + call.tick(1_200)), 1_200)
    assert call.activity(1_200) == "listening"


def test_a_tool_runs_until_its_result_is_in() -> None:
    call = new_call()
    feed(call, function_call("call_1", "search_products", "{}", "resp_t"), 1_000)
    assert call.activity(1_000) == "tool_running"
    call.on_tool_result("call_1", ToolResult('{"found": 0}'), 1_100)
    assert call.activity(1_100) == "listening"


def test_a_call_being_handed_to_a_person_is_transferring() -> None:
    call = new_call()
    feed(call, function_call("call_1", "transfer_to_person", "{}", "resp_t"), 1_000)
    call.on_tool_result("call_1", ToolResult('{"transferring": true}', action="transfer"), 1_100)
    assert call.activity(1_100) == "transferring"
