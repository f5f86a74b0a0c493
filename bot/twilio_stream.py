"""Twilio Media Streams messages as typed values: parse what Twilio sends, build what we send.

Parsing is the hot path (fifty `media` frames a second per call), so each frame is decoded
once with `json.loads` and mapped by hand onto slotted dataclasses: no validation layer that
allocates. Every field is held to what Twilio sends (strings where it sends strings, counts in
ASCII digits, strict base64), with size and nesting bounded before decoding (`bot.wire`).
Anything malformed or unknown becomes a `ProtocolViolation` value, never an exception: the
caller counts it, logs the first of each kind, and the call goes on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from bot.wire import JsonFault, decode_base64, load_json, parse_count

# The largest Media Streams message the app accepts (uvicorn's default is 16 MiB). Twilio's own
# messages are well under 1 KiB; anything near this is a fault, and is closed with 1009.
MAX_MESSAGE_BYTES = 64 * 1024
# uvicorn's WebSocket implementation for the Media Streams socket, in `serve` and in the tests'
# servers alike: of uvicorn's three, the cheapest per message on the peer benchmark's load.
UVICORN_WS = "websockets-sansio"
# `start` is the deepest message Twilio sends (start.customParameters): three levels.
MAX_NESTING = 8
MULAW_BYTES_PER_MS = 8

ViolationKind = Literal[
    "binary",
    "too_large",
    "too_deep",
    "not_json",
    "not_object",
    "no_event",
    "unknown_event",
    "bad_field",
    "bad_payload",
]


@dataclass(frozen=True, slots=True)
class Connected:
    """First message on the socket; carries nothing the bot needs but the protocol name."""

    protocol: str
    version: str


@dataclass(frozen=True, slots=True)
class MediaFormat:
    encoding: str
    sample_rate_hz: int
    channels: int


# What the bot can play and hear: Twilio's one format for Media Streams.
TWILIO_MEDIA_FORMAT = MediaFormat("audio/x-mulaw", 8000, 1)


@dataclass(frozen=True, slots=True)
class Start:
    """Sent once; the only message with the call's identity and our `<Parameter>` values."""

    stream_sid: str
    call_sid: str
    account_sid: str
    custom_parameters: dict[str, str]
    media_format: MediaFormat
    tracks: tuple[str, ...] = ()


@dataclass(slots=True)
class Media:
    """One inbound audio frame: `payload` is Twilio's base64 text, `audio` its mu-law bytes.

    Not frozen: fifty are built a second per call, and a frozen init costs a setattr per field."""

    stream_sid: str
    timestamp_ms: int
    payload: str
    audio: bytes

    @property
    def duration_ms(self) -> int:
        return len(self.audio) // MULAW_BYTES_PER_MS


@dataclass(frozen=True, slots=True)
class Mark:
    """Echo of a mark we sent: the audio before it has played (or was flushed by `clear`)."""

    stream_sid: str
    name: str


@dataclass(frozen=True, slots=True)
class Dtmf:
    stream_sid: str
    digit: str


@dataclass(frozen=True, slots=True)
class Stop:
    """The stream ended (hang-up, redirect, or stream stopped); the socket closes next."""

    stream_sid: str
    call_sid: str


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """A frame the bot cannot use. `event` names the message when it had a known one (a broken
    `start` ends a stream that has not begun); `detail` is for a log line and never holds audio."""

    kind: ViolationKind
    detail: str = field(default="")
    event: str = field(default="")


InboundMessage = Connected | Start | Media | Mark | Dtmf | Stop


def parse_message(text: str | bytes) -> InboundMessage | ProtocolViolation:
    """One Twilio WebSocket frame -> a typed message, or the reason it is unusable."""
    if isinstance(text, bytes):
        return ProtocolViolation("binary", f"{len(text)} bytes")
    data = load_json(text, max_chars=MAX_MESSAGE_BYTES, max_depth=MAX_NESTING)
    if type(data) is not dict:
        if isinstance(data, JsonFault):
            return ProtocolViolation(data.kind, data.detail)
        return ProtocolViolation("not_object", type(data).__name__)
    event = data.get("event")
    if event is None:
        return ProtocolViolation("no_event")
    try:
        if event == "media":
            return _parse_media(data)
        if event == "mark":
            return Mark(_str(data, "streamSid"), _str(_obj(data, "mark"), "name"))
        if event == "dtmf":
            return Dtmf(_str(data, "streamSid"), _str(_obj(data, "dtmf"), "digit"))
        if event == "start":
            return _parse_start(data)
        if event == "stop":
            stop = data.get("stop")
            call_sid = stop.get("callSid") if type(stop) is dict else None
            return Stop(_str(data, "streamSid"), call_sid if type(call_sid) is str else "")
        if event == "connected":
            protocol, version = data.get("protocol"), data.get("version")
            return Connected(
                protocol if type(protocol) is str else "", version if type(version) is str else ""
            )
    except _BadField as exc:
        return ProtocolViolation("bad_field", f"{event}: bad or missing {exc}", event)
    return ProtocolViolation("unknown_event", _describe(event))


