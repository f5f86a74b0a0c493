"""Load benchmark: N concurrent simulated calls against one bot process, over real sockets.

    python3 bench/calls.py --calls 1,50,250,400 --audio-format pcm16 --seconds 60
    python3 bench/calls.py --smoke        # a few calls per audio format, < 30 s, for CI

The bot runs as a subprocess (`python -m bot serve`'s code path, under a thin wrapper that adds
an event-loop lag probe) pinned to core 0 with `taskset`; this process, pinned to the other
cores, runs the Realtime and Twilio REST simulators and N simulated phones that talk in real time
(one 20 ms frame every 20 ms, utterances with pauses, the bot answering each turn). Calls start
staggered over a ramp; the figures come from a window in which all N calls are up.

What is measured, and how (every timestamp is `time.monotonic()` in this process):
- up-link added latency: a phone's media frame written to its socket -> the matching
  `input_audio_buffer.append` read by the Realtime simulator. Each frame becomes one append, in
  order, so appends are matched to frames by position: the offset is the largest one that keeps
  every append after its frame (frames queued before the Realtime socket opened are dropped by
  design and shift the offset once; a frame lost mid-call shifts it again and is counted).
- down-link added latency: a `response.output_audio.delta` written by the simulator -> the first
  Twilio media frame holding its audio read by the phone. Frames are matched to deltas through the
  mark the bot sends after every message (`generation:ms_sent:item_id`): the first frame of the item
  whose mark passes the delta's start offset. The bot paces audio at up to 2x real time on
  purpose, so with a model faster than that, later deltas of a reply wait for playback; "first"
  is the first delta of each reply (never paced), "all" is every delta. The simulated model
  streams at `--model-speed` times real time (1.0 by default, so no delta is held by pacing).
- app CPU seconds per call-minute (utime+stime of the app process over the window), resident
  memory per call ((mean RSS in the window - RSS after a warm-up call) / N), app event-loop lag
  (a 50 ms timer's overshoot inside the app), and this process's own CPU and loop lag: when the
  load generator saturates its core, the latencies include its own delays, and the table says so.
- frames lost: frames sent vs appends received, minus those dropped by design (before the
  Realtime socket opened, in flight at hang-up); bot audio bytes the simulator sent vs the phones
  received (in mu-law bytes; replies cut by a barge-in, or by a hang-up while they still played,
  are left out); Realtime sockets still open after every call hung up and a grace period.
- cross-talk: each phone must hear audio from exactly one Realtime session (by the item ids in
  the marks it gets), and no two phones from the same one.
- the app's file descriptors: before the calls (after the warm-up), at their peak, and after every
  call hung up and a grace period, which must be back to the first figure.

Exit status: 1 on a functional failure (a call that failed, a frame or byte lost, cross-talk, a
socket or file descriptor left open), never on timing.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import gc
import math
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO_DIR = Path(__file__).resolve().parent.parent
if str(REPO_DIR) not in sys.path:
    sys.path.insert(0, str(REPO_DIR))

from bot.sim.phone import CallEnded, CallNotConnected, PhoneCall, dial  # noqa: E402
from bot.sim.realtime import RealtimeSimulator, Scenario, Turn  # noqa: E402
from bot.sim.twilio_api import TwilioApiSimulator  # noqa: E402
from bot.wav import read_wav  # noqa: E402

AUDIO_DIR = REPO_DIR / "bot" / "sim" / "audio"
CALLER_WAVS = (
    "caller_washers.wav",
    "caller_text_me.wav",
    "caller_dryers.wav",
    "caller_person.wav",
    "caller_large_family.wav",
)
SIM_API_KEY = "sk-sim-bench"
APP_CORE = 0
MULAW_BYTES_PER_MS = 8
MODEL_BYTES_PER_MS = {"pcm16": 48, "pcmu": 8}
PAUSE_MS = 400
QUIET_MS = 600
REPLY_TIMEOUT_S = 20.0
FRAME_S = 0.02
# Calls start this far apart: 0.618 of a frame (the golden ratio) spreads their 20 ms frame
# clocks evenly over the frame period, as independent real calls are; a whole frame would line
# every call's frames up into one burst per 20 ms.
RAMP_PER_CALL_S = FRAME_S * (math.sqrt(5) - 1) / 2
SETTLE_S = 2.0
SOCKET_GRACE_S = 2.0
# uvicorn closes an idle keep-alive connection after 5 s.
FDS_GRACE_S = 7.0
POLL_S = 0.05
BACKGROUND_SAMPLE_S = 1.0
# A process using this share of its core (or whose loop lags a frame) is at its limit.
SATURATED_SHARE = 0.85
# Below this many calls the app's idle work (timers, probes) skews a per-call extrapolation.
CAPACITY_MIN_CALLS = 10
APP_START_TIMEOUT_S = 30.0
APP_STOP_TIMEOUT_S = 15.0
LAG_PROBE_S = 0.05
RSS_SAMPLE_S = 1.0
# A phone writes its frame event just after the send returns; allow that much reordering.
CAUSALITY_SLACK_S = 0.001
# Frames sent this close to the hang-up may still be in the bot's queue when `stop` ends the call.
HANGUP_INFLIGHT_S = 0.1
# A reply whose audio was still arriving this shortly before the hang-up was cut, not lost
# (only an overloaded run hangs up mid-reply: the caller takes a late gap for the end of it).
HANGUP_CUT_S = 3.0
APPEND_PREFIX = '{"type":"input_audio_buffer.append"'
DELTA_PREFIX = '{"type": "response.output_audio.delta"'
SMOKE_CALLS = 3
# The smoke window starts with the calls, so it holds the greetings (deltas) and caller audio.
SMOKE_SECONDS = 2.0


# --- the scripted model -------------------------------------------------------------------


def bench_scenario() -> Scenario:
    """A short greeting and short replies, so turns come quickly and both directions carry audio."""
    replies = (
        ("We have three washers in stock. Want the details?", 2000),
        ("Sure, I'll text them to you now.", 1500),
        ("The dryers start at four hundred dollars.", 1800),
        ("Of course, one moment please.", 1200),
        ("For a family of five, the large one fits best.", 2200),
    )
    return Scenario(
        greeting="Hi, how can I help?",
        turns=[Turn(say=text, audio_ms=ms) for text, ms in replies],
        fallback_say="Sorry, could you say that again?",
    )


# --- tracing the Realtime simulator's wire --------------------------------------------------


@dataclass(slots=True)
class Delta:
    """One audio delta as the simulator wrote it: where it starts in its item, in model ms."""

    item_id: str
    start_ms: float
    mulaw_bytes: int
    t: float


@dataclass(slots=True)
class SessionTrace:
    """One Realtime socket seen from the simulator: append arrival times and deltas sent."""

    append_t: list[float] = field(default_factory=list)
    deltas: list[Delta] = field(default_factory=list)
    item_bytes: dict[str, int] = field(default_factory=dict)


class TracedRealtimeSimulator(RealtimeSimulator):
    """The Realtime simulator, timing each append it reads and each audio delta it writes.

    The hooks wrap the socket's `recv` and `send` per connection: the wire and the protocol stay
    the simulator's own; per message they cost a prefix test (and a few `find`s per delta).
    """

    def __init__(self, scenario: Scenario, *, model_bytes_per_ms: int, **kwargs: Any) -> None:
        super().__init__(scenario, **kwargs)
        self.traces: list[SessionTrace] = []
        self._model_bytes_per_ms = model_bytes_per_ms

    async def _handle(self, ws: Any) -> None:
        trace = SessionTrace()
        self.traces.append(trace)
        recv, send = ws.recv, ws.send
        monotonic = time.monotonic
        appends = trace.append_t

        async def timed_recv(decode: bool | None = None) -> Any:
            message = await recv(decode)
            if isinstance(message, str) and message.startswith(APPEND_PREFIX):
                appends.append(monotonic())
            return message

        async def timed_send(message: Any, text: bool | None = None) -> None:
            await send(message, text=text)
            if isinstance(message, str) and message.startswith(DELTA_PREFIX):
                self._record_delta(trace, message, monotonic())

        ws.recv, ws.send = timed_recv, timed_send
        await super()._handle(ws)

    def _record_delta(self, trace: SessionTrace, message: str, t: float) -> None:
        item_id = _json_string_field(message, "item_id")
        b64 = _json_string_field(message, "delta")
        size = len(b64) * 3 // 4 - b64[-2:].count("=")
        done = trace.item_bytes.get(item_id, 0)
        trace.item_bytes[item_id] = done + size
        per_ms = self._model_bytes_per_ms
        trace.deltas.append(Delta(item_id, done / per_ms, size * MULAW_BYTES_PER_MS // per_ms, t))


def _json_string_field(message: str, name: str) -> str:
    """The value of `"name": "..."` in json.dumps output (ids and base64 need no unescaping)."""
    key = f'"{name}": "'
    start = message.index(key) + len(key)
    return message[start : message.index('"', start)]


# --- the app process -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pinning() -> tuple[list[str], set[int] | None]:
    """(`taskset` prefix for the app, cores for this process), or no pinning on one core."""
    cores = sorted(os.sched_getaffinity(0))
    taskset = shutil.which("taskset")
    if taskset is None or len(cores) < 2 or APP_CORE not in cores:
        return [], None
    return [taskset, "-c", str(APP_CORE)], {c for c in cores if c != APP_CORE}


class AppProcess:
    """The bot, started as `python3 bench/calls.py --serve-app` (= `python -m bot serve` + probe)."""

    def __init__(self, env: dict[str, str], workdir: Path, port: int, taskset: list[str]) -> None:
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.lag_path = workdir / "app-lag.txt"
        command = [
            *taskset,
            sys.executable,
            str(Path(__file__).resolve()),
            "--serve-app",
            str(port),
            "--lag-file",
            str(self.lag_path),
        ]
        self._log = open(workdir / "app.log", "wb")
        self.proc = subprocess.Popen(
            command, env=env, cwd=workdir, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.log_path = workdir / "app.log"

    async def wait_ready(self, http: httpx.AsyncClient) -> None:
        deadline = time.monotonic() + APP_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app exited with {self.proc.returncode}: {self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(self.base_url + "/healthz")).status_code == 200:
                    return
            await asyncio.sleep(POLL_S)
        raise RuntimeError(f"app not ready after {APP_START_TIMEOUT_S:.0f} s: {self.log_tail()}")

    async def active_calls(self, http: httpx.AsyncClient) -> int | None:
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            body = (await http.get(self.base_url + "/healthz")).json()
            return int(body["calls"]["active"])
        return None

    def cpu_s(self) -> float:
        """utime + stime of the app process, all threads, in seconds."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def lag_samples(self, start: float, end: float) -> list[float]:
        """The app's loop lag samples (ms) taken between two monotonic times."""
        if not self.lag_path.exists():
            return []
        samples = []
        for line in self.lag_path.read_text().splitlines():
            t, _, lag = line.partition(" ")
            with contextlib.suppress(ValueError):
                if start <= float(t) <= end:
                    samples.append(float(lag))
        return samples

    def log_tail(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-2000:]

    async def stop(self) -> None:
        """SIGTERM (uvicorn shuts down gracefully), then SIGKILL if it takes too long."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, APP_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait)
        self._log.close()


def serve_app(port: int, lag_file: Path) -> int:
    """The app subprocess: `bot.app.main` (what `python -m bot serve` runs) plus a lag probe."""
    import uvicorn

    from bot import app as bot_app

    serve = uvicorn.Server.serve

    async def serve_with_probe(self: uvicorn.Server, sockets: list[socket.socket] | None = None) -> None:
        probe = asyncio.create_task(lag_probe(LagFile(lag_file).record))
        try:
            await serve(self, sockets)
        finally:
            probe.cancel()

    uvicorn.Server.serve = serve_with_probe  # type: ignore[method-assign]
    return bot_app.main(["--host", "127.0.0.1", "--port", str(port)])


async def lag_probe(record: Callable[[float, float], None]) -> None:
    """Measures how late a 50 ms timer fires: how long every other callback had to wait too."""
    loop = asyncio.get_running_loop()
    while True:
        before = loop.time()
        await asyncio.sleep(LAG_PROBE_S)
        record(time.monotonic(), (loop.time() - before - LAG_PROBE_S) * 1000)


class LagFile:
    """The app's lag samples as `monotonic_s lag_ms` lines, written about once a second."""

    def __init__(self, path: Path) -> None:
        self._out = open(path, "a", encoding="ascii")
        self._lines: list[str] = []

    def record(self, t: float, lag_ms: float) -> None:
        self._lines.append(f"{t:.6f} {lag_ms:.3f}\n")
        if len(self._lines) * LAG_PROBE_S >= 1:
            self._out.write("".join(self._lines))
            self._out.flush()
            self._lines.clear()


