"""A local OpenAI Realtime API (GA, WebSocket) that follows a script, for tests, benchmarks and the demo.

It speaks the wire protocol of `wss://api.openai.com/v1/realtime` on 127.0.0.1: the handshake
and its refusals, `session.update` with the GA schema (validated with the `openai` package's own
models, unknown fields refused as the real service does), an energy-based server VAD on audio
time, responses with audio deltas paced faster than real time, function calls, cancel, truncate,
and `POST /v1/realtime/client_secrets` for ephemeral keys, both on one port as OpenAI serves them
from one host. A browser authenticates as it does with OpenAI: the client secret in the
subprotocol `openai-insecure-api-key.<secret>`, offered with `realtime`. What the model says and
which tools it calls come from a `Scenario`: an ordered list of turns. Fault switches on
`RealtimeSimulator` drop the socket, delay events, inject errors, refuse handshakes and client
secrets, close sessions, and follow events with malformed copies of themselves.

How a `response.create` (or the VAD's automatic response) picks what to say, per session:
0. an out-of-band response (`conversation: "none"`) leaves the script and the conversation as
   they are: it says the last double-quoted words of its instructions (the bot's "one
   moment" line quotes what to say), and its items are never added to the conversation;
1. after a tool-call response, the pending turn's `say`, with `{field}` filled from the JSON
   tool outputs received since (a tool call's string arguments may likewise be a whole
   `{path}` into them, such as `{products.0.sku}`, to act on what an earlier tool found),
   unless a user item arrived since: as a model does, it answers the newest question instead
   and the pending `say` is dropped;
2. else, when a user item (audio commit or text) arrived since the last response, the next turn
   (or `fallback_say` once the turns run out); its tool calls go first, in a response of their own;
3. else, before the caller has said anything, the greeting; otherwise `fallback_say`.
"""

from __future__ import annotations

import argparse
import asyncio
import audioop
import base64
import binascii
import contextlib
import copy
import http
import json
import logging
import math
import random
import re
import secrets
import signal
import socket
import struct
import sys
import time
import typing
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import h11
from openai.types.realtime import RealtimeClientEvent
from openai.types.realtime.realtime_session_create_request import RealtimeSessionCreateRequest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from bot.cli import CommandParser, port_number
from bot.settings import SettingsError, load_settings
from bot.wav import read_wav

logger = logging.getLogger(__name__)

SIM_DIR = Path(__file__).parent
DEFAULT_SPEECH_WAV = SIM_DIR / "audio" / "bot_reply_24k.wav"
SCENARIO_DIR = SIM_DIR / "scenarios"

REALTIME_PATH = "/v1/realtime"
CLIENT_SECRETS_PATH = "/v1/realtime/client_secrets"
PCM_RATE_HZ = 24000
G711_RATE_HZ = 8000
MAX_APPEND_BYTES = 15 * 1024 * 1024
MAX_REST_BODY_BYTES = 1024 * 1024
MAX_REST_HEAD_BYTES = 64 * 1024
REALTIME_SUBPROTOCOL = "realtime"
KEY_SUBPROTOCOL_PREFIX = "openai-insecure-api-key."
BETA_SUBPROTOCOL = "openai-beta.realtime-v1"
MIN_COMMIT_MS = 100
VAD_FRAME_MS = 10
# Energy threshold in dBFS for VAD threshold t: -60 + 50 t (0.5 -> -35 dBFS, louder needed as t rises).
VAD_DB_AT_ZERO = -60.0
VAD_DB_SPAN = 50.0
# Semantic VAD has no threshold knobs; the sim ends a turn after this much silence per eagerness.
SEMANTIC_SILENCE_MS = {"low": 1500, "medium": 800, "auto": 800, "high": 400}
MS_PER_CHAR = 65
MAX_REPLY_MS = 15_000
AUDIO_CHUNK_MS = 100
DEFAULT_AUDIO_SPEED = 4.0
SESSION_MAX_S = 60 * 60
SECRET_DEFAULT_TTL_S = 600
INPUT_AUDIO_TOKENS_PER_S = 10
OUTPUT_AUDIO_TOKENS_PER_S = 20
CHARS_PER_TEXT_TOKEN = 4
VOICES = ("alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar")
DEFAULT_INSTRUCTIONS = "You are a helpful, friendly assistant. Keep answers short."
BETA_DISABLED_MESSAGE = (
    "The Realtime Beta API is no longer supported. Please use /v1/realtime for the GA API."
)

Json = dict[str, Any]


# --- scenario -------------------------------------------------------------------------------


@dataclass(slots=True)
class ToolCall:
    """A function call the simulated model makes, with its arguments as a JSON object."""

    name: str
    arguments: dict[str, Any]


@dataclass(slots=True)
class Turn:
    """One model turn, taken when the caller finishes a turn.

    `tool_calls` go out first in a response of their own; `say` is spoken in the response that
    follows the tool outputs. `hears` is what the caller is taken to have said (the sim cannot
    recognise speech), used as the input transcription.
    """

    say: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    audio_ms: int | None = None
    hears: str | None = None


class _ToolCallModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    arguments: dict[str, Any] = Field(default_factory=dict)


class _TurnModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    say: str = ""
    tool_calls: list[_ToolCallModel] = Field(default_factory=list)
    audio_ms: int | None = Field(None, ge=0)
    hears: str | None = None


class _ScenarioModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    greeting: str
    turns: list[_TurnModel]
    fallback_say: str = "Sorry, could you say that again?"


@dataclass(slots=True)
class Scenario:
    """What the simulated model says: a greeting, then one turn per caller turn, in order."""

    greeting: str
    turns: list[Turn]
    fallback_say: str = "Sorry, could you say that again?"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Scenario:
        model = _ScenarioModel.model_validate(data)
        turns = [
            Turn(
                say=t.say,
                tool_calls=[ToolCall(c.name, c.arguments) for c in t.tool_calls],
                audio_ms=t.audio_ms,
                hears=t.hears,
            )
            for t in model.turns
        ]
        return cls(greeting=model.greeting, turns=turns, fallback_say=model.fallback_say)

    @classmethod
    def from_json(cls, path: str | Path) -> Scenario:
        """Loads a scenario file; a bare name like `washers` means a bundled scenario."""
        file = Path(path)
        if not file.exists() and (SCENARIO_DIR / f"{path}.json").exists():
            file = SCENARIO_DIR / f"{path}.json"
        return cls.from_dict(json.loads(file.read_text(encoding="utf-8")))


@dataclass(slots=True)
class _Plan:
    """What one response will contain."""

    say: str
    tool_calls: list[ToolCall]
    audio_ms: int | None


_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _fill(text: str, fields: Mapping[str, Any]) -> str:
    """Replaces `{name}` with the tool output's field; unknown names stay as written."""
    return _PLACEHOLDER.sub(lambda m: str(fields[m[1]]) if m[1] in fields else m[0], text)


_QUOTED = re.compile(r'"([^"]+)"')


def _quoted_words(instructions: object, otherwise: str) -> str:
    """The last double-quoted words of an out-of-band response's instructions."""
    found = _QUOTED.findall(instructions) if isinstance(instructions, str) else []
    return found[-1] if found else otherwise


_PATH = re.compile(r"^\{([\w.]+)\}$")


def _fill_arguments(value: Any, fields: Mapping[str, Any]) -> Any:
    """Arguments with each string that is a whole `{path}` (`products.0.sku`) replaced by what the
    tool outputs hold there; a path that leads nowhere stays as written."""
    if isinstance(value, dict):
        return {key: _fill_arguments(item, fields) for key, item in value.items()}
    if isinstance(value, list):
        return [_fill_arguments(item, fields) for item in value]
    found = _PATH.match(value) if isinstance(value, str) else None
    if found is None:
        return value
    current: Any = fields
    for step in found[1].split("."):
        if isinstance(current, dict) and step in current:
            current = current[step]
        elif isinstance(current, list) and step.isdigit() and int(step) < len(current):
            current = current[int(step)]
        else:
            return value
    return current


