"""A simulated caller that dials the bot exactly as Twilio does, so every test hears a real call.

It signs and POSTs the voice webhook, reads the TwiML, opens the `<Connect><Stream>` WebSocket
and speaks Media Streams: `connected`, `start`, a `media` frame of 160 mu-law bytes every 20 ms
(silence between utterances, as a real line never goes quiet), `dtmf`, `stop`. The bot's audio
goes into a playback buffer drained at 8000 samples/s on the phone's clock; each `mark` is echoed
when the audio queued before it has played and `clear` flushes the buffer and echoes pending marks
at once. Every event is timestamped (seconds since dial) for latency measurements, and what the
caller heard can be written as a WAV.

Time on the phone is the time bytes cross the wire, not the time this process gets round to
them: a message is stamped when its frame is read off the socket (before any task handles it),
audio starts playing and a `clear` takes effect at that instant, and each mark is echoed when
playback reaches it, by its own timer. So what the phone reports having played stays true on a
loaded machine, where handling a message can lag its arrival by tens of milliseconds.

One task reads, one task sends paced frames; per-frame work is a string format and a base64 call,
so one process can hold hundreds of calls (the load benchmark).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import json
import secrets
import statistics
import time
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx
import numpy as np
from twilio.request_validator import RequestValidator
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.frames import DATA_OPCODES, Frame
from websockets.protocol import Event

from bot.cli import CommandParser, positive_int
from bot.settings import SettingsError, load_settings
from bot.wav import Wav, WavError, read_wav, write_wav

TWILIO_RATE_HZ = 8000
FRAME_MS = 20
FRAME_S = FRAME_MS / 1000
FRAME_BYTES = TWILIO_RATE_HZ * FRAME_MS // 1000
BYTES_PER_MS = TWILIO_RATE_HZ // 1000
ULAW_SILENCE = b"\xff"
SILENCE_FRAME = ULAW_SILENCE * FRAME_BYTES
VOICE_WEBHOOK_PATH = "/twiml/voice"
SIGNATURE_HEADER = "X-Twilio-Signature"
WEBHOOK_USER_AGENT = "TwilioProxy/1.1"
STREAM_USER_AGENT = "Twilio.TmeWs/1.0"
WEBHOOK_TIMEOUT_S = 15.0
STREAM_OPEN_TIMEOUT_S = 10.0
STREAM_CLOSE_TIMEOUT_S = 2.0
STREAM_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# A 20 ms frame louder than this (PCM16 RMS, about -40 dBFS) is speech when finding where an
# utterance's speech ends: recordings carry trailing silence, and turn latency starts at speech end.
SPEECH_RMS_THRESHOLD = 300.0

_SILENCE_FRAME_B64 = base64.b64encode(SILENCE_FRAME).decode("ascii")
# Preformatted JSON: the hot path fills in numbers and base64 (JSON-safe) without json.dumps.
_MEDIA_TEMPLATE = (
    '{"event":"media","sequenceNumber":"%d","streamSid":"%s","media":'
    '{"track":"inbound","chunk":"%d","timestamp":"%d","payload":"%s"}}'
)

Direction = Literal["in", "out"]


def _ulaw_magnitudes() -> np.ndarray[Any, np.dtype[np.float64]]:
    """|PCM16| for each G.711 mu-law byte."""
    inverted = np.bitwise_not(np.arange(256, dtype=np.uint8)).astype(np.int64)
    exponent, mantissa = (inverted >> 4) & 7, inverted & 0x0F
    return ((((mantissa << 3) + 0x84) << exponent) - 0x84).astype(np.float64)


_ULAW_MAGNITUDE = _ulaw_magnitudes()


class PhoneError(RuntimeError):
    """Base class for what can go wrong on the simulated phone."""


class CallNotConnected(PhoneError):
    """The call has no media stream (rejected webhook, fallback TwiML, refused upgrade)."""


class CallEnded(PhoneError):
    """The media stream closed while the caller still had something to do."""


@dataclass(frozen=True, slots=True)
class PhoneEvent:
    """One thing that crossed the wire; `t` is seconds since dial on the monotonic clock."""

    t: float
    direction: Direction
    kind: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class TwimlVerb:
    """A top-level TwiML verb, e.g. Say('Goodbye.') or Dial('+1555…', {'callerId': …})."""

    name: str
    text: str
    attributes: dict[str, str]


@dataclass(frozen=True, slots=True)
class DialResult:
    """What the voice webhook answered and what the phone made of it."""

    twiml: str
    stream_url: str | None
    parameters: dict[str, str]
    status_code: int
    verbs: tuple[TwimlVerb, ...] = ()
    error: str = ""  # the webhook could not be fetched (status_code 0; Twilio's error 11200)

    def describe(self) -> str:
        """'stream ws://…', 'HTTP 403', 'invalid TwiML' or the verbs, e.g. "Say 'Sorry', Hangup"."""
        if self.error:
            return f"webhook failed ({self.error})"
        if self.status_code != 200:
            return f"HTTP {self.status_code}"
        if self.stream_url is not None:
            return f"stream {self.stream_url}"
        if not self.verbs:
            return "invalid TwiML"
        return describe_verbs(self.verbs)


@dataclass(slots=True)
class Turn:
    """One caller utterance and when the bot's first audio after it arrived."""

    started_t: float
    ended_t: float
    first_audio_t: float | None = None

    @property
    def latency_s(self) -> float | None:
        return None if self.first_audio_t is None else self.first_audio_t - self.ended_t


@dataclass(frozen=True, slots=True)
class MarkEcho:
    """A mark the phone echoed: when it came, when it went back, how much bot audio had played."""

    name: str
    received_t: float
    echoed_t: float
    played_ms: float
    cleared: bool