# --- callers ---------------------------------------------------------------------------------


@dataclass(slots=True)
class CallTrace:
    """What one phone did and saw, on the shared monotonic clock."""

    index: int
    t0: float = 0.0
    call: PhoneCall | None = None
    turns: int = 0
    failure: str = ""

    @property
    def ok(self) -> bool:
        call = self.call
        return (
            not self.failure
            and call is not None
            and not call.protocol_errors
            and not call.closed_by_app
            and self.turns > 0
        )


@dataclass(frozen=True, slots=True)
class Plan:
    """When each call starts and until when it keeps taking turns."""

    first_start: float
    ramp_step_s: float
    window_start: float
    window_end: float


async def run_caller(
    trace: CallTrace,
    app: AppProcess,
    twilio: TwilioApiSimulator,
    utterances: Sequence[bytes],
    http: httpx.AsyncClient,
    plan: Plan,
) -> None:
    """Dials, hears the greeting, then says utterances and hears replies until the window ends."""
    await asyncio.sleep(max(0.0, plan.first_start + trace.index * plan.ramp_step_s - time.monotonic()))
    trace.t0 = time.monotonic()
    call = await dial(
        app.base_url,
        account_sid=twilio.account_sid,
        auth_token=twilio.auth_token,
        caller=f"+1555{trace.index:07d}",
        http=http,
    )
    trace.call = call
    try:
        if not call.connected:
            trace.failure = call.outcome
            return
        await call.wait_for_audio(REPLY_TIMEOUT_S)
        await call.wait_until_quiet(QUIET_MS, REPLY_TIMEOUT_S)
        while trace.turns == 0 or time.monotonic() < plan.window_end:
            await call.silence(PAUSE_MS)
            await call.say(utterances[(trace.index + trace.turns) % len(utterances)])
            await call.wait_for_audio(REPLY_TIMEOUT_S)
            await call.wait_until_quiet(QUIET_MS, REPLY_TIMEOUT_S)
            trace.turns += 1
    except (TimeoutError, CallEnded, CallNotConnected) as exc:
        trace.failure = f"turn {trace.turns + 1}: {type(exc).__name__} {exc}"
    finally:
        await call.hang_up()


