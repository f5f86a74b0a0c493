"""Twilio Media Streams messages: every inbound kind parses, junk is a value, outbound is exact."""

from __future__ import annotations

import base64
import json

import pytest

from bot.twilio_stream import (
    Connected,
    Dtmf,
    Mark,
    Media,
    MediaFormat,
    Outbound,
    ProtocolViolation,
    Start,
    Stop,
    parse_message,
)

SID = "MZ" + "1" * 32
CALL = "CA" + "2" * 32


def frame(**fields: object) -> str:
    return json.dumps(fields)


def test_connected_parses() -> None:
    message = parse_message(frame(event="connected", protocol="Call", version="1.0.0"))
    assert message == Connected("Call", "1.0.0")


def test_start_parses_identity_parameters_and_format() -> None:
    text = frame(
        event="start",
        sequenceNumber="1",
        streamSid=SID,
        start={
            "accountSid": "AC" + "3" * 32,
            "streamSid": SID,
            "callSid": CALL,
            "tracks": ["inbound"],
            "customParameters": {"caller": "+15551234567", "token": "v1.1.abc"},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        },
    )
    message = parse_message(text)
    assert message == Start(
        stream_sid=SID,
        call_sid=CALL,
        account_sid="AC" + "3" * 32,
        custom_parameters={"caller": "+15551234567", "token": "v1.1.abc"},
        media_format=MediaFormat("audio/x-mulaw", 8000, 1),
        tracks=("inbound",),
    )


def test_start_without_call_sid_is_a_violation() -> None:
    message = parse_message(frame(event="start", streamSid=SID, start={"streamSid": SID}))
    assert message == ProtocolViolation("bad_field", "start: bad or missing callSid", "start")


def test_media_parses_timestamp_and_decodes_audio_once() -> None:
    audio = bytes(range(160))
    payload = base64.b64encode(audio).decode()
    text = frame(
        event="media",
        sequenceNumber="4",
        streamSid=SID,
        media={"track": "inbound", "chunk": "2", "timestamp": "40", "payload": payload},
    )
    message = parse_message(text)
    assert message == Media(SID, 40, payload, audio)
    assert isinstance(message, Media) and message.duration_ms == 20


def test_media_with_invalid_base64_is_a_bad_payload() -> None:
    text = frame(event="media", streamSid=SID, media={"timestamp": "0", "payload": "abc"})
    message = parse_message(text)
    assert isinstance(message, ProtocolViolation) and message.kind == "bad_payload"


def test_media_with_a_non_numeric_timestamp_is_a_bad_field() -> None:
    text = frame(event="media", streamSid=SID, media={"timestamp": "soon", "payload": ""})
    assert parse_message(text) == ProtocolViolation("bad_field", "media: bad or missing timestamp", "media")


def test_mark_dtmf_and_stop_parse() -> None:
    assert parse_message(frame(event="mark", streamSid=SID, mark={"name": "1:20:item"})) == Mark(
        SID, "1:20:item"
    )
    assert parse_message(
        frame(event="dtmf", streamSid=SID, dtmf={"track": "inbound_track", "digit": "0"})
    ) == Dtmf(SID, "0")
    assert parse_message(
        frame(event="stop", streamSid=SID, stop={"accountSid": "AC", "callSid": CALL})
    ) == Stop(SID, CALL)


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        (b"\x00\x01binary", "binary"),
        ("not json at all", "not_json"),
        ("[1, 2, 3]", "not_object"),
        ('{"streamSid": "MZ"}', "no_event"),
        ('{"event": "dance"}', "unknown_event"),
        ('{"event": "mark", "streamSid": "MZ", "mark": "oops"}', "bad_field"),
        ('{"event": "dtmf", "streamSid": "MZ", "dtmf": {"digit": 5}}', "bad_field"),
    ],
)
def test_junk_becomes_a_violation_value_not_an_exception(text: str | bytes, kind: str) -> None:
    message = parse_message(text)
    assert isinstance(message, ProtocolViolation)
    assert message.kind == kind


def media_frame(**media: object) -> str:
    return frame(event="media", streamSid=SID, media={"timestamp": "0", "payload": "", **media})


@pytest.mark.parametrize("payload", ["éAAA", "AAA", "A\u0000AA", "////" * 10 + "//", "\ud800AAA"])
def test_non_ascii_or_truncated_base64_is_a_bad_payload(payload: str) -> None:
    message = parse_message(media_frame(payload=payload))
    assert isinstance(message, ProtocolViolation) and message.kind == "bad_payload"