@dataclass(slots=True)
class _Outgoing:
    """Caller audio waiting to be framed; `done` resolves when its last frame is on the wire.

    A spoken utterance ends its turn at `speech_end` (a byte offset); plain silence has no turn.
    """

    data: bytes
    speech_end: int | None
    done: asyncio.Future[None]
    offset: int = 0
    started_t: float = 0.0


@dataclass(slots=True)
class _PendingMark:
    due_sample: int
    name: str
    received_t: float


class _StampedConnection(ClientConnection):
    """A client connection that notes when each message's last frame came off the socket.

    `process_event` runs in the protocol callback, as the bytes are parsed, before any task
    reads the message; `arrivals` holds one monotonic time per message, in order."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.arrivals: deque[float] = deque()

    def process_event(self, event: Event) -> None:
        if isinstance(event, Frame) and event.fin and event.opcode in DATA_OPCODES:
            self.arrivals.append(time.monotonic())
        super().process_event(event)


def speech_end_offset(ulaw: bytes) -> int:
    """Byte offset just after the last 20 ms frame louder than SPEECH_RMS_THRESHOLD.

    Audio with no loud frame counts as speech to its end.
    """
    frames = len(ulaw) // FRAME_BYTES
    if frames == 0:
        return len(ulaw)
    levels = _ULAW_MAGNITUDE[np.frombuffer(ulaw, dtype=np.uint8, count=frames * FRAME_BYTES)]
    rms = np.sqrt(np.mean(np.square(levels.reshape(frames, FRAME_BYTES)), axis=1))
    loud = np.flatnonzero(rms > SPEECH_RMS_THRESHOLD)
    if len(loud) == 0:
        return len(ulaw)
    end = (int(loud[-1]) + 1) * FRAME_BYTES
    return len(ulaw) if end == frames * FRAME_BYTES else end


def describe_verbs(verbs: tuple[TwimlVerb, ...]) -> str:
    return ", ".join(f"{v.name} {v.text!r}" if v.text else v.name for v in verbs)


def inbound_call_params(
    *, call_sid: str, account_sid: str, caller: str, called: str
) -> dict[str, str]:
    """The form fields Twilio POSTs to the voice URL when a call comes in."""
    geo = {"City": "", "State": "", "Zip": "", "Country": "US"}
    params = {
        "AccountSid": account_sid,
        "ApiVersion": "2010-04-01",
        "CallSid": call_sid,
        "CallStatus": "ringing",
        "Called": called,
        "Caller": caller,
        "Direction": "inbound",
        "From": caller,
        "To": called,
    }
    for prefix in ("From", "To", "Caller", "Called"):
        params.update({prefix + key: value for key, value in geo.items()})
    return params


def compute_signature(auth_token: str, url: str, params: Mapping[str, str]) -> str:
    """X-Twilio-Signature for `url` and form `params`, with the twilio package's own validator."""
    return str(RequestValidator(auth_token).compute_signature(url, dict(params)))


def parse_twiml(text: str, status_code: int, webhook_url: str) -> DialResult:
    """Find `<Connect><Stream url>` and its `<Parameter>`s; otherwise keep the verbs as outcome."""
    if status_code != 200:
        return DialResult(text, None, {}, status_code)
    try:
        root = ET.fromstring(text)
    except ET.ParseError:
        return DialResult(text, None, {}, status_code)
    if root.tag != "Response":
        return DialResult(text, None, {}, status_code)
    verbs = tuple(
        TwimlVerb(el.tag, " ".join((el.text or "").split()), dict(el.attrib)) for el in root
    )
    stream = root.find("./Connect/Stream")
    if stream is None or not stream.get("url"):
        return DialResult(text, None, {}, status_code, verbs)
    parameters = {
        p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter") if p.get("name")
    }
    return DialResult(
        text, _websocket_url(webhook_url, stream.get("url", "")), parameters, status_code, verbs
    )


def _websocket_url(webhook_url: str, stream_url: str) -> str:
    """Resolves a relative Stream url against the webhook URL, with a ws/wss scheme."""
    parts = urlsplit(urljoin(webhook_url, stream_url))
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, parts.path, parts.query, ""))


