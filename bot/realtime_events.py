"""Realtime server events as typed values: each text frame is parsed once, here, at the edge.

`Call` consumes these dataclasses and never reads a dict. Only the events the bot acts on get a
type, and only the fields it uses are checked, by hand: an audio delta (the hot path, ten or more
a second per call) costs one bounded `json.loads`, a few type checks and the base64 decode it
needed anyway. A frame that is not JSON, too large or too deep, not an object, without a `type`,
or a known event with a missing or mistyped field becomes a `Malformed` value, which the bridge
counts and the call survives. Events the bot has no use for (and types newer than this code)
become `IGNORED`, also never an exception.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from bot.wire import MAX_NUMBER, JsonFault, decode_base64, load_json

# A session.updated echoing the instructions and tools is the largest event; the socket itself
# refuses frames past REALTIME_MAX_MESSAGE_BYTES. Tool schemas nest about eight levels.
MAX_EVENT_CHARS = 1024 * 1024
MAX_NESTING = 32

MalformedKind = Literal["binary", "too_large", "too_deep", "not_json", "not_object", "no_type", "bad_field"]


@dataclass(slots=True)
class AudioDelta:
    """A chunk of the model's speech, already decoded (PCM16 24 kHz or mu-law, as configured).

    Not frozen, like Twilio's Media: a frozen init costs a setattr per field on the hot path."""

    response_id: str
    item_id: str
    audio: bytes


@dataclass(frozen=True, slots=True)
class AudioDone:
    response_id: str
    item_id: str


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    """The server VAD heard the caller start: barge-in."""

    item_id: str


@dataclass(frozen=True, slots=True)
class SpeechStopped:
    item_id: str


@dataclass(frozen=True, slots=True)
class ResponseCreated:
    """`metadata` is what our `response.create` asked to tag it with (empty for the server's own)."""

    response_id: str
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ResponseDone:
    """`usage` holds the token counts the response reported, audio and text apart."""

    response_id: str
    status: str
    usage: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class OutputTranscript:
    """What the model said in one item, as text."""

    item_id: str
    transcript: str


@dataclass(frozen=True, slots=True)
class InputTranscript:
    """What the caller said in one item, as the transcription model heard it."""

    item_id: str
    transcript: str


@dataclass(frozen=True, slots=True)
class FunctionCall:
    """The model asks for a tool; `arguments` is its JSON text, parsed by the tool."""

    call_id: str
    name: str
    arguments: str
    response_id: str


@dataclass(frozen=True, slots=True)
class ServerError:
    """An `error` event. `client_event_id` is the `event_id` of our client event it answers."""

    code: str | None
    type: str
    message: str
    client_event_id: str | None


@dataclass(frozen=True, slots=True)
class SessionCreated:
    """The first event of a session: its id, which OpenAI's own logs know it by."""

    session_id: str


ServerEvent = (
    AudioDelta
    | AudioDone
    | SpeechStarted
    | SpeechStopped
    | ResponseCreated
    | ResponseDone
    | OutputTranscript
    | InputTranscript
    | FunctionCall
    | ServerError
    | SessionCreated
)


@dataclass(frozen=True, slots=True)
class Malformed:
    """A frame the bot cannot use; `detail` is for a log line and never holds audio."""

    kind: MalformedKind
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Ignored:
    """A well-formed event the bot has no use for."""


IGNORED = Ignored()


def parse_server_event(text: str | bytes) -> ServerEvent | Malformed | Ignored:
    """One Realtime WebSocket frame -> a typed event, IGNORED, or why it is unusable."""
    if isinstance(text, bytes):
        return Malformed("binary", f"{len(text)} bytes")
    data = load_json(text, max_chars=MAX_EVENT_CHARS, max_depth=MAX_NESTING)
    if type(data) is not dict:
        if isinstance(data, JsonFault):
            return Malformed(data.kind, data.detail)
        return Malformed("not_object", type(data).__name__)
    kind = data.get("type")
    if type(kind) is not str:
        return Malformed("no_type")
    parse = _PARSERS.get(kind)
    if parse is None:
        return IGNORED
    try:
        return parse(data)
    except _BadField as exc:
        return Malformed("bad_field", f"{kind}: bad or missing {exc}")


class _BadField(Exception):
    """Internal: names the missing or mistyped field; surfaces as Malformed."""