# --- analysis -------------------------------------------------------------------------------


@dataclass(slots=True)
class Uplink:
    latencies_ms: list[float] = field(default_factory=list)
    frames: int = 0
    appends: int = 0
    before_session: int = 0
    at_hangup: int = 0
    lost: int = 0
    extra: int = 0


@dataclass(slots=True)
class Downlink:
    first_ms: list[float] = field(default_factory=list)
    all_ms: list[float] = field(default_factory=list)
    sent_bytes: int = 0
    received_bytes: int = 0
    cleared_items: int = 0
    lost_bytes: int = 0
    cut_bytes: int = 0


@dataclass(slots=True)
class PhoneView:
    """A phone's events, in absolute time: frames out, messages in grouped by the mark after each."""

    frames_out: list[float]
    hangup_t: float
    frames_in: dict[str, list[tuple[float, float]]]  # item -> [(ms sent after frame, arrival)]
    bytes_in: dict[str, int]
    clears: int


def phone_view(trace: CallTrace) -> PhoneView:
    call = trace.call
    assert call is not None
    frames_out: list[float] = []
    frames_in: dict[str, list[tuple[float, float]]] = defaultdict(list)
    bytes_in: dict[str, int] = defaultdict(int)
    hangup_t = math.inf
    clears = 0
    last_media_t = 0.0
    pending_bytes = 0
    for event in call.events:
        t = trace.t0 + event.t
        if event.direction == "out":
            if event.kind == "media":
                frames_out.append(t)
            elif event.kind in ("stop", "close") and hangup_t == math.inf:
                hangup_t = t
        elif event.kind == "media":
            last_media_t = t
            pending_bytes += int(event.detail)
        elif event.kind == "mark":
            parts = event.detail.split(":", 2)
            if len(parts) == 3 and parts[1].isdigit():
                frames_in[parts[2]].append((float(parts[1]), last_media_t))
                bytes_in[parts[2]] += pending_bytes
            pending_bytes = 0
        elif event.kind == "clear":
            clears += 1
    return PhoneView(frames_out, hangup_t, frames_in, bytes_in, clears)