class PhoneCall:
    """One simulated call. Create it with `await dial(...)` (or `async with dial(...) as call`)."""

    def __init__(
        self,
        dial: DialResult,
        *,
        account_sid: str,
        call_sid: str,
        t0: float,
        pace: bool,
        record_frames: bool,
        events: list[PhoneEvent],
    ) -> None:
        self.dial = dial
        self.account_sid = account_sid
        self.call_sid = call_sid
        self.stream_sid = "MZ" + secrets.token_hex(16)
        self.events = events
        self.turns: list[Turn] = []
        self.marks: list[MarkEcho] = []
        self.protocol_errors: list[str] = []
        self.first_audio_t: float | None = None
        self.closed_by_app = False
        self.close_code: int | None = None
        self.close_reason = ""
        self.stream_error: str | None = None
        self._t0 = t0
        self.pace = pace
        self._record_frames = record_frames
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._mark_echoer: asyncio.Task[None] | None = None
        self._marks_changed = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._closed = asyncio.Event()
        self._reading = asyncio.Event()
        self._reading.set()
        self._hung_up = False
        self._seq = 0
        self._chunk = 0
        self._stream_start = t0
        self._outbox: deque[_Outgoing] = deque()
        self._pending_marks: deque[_PendingMark] = deque()
        self._played: list[tuple[int, bytes]] = []
        self._play_end_sample = 0
        self._end_sample: int | None = None
        self._received_bytes = 0
        self._cleared_bytes = 0
        self._reply_base_bytes = 0
        self._last_audio_mono = t0
        self._last_utterance_end_mono = t0
        self._awaiting_reply: Turn | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._parameters: dict[str, str] = dict(dial.parameters)

    # ----------------------------------------------------------------- what the caller does

    @property
    def connected(self) -> bool:
        """True while the media stream is open."""
        return self._ws is not None and not self._closed.is_set()

    async def say(self, ulaw: bytes) -> None:
        """Streams mu-law 8 kHz speech; returns once its last frame is sent (silence follows).

        The turn (for reply latency) ends at the last loud frame, not at trailing silence.
        Raises CallEnded if the stream closes first.
        """
        await self._queue(ulaw, speech_end=speech_end_offset(ulaw))

    async def silence(self, ms: int) -> None:
        """Sends `ms` of silence frames (real time when paced, a burst with `pace=False`)."""
        await self._queue(ULAW_SILENCE * (ms * BYTES_PER_MS), speech_end=None)

    async def press(self, digit: str) -> None:
        """Sends a `dtmf` event (Twilio sends 0-9, * and #; anything else is a fault test)."""
        self._require_stream()
        async with self._send_lock:
            self._seq += 1
            message = {
                "event": "dtmf",
                "streamSid": self.stream_sid,
                "sequenceNumber": str(self._seq),
                "dtmf": {"track": "inbound_track", "digit": digit},
            }
            await self._send(json.dumps(message), "dtmf", digit)

    async def send_raw(self, frame: str | bytes) -> None:
        """Sends one frame verbatim (text or binary), for garbage and oversize fault tests."""
        self._require_stream()
        detail = f"{len(frame)} {'bytes' if isinstance(frame, bytes) else 'chars'}"
        async with self._send_lock:
            await self._send(frame, "raw", detail)

    async def send_oversized(self, size: int, *, sent: int = 1024) -> None:
        """Sends the header of a text frame announcing `size` bytes, then only `sent` of them.

        A server that caps messages refuses the frame by its header, with close 1009. Bytes the
        server never reads (the rest of a whole frame, or media sent meanwhile: use it before
        `send_start`) turn its close into a TCP reset that can overtake the close frame, and the
        phone would see 1006 by chance."""
        self._require_stream()
        assert self._ws is not None
        mask = secrets.token_bytes(4)
        header = bytes([0x81, 0x80 | 127]) + size.to_bytes(8, "big") + mask
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(b"x" * min(sent, size)))
        async with self._send_lock:
            self._ws.transport.write(header + payload)
        self._event("out", "raw", f"frame header of {size} bytes, {min(sent, size)} sent")

    async def send_start(self) -> None:
        """Sends `start` and starts the media clock; `dial` does it unless `start_stream=False`.

        Calling it again sends a duplicate `start` (a fault test) on the same stream clock.
        """
        self._require_stream()
        start = {
            "accountSid": self.account_sid,
            "streamSid": self.stream_sid,
            "callSid": self.call_sid,
            "tracks": ["inbound"],
            "customParameters": self._parameters,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": TWILIO_RATE_HZ, "channels": 1},
        }
        async with self._send_lock:
            self._seq += 1
            message = {
                "event": "start",
                "sequenceNumber": str(self._seq),
                "streamSid": self.stream_sid,
                "start": start,
            }
            await self._send(json.dumps(message), "start", self.stream_sid)
        if self._sender is None:
            self._stream_start = time.monotonic()
            self._sender = asyncio.create_task(self._pump(), name=f"phone-send-{self.call_sid}")

    def pause_reading(self) -> None:
        """Stops reading the socket (a stuck phone): the app's sends back up over TCP."""
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

    async def hang_up(self, *, send_stop: bool = True, close: bool = True) -> None:
        """Stops the media, sends `stop` and closes the socket; safe to call more than once.

        `send_stop=False` closes without `stop`; `close=False` sends `stop` and leaves the socket
        for the app to close (Twilio's end signals arrive in either order, or alone)."""
        if self._ws is None or self._hung_up:
            return
        self._hung_up = True
        self._reading.set()
        if not self._closed.is_set():
            self._end_sample = self._now_sample()
            await self._stop_sender()
            if send_stop:
                # An app that stopped reading must not keep the caller from hanging up.
                with contextlib.suppress(CallEnded, TimeoutError):
                    async with asyncio.timeout(STREAM_CLOSE_TIMEOUT_S):
                        await self._send_stop()
            if not close:
                return
            self._event("out", "close", "1000")
            await self._ws.close()
        if self._reader is not None:
            await asyncio.wait([self._reader])

    async def _send_stop(self) -> None:
        async with self._send_lock:
            self._seq += 1
            message = {
                "event": "stop",
                "sequenceNumber": str(self._seq),
                "streamSid": self.stream_sid,
                "stop": {"accountSid": self.account_sid, "callSid": self.call_sid},
            }
            await self._send(json.dumps(message), "stop", "")

    # ----------------------------------------------------------------- waiting

    async def wait_for_audio(self, timeout: float, min_ms: int = 200) -> None:  # noqa: ASYNC109 (public API)
        """Waits until `min_ms` of bot audio arrived since the caller's last utterance ended.

        Raises TimeoutError, or CallEnded if the stream closes first.
        """
        self._require_stream()
        need = min_ms * BYTES_PER_MS
        async with asyncio.timeout(timeout):
            while self._received_bytes - self._reply_base_bytes < need:
                if self._closed.is_set():
                    raise CallEnded(f"stream closed ({self.close_code}) before the bot answered")
                waiter = asyncio.get_running_loop().create_future()
                self._waiters.append(waiter)
                await waiter

    async def wait_until_quiet(self, quiet_ms: int, timeout: float) -> None:  # noqa: ASYNC109 (public API)
        """Waits until no bot audio arrived for `quiet_ms` and everything received has played.

        Quiet is counted from the later of the last bot audio and the caller's last utterance,
        so call `wait_for_audio` first if the bot may take longer than `quiet_ms` to answer.
        """
        self._require_stream()
        async with asyncio.timeout(timeout):
            while not self._closed.is_set():
                since = max(self._last_audio_mono, self._last_utterance_end_mono)
                play_end = self._t0 + self._play_end_sample / TWILIO_RATE_HZ
                remaining = max(since + quiet_ms / 1000, play_end) - time.monotonic()
                if remaining <= 0:
                    return
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await self._closed.wait()

    async def wait_closed(self, timeout: float) -> None:  # noqa: ASYNC109 (public API)
        """Waits until the stream is closed (by the app or by `hang_up`)."""
        self._require_stream()
        async with asyncio.timeout(timeout):
            await self._closed.wait()

    # ----------------------------------------------------------------- measurements

    @property
    def heard(self) -> bytes:
        """What the caller heard, mu-law 8 kHz from dial to now (or to the end of the stream)."""
        end = self._end_sample if self._end_sample is not None else self._now_sample()
        out = bytearray(ULAW_SILENCE * end)
        for start, audio in self._played:
            if start >= end:
                break
            out[start : start + len(audio)] = audio[: end - start]
        return bytes(out)

    @property
    def played(self) -> bytes:
        """The bot's audio as the phone played it, back to back: `heard` without the silence of
        any stretch where the phone had nothing to play (cleared audio not included)."""
        end = self._end_sample if self._end_sample is not None else self._now_sample()
        return b"".join(audio[: end - start] for start, audio in self._played if start < end)

    def write_heard_wav(self, path: Path | str) -> None:
        write_wav(path, Wav(self.heard, TWILIO_RATE_HZ, "mulaw"))

    def heard_ms(self) -> float:
        """Milliseconds of bot audio played so far (received, minus cleared, minus still queued)."""
        end = self._end_sample if self._end_sample is not None else self._now_sample()
        queued = max(0, self._play_end_sample - end)
        return (self._received_bytes - self._cleared_bytes - queued) / BYTES_PER_MS

    def received_audio_ms(self) -> float:
        return self._received_bytes / BYTES_PER_MS

    @property
    def dialled_at(self) -> float:
        """When the call was placed, on the monotonic clock (event times count from it)."""
        return self._t0

    def utterances(self, gap_ms: int = 300) -> list[tuple[float, float]]:
        """The bot's speech as the caller heard it: (start, end) in seconds since dial, one span
        per stretch of audio with no gap longer than `gap_ms` (cleared audio not included)."""
        spans: list[tuple[int, int]] = []
        gap = gap_ms * BYTES_PER_MS
        for start, audio in self._played:
            end = start + len(audio)
            if spans and start - spans[-1][1] <= gap:
                spans[-1] = (spans[-1][0], max(spans[-1][1], end))
            elif audio:
                spans.append((start, end))
        return [(start / TWILIO_RATE_HZ, end / TWILIO_RATE_HZ) for start, end in spans]

    def first_audio_latencies(self) -> list[float | None]:
        """Seconds from the end of each utterance to the first bot audio after it (None: none)."""
        return [turn.latency_s for turn in self.turns]

    @property
    def outcome(self) -> str:
        """One line for a summary: how the call went, as Twilio would have played it."""
        if self._ws is None:
            if self.stream_error is not None:
                return f"stream refused ({self.stream_error}), then {self._after_connect()}"
            return f"no stream: {self.dial.describe()}"
        if self.closed_by_app:
            why = f"{self.close_code} {self.close_reason}".strip()
            return f"closed by app ({why}), then {self._after_connect()}"
        return "hung up by caller" if self._hung_up else "in progress"

    def _after_connect(self) -> str:
        names = [v.name for v in self.dial.verbs]
        rest = self.dial.verbs[names.index("Connect") + 1 :] if "Connect" in names else ()
        return describe_verbs(rest) if rest else "hang-up"

    # ----------------------------------------------------------------- plumbing

    async def _open(
        self, url: str, headers: dict[str, str], parameters: dict[str, str], start: bool
    ) -> None:
        self._parameters = parameters
        try:
            self._ws = await connect(
                url,
                create_connection=_StampedConnection,
                additional_headers=headers,
                user_agent_header=STREAM_USER_AGENT,
                compression=None,
                proxy=None,
                ping_interval=None,
                open_timeout=STREAM_OPEN_TIMEOUT_S,
                close_timeout=STREAM_CLOSE_TIMEOUT_S,
                max_size=STREAM_MAX_MESSAGE_BYTES,
            )
        except InvalidStatus as exc:
            self._refused(f"HTTP {exc.response.status_code}")
            return
        except (InvalidHandshake, OSError, TimeoutError) as exc:
            self._refused(f"{type(exc).__name__}: {exc}")
            return
        self._event("in", "open", url)
        self._reader = asyncio.create_task(self._read(), name=f"phone-read-{self.call_sid}")
        self._mark_echoer = asyncio.create_task(
            self._echo_marks_on_time(), name=f"phone-marks-{self.call_sid}"
        )
        connected = {"event": "connected", "protocol": "Call", "version": "1.0.0"}
        with contextlib.suppress(CallEnded):  # the reader records an app that closes at once
            await self._send(json.dumps(connected), "connected", "")
            if start:
                await self.send_start()

    def _refused(self, reason: str) -> None:
        self._end_sample = self._now_sample()
        self.stream_error = reason
        self.closed_by_app = True
        self._event("in", "refused", reason)
        self._closed.set()

    def _require_stream(self) -> None:
        if self._ws is None:
            raise CallNotConnected(self.outcome)

    def _now_sample(self) -> int:
        return int((time.monotonic() - self._t0) * TWILIO_RATE_HZ)

    def _event(self, direction: Direction, kind: str, detail: str) -> None:
        self.events.append(PhoneEvent(time.monotonic() - self._t0, direction, kind, detail))

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _send(self, frame: str | bytes, kind: str, detail: str) -> None:
        """Sends one message; callers hold `_send_lock` so sequence numbers go out in order."""
        assert self._ws is not None
        try:
            await self._ws.send(frame)
        except ConnectionClosed as exc:
            raise CallEnded(f"stream closed ({exc.rcvd.code if exc.rcvd else 1006})") from exc
        self._event("out", kind, detail)

    async def _queue(self, data: bytes, *, speech_end: int | None) -> None:
        self._require_stream()
        if self._closed.is_set():
            raise CallEnded(f"stream closed ({self.close_code})")
        if not data:
            return
        item = _Outgoing(data, speech_end, asyncio.get_running_loop().create_future())
        self._outbox.append(item)
        await item.done

    async def _pump(self) -> None:
        """Sends one frame per 20 ms on a monotonic schedule (bursts queued audio if not paced)."""
        ws = self._ws
        assert ws is not None
        next_due = self._stream_start
        try:
            while True:
                if self.pace or not self._outbox:
                    delay = next_due - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                else:
                    await asyncio.sleep(0)
                    next_due = time.monotonic()
                await self._send_frame(ws, self._outbox[0] if self._outbox else None)
                next_due += FRAME_S
        except (ConnectionClosed, CallEnded):
            return

    async def _send_frame(self, ws: ClientConnection, item: _Outgoing | None) -> None:
        if item is None:
            payload = _SILENCE_FRAME_B64
        else:
            offset = item.offset
            if offset == 0:
                item.started_t = time.monotonic() - self._t0
            frame = item.data[offset : offset + FRAME_BYTES]
            if len(frame) < FRAME_BYTES:
                frame += ULAW_SILENCE * (FRAME_BYTES - len(frame))
            item.offset = offset + FRAME_BYTES
            payload = base64.b64encode(frame).decode("ascii")
        async with self._send_lock:
            self._seq += 1
            self._chunk += 1
            text = _MEDIA_TEMPLATE % (
                self._seq, self.stream_sid, self._chunk, (self._chunk - 1) * FRAME_MS, payload
            )
            await ws.send(text)
        if self._record_frames:
            self._event("out", "media", str(self._chunk))
        if item is None:
            return
        if item.speech_end is not None and item.offset >= item.speech_end:
            self._end_turn(item)
        if item.offset >= len(item.data):
            self._outbox.popleft()
            if not item.done.done():
                item.done.set_result(None)

    def _end_turn(self, item: _Outgoing) -> None:
        """The caller stopped speaking: from now on the bot's first audio is its reply."""
        now = time.monotonic()
        turn = Turn(item.started_t, now - self._t0)
        self.turns.append(turn)
        self._awaiting_reply = turn
        self._reply_base_bytes = self._received_bytes
        self._last_utterance_end_mono = now
        self._event("out", "utterance_end", f"{item.offset / BYTES_PER_MS:.0f}ms")
        item.speech_end = None

    async def _echo_marks(self, *, cleared: bool) -> None:
        """Echoes every due mark (all of them after a clear); caller holds `_send_lock`."""
        now = self._now_sample()
        while self._pending_marks and (cleared or self._pending_marks[0].due_sample <= now):
            mark = self._pending_marks.popleft()
            self._seq += 1
            message = {
                "event": "mark",
                "sequenceNumber": str(self._seq),
                "streamSid": self.stream_sid,
                "mark": {"name": mark.name},
            }
            await self._send(json.dumps(message), "mark", mark.name)
            echoed_t = time.monotonic() - self._t0
            self.marks.append(MarkEcho(mark.name, mark.received_t, echoed_t, self.heard_ms(), cleared))

    async def _echo_marks_on_time(self) -> None:
        """Echoes each mark when playback reaches it, as Twilio does (not on the 20 ms pump)."""
        changed = self._marks_changed
        try:
            while True:
                changed.clear()
                if not self._pending_marks:
                    await changed.wait()
                    continue
                due_s = self._t0 + self._pending_marks[0].due_sample / TWILIO_RATE_HZ - time.monotonic()
                if due_s > 0:
                    # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow the
                    # cancellation that hang_up sends, and hang_up would wait for this forever.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(due_s):
                            await changed.wait()
                    continue
                async with self._send_lock:
                    await self._echo_marks(cleared=False)
        except (ConnectionClosed, CallEnded):
            return

    async def _read(self) -> None:
        ws = self._ws
        assert isinstance(ws, _StampedConnection)
        try:
            async for message in ws:
                arrived = ws.arrivals.popleft()
                if not self._reading.is_set():
                    await self._reading.wait()
                    arrived = time.monotonic()
                await self._handle(message, arrived)
        except (ConnectionClosed, CallEnded):
            pass
        finally:
            self._on_closed()

    async def _handle(self, message: str | bytes, arrived: float) -> None:
        """One message from the app; `arrived` is when its bytes came off the socket."""
        if isinstance(message, bytes):
            self._protocol_error(f"binary frame of {len(message)} bytes")
            return
        try:
            msg = json.loads(message)
        except ValueError:
            self._protocol_error(f"not JSON: {message[:60]!r}")
            return
        if not isinstance(msg, dict):
            self._protocol_error(f"not a JSON object: {message[:60]!r}")
            return
        event = msg.get("event")
        if event not in ("media", "mark", "clear"):
            self._protocol_error(f"unknown event {event!r}")
            return
        if msg.get("streamSid") != self.stream_sid:
            self._protocol_error(f"{event} with streamSid {msg.get('streamSid')!r}")
            return
        try:
            if event == "media":
                self._play(base64.b64decode(msg["media"]["payload"], validate=True), arrived)
            elif event == "mark":
                self._on_mark(msg["mark"]["name"], arrived)
            else:
                await self._on_clear(arrived)
        except (KeyError, TypeError, binascii.Error) as exc:
            self._protocol_error(f"malformed {event}: {type(exc).__name__} {exc}")

    def _protocol_error(self, what: str) -> None:
        """Twilio answers these with error 31924; the phone records them for tests to assert."""
        self.protocol_errors.append(what)
        self._event("in", "protocol_error", what)

    def _play(self, audio: bytes, arrived: float) -> None:
        if self._end_sample is not None or not audio:
            return
        if audio[:4] == b"RIFF":
            self._protocol_error("media payload starts with a WAV header")
        now_mono = arrived
        now = int((now_mono - self._t0) * TWILIO_RATE_HZ)
        start = max(now, self._play_end_sample)
        self._played.append((start, audio))
        self._play_end_sample = start + len(audio)
        self._received_bytes += len(audio)
        self._last_audio_mono = now_mono
        t = now_mono - self._t0
        if self.first_audio_t is None:
            self.first_audio_t = t
        if self._awaiting_reply is not None:
            self._awaiting_reply.first_audio_t = t
            self._awaiting_reply = None
        self.events.append(PhoneEvent(t, "in", "media", str(len(audio))))
        if self._waiters:
            self._wake()

    def _on_mark(self, name: object, arrived: float) -> None:
        if not isinstance(name, str):
            raise TypeError(f"mark name {name!r} is not a string")
        self._event("in", "mark", name)
        self._pending_marks.append(_PendingMark(self._play_end_sample, name, arrived - self._t0))
        self._marks_changed.set()

    async def _on_clear(self, arrived: float) -> None:
        now = int((arrived - self._t0) * TWILIO_RATE_HZ)
        dropped = max(0, self._play_end_sample - now)
        if dropped:
            while self._played and self._played[-1][0] >= now:
                self._played.pop()
            if self._played:
                start, audio = self._played[-1]
                self._played[-1] = (start, audio[: now - start])
            self._cleared_bytes += dropped
            self._play_end_sample = now
        self._event("in", "clear", f"{dropped / BYTES_PER_MS:.0f}ms")
        self._marks_changed.set()
        async with self._send_lock:
            await self._echo_marks(cleared=True)

    def _on_closed(self) -> None:
        if self._end_sample is None:
            self._end_sample = self._now_sample()
        if not self._hung_up:
            self.closed_by_app = True
        assert self._ws is not None
        self.close_code = self._ws.close_code
        self.close_reason = self._ws.close_reason or ""
        self._event("in", "close", f"{self.close_code} {self.close_reason}".strip())
        if self._sender is not None:
            self._sender.cancel()
        if self._mark_echoer is not None:
            self._mark_echoer.cancel()
        ended = CallEnded(f"stream closed ({self.close_code})")
        while self._outbox:
            item = self._outbox.popleft()
            if not item.done.done():
                item.done.set_exception(ended)
        self._closed.set()
        self._wake()

    async def _stop_sender(self) -> None:
        """Stops the media and the mark echoes: nothing follows the caller's `stop`."""
        for task in (self._sender, self._mark_echoer):
            if task is not None:
                task.cancel()
                await asyncio.wait([task])


