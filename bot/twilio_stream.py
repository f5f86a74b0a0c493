"""Twilio Media Streams messages as typed values: parse what Twilio sends, build what we send.

Parsing is the hot path (fifty `media` frames a second per call), so each frame is decoded
once with `json.loads` and mapped by hand onto slotted dataclasses: no validation layer that
allocates. Anything malformed or unknown becomes a `ProtocolViolation` value, never an
exception: the caller counts it, logs the first of each kind, and the call goes on.
"""

from __future__ import annotations

import binascii
import json
from dataclasses import dataclass, field
from typing import Any, Literal

# The largest Media Streams message the app accepts (uvicorn's default is 16 MiB). Twilio's own
# messages are well under 1 KiB; anything near this is a fault, and is closed with 1009.
MAX_MESSAGE_BYTES = 64 * 1024
MULAW_BYTES_PER_MS = 8

ViolationKind = Literal[
    "binary",
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
    """A frame the bot cannot use. `detail` is for a log line and never holds audio."""

    kind: ViolationKind
    detail: str = field(default="")


InboundMessage = Connected | Start | Media | Mark | Dtmf | Stop


def parse_message(text: str | bytes) -> InboundMessage | ProtocolViolation:
    """One Twilio WebSocket frame -> a typed message, or the reason it is unusable."""
    if isinstance(text, bytes):
        return ProtocolViolation("binary", f"{len(text)} bytes")
    try:
        data = json.loads(text)
    except ValueError:
        return ProtocolViolation("not_json", f"{len(text)} chars")
    if not isinstance(data, dict):
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
            call_sid = stop.get("callSid", "") if isinstance(stop, dict) else ""
            return Stop(_str(data, "streamSid"), call_sid if isinstance(call_sid, str) else "")
        if event == "connected":
            protocol, version = data.get("protocol", ""), data.get("version", "")
            return Connected(str(protocol), str(version))
    except _BadField as exc:
        return ProtocolViolation("bad_field", f"{event}: bad or missing {exc}")
    return ProtocolViolation("unknown_event", str(event)[:40])


def _parse_media(data: dict[str, Any]) -> Media | ProtocolViolation:
    media = data.get("media")
    if not isinstance(media, dict):
        raise _BadField("media")
    payload = media.get("payload")
    if not isinstance(payload, str):
        raise _BadField("payload")
    timestamp = media.get("timestamp", "0")
    if isinstance(timestamp, str) and timestamp.isdigit():
        timestamp_ms = int(timestamp)
    elif isinstance(timestamp, int) and not isinstance(timestamp, bool) and timestamp >= 0:
        timestamp_ms = timestamp
    else:
        raise _BadField("timestamp")
    try:
        audio = binascii.a2b_base64(payload, strict_mode=True)
    except binascii.Error:
        return ProtocolViolation("bad_payload", f"{len(payload)} chars")
    stream_sid = data.get("streamSid", "")
    return Media(stream_sid if isinstance(stream_sid, str) else "", timestamp_ms, payload, audio)


def _parse_start(data: dict[str, Any]) -> Start:
    start = _obj(data, "start")
    params = start.get("customParameters") or {}
    if not isinstance(params, dict):
        raise _BadField("customParameters")
    fmt = start.get("mediaFormat") or {}
    if not isinstance(fmt, dict):
        raise _BadField("mediaFormat")
    tracks = start.get("tracks") or []
    return Start(
        stream_sid=_str(start, "streamSid"),
        call_sid=_str(start, "callSid"),
        account_sid=str(start.get("accountSid", "")),
        custom_parameters={str(k): str(v) for k, v in params.items()},
        media_format=MediaFormat(
            encoding=str(fmt.get("encoding", "audio/x-mulaw")),
            sample_rate_hz=_int(fmt.get("sampleRate", 8000), "sampleRate"),
            channels=_int(fmt.get("channels", 1), "channels"),
        ),
        tracks=tuple(str(t) for t in tracks) if isinstance(tracks, list) else (),
    )


class _BadField(Exception):
    """Internal: names the missing or mistyped field; surfaces as a ProtocolViolation."""


def _obj(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    if not isinstance(value, dict):
        raise _BadField(key)
    return value


def _str(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise _BadField(key)
    return value


def _int(value: object, name: str) -> int:
    if isinstance(value, bool):
        raise _BadField(name)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise _BadField(name)


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

    def mark(self, name: str) -> str:
        """A mark Twilio echoes once the audio sent before it has played."""
        return self._mark_prefix + json.dumps(name) + "}}"

    def clear(self) -> str:
        """Flush Twilio's playback buffer; every pending mark is echoed at once."""
        return self._clear