def _str(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if type(value) is not str:
        raise _BadField(key)
    return value


def _id(data: dict[str, Any], key: str) -> str:
    """An id the call keys state on: a non-empty string."""
    value = data.get(key)
    if type(value) is not str or not value:
        raise _BadField(key)
    return value


def _obj(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    if type(value) is not dict:
        raise _BadField(key)
    return value


def _optional_str(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is not None and type(value) is not str:
        raise _BadField(key)
    return value


def _audio_delta(data: dict[str, Any]) -> AudioDelta:
    delta = data.get("delta")
    audio = decode_base64(delta) if type(delta) is str else None
    if audio is None:
        raise _BadField("delta")
    return AudioDelta(_id(data, "response_id"), _id(data, "item_id"), audio)


def _audio_done(data: dict[str, Any]) -> AudioDone:
    return AudioDone(_id(data, "response_id"), _id(data, "item_id"))


def _speech_started(data: dict[str, Any]) -> SpeechStarted:
    return SpeechStarted(_str(data, "item_id"))


def _speech_stopped(data: dict[str, Any]) -> SpeechStopped:
    return SpeechStopped(_str(data, "item_id"))


def _response_created(data: dict[str, Any]) -> ResponseCreated:
    response = _obj(data, "response")
    metadata = response.get("metadata") or {}
    if type(metadata) is not dict or not all(type(v) is str for v in metadata.values()):
        raise _BadField("metadata")
    return ResponseCreated(_id(response, "id"), metadata)


def _response_done(data: dict[str, Any]) -> ResponseDone:
    response = _obj(data, "response")
    status = response.get("status")
    return ResponseDone(
        _id(response, "id"), status if type(status) is str else "", _usage(response.get("usage"))
    )


def _output_transcript(data: dict[str, Any]) -> OutputTranscript:
    return OutputTranscript(_id(data, "item_id"), _str(data, "transcript"))


def _input_transcript(data: dict[str, Any]) -> InputTranscript:
    return InputTranscript(_str(data, "item_id"), _str(data, "transcript"))


def _function_call(data: dict[str, Any]) -> FunctionCall:
    return FunctionCall(
        _id(data, "call_id"), _str(data, "name"), _str(data, "arguments"), _str(data, "response_id")
    )


def _error(data: dict[str, Any]) -> ServerError:
    error = _obj(data, "error")
    return ServerError(
        code=_optional_str(error, "code"),
        type=_str(error, "type"),
        message=_str(error, "message")[:200],
        client_event_id=_optional_str(error, "event_id"),
    )


def _session_created(data: dict[str, Any]) -> SessionCreated:
    return SessionCreated(_str(_obj(data, "session"), "id"))


def _usage(usage: object) -> dict[str, int]:
    """Token counts of one response, audio and text apart (they are priced apart)."""
    if type(usage) is not dict:
        return {}
    given = usage.get("input_token_details")
    made = usage.get("output_token_details")
    given = given if type(given) is dict else {}
    made = made if type(made) is dict else {}
    cached = given.get("cached_tokens_details")
    cached = cached if type(cached) is dict else {}
    counts = {
        "input_text_tokens": given.get("text_tokens"),
        "input_audio_tokens": given.get("audio_tokens"),
        "input_cached_tokens": given.get("cached_tokens"),
        "input_cached_text_tokens": cached.get("text_tokens"),
        "input_cached_audio_tokens": cached.get("audio_tokens"),
        "output_text_tokens": made.get("text_tokens"),
        "output_audio_tokens": made.get("audio_tokens"),
    }
    return {key: value for key, value in counts.items() if type(value) is int and 0 <= value <= MAX_NUMBER}


_PARSERS: dict[str, Callable[[dict[str, Any]], ServerEvent]] = {
    "response.output_audio.delta": _audio_delta,
    "response.output_audio.done": _audio_done,
    "input_audio_buffer.speech_started": _speech_started,
    "input_audio_buffer.speech_stopped": _speech_stopped,
    "response.created": _response_created,
    "response.done": _response_done,
    "response.output_audio_transcript.done": _output_transcript,
    "conversation.item.input_audio_transcription.completed": _input_transcript,
    "response.function_call_arguments.done": _function_call,
    "error": _error,
    "session.created": _session_created,
}