async def _place_call(
    app_url: str,
    *,
    account_sid: str,
    auth_token: str,
    caller: str,
    called: str,
    pace: bool,
    sign: bool,
    signed_url: str | None,
    sign_stream: bool | None,
    start_stream: bool,
    custom_parameters: dict[str, str] | None,
    webhook_path: str,
    record_frames: bool,
    http: httpx.AsyncClient | None,
    before_stream: Callable[[], Awaitable[None]] | None,
) -> PhoneCall:
    t0 = time.monotonic()
    events: list[PhoneEvent] = []
    call_sid = "CA" + secrets.token_hex(16)
    url = app_url.rstrip("/") + webhook_path
    params = inbound_call_params(
        call_sid=call_sid, account_sid=account_sid, caller=caller, called=called
    )
    headers = {"User-Agent": WEBHOOK_USER_AGENT, "Accept": "*/*"}
    if sign:
        headers[SIGNATURE_HEADER] = compute_signature(auth_token, signed_url or url, params)
    events.append(PhoneEvent(time.monotonic() - t0, "out", "webhook", url))
    async with contextlib.AsyncExitStack() as stack:
        if http is None:
            http = await stack.enter_async_context(
                httpx.AsyncClient(timeout=WEBHOOK_TIMEOUT_S, trust_env=False)
            )
        try:
            response = await http.post(url, data=params, headers=headers)
        except httpx.HTTPError as exc:
            result = DialResult("", None, {}, 0, error=f"{type(exc).__name__}: {exc}")
        else:
            result = parse_twiml(response.text, response.status_code, url)
    events.append(PhoneEvent(time.monotonic() - t0, "in", "twiml", str(result.status_code)))
    call = PhoneCall(
        result,
        account_sid=account_sid,
        call_sid=call_sid,
        t0=t0,
        pace=pace,
        record_frames=record_frames,
        events=events,
    )
    if result.stream_url is not None:
        if before_stream is not None:
            await before_stream()
        stream_headers = {}
        if sign if sign_stream is None else sign_stream:
            stream_headers[SIGNATURE_HEADER] = compute_signature(auth_token, result.stream_url, {})
        parameters = result.parameters if custom_parameters is None else custom_parameters
        await call._open(result.stream_url, stream_headers, parameters, start_stream)
    else:
        call._end_sample = call._now_sample()
    return call


