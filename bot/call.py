"""The conversation state of one phone call, sans-I/O: messages in, actions out.

`Call` is fed Twilio Media Streams messages and Realtime server events (typed values, parsed
once at the edge by `bot.twilio_stream` and `bot.realtime_events`) and answers with a list of
actions: frames for Twilio, events for Realtime, tools to run, a transfer or hang-up to perform.
It never touches a socket, never sleeps and never reads a clock: every method takes `now_ms`
(a monotonic millisecond count the bridge supplies), and `next_deadline()` says when the bridge
must call `tick()` next. So barge-in, mark accounting, pacing and tool round trips are tested as
plain function calls.

What the caller has heard is counted only from the marks Twilio echoes (never from the
inbound clock); mark names carry a generation number so marks flushed by a `clear` are not
counted against newer audio.

Two silences are timed here too, on the same `now_ms`. A caller silent for the idle time while
the bot is not speaking is asked once whether they are still there, then, silent on, told
goodbye and hung up on. A tool that leaves the line silent for TOOL_WAIT_MS gets one short line
said over it ("one moment"), as an out-of-band response: it is not added to the conversation,
so the model cannot answer for the tool in it, and the tool's output still gets its own response.
"""

from __future__ import annotations

import base64
import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from bot.audio import InboundTranscoder, OutboundTranscoder, mulaw_silence
from bot.realtime_events import (
    AudioDelta,
    AudioDone,
    FunctionCall,
    InputTranscript,
    OutputTranscript,
    ResponseCreated,
    ResponseDone,
    ServerError,
    ServerEvent,
    SessionCreated,
    SpeechStarted,
    SpeechStopped,
)
from bot.tools import ToolResult
from bot.twilio_stream import Dtmf, InboundMessage, Mark, Media, Outbound, Start
from bot.wire import parse_digits
from bot.words import LineWords, en

FRAME_MS = 20
MULAW_BYTES_PER_MS = 8
PCM24K_BYTES_PER_MS = 48
FRAME_BYTES = FRAME_MS * MULAW_BYTES_PER_MS
# Down-link messages: one `media` and one `mark` carry up to this much audio (a model delta is
# about 100 ms): ten messages a delta at 20 ms each would cost the bridge more than its features.
CHUNK_MAX_MS = 100
CHUNK_BYTES = CHUNK_MAX_MS * MULAW_BYTES_PER_MS

# Down-link pacing: model audio reaches Twilio at most PACE_RATE x real time after an initial
# burst, and never more than PACE_MAX_LEAD_MS ahead of playback, so a `clear` flushes little.
PACE_RATE = 2
PACE_BURST_MS = 200
PACE_MAX_LEAD_MS = 600
PACE_TICK_MS = 40
# Up-link gaps: silence stands in for missing caller audio so the server VAD can end a turn.
GAP_FILL_MAX_MS = 1000
INPUT_STALL_MS = 750
INPUT_STALL_SILENCE_MS = 1000
# Marks that never come back (a stuck Twilio) stop counting as unplayed audio after this.
MARK_GRACE_MS = 2000
# Chunks sent whose marks are not echoed yet: Twilio echoes each as it plays, so a handful (the
# pacing lead) are in flight. A phone that never echoes must not grow the call's memory: past
# this, the oldest is forgotten (never counted as heard).
INFLIGHT_MAX = 600
# After the caller stops, the server VAD starts its own response; ours would collide with it.
RESPONSE_HOLD_MS = 1500
# Silence a running tool may leave on the line before the caller hears a short "one moment".
TOOL_WAIT_MS = 1000
# Tags the out-of-band "one moment" response, so its response.created is known for what it is.
TOOL_WAIT_METADATA = {"purpose": "tool_wait"}
IDLE_HANG_UP_REASON = "the caller stayed silent"
ROTATION_RETRY_MS = 500
MAX_RESTORED_ENTRIES = 40
DTMF_DIGITS = frozenset("0123456789*#ABCD")



@dataclass(frozen=True, slots=True)
class Script:
    """What the call asks the model to say at set moments, in the store's language: each line is
    asked for with the session's `instructions`, so it comes in the agent's voice and persona."""

    instructions: str = en.AGENT.phone + en.AGENT.speak_callers_language
    greeting: str = en.AGENT.greet
    lines: LineWords = en.LINES

    def line(self, instruction: str) -> dict[str, Any]:
        """A response that says one specific thing."""
        right_now = self.lines.right_now.format(line=instruction)
        return {"type": "response.create", "response": {"instructions": f"{self.instructions}\n{right_now}"}}


# --- actions --------------------------------------------------------------------------


# The two per-frame actions are not frozen: a frozen init costs a setattr per field.
@dataclass(slots=True)
class ToTwilio:
    """A text frame for the Media Streams socket."""

    text: str


@dataclass(slots=True)
class ClearTwilio(ToTwilio):
    """Twilio's `clear`: frames still waiting to be written are dropped, not sent before it (Twilio
    would flush them anyway), so it goes out at once and stops the bot where the caller is."""


@dataclass(slots=True)
class ToRealtime:
    """A client event (JSON text) for the Realtime socket; `audio` frames may be dropped."""

    text: str
    audio: bool = False


@dataclass(frozen=True, slots=True)
class RunTool:
    call_id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class Transfer:
    """Move the live call to a person (the bot's "connecting you" has played)."""

    reason: str


@dataclass(frozen=True, slots=True)
class HangUp:
    """End the phone call (the goodbye has played)."""

    reason: str