class _Script:
    """Walks a scenario for one session (rules in the module docstring). Pure, no I/O."""

    def __init__(self, scenario: Scenario) -> None:
        self._scenario = scenario
        self._next_turn = 0
        self._pending: Turn | None = None
        self._greeted = False

    def upcoming_hears(self) -> str | None:
        turns = self._scenario.turns
        return turns[self._next_turn].hears if self._next_turn < len(turns) else None

    def plan(self, *, user_spoke: bool, fields: Mapping[str, Any], tools: set[str]) -> _Plan:
        pending, self._pending = self._pending, None
        if pending is not None and not user_spoke:
            return _Plan(_fill(pending.say, fields), [], pending.audio_ms)
        if user_spoke:
            self._greeted = True
            turns = self._scenario.turns
            if self._next_turn >= len(turns):
                return _Plan(self._scenario.fallback_say, [], None)
            turn = turns[self._next_turn]
            self._next_turn += 1
            calls = [c for c in turn.tool_calls if c.name in tools]
            if calls:
                self._pending = turn
                return _Plan("", calls, None)
            return _Plan(turn.say, [], turn.audio_ms)
        if not self._greeted:
            self._greeted = True
            return _Plan(self._scenario.greeting, [], None)
        return _Plan(self._scenario.fallback_say, [], None)


# --- pure helpers: ids, errors, validation ---------------------------------------------------


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(11)}"


def error_event(
    code: str | None,
    message: str,
    *,
    param: str | None = None,
    client_event_id: str | None = None,
    error_type: str = "invalid_request_error",
) -> Json:
    """An `error` server event, shaped as OpenAI sends it (the sim adds `event_id` on send)."""
    error = {
        "type": error_type,
        "code": code,
        "message": message,
        "param": param,
        "event_id": client_event_id,
    }
    return {"type": "error", "error": error}


class _ClientError(Exception):
    """A client event the real service would answer with an `error` event."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


def _event_models() -> dict[str, type[BaseModel]]:
    """The members of `RealtimeClientEvent`, keyed by their `type` tag."""
    union = typing.get_args(RealtimeClientEvent)[0]
    models: dict[str, type[BaseModel]] = {}
    for model in typing.get_args(union):
        (tag,) = typing.get_args(model.model_fields["type"].annotation)
        models[tag] = model
    return models


CLIENT_EVENT_MODELS = _event_models()

_TYPE_NAMES = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a decimal",
    "float_parsing": "a decimal",
    "bool_type": "a boolean",
    "bool_parsing": "a boolean",
    "list_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
}


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if value is None:
        return "null"
    return "an object"


def _input_path(loc: tuple[int | str, ...], data: Any, missing: bool) -> str:
    """The JSON path of a pydantic error, without the union-branch labels pydantic adds."""
    parts: list[str] = []
    current = data
    for index, element in enumerate(loc):
        if isinstance(current, dict) and isinstance(element, str) and element in current:
            parts.append(f".{element}")
            current = current[element]
        elif isinstance(current, list) and isinstance(element, int) and element < len(current):
            parts.append(f"[{element}]")
            current = current[element]
        elif missing and index == len(loc) - 1:
            parts.append(f".{element}")
    return "".join(parts).lstrip(".")


def _from_validation_error(exc: ValidationError, data: Any, prefix: str = "") -> _ClientError:
    """Maps pydantic's errors to the one error OpenAI would report (the most specific one)."""
    candidates = []
    for err in exc.errors():
        path = _input_path(err["loc"], data, err["type"] == "missing")
        path = f"{prefix}.{path}".strip(".") if prefix else path
        branch_mismatch = path.endswith("type") and err["type"] == "literal_error"
        candidates.append((not branch_mismatch, path.count(".") + path.count("["), path, err))
    _, _, param, err = max(candidates, key=lambda c: (c[0], c[1]))
    kind = err["type"]
    if kind == "missing":
        return _ClientError("missing_required_parameter", f"Missing required parameter: '{param}'.", param)
    if kind in _TYPE_NAMES:
        got = _json_type(err["input"])
        message = f"Invalid type for '{param}': expected {_TYPE_NAMES[kind]}, but got {got} instead."
        return _ClientError("invalid_type", message, param)
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        message = f"Invalid value: {err['input']!r}. Supported values are: {expected}."
        return _ClientError("invalid_value", message, param)
    return _ClientError("invalid_value", f"Invalid '{param}': {err['msg']}.", param)


def _unknown_parameter(value: Any, path: str = "") -> str | None:
    """The path of the first field the GA schema does not know (the models accept extras)."""
    if isinstance(value, BaseModel):
        for key in value.model_extra or {}:
            return f"{path}.{key}".lstrip(".")
        children = ((f"{path}.{name}", getattr(value, name)) for name in type(value).model_fields)
    elif isinstance(value, list):
        children = ((f"{path}[{index}]", item) for index, item in enumerate(value))
    else:
        return None
    for child_path, child in children:
        if isinstance(child, BaseModel | list):
            found = _unknown_parameter(child, child_path)
            if found:
                return found
    return None


def parse_client_event(data: Any) -> BaseModel:
    """Validates one client event against `RealtimeClientEvent`, the way the service does.

    Raises `_ClientError` with OpenAI's code (`missing_required_parameter`, `invalid_value`,
    `invalid_type`, `unknown_parameter`) and the `param` path.
    """
    if not isinstance(data, dict):
        raise _ClientError("invalid_type", "Invalid type: expected a JSON object.", None)
    tag = data.get("type")
    if tag is None:
        raise _ClientError("missing_required_parameter", "Missing required parameter: 'type'.", "type")
    model = CLIENT_EVENT_MODELS.get(tag) if isinstance(tag, str) else None
    if model is None:
        supported = ", ".join(repr(t) for t in CLIENT_EVENT_MODELS)
        raise _ClientError(
            "invalid_value", f"Invalid value: {tag!r}. Supported values are: {supported}.", "type"
        )
    try:
        event = model.model_validate(data)
    except ValidationError as exc:
        raise _from_validation_error(exc, data) from None
    unknown = _unknown_parameter(event)
    if unknown:
        raise _ClientError("unknown_parameter", f"Unknown parameter: '{unknown}'.", unknown)
    return event


def parse_session(data: Any, prefix: str = "session") -> Json:
    """Validates a GA `session` object; returns only the fields the client set."""
    if not isinstance(data, dict):
        raise _ClientError("invalid_type", f"Invalid type for '{prefix}': expected an object.", prefix)
    try:
        session = RealtimeSessionCreateRequest.model_validate(data)
    except ValidationError as exc:
        raise _from_validation_error(exc, data, prefix) from None
    unknown = _unknown_parameter(session, prefix)
    if unknown:
        raise _ClientError("unknown_parameter", f"Unknown parameter: '{unknown}'.", unknown)
    return session.model_dump(mode="json", exclude_unset=True)


# --- session configuration ----------------------------------------------------------------


def default_session(model: str) -> Json:
    """The configuration a new session starts with (what `session.created` shows)."""
    return {
        "type": "realtime",
        "object": "realtime.session",
        "id": _new_id("sess"),
        "model": model,
        "output_modalities": ["audio"],
        "instructions": DEFAULT_INSTRUCTIONS,
        "tools": [],
        "tool_choice": "auto",
        "max_output_tokens": "inf",
        "tracing": None,
        "truncation": "auto",
        "prompt": None,
        "expires_at": int(time.time()) + SESSION_MAX_S,
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": PCM_RATE_HZ},
                "transcription": None,
                "noise_reduction": None,
                "turn_detection": _with_vad_defaults({"type": "server_vad"}),
            },
            "output": {
                "format": {"type": "audio/pcm", "rate": PCM_RATE_HZ},
                "voice": "alloy",
                "speed": 1.0,
            },
        },
    }


def _with_vad_defaults(detection: Json | None) -> Json | None:
    if detection is None:
        return None
    if detection["type"] == "server_vad":
        defaults: Json = {
            "threshold": 0.5,
            "prefix_padding_ms": 300,
            "silence_duration_ms": 500,
            "idle_timeout_ms": None,
        }
    else:
        defaults = {"eagerness": "auto"}
    defaults.update({"create_response": True, "interrupt_response": True})
    given = {k: v for k, v in detection.items() if v is not None}
    return {"type": detection["type"], **defaults, **given}


def _merge(base: Json, update: Mapping[str, Any]) -> Json:
    """`session.update` semantics: present fields change; an object whose `type` changes is replaced."""
    merged = dict(base)
    for key, value in update.items():
        old = merged.get(key)
        if (
            isinstance(value, Mapping)
            and isinstance(old, dict)
            and old.get("type") == value.get("type", old.get("type"))
        ):
            merged[key] = _merge(old, value)
        else:
            merged[key] = value
    return merged


def _normalise(config: Json) -> Json:
    """A full effective config: VAD defaults filled in, PCM rate explicit. Returns a copy."""
    config = copy.deepcopy(config)
    audio = config["audio"]
    audio["input"]["turn_detection"] = _with_vad_defaults(audio["input"].get("turn_detection"))
    for side in ("input", "output"):
        fmt = audio[side]["format"]
        if fmt.get("type", "audio/pcm") == "audio/pcm":
            audio[side]["format"] = {"type": "audio/pcm", "rate": PCM_RATE_HZ}
    return config