class Dialing:
    """`await dial(...)` gives the PhoneCall; `async with dial(...) as call` also hangs up."""

    def __init__(self, place: Callable[[], Coroutine[Any, Any, PhoneCall]]) -> None:
        self._place = place
        self._call: PhoneCall | None = None

    def __await__(self) -> Generator[Any, None, PhoneCall]:
        return (yield from self._place().__await__())

    async def __aenter__(self) -> PhoneCall:
        self._call = await self._place()
        return self._call

    async def __aexit__(self, *exc: object) -> None:
        if self._call is not None:
            await self._call.hang_up()


def dial(
    app_url: str,
    *,
    account_sid: str,
    auth_token: str,
    caller: str = "+15551230001",
    called: str = "+15557650002",
    pace: bool = True,
    sign: bool = True,
    signed_url: str | None = None,
    sign_stream: bool | None = None,
    start_stream: bool = True,
    custom_parameters: dict[str, str] | None = None,
    webhook_path: str = VOICE_WEBHOOK_PATH,
    record_frames: bool = True,
    http: httpx.AsyncClient | None = None,
    before_stream: Callable[[], Awaitable[None]] | None = None,
) -> Dialing:
    """Places a call to the app at `app_url` (its base URL) the way Twilio does.

    `sign=False` sends the webhook unsigned and `signed_url` signs another URL than the one
    posted to; `sign_stream` (default: `sign`) controls the signature on the WebSocket upgrade. With
    `start_stream=False` only `connected` is sent until `send_start()`; `custom_parameters`
    replaces the TwiML `<Parameter>`s in `start`. `pace=False` sends queued audio as fast as
    possible (the call's `pace` attribute can change it later, e.g. to talk over the bot in real
    time); `record_frames=False` skips one event per outgoing frame (long load tests).
    Pass a shared `http` client when placing many calls. `before_stream` runs between the
    webhook's answer and the stream's upgrade, as the gap between Twilio's two requests (a test
    can steer each to a different server process there).
    """

    def place() -> Coroutine[Any, Any, PhoneCall]:
        return _place_call(
            app_url,
            account_sid=account_sid,
            auth_token=auth_token,
            caller=caller,
            called=called,
            pace=pace,
            sign=sign,
            signed_url=signed_url,
            sign_stream=sign_stream,
            start_stream=start_stream,
            custom_parameters=custom_parameters,
            webhook_path=webhook_path,
            record_frames=record_frames,
            http=http,
            before_stream=before_stream,
        )

    return Dialing(place)