def analyse_uplink(view: PhoneView, appends: list[float], window: tuple[float, float], out: Uplink) -> None:
    """Matches appends to frames by position (see the module docstring) and counts the gaps."""
    t = np.asarray(view.frames_out)
    r = np.asarray(appends)
    n, m = len(t), len(r)
    out.frames += n
    out.appends += m
    if m == 0 or n == 0:
        out.lost += n
        return
    # For each append, the largest offset that keeps it after its frame; offsets only grow
    # along the call (a dropped frame adds one), so take the running minimum from the end.
    causal = np.searchsorted(t, r + CAUSALITY_SLACK_S, side="right") - 1 - np.arange(m)
    offsets = np.minimum.accumulate(causal[::-1])[::-1]
    if offsets[0] < 0:
        out.extra += int(-offsets[0])
        offsets = np.maximum(offsets, 0)
    matched = np.arange(m) + offsets
    valid = matched < n
    latencies = (r[valid] - t[matched[valid]]) * 1000
    in_window = (t[matched[valid]] >= window[0]) & (t[matched[valid]] <= window[1])
    out.latencies_ms.extend(latencies[in_window].tolist())
    out.before_session += int(offsets[0])
    out.lost += int(offsets[-1] - offsets[0])
    trailing = n - int(matched[-1]) - 1
    in_flight = 0
    if trailing > 0:
        in_flight = int(np.count_nonzero(t[n - trailing :] >= view.hangup_t - HANGUP_INFLIGHT_S))
    out.at_hangup += in_flight
    out.lost += max(0, trailing - in_flight)
    out.extra += max(0, -trailing)


def analyse_downlink(
    view: PhoneView, session: SessionTrace, window: tuple[float, float], out: Downlink
) -> None:
    """Matches each delta to the first frame of its item whose mark passes the delta's start."""
    out.cleared_items += view.clears
    sent_ms = {item: [ms for ms, _ in frames] for item, frames in view.frames_in.items()}
    sent_by_item: dict[str, int] = defaultdict(int)
    last_sent: dict[str, float] = {}
    for delta in session.deltas:
        sent_by_item[delta.item_id] += delta.mulaw_bytes
        last_sent[delta.item_id] = delta.t
        frames = view.frames_in.get(delta.item_id)
        if not frames or not window[0] <= delta.t <= window[1]:
            continue
        index = bisect.bisect_right(sent_ms[delta.item_id], delta.start_ms)
        if index == len(frames):
            continue  # never played: cut by a barge-in
        latency = (frames[index][1] - delta.t) * 1000
        out.all_ms.append(latency)
        if delta.start_ms == 0:
            out.first_ms.append(latency)
    if view.clears:
        return  # a barge-in flushed audio on purpose: the byte count cannot balance
    for item_id, sent in sent_by_item.items():
        received = view.bytes_in.get(item_id, 0)
        if received < sent and view.hangup_t < last_sent[item_id] + HANGUP_CUT_S:
            out.cut_bytes += sent - received  # the caller hung up while it was still playing
            continue
        out.sent_bytes += sent
        out.received_bytes += received
        out.lost_bytes += max(0, sent - received)