def _check_values(update: Json) -> None:
    """Range checks the service makes that the SDK's models leave out."""
    audio = update.get("audio") or {}
    output = audio.get("output") or {}
    voice = output.get("voice")
    if isinstance(voice, str) and voice not in VOICES:
        supported = ", ".join(repr(v) for v in VOICES)
        param = "session.audio.output.voice"
        raise _ClientError(
            "invalid_value", f"Invalid value: {voice!r}. Supported values are: {supported}.", param
        )
    speed = output.get("speed")
    if speed is not None and not 0.25 <= speed <= 1.5:
        raise _ClientError(
            "decimal_out_of_range", "Invalid 'session.audio.output.speed'.", "session.audio.output.speed"
        )
    detection = (audio.get("input") or {}).get("turn_detection") or {}
    threshold = detection.get("threshold")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        param = "session.audio.input.turn_detection.threshold"
        raise _ClientError("decimal_out_of_range", f"Invalid '{param}': expected 0.0 to 1.0.", param)
    tokens = update.get("max_output_tokens")
    if isinstance(tokens, int) and not 1 <= tokens <= 4096:
        param = "session.max_output_tokens"
        raise _ClientError("integer_out_of_range", f"Invalid '{param}': expected 1 to 4096.", param)


# --- audio ----------------------------------------------------------------------------------


def _bytes_per_ms(fmt: Mapping[str, Any]) -> int:
    return 48 if fmt.get("type") == "audio/pcm" else 8


def _decode_input(data: bytes, fmt: Mapping[str, Any]) -> tuple[bytes, int]:
    """Input audio as PCM16 at its own rate: (samples, rate_hz)."""
    kind = fmt.get("type")
    if kind == "audio/pcmu":
        return audioop.ulaw2lin(data, 2), G711_RATE_HZ
    if kind == "audio/pcma":
        return audioop.alaw2lin(data, 2), G711_RATE_HZ
    return data, PCM_RATE_HZ


def _encode_speech(pcm24k: bytes, fmt: Mapping[str, Any]) -> bytes:
    kind = fmt.get("type")
    if kind in ("audio/pcmu", "audio/pcma"):
        narrow, _ = audioop.ratecv(pcm24k, 2, 1, PCM_RATE_HZ, G711_RATE_HZ, None)
        return audioop.lin2ulaw(narrow, 2) if kind == "audio/pcmu" else audioop.lin2alaw(narrow, 2)
    return pcm24k


@dataclass(slots=True)
class VadEvent:
    """`started` at `ms` (prefix padding included) or `stopped` at `ms` (silence included)."""

    kind: Literal["started", "stopped"]
    ms: int


class EnergyVad:
    """Server VAD on audio time: RMS level per 10 ms frame against a threshold in dBFS.

    Time is the session's audio clock (milliseconds of audio appended), never the wall clock,
    so a caller streaming faster than real time sees the same events.
    """

    def __init__(self) -> None:
        self.audio_ms = 0
        self.buffer_start_ms = 0
        self.enabled = False
        self._rate_hz = PCM_RATE_HZ
        self._carry = b""
        self._rms_floor = 0.0
        self._prefix_ms = 300
        self._silence_ms = 500
        self._speaking = False
        self._last_loud_end_ms = 0

    @property
    def speaking(self) -> bool:
        return self._speaking

    def configure(self, detection: Mapping[str, Any] | None, rate_hz: int) -> None:
        if rate_hz != self._rate_hz:
            self._rate_hz, self._carry = rate_hz, b""
        self.enabled = detection is not None
        if detection is None:
            self._speaking = False
            return
        if detection["type"] == "semantic_vad":
            threshold, self._prefix_ms = 0.5, 300
            self._silence_ms = SEMANTIC_SILENCE_MS[detection.get("eagerness") or "auto"]
        else:
            threshold = detection["threshold"]
            self._prefix_ms = detection["prefix_padding_ms"]
            self._silence_ms = detection["silence_duration_ms"]
        db = VAD_DB_AT_ZERO + VAD_DB_SPAN * threshold
        self._rms_floor = 32768.0 * 10 ** (db / 20)

    def reset_buffer(self) -> None:
        """The input buffer was committed or cleared: a new buffer starts now."""
        self.buffer_start_ms = self.audio_ms
        self._speaking = False

    def feed(self, pcm: bytes) -> list[VadEvent]:
        """Advances the audio clock by `pcm` (PCM16 LE at the configured rate)."""
        data = self._carry + pcm
        frame_bytes = self._rate_hz * VAD_FRAME_MS // 1000 * 2
        count = len(data) // frame_bytes
        self._carry = data[count * frame_bytes :]
        if count == 0:
            return []
        if not self.enabled:
            self.audio_ms += count * VAD_FRAME_MS
            return []
        events: list[VadEvent] = []
        for offset in range(0, count * frame_bytes, frame_bytes):
            is_loud = audioop.rms(data[offset : offset + frame_bytes], 2) >= self._rms_floor
            start_ms = self.audio_ms
            self.audio_ms += VAD_FRAME_MS
            if is_loud:
                if not self._speaking:
                    self._speaking = True
                    onset = max(self.buffer_start_ms, start_ms - self._prefix_ms)
                    events.append(VadEvent("started", onset))
                self._last_loud_end_ms = self.audio_ms
            elif self._speaking and self.audio_ms - self._last_loud_end_ms >= self._silence_ms:
                self._speaking = False
                events.append(VadEvent("stopped", self.audio_ms))
        return events


# --- one connection -------------------------------------------------------------------------


class _SessionEnded(Exception):
    """The socket is gone (closed, or dropped by a fault switch): stop producing events."""


_WRONG_TYPES: tuple[Any, ...] = (None, 12, -1, 1.5, float("inf"), float("nan"), 10**30, True, [], {}, ["x"])
_DEEP_NESTING = 3000


def malformed_copy(event: Json, rng: random.Random) -> str | bytes:
    """A broken copy of a server event, as a faulty server or network might deliver it: cut short,
    binary, not an object, nested past any sane depth, without a usable type, or with every field
    but its type mistyped (an audio delta's base64 non-ASCII). Never a valid event: a client that
    acted on it would play, cut or answer twice."""
    text = json.dumps(event)
    fields = [key for key in event if key not in ("type", "event_id")]
    kind = rng.randrange(6 if fields else 5)
    if kind == 0:
        return text[: rng.randrange(1, len(text))]
    if kind == 1:
        return text.encode()
    if kind == 2:
        return json.dumps([event])
    if kind == 3:
        return '{"type": ' + "[" * _DEEP_NESTING + "]" * _DEEP_NESTING + "}"
    if kind == 4:
        return json.dumps({**event, "type": rng.choice(_WRONG_TYPES)})
    broken = {key: "éAAA" if key == "delta" else rng.choice(_WRONG_TYPES) for key in fields}
    return json.dumps({**event, **broken})


def _settle_response_task(task: asyncio.Task[None]) -> None:
    """A reply cut short by the client hanging up is normal; any other failure is logged once."""
    if task.cancelled():
        return
    error = task.exception()
    if error is not None and not isinstance(error, _SessionEnded):
        logger.error("simulated response failed", exc_info=error)


@dataclass(slots=True)
class _Response:
    id: str
    task: asyncio.Task[None] | None = None
    cancel_reason: str | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    output: list[Json] = field(default_factory=list)
    out_of_band: bool = False


@dataclass(slots=True)
class SimSession:
    """What one accepted connection did, for tests to assert on.

    `events_received` holds every client event as parsed JSON except `input_audio_buffer.append`
    (a call sends 50 a second), which `audio_appends` counts and `input_audio_ms` measures;
    `input_audio` keeps the decoded PCM16 only when the simulator's `record_input_audio` is on.
    `transcript` is (role, text) in order: "user" (the scenario's `hears`, or a placeholder) and
    "assistant" (what was spoken, cut short when cancelled). `client_secret` is the ephemeral
    secret the session was opened with (None for the API key). `turns_ended_at` holds when each
    `speech_stopped` went out (monotonic seconds), the moment the caller's turn was over.
    """

    events_received: list[Json] = field(default_factory=list)
    audio_appends: int = 0
    input_audio_ms: int = 0
    session: Json = field(default_factory=dict)
    truncations: list[tuple[str, int, int]] = field(default_factory=list)
    tool_outputs: list[tuple[str, str]] = field(default_factory=list)
    transcript: list[tuple[str, str]] = field(default_factory=list)
    closed: bool = False
    beta_header: bool = False
    client_secret: str | None = None
    input_audio: bytearray = field(default_factory=bytearray)
    turns_ended_at: list[float] = field(default_factory=list)