# --------------------------------------------------------------------- command line

CLI_PROG = "python -m bot call"
CLI_DESCRIPTION = (
    "Place simulated Twilio calls to a running bot: each call POSTs the signed voice webhook, "
    "opens the Media Stream the TwiML names, waits for the greeting, speaks the WAVs in order "
    "(waiting for each reply) and hangs up. Progress is printed as it happens, then one summary "
    "line per call with its reply latencies. Requests are signed as Twilio signs them, with "
    "TWILIO_AUTH_TOKEN from the environment or .env (the same setting the bot reads): the bot "
    "refuses unsigned calls."
)


@dataclass(slots=True)
class CallSummary:
    index: int
    call_sid: str = ""
    outcome: str = ""
    completed: bool = False
    problem: str = ""
    greeting_s: float | None = None
    latencies_s: list[float | None] = field(default_factory=list)
    heard_ms: float = 0.0


class Progress:
    """Prints one line per call event as it happens, stamped with seconds since the start."""

    def __init__(self, calls: int) -> None:
        self._t0 = time.monotonic()
        self._width = len(str(calls))

    def __call__(self, index: int, text: str) -> None:
        print(f"[{time.monotonic() - self._t0:6.2f}s] call {index:>{self._width}}: {text}", flush=True)


def _load_utterances(paths: list[str]) -> list[bytes]:
    utterances = []
    for path in paths:
        wav = read_wav(path)
        if wav.encoding != "mulaw" or wav.rate_hz != TWILIO_RATE_HZ:
            raise WavError(f"{path}: {wav.encoding} {wav.rate_hz} Hz, need mu-law 8000 Hz")
        utterances.append(wav.data)
    return utterances