# --- one run -------------------------------------------------------------------------------


@dataclass(slots=True)
class RunResult:
    mode: str
    calls: int
    ok_calls: int = 0
    failures: list[str] = field(default_factory=list)
    window_s: float = 0.0
    up: Uplink = field(default_factory=Uplink)
    down: Downlink = field(default_factory=Downlink)
    turn_latency_s: list[float] = field(default_factory=list)
    app_cpu_s: float = 0.0
    rss_idle_kb: int = 0
    rss_window_kb: float = 0.0
    app_lag_ms: list[float] = field(default_factory=list)
    bench_cpu_s: float = 0.0
    bench_lag_ms: list[float] = field(default_factory=list)
    core_busy: dict[str, float] = field(default_factory=dict)
    background_busy: dict[str, float] = field(default_factory=dict)
    appends_in_window: int = 0
    sockets_left: int = 0
    app_active_after: int | None = None
    unmatched_calls: int = 0
    cross_talk: int = 0
    fds_idle: int = 0
    fds_peak: int = 0
    fds_after: int = 0
    loose_errors: Counter[str] = field(default_factory=Counter)

    @property
    def functional_failure(self) -> bool:
        return bool(
            self.ok_calls < self.calls
            or self.up.lost
            or self.up.extra
            or self.down.lost_bytes
            or self.sockets_left
            or self.app_active_after
            or self.unmatched_calls
            or self.cross_talk
            or self.fds_after > self.fds_idle
        )


def cpu_ticks() -> dict[str, tuple[int, int]]:
    """(busy, total) jiffies per core, from /proc/stat, to see what else ran on each core."""
    ticks: dict[str, tuple[int, int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name != "cpu":
            numbers = [int(v) for v in values[:8]]
            idle = numbers[3] + numbers[4]
            ticks[name] = (sum(numbers) - idle, sum(numbers))
    return ticks


def self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Millions of trace objects make a full collection a pause of this process; refcounting
    frees nearly everything anyway, and the leftovers go at the end."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()


@contextlib.contextmanager
def loose_errors_counted(into: Counter[str]) -> Iterator[None]:
    """Counts errors nobody awaited (a simulator task ended by a socket the app closed) instead
    of printing a traceback for each: under overload there are hundreds."""
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()

    def count(_: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exception = context.get("exception")
        into[type(exception).__name__ if exception else context.get("message", "?")] += 1

    loop.set_exception_handler(count)
    try:
        yield
    finally:
        loop.set_exception_handler(previous)


async def run_load(
    calls: int,
    mode: str,
    seconds: float,
    *,
    model_speed: float,
    smoke: bool,
    taskset: list[str],
) -> RunResult:
    """One app process, N calls in one audio format; warm-up first unless `smoke`."""
    result = RunResult(mode, calls)
    utterances = [read_wav(AUDIO_DIR / name).data for name in CALLER_WAVS]
    realtime = TracedRealtimeSimulator(
        bench_scenario(),
        api_key=SIM_API_KEY,
        audio_speed=model_speed,
        model_bytes_per_ms=MODEL_BYTES_PER_MS[mode],
    )
    twilio = TwilioApiSimulator()
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    with tempfile.TemporaryDirectory(prefix="bench-calls-") as tmp, loose_errors_counted(result.loose_errors):
        workdir = Path(tmp)
        async with realtime, twilio, httpx.AsyncClient(timeout=30.0, trust_env=False, limits=limits) as http:
            port = free_port()
            env = app_env(realtime, twilio, workdir, port, mode)
            app = AppProcess(env, workdir, port, taskset)
            try:
                await app.wait_ready(http)
                if not smoke:
                    await warm_up_call(app, twilio, utterances, http)
                    await asyncio.sleep(0.5)
                realtime.traces.clear()
                result.background_busy = await core_busy(BACKGROUND_SAMPLE_S)
                result.rss_idle_kb = app.rss_kb()
                result.fds_idle = result.fds_peak = app.open_fds()
                with gc_paused():
                    settle_s = 0.0 if smoke else SETTLE_S
                    traces, plan = await drive(
                        calls, seconds, settle_s, app, twilio, utterances, http, result
                    )
                    await wait_for_sockets(realtime)
                    result.sockets_left = realtime.open_connections
                    result.fds_after = await fds_settled(app, result.fds_idle)
                    result.app_active_after = await app.active_calls(http)
                    analyse(result, traces, realtime, (plan.window_start, plan.window_end))
            finally:
                await app.stop()
        gc.collect()  # the simulators' finished tasks sit in reference cycles: count them now
    return result


def app_env(
    realtime: RealtimeSimulator, twilio: TwilioApiSimulator, workdir: Path, port: int, mode: str
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI", "TWILIO_", "WEBHOOK_"))}
    env.update(
        {
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_DIR), env.get("PYTHONPATH")])),
            "OPENAI_API_KEY": SIM_API_KEY,
            "OPENAI_REALTIME_URL": realtime.url,
            "OPENAI_BASE_URL": realtime.base_url,
            "TWILIO_ACCOUNT_SID": twilio.account_sid,
            "TWILIO_AUTH_TOKEN": twilio.auth_token,
            "TWILIO_API_BASE": twilio.base_url,
            "DATABASE_PATH": str(workdir / "outbox.sqlite3"),
            "PUBLIC_URL": f"http://127.0.0.1:{port}",
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "LOG_LEVEL": "WARNING",
            "LOG_FORMAT": "text",
            "AUDIO_FORMAT": mode,
        }
    )
    return env