class _Connection:
    """Runs one Realtime session on one WebSocket: reads client events, writes server events."""

    def __init__(
        self, sim: RealtimeSimulator, ws: ServerConnection, record: SimSession, config: Json
    ) -> None:
        self.sim = sim
        self.ws = ws
        self.record = record
        record.session = _normalise(config)
        self.script = _Script(sim.scenario)
        self.vad = EnergyVad()
        self.items: dict[str, Json] = {}
        self.order: list[str] = []
        self.item_audio_ms: dict[str, int] = {}
        self.call_ids: set[str] = set()
        self.tool_fields: Json = {}
        self.user_spoke = False
        self.speech_item_id: str | None = None
        self.active: _Response | None = None
        self.audio_out = False
        self.dropped = False
        self.send_lock = asyncio.Lock()
        self._apply_audio_config()

    # sending

    async def send(self, event: Json, *, unless_cancelled: _Response | None = None) -> bool:
        """Sends one server event through the fault switches, in order.

        A delta of a response cancelled while it waited for its turn is not sent (returns False):
        no audio goes out after the `speech_started` that interrupted it.
        """
        event["event_id"] = _new_id("event")
        async with self.send_lock:
            if unless_cancelled is not None and unless_cancelled.cancel_reason:
                return False
            if self.sim.event_delay_s > 0:
                await asyncio.sleep(self.sim.event_delay_s)
            if self.dropped or self.sim.drop_after_events == 0:
                await self._drop()
                raise _SessionEnded
            try:
                await self.ws.send(json.dumps(event))
                if self.sim.malformed_event_rate and self.sim.fuzz.random() < self.sim.malformed_event_rate:
                    await self.ws.send(malformed_copy(event, self.sim.fuzz))
                    self.sim.malformed_events_sent += 1
            except ConnectionClosed:
                raise _SessionEnded from None
            if self.sim.drop_after_events is not None:
                self.sim.drop_after_events -= 1
                if self.sim.drop_after_events == 0:
                    await self._drop()
        return True

    async def _drop(self) -> None:
        """Resets the TCP connection with no close frame, as a network failure would."""
        self.sim.drop_after_events = None
        if self.dropped:
            return
        self.dropped = True
        transport = self.ws.transport
        for _ in range(100):
            if transport.get_write_buffer_size() == 0:
                break
            await asyncio.sleep(0.005)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
        logger.info("realtime sim: dropped connection (fault switch)")

    async def send_error(self, err: _ClientError, client_event_id: str | None) -> None:
        await self.send(error_event(err.code, err.message, param=err.param, client_event_id=client_event_id))

    # the connection's life

    async def run(self) -> None:
        try:
            if self.record.beta_header:
                await self.send(error_event("beta_api_shape_disabled", BETA_DISABLED_MESSAGE))
                await self.ws.close(1008, "beta_api_shape_disabled")
                return
            await self.send({"type": "session.created", "session": self.record.session})
            for event in self.sim.take_pending_errors():
                await self.send(event)
            async for message in self.ws:
                if self.sim.read_delay_s > 0:
                    await asyncio.sleep(self.sim.read_delay_s)
                await self.handle(message)
        except (_SessionEnded, ConnectionClosed):
            pass
        finally:
            self.record.closed = True
            if self.active is not None and self.active.task is not None:
                self.active.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, _SessionEnded):
                    await self.active.task

    async def handle(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            err = _ClientError("invalid_type", "Binary frames are not supported; send JSON text.")
            await self.send_error(err, None)
            return
        try:
            data = json.loads(message)
        except json.JSONDecodeError as exc:
            await self.send_error(_ClientError("invalid_json", f"Invalid JSON: {exc.msg}."), None)
            return
        client_event_id = data.get("event_id") if isinstance(data, dict) else None
        if isinstance(data, dict) and data.get("type") == "input_audio_buffer.append":
            self.record.audio_appends += 1
        else:
            self.record.events_received.append(data)
        event_id = client_event_id if isinstance(client_event_id, str) else None
        try:
            event = parse_client_event(data)
            await HANDLERS[data["type"]](self, event, data)
        except _ClientError as err:
            await self.send_error(err, event_id)
        except (_SessionEnded, ConnectionClosed):
            raise
        except Exception:
            logger.exception("realtime sim: failed handling %s", data.get("type"))
            message = "The server had an error while processing your request."
            await self.send(error_event(None, message, client_event_id=event_id, error_type="server_error"))

    # session

    def _apply_audio_config(self) -> None:
        audio = self.record.session["audio"]
        _, rate = _decode_input(b"", audio["input"]["format"])
        self.vad.configure(audio["input"]["turn_detection"], rate)

    async def on_session_update(self, event: Any, data: Json) -> None:
        if event.session.type != "realtime":
            message = "Invalid value: 'transcription'. Supported values are: 'realtime'."
            raise _ClientError("invalid_value", message, "session.type")
        update: Json = event.session.model_dump(mode="json", exclude_unset=True)
        _check_values(update)
        update.pop("model", None)
        voice = (update.get("audio") or {}).get("output", {}).get("voice")
        current = self.record.session["audio"]["output"]["voice"]
        if voice is not None and voice != current and self.audio_out:
            message = "Cannot update a conversation's voice if assistant audio is present."
            raise _ClientError("cannot_update_voice", message, "session.audio.output.voice")
        self.record.session = _normalise(_merge(self.record.session, update))
        self._apply_audio_config()
        await self.send({"type": "session.updated", "session": self.record.session})

    # input audio

    async def on_append(self, event: Any, data: Json) -> None:
        try:
            raw = base64.b64decode(event.audio, validate=True)
        except (binascii.Error, ValueError):
            raise _ClientError(
                "invalid_value", "Invalid 'audio': expected base64-encoded audio.", "audio"
            ) from None
        if len(raw) > MAX_APPEND_BYTES:
            raise _ClientError("invalid_value", "Audio chunk exceeds the 15 MiB limit.", "audio")
        pcm, _ = _decode_input(raw, self.record.session["audio"]["input"]["format"])
        if self.sim.record_input_audio:
            self.record.input_audio += pcm
        vad_events = self.vad.feed(pcm)
        self.record.input_audio_ms = self.vad.audio_ms
        for vad_event in vad_events:
            if vad_event.kind == "started":
                await self._speech_started(vad_event.ms)
            else:
                await self._speech_stopped(vad_event.ms)

    async def _speech_started(self, ms: int) -> None:
        self.speech_item_id = _new_id("item")
        detection = self.record.session["audio"]["input"]["turn_detection"]
        interrupt = self.active if detection and detection["interrupt_response"] else None
        if interrupt is not None:
            interrupt.cancel_reason = "turn_detected"
        await self.send(
            {
                "type": "input_audio_buffer.speech_started",
                "audio_start_ms": ms,
                "item_id": self.speech_item_id,
            }
        )
        if interrupt is not None:
            await self._cancel_active("turn_detected")

    async def _speech_stopped(self, ms: int) -> None:
        item_id = self.speech_item_id or _new_id("item")
        await self.send({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": ms, "item_id": item_id})
        self.record.turns_ended_at.append(time.monotonic())
        seconds = (ms - self.vad.buffer_start_ms) / 1000
        await self._commit(item_id, seconds)
        detection = self.record.session["audio"]["input"]["turn_detection"]
        if detection and detection["create_response"] and self.active is None:
            self._start_response(None)

    async def on_commit(self, event: Any, data: Json) -> None:
        buffered_ms = self.vad.audio_ms - self.vad.buffer_start_ms
        if buffered_ms < MIN_COMMIT_MS:
            message = (
                "Error committing input audio buffer: buffer too small. Expected at least "
                f"{MIN_COMMIT_MS}ms of audio, but buffer only has {buffered_ms}ms of audio."
            )
            raise _ClientError("input_audio_buffer_commit_empty", message)
        item_id = self.speech_item_id if self.vad.speaking and self.speech_item_id else _new_id("item")
        await self._commit(item_id, buffered_ms / 1000)

    async def _commit(self, item_id: str, seconds: float) -> None:
        previous = self.order[-1] if self.order else None
        self.vad.reset_buffer()
        self.speech_item_id = None
        await self.send(
            {"type": "input_audio_buffer.committed", "item_id": item_id, "previous_item_id": previous}
        )
        transcript = self.script.upcoming_hears() or f"(caller audio {seconds:.1f} s)"
        item = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "role": "user",
            "status": "completed",
            "content": [{"type": "input_audio", "transcript": None}],
        }
        await self._add_item(item, previous)
        self.user_spoke = True
        self.record.transcript.append(("user", transcript))
        if self.record.session["audio"]["input"]["transcription"] is not None:
            await self._send_transcription(item_id, transcript, seconds)

    async def _send_transcription(self, item_id: str, transcript: str, seconds: float) -> None:
        ids = {"item_id": item_id, "content_index": 0}
        await self.send(
            {"type": "conversation.item.input_audio_transcription.delta", **ids, "delta": transcript}
        )
        audio_tokens = max(1, int(seconds * INPUT_AUDIO_TOKENS_PER_S))
        text_tokens = max(1, len(transcript) // CHARS_PER_TEXT_TOKEN)
        usage = {
            "type": "tokens",
            "input_tokens": audio_tokens,
            "output_tokens": text_tokens,
            "total_tokens": audio_tokens + text_tokens,
            "input_token_details": {"audio_tokens": audio_tokens, "text_tokens": 0},
        }
        await self.send(
            {
                "type": "conversation.item.input_audio_transcription.completed",
                **ids,
                "transcript": transcript,
                "usage": usage,
            }
        )

    async def on_clear(self, event: Any, data: Json) -> None:
        self.vad.reset_buffer()
        self.speech_item_id = None
        await self.send({"type": "input_audio_buffer.cleared"})

    async def on_output_clear(self, event: Any, data: Json) -> None:
        raise _ClientError(
            "unsupported_event",
            "output_audio_buffer.clear is only supported for WebRTC and SIP connections.",
            "type",
        )

    # conversation items

    async def _add_item(self, item: Json, previous: str | None) -> None:
        if previous is None:
            self.order.insert(0, item["id"])
        else:
            self.order.insert(self.order.index(previous) + 1, item["id"])
        self.items[item["id"]] = item
        await self.send({"type": "conversation.item.added", "item": item, "previous_item_id": previous})
        await self.send({"type": "conversation.item.done", "item": item, "previous_item_id": previous})

    async def on_item_create(self, event: Any, data: Json) -> None:
        item: Json = event.item.model_dump(mode="json", exclude_none=True)
        item_id = item.get("id") or _new_id("item")
        if item_id in self.items:
            raise _ClientError("invalid_value", f"Item with id '{item_id}' already exists.", "item.id")
        previous = data.get("previous_item_id")
        if previous == "root":
            previous = None
        elif previous is None:
            previous = self.order[-1] if self.order else None
        elif previous not in self.items:
            raise _ClientError("invalid_value", f"Item with id '{previous}' not found.", "previous_item_id")
        kind, role = item["type"], item.get("role")
        if (
            kind == "message"
            and role == "assistant"
            and any(c.get("type") == "output_audio" for c in item["content"])
        ):
            raise _ClientError(
                "invalid_value", "Assistant audio cannot be added to a conversation.", "item.content"
            )
        if kind == "function_call_output" and item["call_id"] not in self.call_ids:
            message = f"No function call found with call_id '{item['call_id']}'."
            raise _ClientError("invalid_value", message, "item.call_id")
        if kind == "function_call" and "call_id" in item:
            self.call_ids.add(item["call_id"])
        item.update({"id": item_id, "object": "realtime.item", "status": "completed"})
        await self._add_item(item, previous)
        if kind == "function_call_output":
            self.record.tool_outputs.append((item["call_id"], item["output"]))
            with contextlib.suppress(ValueError):
                fields = json.loads(item["output"])
                if isinstance(fields, dict):
                    self.tool_fields.update(fields)
        elif kind == "message" and role == "user":
            self.user_spoke = True
            text = " ".join(c.get("text") or c.get("transcript") or "" for c in item["content"]).strip()
            self.record.transcript.append(("user", text))

    def _find_item(self, item_id: str) -> Json:
        item = self.items.get(item_id)
        if item is None:
            raise _ClientError("invalid_value", f"Item with item_id not found: {item_id}.", "item_id")
        return item

    async def on_item_delete(self, event: Any, data: Json) -> None:
        self._find_item(event.item_id)
        del self.items[event.item_id]
        self.order.remove(event.item_id)
        await self.send({"type": "conversation.item.deleted", "item_id": event.item_id})

    async def on_item_retrieve(self, event: Any, data: Json) -> None:
        item = self._find_item(event.item_id)
        await self.send({"type": "conversation.item.retrieved", "item": item})

    async def on_truncate(self, event: Any, data: Json) -> None:
        item = self._find_item(event.item_id)
        if item.get("role") != "assistant" or event.item_id not in self.item_audio_ms:
            raise _ClientError(
                "unsupported_content_type", "Only model output audio messages can be truncated.", "item_id"
            )
        if event.content_index != 0:
            raise _ClientError(
                "invalid_value", "Invalid 'content_index': the item has one content part.", "content_index"
            )
        sent_ms = self.item_audio_ms[event.item_id]
        if event.audio_end_ms > sent_ms:
            message = f"Audio content of {sent_ms}ms is already shorter than {event.audio_end_ms}ms"
            raise _ClientError("invalid_value", message, "audio_end_ms")
        self.record.truncations.append((event.item_id, event.content_index, event.audio_end_ms))
        for part in item["content"]:
            part["transcript"] = ""
        await self.send(
            {
                "type": "conversation.item.truncated",
                "item_id": event.item_id,
                "content_index": event.content_index,
                "audio_end_ms": event.audio_end_ms,
            }
        )

    # responses

    async def on_response_create(self, event: Any, data: Json) -> None:
        if self.active is not None:
            message = (
                f"Conversation already has an active response in progress: {self.active.id}. "
                "Wait until the response is finished before creating a new one."
            )
            raise _ClientError("conversation_already_has_active_response", message)
        self._start_response(data.get("response") or {})

    async def on_response_cancel(self, event: Any, data: Json) -> None:
        active = self.active
        if active is None or (event.response_id and event.response_id != active.id):
            message = "Cancellation failed: no active response found."
            raise _ClientError("response_cancel_not_active", message)
        await self._cancel_active("client_cancelled")

    async def _cancel_active(self, reason: str) -> None:
        """Stops the active response; returns once its `response.done` has been sent."""
        active = self.active
        if active is None or active.task is None:
            return
        active.cancel_reason = reason
        active.wake.set()
        with contextlib.suppress(_SessionEnded):
            await active.task

    def _start_response(self, params: Json | None) -> None:
        response = _Response(_new_id("resp"), out_of_band=(params or {}).get("conversation") == "none")
        self.active = response
        response.task = asyncio.create_task(self._run_response(response, params or {}))
        response.task.add_done_callback(_settle_response_task)

    def _tools(self, params: Json) -> set[str]:
        tools = params["tools"] if params.get("tools") is not None else self.record.session["tools"]
        choice = params.get("tool_choice") or self.record.session["tool_choice"]
        if choice == "none":
            return set()
        return {t["name"] for t in tools if t.get("type") == "function"}

    async def _run_response(self, response: _Response, params: Json) -> None:
        session = self.record.session
        modalities = params.get("output_modalities") or session["output_modalities"]
        output = (params.get("audio") or {}).get("output") or {}
        fmt = output.get("format") or session["audio"]["output"]["format"]
        voice = output.get("voice") or session["audio"]["output"]["voice"]
        if response.out_of_band:
            plan = _Plan(_quoted_words(params.get("instructions"), self.sim.scenario.fallback_say), [], None)
        else:
            plan = self.script.plan(
                user_spoke=self.user_spoke, fields=self.tool_fields, tools=self._tools(params)
            )
            self.user_spoke = False
        if plan.tool_calls:
            fields = self.tool_fields
            calls = plan.tool_calls
            plan.tool_calls = [ToolCall(c.name, _fill_arguments(c.arguments, fields)) for c in calls]
            self.tool_fields = {}
        shell: Json = {
            "id": response.id,
            "object": "realtime.response",
            "status": "in_progress",
            "status_details": None,
            "output": [],
            "conversation_id": None
            if response.out_of_band
            else "conv_" + self.record.session["id"].removeprefix("sess_"),
            "output_modalities": modalities,
            "max_output_tokens": params.get("max_output_tokens", session["max_output_tokens"]),
            "audio": {"output": {"format": fmt, "voice": voice}},
            "usage": None,
            "metadata": params.get("metadata"),
        }
        try:
            await self.send({"type": "response.created", "response": shell})
            await self.send({"type": "rate_limits.updated", "rate_limits": _rate_limits()})
            for call in plan.tool_calls:
                if response.cancel_reason:
                    break
                await self._emit_function_call(response, call)
            if plan.say and not response.cancel_reason:
                await self._emit_message(response, plan, modalities, fmt)
            await self._finish(response, shell)
        finally:
            if self.active is response:
                self.active = None

    async def _emit_function_call(self, response: _Response, call: ToolCall) -> None:
        index = len(response.output)
        call_id = _new_id("call")
        self.call_ids.add(call_id)
        arguments = json.dumps(call.arguments, separators=(",", ":"))
        item: Json = {
            "id": _new_id("item"),
            "object": "realtime.item",
            "type": "function_call",
            "status": "in_progress",
            "name": call.name,
            "call_id": call_id,
            "arguments": "",
        }
        ids = {"response_id": response.id, "item_id": item["id"], "output_index": index, "call_id": call_id}
        previous = await self._add_output_item(response, index, item)
        half = len(arguments) // 2
        for piece in (arguments[:half], arguments[half:]):
            await self.send({"type": "response.function_call_arguments.delta", **ids, "delta": piece})
        await self.send(
            {
                "type": "response.function_call_arguments.done",
                **ids,
                "name": call.name,
                "arguments": arguments,
            }
        )
        item.update({"status": "completed", "arguments": arguments})
        await self._finish_output_item(response, index, item, previous)

    async def _finish_output_item(
        self, response: _Response, index: int, item: Json, previous: str | None
    ) -> None:
        response.output.append(item)
        await self.send(
            {
                "type": "response.output_item.done",
                "response_id": response.id,
                "output_index": index,
                "item": item,
            }
        )
        if not response.out_of_band:
            await self.send({"type": "conversation.item.done", "item": item, "previous_item_id": previous})

    async def _add_output_item(self, response: _Response, index: int, item: Json) -> str | None:
        """Announces a new output item to the response and the conversation (unless the response is
        out of band); returns the item before it."""
        previous = self.order[-1] if self.order else None
        await self.send(
            {
                "type": "response.output_item.added",
                "response_id": response.id,
                "output_index": index,
                "item": dict(item),
            }
        )
        if response.out_of_band:
            return None
        self.order.append(item["id"])
        self.items[item["id"]] = item
        await self.send({"type": "conversation.item.added", "item": dict(item), "previous_item_id": previous})
        return previous

    async def _emit_message(self, response: _Response, plan: _Plan, modalities: list[str], fmt: Json) -> None:
        """Streams one assistant message; stops early (item `incomplete`) when cancelled."""
        audio = "audio" in modalities
        index = len(response.output)
        item: Json = {
            "id": _new_id("item"),
            "object": "realtime.item",
            "type": "message",
            "role": "assistant",
            "status": "in_progress",
            "content": [],
        }
        ids = {"response_id": response.id, "item_id": item["id"], "output_index": index, "content_index": 0}
        previous = await self._add_output_item(response, index, item)
        part_type = "audio" if audio else "text"
        empty_part = {"type": part_type, "transcript": ""} if audio else {"type": "text", "text": ""}
        await self.send({"type": "response.content_part.added", **ids, "part": empty_part})
        duration_ms = (
            plan.audio_ms if plan.audio_ms is not None else min(len(plan.say) * MS_PER_CHAR, MAX_REPLY_MS)
        )
        pcm = self.sim.speech_for(fmt, duration_ms) if audio else b""
        chunk_bytes = AUDIO_CHUNK_MS * _bytes_per_ms(fmt)
        chunks = max(1, math.ceil(duration_ms / AUDIO_CHUNK_MS))
        words = re.findall(r"\S+\s*", plan.say)
        spoken = ""
        if audio:
            self.item_audio_ms[item["id"]] = 0
        for n in range(chunks):
            if response.cancel_reason:
                break
            piece = "".join(words[len(words) * n // chunks : len(words) * (n + 1) // chunks])
            text_type = "response.output_audio_transcript.delta" if audio else "response.output_text.delta"
            if piece and await self.send(
                {"type": text_type, **ids, "delta": piece}, unless_cancelled=response
            ):
                spoken += piece
            if audio:
                delta = pcm[n * chunk_bytes : (n + 1) * chunk_bytes]
                encoded = base64.b64encode(delta).decode()
                event = {"type": "response.output_audio.delta", **ids, "delta": encoded}
                if not await self.send(event, unless_cancelled=response):
                    break
                self.audio_out = True
                self.item_audio_ms[item["id"]] += len(delta) // _bytes_per_ms(fmt)
            await self._pace(response, AUDIO_CHUNK_MS)
        complete = response.cancel_reason is None
        text = plan.say if complete else spoken
        if audio:
            await self.send({"type": "response.output_audio.done", **ids})
            await self.send({"type": "response.output_audio_transcript.done", **ids, "transcript": text})
            part = {"type": "audio", "transcript": text}
            content = {"type": "output_audio", "transcript": text}
        else:
            await self.send({"type": "response.output_text.done", **ids, "text": text})
            part = {"type": "text", "text": text}
            content = {"type": "output_text", "text": text}
        await self.send({"type": "response.content_part.done", **ids, "part": part})
        item.update({"status": "completed" if complete else "incomplete", "content": [content]})
        await self._finish_output_item(response, index, item, previous)
        self.record.transcript.append(("assistant", text))

    async def _pace(self, response: _Response, chunk_ms: int) -> None:
        """Waits out one chunk at `audio_speed` times real time; a cancel cuts the wait short."""
        speed = self.sim.audio_speed
        if speed == math.inf or speed <= 0:
            await asyncio.sleep(0)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(response.wake.wait(), chunk_ms / 1000 / speed)

    async def _finish(self, response: _Response, shell: Json) -> None:
        cancelled = response.cancel_reason is not None
        shell.update(
            {
                "status": "cancelled" if cancelled else "completed",
                "status_details": {"type": "cancelled", "reason": response.cancel_reason}
                if cancelled
                else None,
                "output": response.output,
                "usage": self._usage(response),
            }
        )
        await self.send({"type": "response.done", "response": shell})

    def _usage(self, response: _Response) -> Json:
        audio_ms = sum(self.item_audio_ms.get(item["id"], 0) for item in response.output)
        out_audio = audio_ms * OUTPUT_AUDIO_TOKENS_PER_S // 1000
        out_text = sum(
            len(json.dumps(item.get("content") or item.get("arguments"))) for item in response.output
        )
        out_text //= CHARS_PER_TEXT_TOKEN
        in_text = len(self.record.session.get("instructions") or "") // CHARS_PER_TEXT_TOKEN + 20 * len(
            self.order
        )
        in_audio = self.vad.audio_ms * INPUT_AUDIO_TOKENS_PER_S // 1000
        cached = (in_text // 64) * 64
        return {
            "total_tokens": in_text + in_audio + out_text + out_audio,
            "input_tokens": in_text + in_audio,
            "output_tokens": out_text + out_audio,
            "input_token_details": {
                "text_tokens": in_text,
                "audio_tokens": in_audio,
                "image_tokens": 0,
                "cached_tokens": cached,
                "cached_tokens_details": {"text_tokens": cached, "audio_tokens": 0, "image_tokens": 0},
            },
            "output_token_details": {"text_tokens": out_text, "audio_tokens": out_audio},
        }


def _rate_limits() -> list[Json]:
    return [
        {"name": "requests", "limit": 5000, "remaining": 4999, "reset_seconds": 0.012},
        {"name": "tokens", "limit": 800_000, "remaining": 795_000, "reset_seconds": 0.375},
    ]


Handler = Callable[[_Connection, Any, Json], Awaitable[None]]
HANDLERS: dict[str, Handler] = {
    "session.update": _Connection.on_session_update,
    "input_audio_buffer.append": _Connection.on_append,
    "input_audio_buffer.commit": _Connection.on_commit,
    "input_audio_buffer.clear": _Connection.on_clear,
    "output_audio_buffer.clear": _Connection.on_output_clear,
    "conversation.item.create": _Connection.on_item_create,
    "conversation.item.delete": _Connection.on_item_delete,
    "conversation.item.retrieve": _Connection.on_item_retrieve,
    "conversation.item.truncate": _Connection.on_truncate,
    "response.create": _Connection.on_response_create,
    "response.cancel": _Connection.on_response_cancel,
}


# --- HTTP: handshake refusals and POST /v1/realtime/client_secrets ---------------------------


def _api_error(
    message: str, code: str | None, error_type: str = "invalid_request_error", param: str | None = None
) -> Json:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


HANDSHAKE_ERRORS: dict[int, Json] = {
    401: _api_error("Incorrect API key provided.", "invalid_api_key"),
    403: _api_error("Country, region, or territory not supported.", "unsupported_country_region_territory"),
    429: _api_error(
        "You exceeded your current quota, please check your plan and billing details.",
        "insufficient_quota",
        "insufficient_quota",
    ),
    500: _api_error(
        "The server had an error while processing your request. Sorry about that!", None, "server_error"
    ),
    503: _api_error("The engine is currently overloaded, please try again later.", None, "server_error"),
}


def _bearer(value: str | None) -> str | None:
    if value is None or not value.startswith("Bearer "):
        return None
    return value.removeprefix("Bearer ").strip() or None


def _subprotocols(request: Request) -> list[str]:
    offered = request.headers.get_all("Sec-WebSocket-Protocol")
    return [name.strip() for value in offered for name in value.split(",") if name.strip()]


def _credential(request: Request) -> str | None:
    """The key a client connects with: a bearer header (servers) or the subprotocol (browsers)."""
    bearer = _bearer(request.headers.get("Authorization"))
    if bearer is not None:
        return bearer
    for name in _subprotocols(request):
        if name.startswith(KEY_SUBPROTOCOL_PREFIX):
            return name.removeprefix(KEY_SUBPROTOCOL_PREFIX) or None
    return None


def _select_subprotocol(
    connection: ServerConnection, offered: typing.Sequence[Subprotocol]
) -> Subprotocol | None:
    """OpenAI answers `realtime`; the key subprotocol is never echoed back."""
    return Subprotocol(REALTIME_SUBPROTOCOL) if REALTIME_SUBPROTOCOL in offered else None


def _asks_for_websocket(head: bytes) -> bool:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"upgrade" and b"websocket" in value.lower():
            return True
    return False


class _SharedPortConnection(ServerConnection):
    """One port for REST and WebSocket, as api.openai.com serves both.

    A request asking to upgrade goes on to websockets; any other HTTP request is answered by
    `answer_rest` (one request per connection, then the connection closes).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head: bytearray | None = bytearray()
        self._rest: h11.Connection | None = None
        self._rest_request: h11.Request | None = None
        self._rest_body = bytearray()

    def answer_rest(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, Json]:
        raise NotImplementedError("RealtimeSimulator.start binds this to RealtimeSimulator.rest")

    def data_received(self, data: bytes) -> None:
        if self._rest is not None:
            self._receive_rest(data)
            return
        if self._head is None:
            super().data_received(data)
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_REST_HEAD_BYTES:
                self.transport.close()
            return
        received, self._head = bytes(self._head), None
        if _asks_for_websocket(received[:end]):
            super().data_received(received)
        else:
            self._rest = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REST_HEAD_BYTES)
            self._receive_rest(received)

    def eof_received(self) -> None:
        if self._head is not None or self._rest is not None:
            self.transport.close()
            return
        super().eof_received()

    def _receive_rest(self, data: bytes) -> None:
        assert self._rest is not None
        self._rest.receive_data(data)
        while True:
            try:
                event = self._rest.next_event()
            except h11.RemoteProtocolError:
                self.transport.close()
                return
            if event is h11.NEED_DATA:
                return
            if isinstance(event, h11.Request):
                self._rest_request = event
            elif isinstance(event, h11.Data):
                self._rest_body += event.data
                if len(self._rest_body) > MAX_REST_BODY_BYTES:
                    self.transport.close()
                    return
            elif isinstance(event, h11.EndOfMessage) and self._rest_request is not None:
                self._respond(self._rest_request, bytes(self._rest_body))
                return
            else:
                self.transport.close()
                return

    def _respond(self, request: h11.Request, body: bytes) -> None:
        assert self._rest is not None
        status, payload = self.answer_rest(
            request.method.decode(),
            request.target.decode(),
            {k.decode().lower(): v.decode() for k, v in request.headers},
            body,
        )
        data = json.dumps(payload).encode()
        headers = [
            ("content-type", "application/json"),
            ("content-length", str(len(data))),
            ("connection", "close"),
        ]
        reason = http.HTTPStatus(status).phrase.encode()
        response = h11.Response(status_code=status, headers=headers, reason=reason)
        for event in (response, h11.Data(data=data), h11.EndOfMessage()):
            self.transport.write(self._rest.send(event) or b"")
        self.transport.close()


def _auth_failure(token: str | None) -> Json:
    if token is None:
        message = (
            "You didn't provide an API key. You need to provide your API key in an Authorization "
            "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
        )
        return _api_error(message, None)
    return _api_error(f"Incorrect API key provided: {token[:3]}***{token[-4:]}.", "invalid_api_key")


class _ExpiresAfter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    anchor: Literal["created_at"] = "created_at"
    seconds: int = Field(SECRET_DEFAULT_TTL_S, ge=10, le=7200)


class _ClientSecretRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    expires_after: _ExpiresAfter = _ExpiresAfter(anchor="created_at", seconds=SECRET_DEFAULT_TTL_S)
    session: dict[str, Any] | None = None


# --- the simulator --------------------------------------------------------------------------


class RealtimeSimulator:
    """A Realtime API on 127.0.0.1, one port: WebSocket at `url`, REST at `base_url`.

    Fault switches (settable any time): `drop_after_events` resets the TCP connection after that
    many more server events; `event_delay_s` delays every server event; `read_delay_s` slows the
    reading of client events; `reject_handshake_status` refuses new connections with that HTTP
    status (counted in `handshakes_refused`), and `reject_client_secrets_status` new client
    secrets; `malformed_event_rate` follows that share of server events with a `malformed_copy`
    (drawn from the seeded `fuzz`, counted in `malformed_events_sent`); `inject_error()` and
    `close_with()` act on open sessions.
    """

    def __init__(
        self,
        scenario: Scenario,
        *,
        api_key: str = "sk-sim-test",
        speech: bytes | None = None,
        audio_speed: float = DEFAULT_AUDIO_SPEED,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.scenario = scenario
        self.api_key = api_key
        self.audio_speed = audio_speed
        self.record_input_audio = False
        self.drop_after_events: int | None = None
        self.event_delay_s = 0.0
        self.read_delay_s = 0.0
        self.reject_handshake_status: int | None = None
        self.reject_client_secrets_status: int | None = None
        self.handshakes_refused = 0
        self.malformed_event_rate = 0.0
        self.malformed_events_sent = 0
        self.fuzz = random.Random(0)
        self.sessions: list[SimSession] = []
        self.client_secret_requests: list[Json] = []
        self._clock = clock
        self._speech = speech if speech is not None else read_wav(DEFAULT_SPEECH_WAV).data
        self._encoded: dict[str, bytes] = {}
        self._secrets: dict[str, tuple[float, Json]] = {}
        self._connections: dict[int, _Connection] = {}
        self._pending_errors: list[Json] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._ws_server: Server | None = None
        self.url = ""
        self.base_url = ""

    @property
    def open_connections(self) -> int:
        return sum(not s.closed for s in self.sessions)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        sim = self

        class Connection(_SharedPortConnection):
            def answer_rest(
                self, method: str, target: str, headers: Mapping[str, str], body: bytes
            ) -> tuple[int, Json]:
                return sim.rest(method, target, headers, body)

        self._ws_server = await serve(
            self._handle,
            host,
            port,
            process_request=self._check_handshake,
            select_subprotocol=_select_subprotocol,
            max_size=MAX_APPEND_BYTES * 2,
            compression=None,
            create_connection=Connection,
        )
        bound = self._ws_server.sockets[0].getsockname()[1]
        self.url = f"ws://{host}:{bound}{REALTIME_PATH}"
        self.base_url = f"http://{host}:{bound}"

    async def stop(self) -> None:
        if self._ws_server is not None:
            self._ws_server.close()
            await self._ws_server.wait_closed()
        for task in list(self._tasks):
            task.cancel()

    async def __aenter__(self) -> RealtimeSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # fault switches acting on sessions

    def inject_error(self, code: str, message: str, *, error_type: str = "invalid_request_error") -> None:
        """Sends an `error` event on every open session (or on the next one if none is open)."""
        event = error_event(code, message, error_type=error_type)
        if not self._connections:
            self._pending_errors.append(event)
        for connection in self._connections.values():
            self._spawn(self._send_quietly(connection, dict(event)))

    def close_with(self, code: int, reason: str) -> None:
        """Closes every open session with this close code, e.g. 1001 at the 60-minute limit."""
        for connection in self._connections.values():
            self._spawn(self._close_quietly(connection, code, reason))

    def take_pending_errors(self) -> list[Json]:
        events, self._pending_errors = self._pending_errors, []
        return events

    def speech_for(self, fmt: Mapping[str, Any], duration_ms: int) -> bytes:
        """`duration_ms` of speech in the output format (the bundled recording, looped)."""
        key = fmt.get("type", "audio/pcm")
        if key not in self._encoded:
            self._encoded[key] = _encode_speech(self._speech, fmt) or b"\x00" * _bytes_per_ms(fmt)
        source = self._encoded[key]
        size = duration_ms * _bytes_per_ms(fmt)
        return (source * (size // len(source) + 1))[:size]

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _send_quietly(connection: _Connection, event: Json) -> None:
        with contextlib.suppress(_SessionEnded):
            await connection.send(event)

    @staticmethod
    async def _close_quietly(connection: _Connection, code: int, reason: str) -> None:
        async with connection.send_lock:
            await connection.ws.close(code, reason)

    # WebSocket

    def _authorised(self, token: str | None) -> Json | None:
        """The session config the key grants (`{}` for the API key), or None if refused."""
        if token is None:
            return None
        if secrets.compare_digest(token, self.api_key):
            return {}
        expires_at, session = self._secrets.get(token, (0.0, {}))
        return session if self._clock() < expires_at else None

    def _check_handshake(self, connection: ServerConnection, request: Request) -> Response | None:
        if self.reject_handshake_status is not None:
            self.handshakes_refused += 1
            status = self.reject_handshake_status
            body = HANDSHAKE_ERRORS.get(status, _api_error(http.HTTPStatus(status).phrase, None))
            return _json_response(connection, status, body)
        target = urlsplit(request.path)
        if target.path != REALTIME_PATH:
            return _json_response(connection, 404, _api_error(f"Invalid URL (GET {target.path})", None))
        token = _credential(request)
        if self._authorised(token) is None:
            return _json_response(connection, 401, _auth_failure(token))
        offered = _subprotocols(request)
        if any(p.startswith(KEY_SUBPROTOCOL_PREFIX) for p in offered) and REALTIME_SUBPROTOCOL not in offered:
            body = _api_error(
                "Offer the 'realtime' subprotocol with the key subprotocol.", "invalid_subprotocol"
            )
            return _json_response(connection, 400, body)
        if not parse_qs(target.query).get("model"):
            body = _api_error(
                "Missing required parameter: 'model'.", "missing_required_parameter", param="model"
            )
            return _json_response(connection, 400, body)
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        request = ws.request
        assert request is not None
        model = parse_qs(urlsplit(request.path).query)["model"][0]
        token = _credential(request)
        granted = self._authorised(token) or {}
        beta = request.headers.get("OpenAI-Beta", "").startswith("realtime") or (
            BETA_SUBPROTOCOL in _subprotocols(request)
        )
        record = SimSession(beta_header=beta, client_secret=token if token in self._secrets else None)
        self.sessions.append(record)
        granted = {k: v for k, v in granted.items() if k not in ("id", "object")}
        config = {**_merge(default_session(model), granted), "model": model}
        connection = _Connection(self, ws, record, config)
        self._connections[id(connection)] = connection
        logger.info("realtime sim: session %d opened (model %s)", len(self.sessions), model)
        try:
            await connection.run()
        finally:
            del self._connections[id(connection)]
            logger.info("realtime sim: session closed")

    # REST

    def rest(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> tuple[int, Json]:
        """Answers one REST request: (status, JSON body). Only client secrets are served."""
        path = urlsplit(target).path
        if path != CLIENT_SECRETS_PATH:
            return 404, _api_error(f"Invalid URL ({method} {path})", None)
        if method != "POST":
            return 405, _api_error(f"Method {method} not allowed.", None)
        if self.reject_client_secrets_status is not None:
            status = self.reject_client_secrets_status
            return status, HANDSHAKE_ERRORS.get(status, _api_error(http.HTTPStatus(status).phrase, None))
        token = _bearer(headers.get("authorization"))
        if token is None or not secrets.compare_digest(token, self.api_key):
            return 401, _auth_failure(token)
        try:
            data = json.loads(body or b"{}")
            self.client_secret_requests.append(data)
            parsed = _ClientSecretRequest.model_validate(data)
            model = default_session("gpt-realtime")
            update = parse_session(parsed.session) if parsed.session is not None else {}
            _check_values(update)
        except json.JSONDecodeError:
            return 400, _api_error("We could not parse the JSON body of your request.", "invalid_json")
        except ValidationError as exc:
            err = _from_validation_error(exc, data)
            return 400, _api_error(err.message, err.code, param=err.param)
        except _ClientError as err:
            return 400, _api_error(err.message, err.code, param=err.param)
        session = _normalise(_merge(model, update))
        value = "ek_" + secrets.token_hex(16)
        expires_at = int(self._clock()) + parsed.expires_after.seconds
        self._secrets[value] = (float(expires_at), session)
        return 200, {"value": value, "expires_at": expires_at, "session": session}


def _json_response(connection: ServerConnection, status: int, body: Json) -> Response:
    response = connection.respond(status, json.dumps(body))
    headers = Headers((k, v) for k, v in response.headers.raw_items() if k.lower() != "content-type")
    headers["Content-Type"] = "application/json"
    response.headers = headers
    return response


# --- command line ---------------------------------------------------------------------------

CLI_PROG = "python -m bot sim realtime"
CLI_DEFAULT_API_KEY = "sk-sim-test"


def bundled_scenarios() -> list[str]:
    """The scenario names `--scenario` takes without a path."""
    return sorted(path.stem for path in SCENARIO_DIR.glob("*.json"))


def _cli_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog=CLI_PROG,
        description=(
            "A local OpenAI Realtime API on 127.0.0.1: the GA WebSocket and POST "
            "/v1/realtime/client_secrets on one port. It speaks the turns of a scripted scenario (what the "
            "model says and which tools it calls) and accepts one API key: OPENAI_API_KEY from "
            "the environment or .env (the same setting the bot reads), else "
            f"{CLI_DEFAULT_API_KEY}. It prints the settings to give the bot, then runs until Ctrl-C."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=port_number, default=0,
        help="port for the WebSocket and REST (default 0: any free port)",
    )
    parser.add_argument(
        "--scenario", default="washers",
        help=f"a scenario JSON file, or a bundled one: {', '.join(bundled_scenarios())} (default washers)",
    )
    parser.add_argument("--api-key", help="the key callers must present (default: as described above)")
    parser.add_argument(
        "--audio-speed", type=float, default=DEFAULT_AUDIO_SPEED,
        help=f"how much faster than real time replies are sent (default {DEFAULT_AUDIO_SPEED:g})",
    )
    return parser


def _load_cli_scenario(name: str) -> Scenario:
    """The scenario, or ValueError with one line saying what is wrong with it."""
    try:
        return Scenario.from_json(name)
    except FileNotFoundError:
        bundled = ", ".join(bundled_scenarios())
        raise ValueError(
            f"no scenario {name!r}: give a scenario JSON file or a bundled name ({bundled})"
        ) from None
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        raise ValueError(f"scenario {name}: {where}: {error['msg']}") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"scenario {name}: {exc}") from None


def main(argv: list[str]) -> int:
    """`python -m bot sim realtime [--port N] [--scenario NAME]`: serve until Ctrl-C."""
    parser = _cli_parser()
    args = parser.parse_args(argv)
    try:
        scenario = _load_cli_scenario(args.scenario)
        settings = load_settings()
    except (ValueError, SettingsError) as exc:
        parser.error(str(exc))
    key_from_settings = args.api_key is None and settings.openai_api_key is not None
    api_key = args.api_key or settings.openai_api_key or CLI_DEFAULT_API_KEY
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    sim = RealtimeSimulator(scenario, api_key=api_key, audio_speed=args.audio_speed)

    async def run() -> None:
        stopping = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
        await sim.start(args.host, args.port)
        key_line = (
            "OPENAI_API_KEY: the one already set (environment or .env) is the key accepted"
            if key_from_settings
            else f"OPENAI_API_KEY={api_key}"
        )
        lines = [
            f"Realtime simulator up, scenario {args.scenario}. Give the bot these settings:",
            f"  OPENAI_REALTIME_URL={sim.url}",
            f"  OPENAI_BASE_URL={sim.base_url}",
            f"  {key_line}",
        ]
        if "OPENAI_REALTIME_URL" in settings.model_fields_set and settings.openai_realtime_url != sim.url:
            lines.append(
                f"  note: OPENAI_REALTIME_URL is {settings.openai_realtime_url} here, not this simulator"
            )
        print("\n".join(lines), flush=True)
        try:
            await stopping.wait()
        finally:
            await sim.stop()

    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run())
    except OSError as exc:
        print(f"{CLI_PROG}: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