def explain_no_stream(call: PhoneCall, url: str) -> str:
    """Why a call got no media stream, and what to check, in one line."""
    result = call.dial
    if result.error:
        return f"cannot reach the bot at {url} ({result.error}): is `python -m bot serve` running there?"
    if result.status_code == 403:
        return (
            "the bot refused the call (403): its TWILIO_AUTH_TOKEN is not the one used here, or it "
            "signs another URL than the one dialled (PUBLIC_URL)"
        )
    if result.status_code != 200:
        return f"the voice webhook answered HTTP {result.status_code}: is {url} the bot's base URL?"
    if call.stream_error is not None:
        return (
            f"the Media Stream upgrade was refused ({call.stream_error}): the stream URL in the "
            f"TwiML is {result.stream_url}"
        )
    return f"the bot answered without a stream ({result.describe()}): it has no OPENAI_API_KEY"


def explain_end(call: PhoneCall) -> str:
    """Why the bot ended a call before the caller was done, in one line."""
    if call.closed_by_app and call.heard_ms() == 0:
        return (
            f"{call.outcome}: the bot could not start its Realtime session; its log says why "
            "(OPENAI_API_KEY, OPENAI_REALTIME_URL)"
        )
    return call.outcome


async def _scripted_call(
    index: int,
    args: argparse.Namespace,
    utterances: list[bytes],
    http: httpx.AsyncClient,
    report: Callable[[int, str], None],
) -> CallSummary:
    summary = CallSummary(index)
    call = await dial(
        args.url,
        account_sid=args.account_sid,
        auth_token=args.auth_token,
        pace=not args.fast,
        http=http,
    )
    summary.call_sid = call.call_sid
    if not call.connected:
        summary.problem = explain_no_stream(call, args.url)
        report(index, f"{call.call_sid} not connected: {summary.problem}")
    else:
        report(index, f"{call.call_sid} connected, media stream open")
        try:
            with contextlib.suppress(TimeoutError):
                await call.wait_for_audio(args.reply_timeout)
            await call.wait_until_quiet(args.quiet_ms, args.reply_timeout + 60)
            if call.first_audio_t is not None:
                report(index, f"greeted ({call.heard_ms() / 1000:.1f} s of audio)")
            for turn, utterance in enumerate(utterances, start=1):
                await call.silence(args.pause_ms)
                await call.say(utterance)
                report(index, f"caller turn {turn}/{len(utterances)} spoken")
                await call.wait_for_audio(args.reply_timeout)
                latency = call.turns[-1].latency_s
                shown = "-" if latency is None else f"{latency:.2f} s"
                report(index, f"bot answered turn {turn} after {shown}")
                await call.wait_until_quiet(args.quiet_ms, args.reply_timeout + 60)
            summary.completed = True
        except TimeoutError:
            summary.problem = f"no reply within {args.reply_timeout:g} s"
        except CallEnded:
            summary.problem = explain_end(call)
        await call.hang_up()
        if args.heard_dir is not None:
            call.write_heard_wav(Path(args.heard_dir) / f"heard_{index}_{call.call_sid}.wav")
        report(index, "completed, hung up" if summary.completed else f"FAILED: {summary.problem}")
    summary.outcome = call.outcome
    if call.first_audio_t is not None and call.turns:
        stream_open = next((e.t for e in call.events if e.kind == "start"), 0.0)
        if call.first_audio_t < call.turns[0].started_t:
            summary.greeting_s = call.first_audio_t - stream_open
    summary.latencies_s = call.first_audio_latencies()
    summary.heard_ms = call.heard_ms()
    return summary