@dataclass(frozen=True, slots=True)
class RotateSession:
    """Open a fresh Realtime session now: this is a turn boundary and the old one is aging."""


@dataclass(frozen=True, slots=True)
class Reconnect:
    """The Realtime session is unusable (it expired); replace it the way a drop is handled."""

    reason: str


@dataclass(frozen=True, slots=True)
class TurnTimed:
    """A reply began playing: the caller's end of speech to its first frame sent, and the bot's part
    of that wait (its first audio from the model to that frame). Once per answered turn."""

    latency_ms: int
    bot_ms: int


@dataclass(frozen=True, slots=True)
class Note:
    """Something worth one structured log line (never per frame, never audio or secrets)."""

    event: str
    fields: dict[str, Any] = field(default_factory=dict)


Action = (
    ToTwilio
    | ClearTwilio
    | ToRealtime
    | RunTool
    | Transfer
    | HangUp
    | RotateSession
    | Reconnect
    | TurnTimed
    | Note
)
Activity = Literal["connecting", "listening", "bot_speaking", "tool_running", "transferring", "ending"]


# --- records --------------------------------------------------------------------------


@dataclass(slots=True)
class TranscriptEntry:
    """One turn: what the caller said, what the caller heard the bot say, a tool call, or an
    event of the call (`text` names it: `idle_prompt`, `idle_hang_up`)."""

    role: Literal["user", "assistant", "tool", "event"]
    text: str
    at_ms: int
    interrupted: bool = False
    tool_name: str | None = None
    call_id: str | None = None
    arguments: str | None = None

    def as_dict(self, call_started_ms: int) -> dict[str, Any]:
        """`at_ms` counts from the start of the call, so the record reads on its own."""
        entry: dict[str, Any] = {
            "role": self.role,
            "text": self.text,
            "at_ms": self.at_ms - call_started_ms,
        }
        if self.interrupted:
            entry["interrupted"] = True
        if self.role == "tool":
            entry.update(name=self.tool_name, call_id=self.call_id, arguments=self.arguments)
        return entry


@dataclass(slots=True)
class ResponseStats:
    """Latency and cost of one model response."""

    response_id: str
    created_ms: int
    status: str = "in_progress"
    had_audio: bool = False
    first_audio_latency_ms: int | None = None
    bot_latency_ms: int | None = None
    usage: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "response_id": self.response_id,
            "status": self.status,
            "first_audio_latency_ms": self.first_audio_latency_ms,
            "bot_latency_ms": self.bot_latency_ms,
            "usage": self.usage,
        }


@dataclass(slots=True, eq=False)
class _Item:
    """One assistant item's audio on its way to the caller."""

    item_id: str
    response_id: str
    first_ms: int
    stats: ResponseStats | None
    received_bytes: int = 0
    buf: bytearray = field(default_factory=bytearray)
    sent_bytes: int = 0
    heard_ms: int = 0
    audio_done: bool = False
    entry: TranscriptEntry | None = None
    mark_tail: str = ""


@dataclass(slots=True, eq=False)
class _Chunk:
    """One `media` message sent and its mark not yet echoed: `start_ms`/`end_ms` in its item."""

    item: _Item
    start_ms: int
    end_ms: int
    sent_ms: int


@dataclass(slots=True)
class _ToolCall:
    response_id: str
    entry: TranscriptEntry
    session: int
    started_ms: int
    answered: bool = False
    waited_out: bool = False  # the caller has heard a "one moment" for it


@dataclass(slots=True)
class _PendingAction:
    """A transfer or hang-up waiting for the bot's last words to be heard."""

    kind: Literal["transfer", "end_call"]
    reason: str
    cancellable: bool


# --- the call -------------------------------------------------------------------------