def _parse_media(data: dict[str, Any]) -> Media | ProtocolViolation:
    media = data.get("media")
    if type(media) is not dict:
        raise _BadField("media")
    payload = media.get("payload")
    if type(payload) is not str:
        raise _BadField("payload")
    timestamp_ms = parse_count(media.get("timestamp", "0"))
    if timestamp_ms is None:
        raise _BadField("timestamp")
    audio = decode_base64(payload)
    if audio is None:
        return ProtocolViolation("bad_payload", f"{len(payload)} chars", "media")
    stream_sid = data.get("streamSid")
    return Media(stream_sid if type(stream_sid) is str else "", timestamp_ms, payload, audio)


def _parse_start(data: dict[str, Any]) -> Start:
    start = _obj(data, "start")
    params = start.get("customParameters") or {}
    if type(params) is not dict or not all(type(v) is str for v in params.values()):
        raise _BadField("customParameters")
    fmt = start.get("mediaFormat") or {}
    if type(fmt) is not dict:
        raise _BadField("mediaFormat")
    tracks = start.get("tracks") or []
    if type(tracks) is not list or not all(type(t) is str for t in tracks):
        raise _BadField("tracks")
    account_sid = start.get("accountSid", "")
    encoding = fmt.get("encoding", TWILIO_MEDIA_FORMAT.encoding)
    if type(account_sid) is not str:
        raise _BadField("accountSid")
    if type(encoding) is not str:
        raise _BadField("encoding")
    return Start(
        stream_sid=_str(start, "streamSid"),
        call_sid=_str(start, "callSid"),
        account_sid=account_sid,
        custom_parameters=params,
        media_format=MediaFormat(
            encoding=encoding,
            sample_rate_hz=_count(fmt, "sampleRate", TWILIO_MEDIA_FORMAT.sample_rate_hz),
            channels=_count(fmt, "channels", TWILIO_MEDIA_FORMAT.channels),
        ),
        tracks=tuple(tracks),
    )


class _BadField(Exception):
    """Internal: names the missing or mistyped field; surfaces as a ProtocolViolation."""


def _obj(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    if type(value) is not dict:
        raise _BadField(key)
    return value


def _str(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if type(value) is not str or not value:
        raise _BadField(key)
    return value


def _count(data: dict[str, Any], key: str, default: int) -> int:
    value = parse_count(data.get(key, default))
    if value is None:
        raise _BadField(key)
    return value


def _describe(event: object) -> str:
    """A log-safe name for an event we do not know: its text, cut short, or its JSON type."""
    return event[:40] if type(event) is str else type(event).__name__


class Outbound:
    """Builds the frames we send on one stream; the JSON around the audio is prepared once."""

    __slots__ = ("_clear", "_mark_prefix", "_media_prefix", "stream_sid")

    def __init__(self, stream_sid: str) -> None:
        self.stream_sid = stream_sid
        sid = json.dumps(stream_sid)
        self._media_prefix = '{"event":"media","streamSid":' + sid + ',"media":{"payload":"'
        self._mark_prefix = '{"event":"mark","streamSid":' + sid + ',"mark":{"name":'
        self._clear = '{"event":"clear","streamSid":' + sid + "}"

    def media(self, payload: str) -> str:
        """Audio to play; `payload` is base64 mu-law 8 kHz, JSON-safe as it is."""
        return self._media_prefix + payload + '"}}'

    def mark_tail(self, item_id: str) -> str:
        """The end of every mark naming one item (`:item_id`, JSON-escaped, and the closing
        braces), built once per item so a mark costs a few concatenations, never a `json.dumps`."""
        return json.dumps(":" + item_id)[1:] + "}}"

    def mark(self, generation: str, offset_ms: int, tail: str) -> str:
        """A mark Twilio echoes once the audio sent before it has played, named
        `generation:offset_ms:item_id`; `tail` comes from `mark_tail(item_id)`."""
        return self._mark_prefix + '"' + generation + ":" + str(offset_ms) + tail

    def clear(self) -> str:
        """Flush Twilio's playback buffer; every pending mark is echoed at once."""
        return self._clear