def _format_summary(s: CallSummary, calls: int) -> str:
    lat = " ".join("-" if x is None else f"{x:.2f}" for x in s.latencies_s) or "-"
    greeting = "-" if s.greeting_s is None else f"{s.greeting_s:.2f} s"
    status = "completed" if s.completed else "FAILED"
    return (
        f"call {s.index}/{calls} {s.call_sid}: {status} | greeting {greeting} | "
        f"reply latency (s) {lat} | heard {s.heard_ms / 1000:.1f} s | {s.outcome}"
    )


async def _run_calls(args: argparse.Namespace, utterances: list[bytes]) -> list[CallSummary]:
    report = Progress(args.calls)
    async with httpx.AsyncClient(timeout=WEBHOOK_TIMEOUT_S, trust_env=False) as http:
        return await asyncio.gather(
            *(_scripted_call(i + 1, args, utterances, http, report) for i in range(args.calls))
        )


def main(argv: list[str]) -> int:
    parser = CommandParser(prog=CLI_PROG, description=CLI_DESCRIPTION)
    parser.add_argument("url", help="the bot's base URL, e.g. http://127.0.0.1:5052 (or its PUBLIC_URL)")
    parser.add_argument("--audio", nargs="+", required=True, metavar="WAV",
                        help="caller utterances, mu-law 8 kHz mono WAVs, spoken in order "
                             "(bundled: bot/sim/audio/caller_*.wav)")
    parser.add_argument("--calls", type=positive_int, default=1, help="concurrent calls (default 1)")
    parser.add_argument("--account-sid", help="AccountSid sent in the webhook (default: TWILIO_ACCOUNT_SID)")
    parser.add_argument("--auth-token", help="signs the webhook and the stream (default: TWILIO_AUTH_TOKEN)")
    parser.add_argument("--fast", action="store_true",
                        help="send the caller's audio faster than real time (replies still play "
                             "in real time)")
    parser.add_argument("--pause-ms", type=int, default=500,
                        help="silence before each utterance (default 500)")
    parser.add_argument("--quiet-ms", type=int, default=1200,
                        help="bot silence that ends its turn (default 1200)")
    parser.add_argument("--reply-timeout", type=float, default=15.0,
                        help="seconds to wait for the bot to start answering (default 15)")
    parser.add_argument("--heard-dir", help="write what each caller heard as WAVs into this folder")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        utterances = _load_utterances(args.audio)
    except (SettingsError, WavError, OSError) as exc:
        parser.error(str(exc))
    if args.heard_dir is not None and not Path(args.heard_dir).is_dir():
        parser.error(f"--heard-dir {args.heard_dir}: no such folder")
    args.url = args.url.rstrip("/")
    args.account_sid = args.account_sid or settings.twilio_account_sid or "AC" + secrets.token_hex(16)
    args.auth_token = args.auth_token or settings.twilio_auth_token
    if not args.auth_token:
        parser.error(
            "TWILIO_AUTH_TOKEN is not set, and the bot refuses unsigned calls (403): set "
            "TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN to the bot's values, or pass --auth-token"
        )
    summaries = asyncio.run(_run_calls(args, utterances))
    print()
    for summary in summaries:
        print(_format_summary(summary, args.calls))
    latencies = [x for s in summaries for x in s.latencies_s if x is not None]
    done = sum(s.completed for s in summaries)
    line = f"{done}/{len(summaries)} calls completed"
    if latencies:
        line += f"; reply latency median {statistics.median(latencies):.2f} s, "
        line += f"max {max(latencies):.2f} s over {len(latencies)} turns"
    print(line)
    return 0 if done == len(summaries) else 1