async def warm_up_call(
    app: AppProcess, twilio: TwilioApiSimulator, utterances: Sequence[bytes], http: httpx.AsyncClient
) -> None:
    """One full turn first, so lazy imports and first-call allocations are not counted per call."""
    now = time.monotonic()
    trace = CallTrace(index=0)
    await run_caller(trace, app, twilio, utterances[:1], http, Plan(now, 0.0, now, now))
    if not trace.ok:
        raise RuntimeError(f"warm-up call failed: {trace.failure or 'protocol errors'}")


async def drive(
    calls: int,
    seconds: float,
    settle_s: float,
    app: AppProcess,
    twilio: TwilioApiSimulator,
    utterances: Sequence[bytes],
    http: httpx.AsyncClient,
    result: RunResult,
) -> tuple[list[CallTrace], Plan]:
    """Runs the calls; samples CPU, RSS and loop lag over the window in which all are up."""
    start = time.monotonic() + 0.1
    ramp_s = calls * RAMP_PER_CALL_S
    window_start = start + ramp_s + settle_s
    plan = Plan(start, RAMP_PER_CALL_S, window_start, window_start + seconds)
    traces = [CallTrace(index=i + 1) for i in range(calls)]
    bench_lag: list[tuple[float, float]] = []
    probe = asyncio.create_task(lag_probe(lambda t, lag: bench_lag.append((t, lag))))
    sampler = asyncio.create_task(sample_window(app, plan, result))
    try:
        await asyncio.gather(*(run_caller(t, app, twilio, utterances, http, plan) for t in traces))
    finally:
        probe.cancel()
        await sampler
    result.bench_lag_ms = [lag for t, lag in bench_lag if plan.window_start <= t <= plan.window_end]
    result.app_lag_ms = app.lag_samples(plan.window_start, plan.window_end)
    return traces, plan


async def sample_window(app: AppProcess, plan: Plan, result: RunResult) -> None:
    await asyncio.sleep(max(0.0, plan.window_start - time.monotonic()))
    cpu0, bench0, ticks0, t0 = app.cpu_s(), self_cpu_s(), cpu_ticks(), time.monotonic()
    rss: list[int] = []
    while time.monotonic() < plan.window_end:
        rss.append(app.rss_kb())
        result.fds_peak = max(result.fds_peak, app.open_fds())
        await asyncio.sleep(min(RSS_SAMPLE_S, max(0.0, plan.window_end - time.monotonic())))
    cpu1, bench1, ticks1 = app.cpu_s(), self_cpu_s(), cpu_ticks()
    result.window_s = time.monotonic() - t0
    result.app_cpu_s = cpu1 - cpu0
    result.bench_cpu_s = bench1 - bench0
    result.rss_window_kb = statistics.fmean(rss) if rss else 0.0
    result.core_busy = busy_between(ticks0, ticks1)


async def wait_for_sockets(realtime: RealtimeSimulator) -> None:
    """Gives the app a short grace to close Realtime sockets after the last hang-up."""
    for _ in range(round(SOCKET_GRACE_S / POLL_S)):
        if not realtime.open_connections:
            return
        await asyncio.sleep(POLL_S)


async def fds_settled(app: AppProcess, idle: int) -> int:
    """The app's open descriptors once back to `idle`, or after a grace period if never (the
    phones' webhook requests may hold keep-alive connections until uvicorn's timeout)."""
    for _ in range(round(FDS_GRACE_S / POLL_S)):
        if app.open_fds() <= idle:
            break
        await asyncio.sleep(POLL_S)
    return app.open_fds()


async def core_busy(seconds: float) -> dict[str, float]:
    """Each core's busy share over `seconds`, whoever used it."""
    before = cpu_ticks()
    await asyncio.sleep(seconds)
    return busy_between(before, cpu_ticks())