@pytest.mark.parametrize(
    "timestamp",
    ["²", "٣", "-20", "20.0", "1e3", "9" * 400, 20.0, -1, 10**400, True, None, [20], float("nan")],
)
def test_a_timestamp_that_is_not_ascii_digits_is_a_bad_field(timestamp: object) -> None:
    text = json.dumps(
        {"event": "media", "streamSid": SID, "media": {"timestamp": timestamp, "payload": ""}}
    )
    message = parse_message(text)
    assert isinstance(message, ProtocolViolation) and message.kind == "bad_field"


def start_frame(**start: object) -> str:
    fields: dict[str, object] = {
        "streamSid": SID,
        "callSid": CALL,
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    }
    return frame(event="start", streamSid=SID, start={**fields, **start})


@pytest.mark.parametrize(
    "start",
    [
        {"mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": "²", "channels": 1}},
        {"mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": "¹"}},
        {"mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000.5, "channels": 1}},
        {"mediaFormat": {"encoding": 7, "sampleRate": 8000, "channels": 1}},
        {"customParameters": {"token": {"nested": "value"}}},
        {"customParameters": ["token"]},
        {"tracks": "inbound"},
        {"tracks": [1, 2]},
        {"accountSid": ["AC"]},
    ],
    ids=["sample-rate", "channels", "fractional-rate", "encoding", "nested-param", "param-list", "tracks-str",
         "tracks-ints", "account-sid"],
)
def test_a_start_with_a_mistyped_field_is_a_violation_of_start(start: dict[str, object]) -> None:
    message = parse_message(start_frame(**start))
    assert isinstance(message, ProtocolViolation)
    assert (message.kind, message.event) == ("bad_field", "start")


def test_a_start_gives_the_media_format_as_sent() -> None:
    fmt = {"encoding": "audio/x-alaw", "sampleRate": "16000", "channels": 2}
    message = parse_message(start_frame(mediaFormat=fmt))
    assert isinstance(message, Start) and message.media_format == MediaFormat("audio/x-alaw", 16000, 2)


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("[" * 2000 + "]" * 2000, "too_deep"),
        ('{"event": "media", "media": ' * 20 + "{}" + "}" * 20, "too_deep"),
        ("{" + '"a": 1, ' * 20_000 + '"event": "mark"}', "too_large"),
        ('{"event": {"a": 1}}', "unknown_event"),
        ('{"event": ["media"]}', "unknown_event"),
        ('{"event": "stop", "streamSid": 5}', "bad_field"),
        ('{"event": "media", "streamSid": "MZ", "media": {"payload": null}}', "bad_field"),
        ('{"event": "media", "media": NaN}', "bad_field"),
        ('{"event": "connected", "protocol": Infinity}', None),
    ],
    ids=["deep-arrays", "deep-objects", "too-large", "event-object", "event-list", "stop-sid-int",
         "payload-null", "media-nan", "connected-infinity"],
)
def test_hostile_json_is_a_violation_value_never_an_exception(text: str, kind: str | None) -> None:
    message = parse_message(text)
    if kind is None:
        assert message == Connected("", "")
    else:
        assert isinstance(message, ProtocolViolation) and message.kind == kind


def test_outbound_frames_are_the_documented_json() -> None:
    out = Outbound(SID)
    assert json.loads(out.media("AAAA")) == {
        "event": "media",
        "streamSid": SID,
        "media": {"payload": "AAAA"},
    }
    assert json.loads(out.mark("3", 40, out.mark_tail("item_1"))) == {
        "event": "mark",
        "streamSid": SID,
        "mark": {"name": "3:40:item_1"},
    }
    assert json.loads(out.clear()) == {"event": "clear", "streamSid": SID}


def test_outbound_escapes_a_hostile_stream_sid() -> None:
    out = Outbound('MZ"}, "event": "x')
    assert json.loads(out.media("AAAA"))["streamSid"] == 'MZ"}, "event": "x'
    assert json.loads(out.clear())["event"] == "clear"


def test_a_mark_escapes_a_hostile_item_id() -> None:
    out = Outbound(SID)
    name = json.loads(out.mark("0", 100, out.mark_tail('it"}}, "event": "x\\')))["mark"]["name"]
    assert name == '0:100:it"}}, "event": "x\\'

