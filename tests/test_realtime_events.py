"""Realtime server events at the edge: GA events parse into types, anything else is a value."""

from __future__ import annotations

import base64
import json
import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from openai.types.realtime import RealtimeServerEvent
from pydantic import TypeAdapter

from bot.realtime_events import (
    IGNORED,
    AudioDelta,
    AudioDone,
    FunctionCall,
    InputTranscript,
    Malformed,
    OutputTranscript,
    ResponseCreated,
    ResponseDone,
    ServerError,
    SessionCreated,
    SpeechStarted,
    SpeechStopped,
    parse_server_event,
)
from bot.sim.realtime import malformed_copy

SERVER_EVENT: TypeAdapter[RealtimeServerEvent] = TypeAdapter(RealtimeServerEvent)
AUDIO = bytes(range(96))
IDS = {
    "event_id": "event_1",
    "response_id": "resp_1",
    "item_id": "item_1",
    "output_index": 0,
    "content_index": 0,
}
USAGE = {
    "total_tokens": 100,
    "input_tokens": 60,
    "output_tokens": 40,
    "input_token_details": {"text_tokens": 50, "audio_tokens": 10, "cached_tokens": 30},
    "output_token_details": {"text_tokens": 5, "audio_tokens": 35},
}
GA_EVENTS: list[tuple[dict[str, Any], object]] = [
    (
        {"type": "response.output_audio.delta", **IDS, "delta": base64.b64encode(AUDIO).decode()},
        AudioDelta("resp_1", "item_1", AUDIO),
    ),
    ({"type": "response.output_audio.done", **IDS}, AudioDone("resp_1", "item_1")),
    (
        {
            "type": "input_audio_buffer.speech_started",
            "event_id": "e",
            "audio_start_ms": 5,
            "item_id": "item_u",
        },
        SpeechStarted("item_u"),
    ),
    (
        {
            "type": "input_audio_buffer.speech_stopped",
            "event_id": "e",
            "audio_end_ms": 9,
            "item_id": "item_u",
        },
        SpeechStopped("item_u"),
    ),
    (
        {"type": "response.created", "event_id": "e", "response": {"id": "resp_1", "status": "in_progress"}},
        ResponseCreated("resp_1"),
    ),
    (
        {
            "type": "response.done",
            "event_id": "e",
            "response": {"id": "resp_1", "status": "cancelled", "usage": USAGE},
        },
        ResponseDone(
            "resp_1",
            "cancelled",
            {
                "input_text_tokens": 50,
                "input_audio_tokens": 10,
                "input_cached_tokens": 30,
                "output_text_tokens": 5,
                "output_audio_tokens": 35,
            },
        ),
    ),
    (
        {"type": "response.output_audio_transcript.done", **IDS, "transcript": "Hello."},
        OutputTranscript("item_1", "Hello."),
    ),
    (
        {
            "type": "conversation.item.input_audio_transcription.completed",
            "event_id": "e",
            "item_id": "item_u",
            "content_index": 0,
            "transcript": "Washers?",
            "usage": {"type": "duration", "seconds": 1.2},
        },
        InputTranscript("item_u", "Washers?"),
    ),
    (
        {
            "type": "response.function_call_arguments.done",
            "event_id": "e",
            "response_id": "resp_1",
            "item_id": "item_fc",
            "output_index": 0,
            "call_id": "call_1",
            "name": "search_products",
            "arguments": '{"query": "washer"}',
        },
        FunctionCall("call_1", "search_products", '{"query": "washer"}', "resp_1"),
    ),
    (
        {
            "type": "error",
            "event_id": "e",
            "error": {
                "type": "invalid_request_error",
                "code": "unknown_parameter",
                "message": "no",
                "param": "x",
                "event_id": "bot_response_1",
            },
        },
        ServerError("unknown_parameter", "invalid_request_error", "no", "bot_response_1"),
    ),
    (
        {"type": "session.created", "event_id": "e", "session": {"id": "sess_1", "type": "realtime"}},
        SessionCreated("sess_1"),
    ),
]