def busy_between(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> dict[str, float]:
    shares = {}
    for core, (busy1, total1) in after.items():
        busy0, total0 = before.get(core, (busy1, total1))
        if total1 > total0:
            shares[core] = (busy1 - busy0) / (total1 - total0)
    return shares


def analyse(
    result: RunResult,
    traces: list[CallTrace],
    realtime: TracedRealtimeSimulator,
    window: tuple[float, float],
) -> None:
    """Per call: which Realtime session served it (by the item ids in its marks), then both links."""
    by_item: dict[str, SessionTrace] = {}
    for session in realtime.traces:
        for delta in session.deltas:
            by_item[delta.item_id] = session
    served: dict[int, int] = {}
    for trace in traces:
        call = trace.call
        if trace.ok:
            result.ok_calls += 1
        else:
            result.failures.append(f"call {trace.index}: {trace.failure or describe_failure(call)}")
        if call is None:
            continue
        result.turn_latency_s += [lat for lat in call.first_audio_latencies() if lat is not None]
        view = phone_view(trace)
        sessions = list({id(s): s for item in view.frames_in if (s := by_item.get(item))}.values())
        if len(sessions) != 1:
            result.unmatched_calls += 1
            result.failures.append(f"call {trace.index}: heard audio from {len(sessions)} Realtime sessions")
            continue
        other = served.setdefault(id(sessions[0]), trace.index)
        if other != trace.index:
            result.cross_talk += 1
            result.failures.append(f"call {trace.index}: heard the Realtime session of call {other}")
            continue
        analyse_uplink(view, sessions[0].append_t, window, result.up)
        analyse_downlink(view, sessions[0], window, result.down)
        result.appends_in_window += sum(window[0] <= t <= window[1] for t in sessions[0].append_t)


def describe_failure(call: PhoneCall | None) -> str:
    if call is None:
        return "never dialled"
    if call.protocol_errors:
        return f"protocol errors: {call.protocol_errors[:3]}"
    return call.outcome


# --- report ----------------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else math.nan


def fmt(value: float, digits: int = 2) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


LATENCY_HEADER = (
    "| mode | calls | ok | up p50 | up p90 | up p99 | up max | down first p50 | down first p99 "
    "| down all p50 | down all p90 | down all p99 | samples up/first/all | reply p50 s |"
)
COST_HEADER = (
    "| mode | calls | app CPU s/call-min | app % core | RSS/call KB | app lag p50/p99/max ms "
    "| bench % core | bench lag p99/max ms | cores busy % idle -> run | appends/s/call "
    "| frames lost | dropped by design | bot bytes sent/recv | sockets left | app fds idle/peak/after "
    "| cross-talk |"
)


def latency_row(r: RunResult) -> str:
    up, down = r.up, r.down
    samples = f"{len(up.latencies_ms)}/{len(down.first_ms)}/{len(down.all_ms)}"
    reply = statistics.median(r.turn_latency_s) if r.turn_latency_s else math.nan
    cells = [
        r.mode,
        str(r.calls),
        str(r.ok_calls),
        fmt(pct(up.latencies_ms, 50)),
        fmt(pct(up.latencies_ms, 90)),
        fmt(pct(up.latencies_ms, 99)),
        fmt(max(up.latencies_ms, default=math.nan)),
        fmt(pct(down.first_ms, 50)),
        fmt(pct(down.first_ms, 99)),
        fmt(pct(down.all_ms, 50)),
        fmt(pct(down.all_ms, 90)),
        fmt(pct(down.all_ms, 99)),
        samples,
        fmt(reply),
    ]
    return "| " + " | ".join(cells) + " |"


def cost_row(r: RunResult) -> str:
    window_s = r.window_s or math.nan
    lag, bench_lag = r.app_lag_ms, r.bench_lag_ms
    cores = " ".join(
        f"{core[3:]}: {r.background_busy.get(core, math.nan) * 100:.0f}->{share * 100:.0f}"
        for core, share in sorted(r.core_busy.items())
    )
    cells = [
        r.mode,
        str(r.calls),
        fmt(r.app_cpu_s / (r.calls * window_s / 60), 3),
        fmt(100 * r.app_cpu_s / window_s, 0),
        fmt((r.rss_window_kb - r.rss_idle_kb) / r.calls, 0),
        f"{fmt(pct(lag, 50))}/{fmt(pct(lag, 99))}/{fmt(max(lag, default=math.nan))}",
        fmt(100 * r.bench_cpu_s / window_s, 0),
        f"{fmt(pct(bench_lag, 99))}/{fmt(max(bench_lag, default=math.nan))}",
        cores,
        fmt(r.appends_in_window / (r.calls * window_s), 1),
        f"{r.up.lost + r.up.extra} of {r.up.frames}",
        f"{r.up.before_session} before session, {r.up.at_hangup} at hang-up",
        f"{r.down.sent_bytes}/{r.down.received_bytes}"
        + (f" (+{r.down.cut_bytes} cut by hang-up)" if r.down.cut_bytes else ""),
        str(r.sockets_left),
        f"{r.fds_idle}/{r.fds_peak}/{r.fds_after}",
        str(r.cross_talk),
    ]
    return "| " + " | ".join(cells) + " |"


def print_table(title: str, header: str, rows: Sequence[str]) -> None:
    print(f"\n{title}\n\n{header}\n" + "|---" * (header.count("|") - 1) + "|")
    for row in rows:
        print(row)


def saturation_notes(r: RunResult) -> list[str]:
    """Which side limited the run, so a reader knows whose delay the latencies show."""
    if not r.window_s:
        return []
    notes = []
    bench_share = r.bench_cpu_s / r.window_s
    bench_lag = pct(r.bench_lag_ms, 99)
    if bench_share >= SATURATED_SHARE or bench_lag >= FRAME_S * 1000:
        notes.append(
            f"load generator near its limit ({bench_share * 100:.0f}% of its core, loop lag p99 "
            f"{bench_lag:.0f} ms): latencies include its own delays"
        )
    app_share = r.app_cpu_s / r.window_s
    app_lag = pct(r.app_lag_ms, 99)
    if app_share >= SATURATED_SHARE or app_lag >= FRAME_S * 1000:
        notes.append(
            f"app near its limit ({app_share * 100:.0f}% of its core, loop lag p99 {app_lag:.0f} ms)"
        )
    unsaturated = app_share < SATURATED_SHARE and app_lag < FRAME_S * 1000
    if r.app_cpu_s > 0 and r.calls >= CAPACITY_MIN_CALLS and unsaturated:
        per_core = r.calls * r.window_s / r.app_cpu_s
        notes.append(f"at this app cost one core holds about {per_core:.0f} calls")
    return notes


def print_report(results: Sequence[RunResult]) -> None:
    latency_rows = [latency_row(r) for r in results]
    print_table("Added latency, ms (window with all calls up)", LATENCY_HEADER, latency_rows)
    print_table("Cost and integrity", COST_HEADER, [cost_row(r) for r in results])
    for r in results:
        run = f"{r.mode} x{r.calls}"
        for note in saturation_notes(r):
            print(f"NOTE {run}: {note}")
        if r.loose_errors:
            errors = ", ".join(f"{count} {name}" for name, count in r.loose_errors.most_common())
            print(f"NOTE {run}: unawaited errors in this process (simulator tasks): {errors}")
        for failure in r.failures[:10]:
            print(f"FAILED {run}: {failure}")
        if len(r.failures) > 10:
            print(f"FAILED {run}: ... and {len(r.failures) - 10} more")
        if r.up.lost or r.up.extra or r.down.lost_bytes:
            print(
                f"LOST {run}: {r.up.lost} frames up, {r.up.extra} unexpected appends, "
                f"{r.down.lost_bytes} bot audio bytes"
            )
        if r.sockets_left or r.app_active_after:
            print(f"LEAK {run}: {r.sockets_left} Realtime sockets, {r.app_active_after} calls still active")
        if r.fds_after > r.fds_idle:
            print(f"LEAK {run}: the app holds {r.fds_after - r.fds_idle} more file descriptors than before")


# --- command line ----------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 bench/calls.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", default="1,50,250,400", help="comma-separated concurrent call counts")
    parser.add_argument(
        "--audio-format", choices=("pcm16", "pcmu", "both"), default="both", help="AUDIO_FORMAT of the bot"
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="measurement window per run")
    parser.add_argument(
        "--model-speed", type=float, default=1.0, help="simulated model audio speed, x real time"
    )
    parser.add_argument("--smoke", action="store_true", help=f"{SMOKE_CALLS} calls per format, for CI")
    parser.add_argument("--serve-app", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--lag-file", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


async def run_all(args: argparse.Namespace, taskset: list[str]) -> list[RunResult]:
    """Every (format, N) in turn, each against a fresh app; the smoke runs its formats at once."""
    modes = ["pcm16", "pcmu"] if args.audio_format == "both" else [args.audio_format]
    if args.smoke:
        speed = args.model_speed
        runs = (
            run_load(SMOKE_CALLS, mode, SMOKE_SECONDS, model_speed=speed, smoke=True, taskset=taskset)
            for mode in modes
        )
        return list(await asyncio.gather(*runs))
    results = []
    for mode in modes:
        for calls in (int(n) for n in args.calls.split(",") if n.strip()):
            began = time.monotonic()
            result = await run_load(
                calls, mode, args.seconds, model_speed=args.model_speed, smoke=False, taskset=taskset
            )
            results.append(result)
            print(
                f"{mode} x{calls}: {result.ok_calls}/{calls} calls ok, run took "
                f"{time.monotonic() - began:.0f} s",
                flush=True,
            )
    return results


def bot_revision() -> str:
    """The commit the measured code is at, and whether bot/ has uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_DIR), "status", "--porcelain", "--", "bot"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown (no git)"
    return f"{head or 'unknown'}{' + uncommitted changes in bot/' if dirty else ''}"


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    if args.serve_app is not None:
        return serve_app(args.serve_app, args.lag_file or Path(os.devnull))
    taskset, bench_cores = pinning()
    if bench_cores is not None:
        os.sched_setaffinity(0, bench_cores)
    load = Path("/proc/loadavg").read_text().split()[:3]
    where = (
        f"app on core {APP_CORE}, load generator on cores {sorted(bench_cores)}"
        if bench_cores
        else "no pinning (taskset missing or a single core)"
    )
    print(f"{os.cpu_count()} cores, {where}; load average {' '.join(load)}; model speed {args.model_speed}x")
    print(f"bot code: {bot_revision()}")
    results = asyncio.run(run_all(args, taskset))
    print_report(results)
    return 1 if any(r.functional_failure for r in results) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
