"""Runs one phone call: the Twilio Media Stream and the Realtime session, with `Call` between.

The conversation logic lives in `bot.call` (sans-I/O); this module only moves frames and runs
timers. Per call: a Twilio reader, a Twilio writer, a pacer that wakes at `Call.next_deadline()`,
and a Realtime supervisor that owns the Realtime socket (its reader and writer), reconnects it,
rotates it before OpenAI's session limit, and redirects the call to the fallback TwiML when the
model cannot be reached. Queues are bounded both ways: caller audio for the model keeps at most
about two seconds (oldest dropped and counted), and a Twilio side that stops reading is closed.

The stream token is checked before anything is opened, so a forged or replayed stream costs
nothing at OpenAI. Whichever side ends first, every task is stopped and every Realtime socket is
closed; the end-of-call record goes to the outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState
from twilio.request_validator import RequestValidator
from websockets.exceptions import ConnectionClosed

from bot.call import (
    FRAME_MS,
    Action,
    Call,
    ClearTwilio,
    HangUp,
    Note,
    Reconnect,
    RotateSession,
    RunTool,
    Script,
    ToRealtime,
    ToTwilio,
    Transfer,
    TurnTimed,
)
from bot.feed import CallFeed
from bot.logs import CallLog, mask_phone
from bot.metrics import Metrics
from bot.pricing import Prices, add_up, tokens_by_kind
from bot.realtime import RealtimeClient, RealtimeError, RealtimeRefused, connect_realtime
from bot.realtime_events import Malformed
from bot.settings import Settings
from bot.stores import DEFAULT_STORE_ID, Destination, Store, Stores
from bot.stream_token import check_stream_token
from bot.tools import Agent, CallContext, Toolbox, ToolResult, greeting_line, outcome_of, phone_agent
from bot.twilio_rest import TwilioError, TwilioRest
from bot.twilio_stream import (
    TWILIO_MEDIA_FORMAT,
    Connected,
    Media,
    ProtocolViolation,
    Start,
    Stop,
    parse_message,
)
from bot.twiml import render_fallback_twiml, render_transfer_twiml

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 5.0
CLOSE_POLICY_VIOLATION = 1008
CLOSE_NORMAL = 1000
CLOSE_TIMEOUT_S = 2.0
JUNK_LIMIT_PER_S = 25
UPLINK_MAX_AUDIO_MS = 2000
# Media and mark messages, about 10 s of paced audio: more means Twilio stopped reading.
DOWNLINK_MAX_MESSAGES = 1000
# What a send to the phone raises once its socket is gone: closed by Twilio (WebSocketDisconnect),
# already closed by us (Starlette's RuntimeError), or reset under the transport (OSError).
TWILIO_SEND_FAILED = (WebSocketDisconnect, RuntimeError, OSError)
RECONNECT_ATTEMPTS = 2
MAX_RECONNECTS_PER_CALL = 5
ROTATION_RETRY_S = 30.0
# After a redirect or hang-up through the REST API, Twilio ends the stream; if it does not,
# the bridge closes it after this long.
CONTROL_GRACE_S = 10.0
TOOL_DRAIN_S = 10.0
# Logged once per call, however often they happen (a DTMF storm, a flood of duplicates).
ONCE_NOTES = frozenset({"dtmf_invalid_digit_ignored", "duplicate_start_ignored"})
WARNING_NOTES = frozenset({"realtime_error"})


class CallRecordSink(Protocol):
    """Where the end-of-call record goes (the durable outbox)."""

    async def add_call_completed(
        self, *, call_sid: str, caller: str, record: dict[str, Any], destination: Destination
    ) -> str | None: ...


@dataclass
class BridgeDeps:
    """What a call needs from the app; built once in the app's lifespan.

    `tools_for` gives the toolbox of a call's store; `wall_clock` (epoch seconds) is also what
    stores' opening hours are read on.
    """

    settings: Settings
    stream_key: bytes
    stores: Stores
    tools_for: Callable[[Store], Toolbox]
    twilio: TwilioRest | None = None
    outbox: CallRecordSink | None = None
    active_calls: dict[str, CallBridge] = field(default_factory=dict)
    metrics: Metrics = field(default_factory=Metrics)
    feed: CallFeed | None = None
    wall_clock: Callable[[], float] = time.time
    start_timeout_s: float = START_TIMEOUT_S
    downlink_max_messages: int = DOWNLINK_MAX_MESSAGES
    control_grace_s: float = CONTROL_GRACE_S
    # Why the last Realtime connection was refused (for /healthz); None once one succeeds.
    realtime_refusal: str | None = None
    prices: Prices = field(init=False)

    def __post_init__(self) -> None:
        self.prices = Prices.from_settings(self.settings)


async def serve_media_stream(websocket: WebSocket, deps: BridgeDeps) -> None:
    """The `/media-stream` endpoint: one Twilio Media Stream, from upgrade to close.

    Before `start` nothing is opened; every way a stream can fail to begin ends in a close frame
    (a refused upgrade in HTTP 403) and one count in `stream_rejected`, never in an exception."""
    metrics = deps.metrics
    refusal = upgrade_refusal(websocket, deps.settings)
    if refusal is not None:
        metrics.stream_rejected(refusal)
        logger.warning("media stream refused: %s", refusal.replace("_", " "), extra={"reason": refusal})
        await websocket.close(CLOSE_POLICY_VIOLATION)
        return
    await websocket.accept()
    start = await _wait_for_start(websocket, deps)
    if start is None:
        return
    call_log = CallLog(logger, call_sid=start.call_sid)
    store_id = start.custom_parameters.get("store", DEFAULT_STORE_ID)
    reason = _start_refusal(start, store_id, deps)
    if reason is not None:
        metrics.stream_rejected(reason)
        call_log.warning("media stream refused: %s", reason.replace("_", " "), extra={"reason": reason})
        await _close(websocket, CLOSE_POLICY_VIOLATION, reason.replace("_", " "))
        return
    store = deps.stores.get(store_id)
    if store is None:
        call_log.warning("the call's store left STORES_PATH as it connected: the default store answers")
        store = deps.stores.default
    bridge = CallBridge(websocket, deps, start, store)
    deps.active_calls[start.call_sid] = bridge
    try:
        await bridge.run()
    finally:
        deps.active_calls.pop(start.call_sid, None)


def upgrade_refusal(websocket: WebSocket, settings: Settings) -> str | None:
    """Why the upgrade is refused, or None. Twilio signs `wss://host/path` (no params); a present
    signature is checked whenever the auth token is known, an absent one refused only when
    REQUIRE_UPGRADE_SIGNATURE says the proxy in front keeps the header."""
    signature = websocket.headers.get("x-twilio-signature")
    if signature is None:
        return "unsigned_upgrade" if settings.require_upgrade_signature else None
    if not settings.twilio_auth_token:
        return None
    if settings.public_url:
        base = settings.public_url.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
    else:
        proto = websocket.headers.get("x-forwarded-proto", websocket.url.scheme).split(",")[0].strip()
        scheme = {"https": "wss", "http": "ws"}.get(proto, proto)
        host = websocket.headers.get("x-forwarded-host") or websocket.headers.get("host", "")
        base = f"{scheme}://{host.split(',')[0].strip()}"
    validator = RequestValidator(settings.twilio_auth_token)
    if validator.validate(base + websocket.url.path, {}, signature):
        return None
    return "bad_upgrade_signature"


def _start_refusal(start: Start, store_id: str, deps: BridgeDeps) -> str | None:
    """Why this `start` may not begin a call (the stream token, the format, a second stream)."""
    token = start.custom_parameters.get("token")
    reason = check_stream_token(deps.stream_key, token, start.call_sid, deps.wall_clock(), store_id)
    if reason is not None:
        return reason
    if start.media_format != TWILIO_MEDIA_FORMAT:
        return "unsupported_media_format"
    if start.call_sid in deps.active_calls:
        return "duplicate_call"
    return None


async def _wait_for_start(websocket: WebSocket, deps: BridgeDeps) -> Start | None:
    """Reads until `start`; media before it is ignored. None when the socket is done (closed
    here with 1008 and counted when the stream failed, with 1000 when Twilio stopped it)."""
    metrics = deps.metrics
    junk = _JunkMeter()
    try:
        async with asyncio.timeout(deps.start_timeout_s):
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return None
                parsed = parse_message(_frame(message))
                if isinstance(parsed, Start):
                    return parsed
                if isinstance(parsed, Stop):
                    logger.info("media stream stopped before start")
                    await _close(websocket, CLOSE_NORMAL, "stopped")
                    return None
                if isinstance(parsed, Media):
                    metrics.frame_before_start()
                elif isinstance(parsed, ProtocolViolation):
                    metrics.junk_frame(parsed.kind)
                    if parsed.event == "start":
                        reason = "bad_start"
                    elif junk.over_limit(time.monotonic()):
                        reason = "junk_frames"
                    else:
                        continue
                    metrics.stream_rejected(reason)
                    extra = {"reason": reason, "kind": parsed.kind}
                    logger.warning("media stream refused: %s", parsed.detail or parsed.kind, extra=extra)
                    await _close(websocket, CLOSE_POLICY_VIOLATION, reason.replace("_", " "))
                    return None
    except TimeoutError:
        metrics.stream_rejected("no_start")
        logger.warning("media stream closed: no start within %.1f s", deps.start_timeout_s)
        await _close(websocket, CLOSE_POLICY_VIOLATION, "no start")
        return None


class CallBridge:
    """One live call: the tasks around a `Call`. Created after the stream token checked out."""

    def __init__(self, websocket: WebSocket, deps: BridgeDeps, start: Start, store: Store) -> None:
        self.ws = websocket
        self.deps = deps
        self.settings = deps.settings
        self.metrics = deps.metrics
        self.feed = deps.feed
        self.store = store
        self.toolbox = deps.tools_for(store)
        self.call_sid = start.call_sid
        self.stream_sid = start.stream_sid
        params = start.custom_parameters
        self.context = CallContext(start.call_sid, params.get("caller", ""), params.get("called", ""))
        self.log = CallLog(logger, call_sid=start.call_sid)
        self._loop = asyncio.get_running_loop()
        self._started_wall = deps.wall_clock()
        transfer_key = self.settings.transfer_dtmf_key if self._can_transfer() else None
        agent = self._agent()
        self.call = Call(
            call_sid=start.call_sid,
            stream_sid=start.stream_sid,
            now_ms=self._now_ms(),
            audio_format=self.settings.audio_format,
            transfer_key=transfer_key,
            session_max_ms=int(self.settings.realtime_session_max_s * 1000),
            script=Script(agent.instructions, greeting_line(store), store.words.lines),
            idle_prompt_ms=int(self.settings.idle_prompt_s * 1000),
            idle_hang_up_ms=int(self.settings.idle_hangup_s * 1000),
        )
        self.end_reason = ""
        self.outcome: str | None = None
        self._close_code = CLOSE_NORMAL
        self._done = asyncio.Event()
        self._closing = False
        self._uplink = _Uplink(UPLINK_MAX_AUDIO_MS // FRAME_MS)
        self._down: deque[str] = deque()
        self._down_ready = asyncio.Event()
        self._down_idle = False
        self._pacer_wake = asyncio.Event()
        self._pacer_target: int | None = None
        self._rotate = asyncio.Event()
        self._client: RealtimeClient | None = None
        self._clients: set[RealtimeClient] = set()
        self._tool_tasks: set[asyncio.Task[None]] = set()
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._junk = _JunkMeter()
        self._logged_once: set[str] = set()
        self._reconnects = 0

    def _now_ms(self) -> int:
        return int(self._loop.time() * 1000)

    def _can_transfer(self) -> bool:
        return self.deps.twilio is not None and self.store.can_ever_transfer()

    def _local_now(self) -> datetime:
        return datetime.fromtimestamp(self.deps.wall_clock()).astimezone()

    def _agent(self) -> Agent:
        """The store's phone agent as of now (whether the store is open is part of what it is told)."""
        return phone_agent(self.store, self._local_now())

    # --- lifecycle --------------------------------------------------------------------

    async def run(self) -> None:
        self.metrics.call_started()
        if self.feed is not None:
            self.feed.call_started(self.call_sid, self.context.caller, self.call, store=self.store.name)
        self.log.info(
            "call started",
            extra={
                "caller": mask_phone(self.context.caller),
                "store": self.store.id,
                "audio_format": self.settings.audio_format,
                "stream_sid": self.stream_sid,
            },
        )
        tasks = [
            self._task("twilio-reader", self._guard("twilio-reader", self._read_twilio())),
            self._task("twilio-writer", self._guard("twilio-writer", self._write_twilio())),
            self._task("pacer", self._guard("pacer", self._pace())),
            self._task("realtime", self._guard("realtime", self._supervise_realtime())),
        ]
        try:
            await self._done.wait()
        finally:
            self._closing = True
            for task in tasks + list(self._side_tasks):
                task.cancel()
            await asyncio.gather(*tasks, *self._side_tasks, return_exceptions=True)
            await self._close_realtime()
            await self._drain_tools()
            await _close(self.ws, self._close_code, self.end_reason)
            await self._write_record()

    def _task(self, name: str, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Every task of a call is named `bridge-<job>-<CallSid>`, so a leak is easy to spot."""
        return self._loop.create_task(work, name=f"bridge-{name}-{self.call_sid}")

    def _finish(self, reason: str) -> None:
        if not self._done.is_set():
            self.end_reason = reason
            self._done.set()

    async def _guard(self, name: str, work: Coroutine[Any, Any, None]) -> None:
        """Any task ending ends the call; an unexpected error is logged once, with its trace."""
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception:
            self.log.exception("bridge task %s failed", name)
            self._finish(f"{name} failed")

    async def _close_realtime(self) -> None:
        for client in list(self._clients):
            with contextlib.suppress(Exception):
                await client.close()
        self._clients.clear()

    async def _drain_tools(self) -> None:
        """Lets running tools finish (a promised SMS must still be queued), within a bound."""
        if not self._tool_tasks:
            return
        _, pending = await asyncio.wait(self._tool_tasks, timeout=TOOL_DRAIN_S)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _write_record(self) -> None:
        now = self._now_ms()
        record = self.call.record(now)
        if self.outcome is not None:
            record["outcome"] = self.outcome
        record["started_at"] = datetime.fromtimestamp(self._started_wall, UTC).isoformat()
        record["store"] = self.store.id
        record["end_reason"] = self.end_reason
        record["tokens"] = add_up(tokens_by_kind(response.usage) for response in self.call.responses)
        record["cost_usd"] = round(self.deps.prices.cost_usd(record["tokens"]), 6)
        self.metrics.call_ended(record["outcome"], record["duration_s"])
        if self.feed is not None:
            self.feed.call_ended(self.call_sid, record)
        self.log.info(
            "call ended",
            extra={
                "reason": self.end_reason,
                "outcome": record["outcome"],
                "duration_s": record["duration_s"],
                "interruptions": record["interruptions"],
                "usage": record["usage"],
                "cost_usd": record["cost_usd"],
            },
        )
        if self.deps.outbox is None:
            return
        try:
            await self.deps.outbox.add_call_completed(
                call_sid=self.call_sid,
                caller=self.context.caller,
                record=record,
                destination=self.store.destination(),
            )
        except Exception:
            self.log.exception("could not queue the call.completed record")

    # --- Twilio side ------------------------------------------------------------------

    async def _read_twilio(self) -> None:
        ws = self.ws
        call = self.call
        uplink = self._uplink
        clock = self._loop.time
        while True:
            message = await ws.receive()
            # Stamped as received, before any work: a mark counts from when it came back.
            now = int(clock() * 1000)
            if message["type"] == "websocket.disconnect":
                self._finish("twilio_closed")
                return
            parsed = parse_message(_frame(message))
            if type(parsed) is Media:
                if parsed.stream_sid != self.stream_sid:
                    self._on_junk("foreign_stream")
                    continue
                if self._closing:
                    continue
                for action in call.on_media(parsed, now):
                    # Straight out when the writer waits with nothing queued, as it would send
                    # it (a task switch per frame saved); else queued for it, in order.
                    client = uplink.idle_writer()
                    if client is not None and client.try_send(action.text):
                        continue
                    if uplink.put(action):
                        self.metrics.uplink_frame_dropped()
            elif isinstance(parsed, ProtocolViolation):
                self._on_junk(parsed.kind)
            elif isinstance(parsed, Connected):
                continue
            elif parsed.stream_sid != self.stream_sid:
                # Another stream's stop, mark or start must not end, steer or restart this call.
                self._on_junk("foreign_stream")
            elif isinstance(parsed, Stop):
                self._finish("twilio_stop")
                return
            else:
                self._dispatch(call.on_twilio(parsed, now))

    def _on_junk(self, kind: str) -> None:
        self.metrics.junk_frame(kind)
        if kind not in self._logged_once:
            self._logged_once.add(kind)
            self.log.warning("malformed Media Streams frame skipped", extra={"kind": kind})
        if self._junk.over_limit(time.monotonic()):
            self.log.warning("too many malformed frames: closing the stream")
            self._close_code = CLOSE_POLICY_VIOLATION
            self._finish("junk_frames")

    async def _write_twilio(self) -> None:
        down = self._down
        ready = self._down_ready
        ws = self.ws
        while True:
            while not down:
                ready.clear()
                self._down_idle = True
                try:
                    await ready.wait()
                finally:
                    self._down_idle = False
            try:
                await ws.send_text(down.popleft())
            except TWILIO_SEND_FAILED:
                self._finish("twilio_closed")
                return

    def _to_twilio(self, text: str) -> None:
        if self._down_idle and not self._down and self._send_now(text):
            return
        if len(self._down) >= self.deps.downlink_max_messages:
            if not self._done.is_set():
                self.log.warning("Twilio stopped reading: closing the stream")
                self._finish("twilio_stuck")
            return
        self._down.append(text)
        self._down_ready.set()

    def _send_now(self, text: str) -> bool:
        """Sends from the calling task what the idle writer would send next, unless the send
        would wait: waking the writer costs a turn of the event loop, tens of ms with a hundred
        calls on a core (the peer benchmark's down-link p99 at N=100: 71 ms queued, 30 direct).

        uvicorn's send (the websockets-sansio implementation, which `serve` and the tests pin)
        waits only while the transport has paused writing, and before it writes anything; a send
        that would wait is dropped unsent, and False says to queue the message instead. True when
        sent, or when the socket turned out closed (the call is then ending)."""
        sending = self.ws.send_text(text)
        try:
            sending.send(None)
        except StopIteration:
            return True
        except TWILIO_SEND_FAILED:
            self._finish("twilio_closed")
            return True
        sending.close()
        return False

    # --- the pacer --------------------------------------------------------------------

    async def _pace(self) -> None:
        """Calls `Call.tick` at its deadlines; `_dispatch` wakes it when one moves earlier.

        `next_deadline()` is asked once per wake-up: a wake-up by `_dispatch` only asks again,
        and `tick` at a deadline that has since moved is harmless (it does only what is due)."""
        call = self.call
        wake = self._pacer_wake
        while True:
            deadline = call.next_deadline()
            self._pacer_target = deadline
            wake.clear()
            if deadline is None:
                await wake.wait()
                continue
            delay_s = (deadline - self._now_ms()) / 1000
            if delay_s > 0:
                try:
                    async with asyncio.timeout(delay_s):
                        await wake.wait()
                    continue
                except TimeoutError:
                    pass
            self._carry_out(call.tick(self._now_ms()))

    # --- actions ----------------------------------------------------------------------

    def _dispatch(self, actions: list[Action]) -> None:
        """Carries out what the call asked for, then wakes the pacer if its deadline moved
        earlier."""
        if self._closing:
            return
        self._carry_out(actions)
        target = self._pacer_target
        deadline = self.call.next_deadline()
        if deadline is not None and (target is None or deadline < target):
            self._pacer_wake.set()

    def _carry_out(self, actions: list[Action]) -> None:
        """Carries out what the call asked for, in order; nothing here blocks."""
        if self._closing:
            return
        for action in actions:
            if type(action) is ToTwilio:
                self._to_twilio(action.text)
            elif isinstance(action, ToRealtime):
                if self._uplink.put(action):
                    self.metrics.uplink_frame_dropped()
            elif isinstance(action, Note):
                self._log_note(action)
                self._observe(action)
            elif isinstance(action, ClearTwilio):
                self._down.clear()
                self._to_twilio(action.text)
            elif isinstance(action, RunTool):
                task = self._task("tool", self._run_tool(action))
                self._tool_tasks.add(task)
                task.add_done_callback(self._tool_tasks.discard)
            elif isinstance(action, Transfer):
                self._side(self._transfer(action))
            elif isinstance(action, HangUp):
                self._side(self._hang_up(action))
            elif isinstance(action, RotateSession):
                self._rotate.set()
            elif isinstance(action, Reconnect):
                self.log.info("Realtime session must be replaced", extra={"reason": action.reason})
                if self._client is not None:
                    self._side(self._client.close())
            elif isinstance(action, TurnTimed):
                self.metrics.turn_timed(action.latency_ms, action.bot_ms)
                if self.feed is not None:
                    self.feed.turn_timed(self.call_sid, action.latency_ms, action.bot_ms)

    def _side(self, work: Coroutine[Any, Any, None]) -> None:
        task = self._task("side", self._guard("side", work))
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    def _log_note(self, note: Note) -> None:
        if note.event in ONCE_NOTES:
            if note.event in self._logged_once:
                return
            self._logged_once.add(note.event)
        level = logging.WARNING if note.event in WARNING_NOTES else logging.INFO
        self.log.log(level, note.event, extra=note.fields)

    def _observe(self, note: Note) -> None:
        """The notes /metrics counts: once per barge-in, once per model response."""
        if note.event == "barge_in":
            self.metrics.barge_in(note.fields["truncated"])
        elif note.event == "response_done":
            tokens = tokens_by_kind(note.fields["usage"])
            self.metrics.response_priced(tokens, self.deps.prices.cost_usd(tokens))

    async def _run_tool(self, action: RunTool) -> None:
        started_ms = self._now_ms()
        try:
            result = await self.toolbox.run(action.name, action.arguments, self.context)
        except Exception:
            self.log.exception("tool %s raised", action.name)
            result = ToolResult(
                json.dumps({"error": "The tool failed. Apologise and offer to help otherwise."})
            )
        now = self._now_ms()
        if self.feed is not None:
            self._show_tool(self.feed, action, result, started_ms, now)
        self._dispatch(self.call.on_tool_result(action.call_id, result, now))

    def _show_tool(
        self, feed: CallFeed, action: RunTool, result: ToolResult, started_ms: int, now_ms: int
    ) -> None:
        """The console's line for a tool call, and the cards of the products it sent."""
        outcome = outcome_of(result.output)
        at_ms = started_ms - self.call.started_ms
        feed.tool_ran(
            self.call_sid, action.name, action.arguments, outcome=outcome, at_ms=at_ms, ms=now_ms - started_ms
        )
        if result.collection is not None:
            feed.products_sent(self.call_sid, result.collection)

    async def _transfer(self, action: Transfer) -> None:
        twilio, number = self.deps.twilio, self.store.transfer_to(self._local_now())
        if twilio is None or number is None:
            self.log.warning(
                "transfer asked for but nobody to take it (Twilio credentials, store number, hours)"
            )
            self._dispatch(self.call.transfer_failed(self._now_ms()))
            return
        twiml = render_transfer_twiml(number, self.store.words.code)
        try:
            await twilio.update_call(self.call_sid, twiml=twiml)
        except TwilioError as exc:
            self.log.warning("transfer failed: %s", exc)
            self._dispatch(self.call.transfer_failed(self._now_ms()))
            return
        self.outcome = "transferred"
        self.log.info("call transferred to the store", extra={"reason": action.reason})
        await self._await_stream_end()

    async def _hang_up(self, action: HangUp) -> None:
        twilio = self.deps.twilio
        self.outcome = self.call.outcome or "ended_by_bot"
        if twilio is None:
            self.log.info("no Twilio credentials: ending the call by closing the stream")
            self._finish("ended_by_bot")
            return
        try:
            await twilio.update_call(self.call_sid, status="completed")
        except TwilioError as exc:
            self.log.warning("hang-up through the Calls API failed: %s", exc)
            self._finish("ended_by_bot")
            return
        self.log.info("call ended by the bot", extra={"reason": action.reason})
        await self._await_stream_end()

    async def _await_stream_end(self) -> None:
        """Twilio stops the stream after a redirect or hang-up; close it if it does not."""
        await asyncio.sleep(self.deps.control_grace_s)
        self._finish("stream_not_ended_by_twilio")

    async def _fall_back(self, why: str) -> None:
        """The model is out of reach: hand the live call to the fallback TwiML (or the rest of
        the stream TwiML, which plays once the socket closes)."""
        self.outcome = "fallback"
        self._dispatch(self.call.session_lost(self._now_ms()))
        twilio = self.deps.twilio
        if twilio is not None:
            number = self.store.transfer_to(self._local_now())
            twiml = render_fallback_twiml(number, self.store.words.code)
            try:
                await twilio.update_call(self.call_sid, twiml=twiml)
            except TwilioError as exc:
                self.log.warning("fallback redirect failed: %s", exc)
            else:
                self.metrics.fallback_redirected()
                self.log.warning("call redirected to the fallback TwiML", extra={"why": why})
                await self._await_stream_end()
                return
        self.log.warning("closing the stream so the TwiML after <Connect> plays", extra={"why": why})
        self._finish("fallback")

    # --- the Realtime side ------------------------------------------------------------

    async def _supervise_realtime(self) -> None:
        settings = self.settings
        try:
            async with asyncio.timeout(settings.realtime_reconnect_timeout_s):
                client = await connect_realtime(settings, self._agent())
        except RealtimeRefused as exc:
            self.metrics.realtime_refused()
            self.deps.realtime_refusal = f"HTTP {exc.status}"
            self.log.error("Realtime API refused the connection: %s", exc)
            await self._fall_back("realtime_refused")
            return
        except (RealtimeError, TimeoutError) as exc:
            self.log.error("Realtime API unreachable: %s", exc or "timed out")
            await self._fall_back("realtime_unreachable")
            return
        self.deps.realtime_refusal = None
        while True:
            self._client = client
            self._clients.add(client)
            self._dispatch(self.call.session_opened(self._now_ms()))
            replacement = await self._run_session(client)
            if replacement is not None:
                self.metrics.realtime_rotated()
                self.log.info("Realtime session rotated")
                self._clients.discard(client)
                self._side(client.close())
                client = replacement
                continue
            self.log.warning(
                "Realtime socket closed",
                extra={"close_code": client.close_code, "close_reason": client.close_reason},
            )
            self._clients.discard(client)
            self._client = None
            self._dispatch(self.call.session_lost(self._now_ms()))
            self._reconnects += 1
            self.metrics.realtime_reconnected()
            if self._reconnects > MAX_RECONNECTS_PER_CALL:
                await self._fall_back("realtime_unstable")
                return
            try:
                async with asyncio.timeout(settings.realtime_reconnect_timeout_s):
                    client = await connect_realtime(settings, self._agent(), attempts=RECONNECT_ATTEMPTS)
            except (RealtimeError, TimeoutError) as exc:
                self.log.error("Realtime reconnect failed: %s", exc or "timed out")
                await self._fall_back("realtime_lost")
                return
            self._uplink.clear()
            self.log.info("Realtime reconnected: restoring the conversation")

    async def _run_session(self, client: RealtimeClient) -> RealtimeClient | None:
        """Pumps one session until its socket ends (None) or it is replaced (the new client).

        A rotation opens the next session while this one still runs, so the caller hears no gap.
        """
        reader = self._task("realtime-reader", self._read_realtime(client))
        writer = self._task("realtime-writer", self._write_realtime(client))
        try:
            while True:
                rotate = self._loop.create_task(self._rotate.wait(), name=f"bridge-rotate-{self.call_sid}")
                try:
                    await asyncio.wait({reader, rotate}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    rotate.cancel()
                if reader.done():
                    reader.result()
                    return None
                self._rotate.clear()
                replacement = await self._open_next_session()
                if replacement is not None:
                    return replacement
        finally:
            for task in (reader, writer):
                task.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)

    async def _open_next_session(self) -> RealtimeClient | None:
        try:
            async with asyncio.timeout(self.settings.realtime_reconnect_timeout_s):
                return await connect_realtime(self.settings, self._agent(), attempts=RECONNECT_ATTEMPTS)
        except (RealtimeError, TimeoutError) as exc:
            self.log.warning("Realtime session rotation failed, keeping the old one: %s", exc)
            self.call.rotation_failed(self._now_ms(), retry_in_ms=int(ROTATION_RETRY_S * 1000))
            return None

    async def _read_realtime(self, client: RealtimeClient) -> None:
        call = self.call
        async for event in client.events():
            if isinstance(event, Malformed):
                self._on_realtime_junk(event)
            else:
                self._dispatch(call.on_realtime(event, self._now_ms()))

    def _on_realtime_junk(self, event: Malformed) -> None:
        """OpenAI's side sent something unusable: counted, logged once per kind, and ignored."""
        self.metrics.realtime_junk_event(event.kind)
        once = "realtime:" + event.kind
        if once not in self._logged_once:
            self._logged_once.add(once)
            self.log.warning(
                "malformed Realtime event skipped", extra={"kind": event.kind, "detail": event.detail}
            )

    async def _write_realtime(self, client: RealtimeClient) -> None:
        uplink = self._uplink
        with contextlib.suppress(ConnectionClosed, OSError):
            while True:
                await client.send(await uplink.get(client))


class _Uplink:
    """Client events for Realtime: control events kept in order, audio bounded (oldest dropped).

    While a session's writer waits on an empty queue (`idle_writer`), the Twilio reader may send
    a caller frame itself, still in order, rather than wake the writer for it."""

    __slots__ = ("_audio", "_control", "_idle", "_max_audio", "_ready")

    def __init__(self, max_audio: int) -> None:
        self._control: deque[str] = deque()
        self._audio: deque[str] = deque()
        self._max_audio = max_audio
        self._ready = asyncio.Event()
        self._idle: RealtimeClient | None = None

    def put(self, action: ToRealtime) -> bool:
        """Queues the event; True when an old audio frame had to be dropped for it."""
        dropped = False
        if action.audio:
            if len(self._audio) >= self._max_audio:
                self._audio.popleft()
                dropped = True
            self._audio.append(action.text)
        else:
            self._control.append(action.text)
        self._ready.set()
        return dropped

    async def get(self, client: RealtimeClient) -> str:
        """The next event for `client`'s writer, waiting (idle) while there is none."""
        while not self._control and not self._audio:
            self._ready.clear()
            self._idle = client
            try:
                await self._ready.wait()
            finally:
                if self._idle is client:
                    self._idle = None
        return self._control.popleft() if self._control else self._audio.popleft()

    def idle_writer(self) -> RealtimeClient | None:
        """The session whose writer waits with nothing queued, if one does."""
        if self._control or self._audio:
            return None
        return self._idle

    def clear(self) -> None:
        self._control.clear()
        self._audio.clear()


class _JunkMeter:
    """Counts malformed frames per second: a few are noise, a flood is an attack or a bug."""

    __slots__ = ("_count", "_window_start")

    def __init__(self) -> None:
        self._window_start = 0.0
        self._count = 0

    def over_limit(self, now_s: float) -> bool:
        if now_s - self._window_start >= 1.0:
            self._window_start = now_s
            self._count = 0
        self._count += 1
        return self._count > JUNK_LIMIT_PER_S


def _frame(message: Mapping[str, Any]) -> str | bytes:
    text = message.get("text")
    if text is not None:
        return str(text)
    data = message.get("bytes")
    return bytes(data) if data is not None else b""


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    """Closes the Twilio socket if it is still open; a peer that already left is fine."""
    if websocket.application_state == WebSocketState.DISCONNECTED:
        return
    if websocket.client_state == WebSocketState.DISCONNECTED:
        return
    # A peer that stopped reading never takes the close frame: give up on it rather than
    # leave the call (its record, its slot in active_calls) hanging forever.
    with contextlib.suppress(*TWILIO_SEND_FAILED, TimeoutError):
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await websocket.close(code, reason)