@pytest.mark.parametrize(("event", "parsed"), GA_EVENTS, ids=[e["type"] for e, _ in GA_EVENTS])
def test_each_event_the_call_uses_parses_into_its_type(event: dict[str, Any], parsed: object) -> None:
    SERVER_EVENT.validate_python(event)
    assert parse_server_event(json.dumps(event)) == parsed


@pytest.mark.parametrize(
    "kind",
    [
        "session.updated",
        "rate_limits.updated",
        "conversation.item.added",
        "response.output_audio_transcript.delta",
        "a.type.from.next.year",
    ],
)
def test_events_the_call_has_no_use_for_are_ignored(kind: str) -> None:
    assert (
        parse_server_event(json.dumps({"type": kind, "event_id": "e", "anything": [1, {"x": None}]}))
        is IGNORED
    )


@pytest.mark.parametrize(
    ("frame", "kind"),
    [
        (b'{"type": "error"}', "binary"),
        ('{"type": "response.done", ', "not_json"),
        ("[" * 5000 + "]" * 5000, "too_deep"),
        ('["response.created"]', "not_object"),
        ('{"event": "response.created"}', "no_type"),
        ('{"type": ["response.created"]}', "no_type"),
        (
            '{"type": "response.output_audio.delta", "response_id": "r", "item_id": "i", "delta": "éAAA"}',
            "bad_field",
        ),
        (
            '{"type": "response.output_audio.delta", "response_id": "r", "item_id": "i", "delta": "AAA"}',
            "bad_field",
        ),
        (
            '{"type": "response.output_audio.delta", "response_id": "r", "item_id": "i", "delta": 7}',
            "bad_field",
        ),
        (
            '{"type": "response.output_audio.delta", "response_id": null, "item_id": "i", "delta": ""}',
            "bad_field",
        ),
        (
            '{"type": "response.output_audio.delta", "response_id": "r", "item_id": "", "delta": ""}',
            "bad_field",
        ),
        ('{"type": "response.created", "response": null}', "bad_field"),
        ('{"type": "response.done", "response": {"id": Infinity}}', "bad_field"),
        ('{"type": "input_audio_buffer.speech_started", "item_id": 1e400}', "bad_field"),
        (
            '{"type": "response.function_call_arguments.done", "call_id": "c", "name": "n", "arguments": {}}',
            "bad_field",
        ),
        ('{"type": "error", "error": "busy"}', "bad_field"),
        ('{"type": "error", "error": {"code": ["session_expired"]}}', "bad_field"),
        ('{"type": "session.created", "session": []}', "bad_field"),
    ],
)
def test_a_frame_the_call_cannot_use_is_malformed_never_an_exception(frame: str | bytes, kind: str) -> None:
    event = parse_server_event(frame)
    assert isinstance(event, Malformed) and event.kind == kind


def test_usage_keeps_only_whole_token_counts() -> None:
    usage = {
        "input_token_details": {"text_tokens": "50", "audio_tokens": 1.5, "cached_tokens": -1},
        "output_token_details": {"text_tokens": True, "audio_tokens": 35},
    }
    event = {"type": "response.done", "response": {"id": "resp_1", "status": "completed", "usage": usage}}
    assert parse_server_event(json.dumps(event)) == ResponseDone(
        "resp_1", "completed", {"output_audio_tokens": 35}
    )


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12,
)


@given(
    st.sampled_from(GA_EVENTS),
    st.sampled_from(
        ["type", "response_id", "item_id", "delta", "response", "error", "call_id", "transcript", "session"]
    ),
    JSON,
)
def test_a_ga_event_with_any_field_replaced_by_any_json_parses_or_is_a_value(
    pair: tuple[dict[str, Any], object], key: str, value: object
) -> None:
    event = {**pair[0], key: value}
    parse_server_event(json.dumps(event))


@given(st.text() | st.binary())
def test_any_frame_parses_or_is_a_value(frame: str | bytes) -> None:
    parse_server_event(frame)


@given(st.sampled_from(GA_EVENTS), st.randoms(use_true_random=False))
def test_every_malformed_copy_the_simulator_makes_of_an_event_the_call_uses_is_malformed(
    pair: tuple[dict[str, Any], object], rng: random.Random
) -> None:
    assert isinstance(parse_server_event(malformed_copy(pair[0], rng)), Malformed)