class Call:
    """One call's state machine. Feed it; execute what it returns, in order."""

    def __init__(
        self,
        *,
        call_sid: str,
        stream_sid: str,
        now_ms: int,
        audio_format: Literal["pcm16", "pcmu"],
        transfer_key: str | None = "0",
        session_max_ms: int = 55 * 60 * 1000,
        script: Script = Script(),
        idle_prompt_ms: int = 0,
        idle_hang_up_ms: int = 10_000,
    ) -> None:
        """`pcm16` transcodes both ways; `pcmu` passes Twilio's mu-law through untouched.

        `idle_prompt_ms`: caller silence before "are you still there?" (0: never);
        `idle_hang_up_ms`: further silence before the goodbye and hang-up.
        """
        self.call_sid = call_sid
        self._script = script
        self._lines = script.lines
        self._idle_prompt_ms = idle_prompt_ms
        self._idle_hang_up_ms = idle_hang_up_ms
        self.out = Outbound(stream_sid)
        self.started_ms = now_ms
        transcode = audio_format == "pcm16"
        self._uplink = InboundTranscoder() if transcode else None
        self._downlink = OutboundTranscoder() if transcode else None
        self._model_bytes_per_ms = PCM24K_BYTES_PER_MS if transcode else MULAW_BYTES_PER_MS
        self._transfer_key = transfer_key
        self._session_max_ms = session_max_ms

        self.transcript: list[TranscriptEntry] = []
        self.responses: list[ResponseStats] = []
        self.interruptions = 0
        self.gap_fill_ms = 0
        self.sessions = 0
        self.idle_prompts = 0
        self.tool_wait_lines = 0
        self.outcome: Literal["transferred", "ended_by_bot", "caller_idle"] | None = None

        # down-link
        self._gen = 0
        self._gen_tag = "0"
        self._playing: dict[str, _Item] = {}
        self._queue: deque[_Item] = deque()
        self._inflight: deque[_Chunk] = deque(maxlen=INFLIGHT_MAX)
        self._echo_ms: int | None = None
        self._credit = float(PACE_BURST_MS)
        self._credit_at = now_ms
        self._playout_end = now_ms
        self._last_forward_ms = now_ms - PACE_TICK_MS
        self._cut: dict[str, tuple[int, int]] = {}
        self._discarded: set[str] = set()

        # responses and tools
        self._active: ResponseStats | None = None
        self._stats: dict[str, ResponseStats] = {}
        self._requested = False
        self._request_count = 0
        self._request_id: str | None = None
        self._request_body: dict[str, Any] | None = None
        self._want: dict[str, Any] | None = None
        self._tools: dict[str, _ToolCall] = {}
        self._unanswered = 0
        self._hold_until = now_ms
        self._followups: dict[str, bool] = {}
        self._pending: _PendingAction | None = None
        self._ended = False
        self._asides: set[str] = set()  # out-of-band responses: not in the conversation

        # silences
        self._quiet_since = now_ms
        self._idle_prompted = False

        # up-link
        self._next_input_ts: int | None = None
        self._last_media_ms: int | None = None
        self._stall_padded = False
        self._user_speaking = False
        self._speech_stopped_ms: int | None = None
        self._awaiting_reply = False
        self._user_turn_at: dict[str, int] = {}

        # session
        self._session_live = False
        self._rotate_at_ms = now_ms + session_max_ms
        self._rotating = False
        self._resume_needed = False
        self._last_tick_ms = now_ms

        self._realtime_handlers: dict[type[ServerEvent], Callable[[Any, int], list[Action]]] = {
            AudioDelta: self._on_audio_delta,
            AudioDone: self._on_audio_done,
            SpeechStarted: self._on_speech_started,
            SpeechStopped: self._on_speech_stopped,
            ResponseCreated: self._on_response_created,
            ResponseDone: self._on_response_done,
            OutputTranscript: self._on_output_transcript,
            InputTranscript: self._on_input_transcript,
            FunctionCall: self._on_function_call,
            ServerError: self._on_error,
            SessionCreated: self._on_session_created,
        }

    # --- Twilio side ------------------------------------------------------------------

    def on_twilio(self, message: InboundMessage, now_ms: int) -> list[Action]:
        """A parsed Media Streams message (after `start`, which the bridge handles)."""
        if isinstance(message, Media):
            return list(self.on_media(message, now_ms))
        if isinstance(message, Mark):
            self._on_mark(message.name, now_ms)
            return self._settle(now_ms) if self._pending is not None else []
        if isinstance(message, Dtmf):
            return self._on_dtmf(message.digit, now_ms)
        if isinstance(message, Start):
            return [Note("duplicate_start_ignored", {"stream_sid": message.stream_sid})]
        return []

    def on_media(self, media: Media, now_ms: int) -> list[ToRealtime]:
        """The hot path (50 frames a second): only up-link audio comes out, so it is typed so."""
        actions: list[ToRealtime] = []
        expected = self._next_input_ts
        ts = media.timestamp_ms
        if expected is not None and ts - expected >= FRAME_MS:
            fill_ms = min(ts - expected, GAP_FILL_MAX_MS)
            self.gap_fill_ms += fill_ms
            actions.append(self._silence(fill_ms))
        end = ts + len(media.audio) // MULAW_BYTES_PER_MS
        if expected is None or end > expected:
            self._next_input_ts = end
        self._last_media_ms = now_ms
        self._stall_padded = False
        if self._uplink is None:
            audio = media.payload
        else:
            audio = base64.b64encode(self._uplink.convert(media.audio)).decode("ascii")
        actions.append(ToRealtime(_append_text(audio), audio=True))
        return actions

    def _silence(self, duration_ms: int) -> ToRealtime:
        mulaw = mulaw_silence(duration_ms)
        audio = mulaw if self._uplink is None else self._uplink.convert(mulaw)
        return ToRealtime(_append_text(base64.b64encode(audio).decode("ascii")), audio=True)

    def _on_mark(self, name: str, now_ms: int) -> None:
        gen, _, rest = name.partition(":")
        if gen != self._gen_tag:
            return
        heard, _, item_id = rest.partition(":")
        heard_ms = parse_digits(heard)
        inflight = self._inflight
        # Twilio echoes in order, so this is the oldest chunk; one echoed past others means
        # those played too. A name matching no chunk in flight (a repeat, a forgery) counts nothing.
        played = 0
        for chunk in inflight:
            played += 1
            if chunk.end_ms == heard_ms and chunk.item.item_id == item_id:
                break
        else:
            return
        for _ in range(played):
            chunk = inflight.popleft()
            item = chunk.item
            item.heard_ms = chunk.end_ms
            if item.audio_done and not item.buf and item.heard_ms * MULAW_BYTES_PER_MS >= item.sent_bytes:
                self._playing.pop(item.item_id, None)
        self._echo_ms = now_ms

    def _on_dtmf(self, digit: str, now_ms: int) -> list[Action]:
        if digit not in DTMF_DIGITS:
            return [Note("dtmf_invalid_digit_ignored")]
        self._heard_from_caller(now_ms)
        if digit != self._transfer_key or self._pending is not None or self._ended:
            return []
        actions: list[Action] = [Note("dtmf_transfer_requested", {"digit": digit})]
        if self._unplayed(now_ms):
            actions += self._interrupt(now_ms, truncate=True)
        if self._active is not None:
            actions.append(ToRealtime(json.dumps({"type": "response.cancel"})))
            self._discarded.add(self._active.response_id)
        self._pending = _PendingAction("transfer", "caller pressed the transfer key", False)
        self._want = self._script.line(self._lines.transfer)
        return actions + self._settle(now_ms)

    # --- Realtime side ----------------------------------------------------------------

    def on_realtime(self, event: ServerEvent, now_ms: int) -> list[Action]:
        """A Realtime server event, parsed and checked at the edge (`bot.realtime_events`)."""
        return self._realtime_handlers[type(event)](event, now_ms)

    def _on_audio_delta(self, event: AudioDelta, now_ms: int) -> list[Action]:
        response_id = event.response_id
        if response_id in self._discarded or self._ended:
            return []
        raw = event.audio
        item_id = event.item_id
        item = self._playing.get(item_id)
        if item is None:
            stats = self._stats.get(response_id)
            item = _Item(item_id, response_id, now_ms, stats)
            self._playing[item_id] = item
            self._queue.append(item)
            if stats is not None:
                stats.had_audio = True
        item.received_bytes += len(raw)
        item.buf += raw if self._downlink is None else self._downlink.convert(raw)
        return self._forward(now_ms)

    def _on_audio_done(self, event: AudioDone, now_ms: int) -> list[Action]:
        item = self._playing.get(event.item_id)
        if item is None or item.audio_done:
            return []
        if self._downlink is not None:
            item.buf += self._downlink.flush()
        item.audio_done = True
        return self._forward(now_ms)

    def _on_speech_started(self, event: SpeechStarted, now_ms: int) -> list[Action]:
        self._user_speaking = True
        self._heard_from_caller(now_ms)
        self._user_turn_at[event.item_id] = now_ms
        actions: list[Action] = []
        if self._unplayed(now_ms):
            actions += self._interrupt(now_ms, truncate=True)
        elif self._active is not None:
            # Nothing reached the caller yet; the server cancels the response itself.
            self._discarded.add(self._active.response_id)
        # Outputs already in the conversation reach the model through the caller's new turn.
        for response_id in [r for r, done in self._followups.items() if done and self._answered(r)]:
            del self._followups[response_id]
        pending = self._pending
        if pending is not None and pending.cancellable:
            self._pending = None
            self._want = None
            lines = self._lines
            note = lines.transfer_cancelled_note if pending.kind == "transfer" else lines.end_cancelled_note
            actions.append(ToRealtime(_system_item(note)))
            actions.append(Note("call_action_cancelled_by_caller", {"action": pending.kind}))
        return actions

    def _on_speech_stopped(self, event: SpeechStopped, now_ms: int) -> list[Action]:
        self._user_speaking = False
        self._quiet_since = now_ms
        self._speech_stopped_ms = now_ms
        self._awaiting_reply = True
        self._hold_until = now_ms + RESPONSE_HOLD_MS
        return []

    def _on_response_created(self, event: ResponseCreated, now_ms: int) -> list[Action]:
        response_id = event.response_id
        stats = ResponseStats(response_id, now_ms)
        self._stats[response_id] = stats
        self._active = stats
        self._requested = False
        self._hold_until = now_ms
        self._quiet_since = now_ms
        if event.metadata == TOOL_WAIT_METADATA:
            # Out of band: it answers nothing, and leaves the conversation as it was.
            self._asides.add(response_id)
            return []
        self._awaiting_reply = False
        # This response already sees every tool output sent so far: no follow-up needed.
        for origin in [r for r in self._followups if self._answered(r)]:
            del self._followups[origin]
        return []

    def _on_response_done(self, event: ResponseDone, now_ms: int) -> list[Action]:
        response_id = event.response_id
        stats = self._stats.pop(response_id, None) or ResponseStats(response_id, now_ms)
        stats.status = event.status
        stats.usage = event.usage
        self.responses.append(stats)
        if self._active is not None and self._active.response_id == response_id:
            self._active = None
        self._quiet_since = now_ms
        self._discarded.discard(response_id)
        if response_id in self._followups:
            self._followups[response_id] = True
        note = Note("response_done", {"response_id": response_id, **stats.as_dict()})
        return [note, *self._settle(now_ms)]

    def _on_output_transcript(self, event: OutputTranscript, now_ms: int) -> list[Action]:
        item_id = event.item_id
        text = event.transcript
        item = self._playing.get(item_id)
        entry = TranscriptEntry("assistant", text, now_ms if item is None else item.first_ms)
        if item is not None:
            item.entry = entry
        elif item_id in self._cut:
            heard_ms, received_ms = self._cut.pop(item_id)
            entry.text = _trim_to_heard(text, heard_ms, received_ms)
            entry.interrupted = True
        if entry.text:
            self.transcript.append(entry)
        return []

    def _on_input_transcript(self, event: InputTranscript, now_ms: int) -> list[Action]:
        at_ms = self._user_turn_at.pop(event.item_id, now_ms)
        self.transcript.append(TranscriptEntry("user", event.transcript, at_ms))
        return []

    def _on_function_call(self, event: FunctionCall, now_ms: int) -> list[Action]:
        call_id, name, arguments = event.call_id, event.name, event.arguments
        response_id = event.response_id
        entry = TranscriptEntry("tool", "", now_ms, tool_name=name, call_id=call_id, arguments=arguments)
        self.transcript.append(entry)
        self._tools[call_id] = _ToolCall(response_id, entry, self.sessions, now_ms)
        self._unanswered += 1
        self._followups.setdefault(response_id, False)
        return [RunTool(call_id, name, arguments)]

    def on_tool_result(self, call_id: str, result: ToolResult, now_ms: int) -> list[Action]:
        """A tool finished: its output goes to the model; a follow-up response comes later."""
        tool = self._tools.get(call_id)
        if tool is None or tool.answered:
            return []
        tool.answered = True
        self._unanswered -= 1
        self._quiet_since = max(self._quiet_since, now_ms)
        tool.entry.text = result.output
        actions: list[Action] = []
        if self._session_live:
            if tool.session != self.sessions:
                # Asked in a session that has since been replaced: the call is not there yet.
                actions.append(ToRealtime(_create(_function_call_item(tool.entry))))
            item = {"type": "function_call_output", "call_id": call_id, "output": result.output}
            actions.append(ToRealtime(_create(item)))
        if result.action is not None and self._pending is None and not self._ended:
            kind = result.action
            self._pending = _PendingAction(kind, f"tool {tool.entry.tool_name}", True)
            self._followups.pop(tool.response_id, None)
            if not self._spoke(tool.response_id):
                line = self._lines.transfer if kind == "transfer" else self._lines.goodbye
                self._want = self._script.line(line)
        return actions + self._settle(now_ms)

    def _on_error(self, event: ServerError, now_ms: int) -> list[Action]:
        code = event.code
        fields = {"code": code, "type": event.type, "detail": event.message}
        actions: list[Action] = [Note("realtime_error", fields)]
        if code == "session_expired":
            actions.append(Reconnect("session_expired"))
        elif code == "conversation_already_has_active_response" and event.client_event_id == self._request_id:
            # Our response.create lost a race with the server's own; ask again when idle.
            self._requested = False
            self._request_id = None
            if self._want is None:
                self._want = self._request_body
        return actions

    def _on_session_created(self, event: SessionCreated, now_ms: int) -> list[Action]:
        return [Note("realtime_session_created", {"session_id": event.session_id})]

    # --- session lifecycle ------------------------------------------------------------

    def session_opened(self, now_ms: int) -> list[Action]:
        """A Realtime session is configured: greet, or restore the conversation into it."""
        self._session_live = True
        self._quiet_since = now_ms
        self._rotate_at_ms = now_ms + self._session_max_ms
        first = self.sessions == 0
        self.sessions += 1
        if first:
            self._want = self._script.line(self._script.greeting)
            return self._settle(now_ms)
        actions: list[Action] = [ToRealtime(text) for text in self._restore_items()]
        if self._rotating:
            self._rotating = False
        elif self._resume_needed and self._want is None and self._pending is None:
            self._want = self._script.line(self._lines.resume if self.transcript else self._script.greeting)
        self._resume_needed = False
        return actions + self._settle(now_ms)

    def session_lost(self, now_ms: int) -> list[Action]:
        """The Realtime socket is gone: stop playback; the next session resumes the talk."""
        self._resume_needed = (
            self._resume_needed
            or self._active is not None
            or self._requested
            or self._user_speaking
            or self._awaiting_reply
            or self._unplayed(now_ms)
            or self._unanswered > 0
            or any(self._followups.values())
        )
        actions: list[Action] = []
        if self._unplayed(now_ms):
            actions += self._interrupt(now_ms, truncate=False)
        self._session_live = False
        self._active = None
        self._stats.clear()
        self._requested = False
        if self._want is not None and (self._want.get("response") is None or _is_aside(self._want)):
            self._want = None
        self._followups.clear()
        self._user_speaking = False
        self._awaiting_reply = False
        self._rotating = False
        return actions

    def rotation_failed(self, now_ms: int, retry_in_ms: int) -> None:
        """The next session could not be opened; the current one goes on for now."""
        self._rotating = False
        self._rotate_at_ms = now_ms + retry_in_ms

    def transfer_failed(self, now_ms: int) -> list[Action]:
        """The transfer could not be placed: the bot stays on the line and says so."""
        self._ended = False
        self.outcome = None
        self._want = self._script.line(self._lines.transfer_failed)
        return [ToRealtime(_system_item(self._lines.transfer_failed_note)), *self._settle(now_ms)]

    def _restore_items(self) -> list[str]:
        events: list[str] = []
        entries = sorted(self.transcript, key=lambda e: e.at_ms)[-MAX_RESTORED_ENTRIES:]
        for entry in entries:
            items: list[dict[str, Any]] = []
            if entry.role == "user" and entry.text:
                items.append(_message("user", "input_text", entry.text))
            elif entry.role == "assistant" and entry.text:
                items.append(_message("assistant", "output_text", entry.text))
            elif entry.role == "tool" and entry.text:
                items.append(_function_call_item(entry))
                items.append({"type": "function_call_output", "call_id": entry.call_id, "output": entry.text})
            events += [_create(item) for item in items]
        return events

    # --- time -------------------------------------------------------------------------

    def tick(self, now_ms: int) -> list[Action]:
        """Timed work: paced audio, silence for a stalled caller, a due action or rotation."""
        self._last_tick_ms = now_ms
        actions = self._forward(now_ms)
        if (
            self._user_speaking
            and not self._stall_padded
            and self._last_media_ms is not None
            and now_ms - self._last_media_ms >= INPUT_STALL_MS
        ):
            self._stall_padded = True
            if self._next_input_ts is not None:
                self._next_input_ts += INPUT_STALL_SILENCE_MS
            self.gap_fill_ms += INPUT_STALL_SILENCE_MS
            actions.append(self._silence(INPUT_STALL_SILENCE_MS))
        due = self._after_marks(self._tool_wait_due())
        if due is not None and now_ms >= due:
            actions += self._say_one_moment()
        due = self._after_marks(self._idle_due())
        if due is not None and now_ms >= due:
            actions += self._on_idle(now_ms)
        actions += self._settle(now_ms)
        if self._rotation_due(now_ms):
            self._rotating = True
            actions.append(RotateSession())
        return actions

    def next_deadline(self) -> int | None:
        """The `now_ms` at which `tick` has work to do, or None while only input can help."""
        candidates: list[int] = []
        size = _chunk_bytes(self._queue[0]) if self._queue else 0
        if size:
            duration_ms = -(-size // MULAW_BYTES_PER_MS)
            short = duration_ms - self._credit
            credit_at = self._credit_at + (int(-(-short // PACE_RATE)) if short > 0 else 0)
            lead_at = self._playout_end + duration_ms - PACE_MAX_LEAD_MS - FRAME_MS
            candidates.append(max(credit_at, lead_at, self._last_forward_ms + PACE_TICK_MS))
        if self._user_speaking and not self._stall_padded and self._last_media_ms is not None:
            candidates.append(self._last_media_ms + INPUT_STALL_MS)
        if self._pending is not None and self._inflight:
            candidates.append(self._playout_end + MARK_GRACE_MS)
        if self._session_live and not self._rotating:
            candidates.append(max(self._rotate_at_ms, self._last_tick_ms + ROTATION_RETRY_MS))
        if (self._want is not None or self._followups) and self._hold_until > self._last_tick_ms:
            candidates.append(self._hold_until)
        for due in (self._after_marks(self._tool_wait_due()), self._after_marks(self._idle_due())):
            if due is not None:
                candidates.append(due)
        return min(candidates) if candidates else None

    # --- silences ---------------------------------------------------------------------

    def _heard_from_caller(self, now_ms: int) -> None:
        self._quiet_since = now_ms
        self._idle_prompted = False

    def _line_is_quiet(self) -> bool:
        """Nobody speaks and nothing is about to be said: what both silence timers wait for."""
        return (
            self._session_live
            and not self._ended
            and not self._user_speaking
            and self._active is None
            and not self._requested
            and self._want is None
            and self._pending is None
            and not self._queue
        )

    def _after_marks(self, due: int | None) -> int | None:
        """`due`, or later while marks are unechoed (up to their grace): the bot's words must
        have been heard; an echo moves it back."""
        if due is None or not self._inflight:
            return due
        return max(due, self._playout_end + MARK_GRACE_MS)

    def _waiting_tools(self) -> list[_ToolCall]:
        if self._unanswered == 0:
            return []
        return [
            tool
            for tool in self._tools.values()
            if not tool.answered and not tool.waited_out and tool.session == self.sessions
        ]

    def _tool_wait_due(self) -> int | None:
        """When a running tool has left the line silent for TOOL_WAIT_MS."""
        if self._unanswered == 0 or not self._line_is_quiet():
            return None
        waiting = self._waiting_tools()
        if not waiting:
            return None
        return max(min(tool.started_ms for tool in waiting), self._playout_end) + TOOL_WAIT_MS

    def _say_one_moment(self) -> list[Action]:
        """One short line over the tools still running (never a second for the same tool), out of
        band: the model cannot answer for a tool in it, and the conversation does not keep it."""
        waiting = self._waiting_tools()
        for tool in waiting:
            tool.waited_out = True
        self.tool_wait_lines += 1
        line = self._script.line(self._lines.one_moment.format(words=self._lines.one_moment_words))
        line["response"].update(conversation="none", tool_choice="none", metadata=TOOL_WAIT_METADATA)
        self._want = line
        return [Note("tool_wait_line", {"tools": [tool.entry.tool_name for tool in waiting]})]

    def _idle_due(self) -> int | None:
        """When the caller's silence (the bot silent too, nothing pending) calls for the next step."""
        if not self._idle_prompt_ms or self._unanswered or self._followups or not self._line_is_quiet():
            return None
        wait_ms = self._idle_hang_up_ms if self._idle_prompted else self._idle_prompt_ms
        return max(self._quiet_since, self._playout_end) + wait_ms

    def _on_idle(self, now_ms: int) -> list[Action]:
        """First ask whether the caller is still there; when they stay silent, say goodbye and hang up."""
        self._quiet_since = now_ms
        silent_ms = now_ms - max(self._playout_end, self.started_ms)
        if not self._idle_prompted:
            self._idle_prompted = True
            self.idle_prompts += 1
            self.transcript.append(TranscriptEntry("event", "idle_prompt", now_ms))
            self._want = self._script.line(self._lines.still_there)
            return [Note("caller_idle_prompted", {"silent_ms": silent_ms})]
        self.transcript.append(TranscriptEntry("event", "idle_hang_up", now_ms))
        self._pending = _PendingAction("end_call", IDLE_HANG_UP_REASON, True)
        self._want = self._script.line(self._lines.idle_goodbye)
        return [Note("caller_idle_hanging_up", {"silent_ms": silent_ms})]

    # --- down-link internals ----------------------------------------------------------

    def _forward(self, now_ms: int) -> list[Action]:
        """Send what pacing allows, a message of up to CHUNK_MAX_MS at a time, each followed by
        its mark."""
        queue = self._queue
        if not queue:
            return []
        credit = min(float(PACE_BURST_MS), self._credit + (now_ms - self._credit_at) * PACE_RATE)
        self._credit_at = now_ms
        actions: list[Action] = []
        out = self.out
        while queue:
            item = queue[0]
            buf = item.buf
            size = _chunk_bytes(item)
            if not size:
                if not item.audio_done:
                    break
                queue.popleft()  # all sent
                continue
            duration_ms = size / MULAW_BYTES_PER_MS
            if credit < duration_ms or self._playout_end - now_ms + duration_ms > PACE_MAX_LEAD_MS + FRAME_MS:
                break
            if item.sent_bytes == 0:
                if (timed := self._first_frame(item, now_ms)) is not None:
                    actions.append(timed)
                item.mark_tail = out.mark_tail(item.item_id)
            chunk = bytes(buf[:size])
            del buf[:size]
            start_ms = item.sent_bytes // MULAW_BYTES_PER_MS
            item.sent_bytes += size
            end_ms = item.sent_bytes // MULAW_BYTES_PER_MS
            credit -= duration_ms
            self._playout_end = max(self._playout_end, now_ms) + int(duration_ms)
            self._inflight.append(_Chunk(item, start_ms, end_ms, now_ms))
            actions.append(ToTwilio(out.media(base64.b64encode(chunk).decode("ascii"))))
            actions.append(ToTwilio(out.mark(self._gen_tag, end_ms, item.mark_tail)))
        self._credit = credit
        if actions:
            self._last_forward_ms = now_ms
        return actions

    def _first_frame(self, item: _Item, now_ms: int) -> TurnTimed | None:
        """The reply to the caller's last words starts playing: how long they waited, and how much
        of that the bot itself added (first model audio in -> first frame out)."""
        stopped = self._speech_stopped_ms
        stats = item.stats
        if stopped is None or stats is None or stats.created_ms < stopped:
            return None
        stats.first_audio_latency_ms = now_ms - stopped
        stats.bot_latency_ms = now_ms - item.first_ms
        self._speech_stopped_ms = None
        return TurnTimed(stats.first_audio_latency_ms, stats.bot_latency_ms)

    def _heard_now(self, item: _Item, now_ms: int) -> int:
        """The item's last echoed mark, plus, while its next chunk is the one playing, the time
        since that chunk began (the last echo, or its sending if the phone had run dry), up to
        the chunk's end: playback goes on between marks, never past a mark not yet echoed.
        Before the first echo after a `clear` nothing is credited: the phone's position is
        unknown until then."""
        inflight = self._inflight
        echo_ms = self._echo_ms
        if echo_ms is None or not inflight or inflight[0].item is not item:
            return item.heard_ms
        head = inflight[0]
        since_ms = now_ms - max(echo_ms, head.sent_ms)
        return head.start_ms + min(max(since_ms, 0), head.end_ms - head.start_ms)

    def _unplayed(self, now_ms: int) -> bool:
        """Is bot audio still queued, in flight, or being generated for the caller?"""
        if self._queue:
            return True
        if self._inflight and now_ms < self._playout_end + MARK_GRACE_MS:
            return True
        active = self._active
        return active is not None and any(
            item.response_id == active.response_id and not item.audio_done for item in self._playing.values()
        )

    def _interrupt(self, now_ms: int, *, truncate: bool) -> list[Action]:
        """Stop the bot mid-sentence: flush Twilio and make the history match what was heard."""
        actions: list[Action] = [ClearTwilio(self.out.clear())]
        heard_report: dict[str, int] = {}
        for item in self._playing.values():
            received_ms = item.received_bytes // self._model_bytes_per_ms
            heard_ms = min(self._heard_now(item, now_ms), received_ms)
            heard_report[item.item_id] = heard_ms
            if item.response_id in self._asides:
                pass  # out of band: not in the conversation, nothing there to cut
            elif truncate and heard_ms <= 0:
                event: dict[str, Any] = {"type": "conversation.item.delete", "item_id": item.item_id}
                actions.append(ToRealtime(json.dumps(event)))
            elif truncate:
                event = {
                    "type": "conversation.item.truncate",
                    "item_id": item.item_id,
                    "content_index": 0,
                    "audio_end_ms": heard_ms,
                }
                actions.append(ToRealtime(json.dumps(event)))
            if item.entry is not None:
                item.entry.text = _trim_to_heard(item.entry.text, heard_ms, received_ms)
                item.entry.interrupted = True
            else:
                self._cut[item.item_id] = (heard_ms, received_ms)
            self._discarded.add(item.response_id)
        if self._active is not None:
            self._discarded.add(self._active.response_id)
        self._playing.clear()
        self._queue.clear()
        self._gen += 1
        self._gen_tag = str(self._gen)
        self._inflight.clear()
        self._echo_ms = None
        self._playout_end = now_ms
        if self._downlink is not None:
            self._downlink.reset()
        self.interruptions += 1
        truncated = sum(1 for heard_ms in heard_report.values() if heard_ms > 0) if truncate else 0
        fields = {"heard_ms": heard_report, "truncated": truncated}
        actions.append(Note("barge_in" if truncate else "playback_stopped", fields))
        return actions

    # --- responses, follow-ups and call actions ---------------------------------------

    def _settle(self, now_ms: int) -> list[Action]:
        """Start a wanted response when the conversation is free; fire a due call action."""
        if self._want is None and not self._followups and self._pending is None:
            return []
        actions: list[Action] = []
        idle = (
            self._session_live
            and self._active is None
            and not self._requested
            and not self._user_speaking
            and not self._ended
            and now_ms >= self._hold_until
        )
        if idle and self._want is None:
            ready = [rid for rid, done in self._followups.items() if done and self._answered(rid)]
            if ready:
                for rid in ready:
                    del self._followups[rid]
                self._want = {"type": "response.create"}
        if idle and self._want is not None:
            self._request_count += 1
            self._request_id = f"bot_response_{self._request_count}"
            self._request_body = self._want
            actions.append(ToRealtime(json.dumps({**self._want, "event_id": self._request_id})))
            self._want = None
            self._requested = True
        pending = self._pending
        if (
            pending is not None
            and not self._ended
            and self._active is None
            and not self._requested
            and self._want is None
            and not self._queue
            and (not self._inflight or now_ms >= self._playout_end + MARK_GRACE_MS)
            and self._unanswered == 0
        ):
            self._pending = None
            self._ended = True
            if pending.kind == "transfer":
                self.outcome = "transferred"
                actions.append(Transfer(pending.reason))
            else:
                self.outcome = "caller_idle" if pending.reason == IDLE_HANG_UP_REASON else "ended_by_bot"
                actions.append(HangUp(pending.reason))
        return actions

    def _answered(self, response_id: str) -> bool:
        return all(tool.answered for tool in self._tools.values() if tool.response_id == response_id)

    def _spoke(self, response_id: str) -> bool:
        """Did this response produce audio (so its words come before a transfer or hang-up)?"""
        stats = self._stats.get(response_id)
        if stats is not None:
            return stats.had_audio
        return any(r.response_id == response_id and r.had_audio for r in self.responses)

    def _rotation_due(self, now_ms: int) -> bool:
        return (
            self._session_live
            and not self._rotating
            and not self._ended
            and now_ms >= self._rotate_at_ms
            and self._active is None
            and not self._requested
            and self._want is None
            and not self._user_speaking
            and not self._unplayed(now_ms)
            and self._pending is None
            and self._unanswered == 0
        )

    # --- what the call is doing -------------------------------------------------------

    def activity(self, now_ms: int) -> Activity:
        """For the operators' console, which reads it a few times a second while open."""
        pending = self._pending
        if self.outcome == "transferred" or (pending is not None and pending.kind == "transfer"):
            return "transferring"
        if self._ended or pending is not None:
            return "ending"
        if not self._session_live:
            return "connecting"
        if self._unanswered:
            return "tool_running"
        if self._unplayed(now_ms):
            return "bot_speaking"
        return "listening"

    # --- the end-of-call record -------------------------------------------------------

    def record(self, now_ms: int) -> dict[str, Any]:
        """Transcript, duration, per-turn latency and token usage, for the call.completed event."""
        totals: dict[str, int] = {}
        for stats in self.responses:
            for key, value in stats.usage.items():
                totals[key] = totals.get(key, 0) + value
        return {
            "call_sid": self.call_sid,
            "duration_s": round((now_ms - self.started_ms) / 1000, 3),
            "outcome": self.outcome or "caller_hung_up",
            "transcript": [
                e.as_dict(self.started_ms) for e in sorted(self.transcript, key=lambda e: e.at_ms)
            ],
            "responses": [stats.as_dict() for stats in self.responses],
            "usage": totals,
            "interruptions": self.interruptions,
            "idle_prompts": self.idle_prompts,
            "tool_wait_lines": self.tool_wait_lines,
            "gap_fill_ms": self.gap_fill_ms,
            "realtime_sessions": self.sessions,
        }


# --- helpers --------------------------------------------------------------------------


def _chunk_bytes(item: _Item) -> int:
    """The size of the item's next message: up to CHUNK_MAX_MS of what is buffered, in whole
    20 ms frames but for the item's very last bytes."""
    buffered = len(item.buf)
    if buffered >= CHUNK_BYTES:
        return CHUNK_BYTES
    return buffered if item.audio_done else buffered - buffered % FRAME_BYTES


def _append_text(audio_b64: str) -> str:
    """The up-link event, built as a string: base64 needs no JSON escaping."""
    return '{"type":"input_audio_buffer.append","audio":"' + audio_b64 + '"}'


def _message(role: Literal["user", "assistant"], kind: str, text: str) -> dict[str, Any]:
    return {"type": "message", "role": role, "content": [{"type": kind, "text": text}]}


def _is_aside(want: dict[str, Any]) -> bool:
    """An out-of-band response (its words are not added to the conversation)."""
    return bool(want.get("response", {}).get("conversation") == "none")


def _system_item(text: str) -> str:
    item = {"type": "message", "role": "system", "content": [{"type": "input_text", "text": text}]}
    return _create(item)


def _create(item: dict[str, Any]) -> str:
    return json.dumps({"type": "conversation.item.create", "item": item})


def _function_call_item(entry: TranscriptEntry) -> dict[str, Any]:
    return {
        "type": "function_call",
        "call_id": entry.call_id,
        "name": entry.tool_name,
        "arguments": entry.arguments,
    }


def _trim_to_heard(text: str, heard_ms: int, received_ms: int) -> str:
    """The words the caller probably heard, in proportion to the audio played."""
    if received_ms <= 0 or heard_ms >= received_ms:
        return text
    words = text.split()
    return " ".join(words[: round(len(words) * heard_ms / received_ms)])
