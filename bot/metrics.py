"""Prometheus metrics: what whoever runs the phone line watches, at a glance and over time.

One `Metrics` per app, with its own registry (so tests, and several apps in one process, stay
apart), fed by the bridge, the tools and the outbox relay through the methods below. Each is a
counter add or one histogram observation per call, turn, event or delivery; none runs per audio
frame except `uplink_frame_dropped`, which only an overloaded call reaches.

Under `serve --workers N` prometheus-client's multiprocess mode adds the processes up: `serve`
points PROMETHEUS_MULTIPROC_DIR at a fresh folder before the workers start, every worker writes
its values there (memory-mapped files), and a scrape, whichever worker answers it, merges them.
Each gauge says how it merges (`livesum`: the calls in progress of the processes alive now). A
worker that died without cleaning up is noticed at scrape time and its gauges dropped; its
counters stay, as counters must.

The outbox's figures are read from its database at scrape time (cached for a moment): every
process shares that database, so they describe the whole deployment and are never summed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from bot import __version__
from bot.pricing import KINDS, MODALITIES

if TYPE_CHECKING:
    # Only the type: the outbox's relay feeds these metrics, so the outbox imports this module.
    from bot.outbox.rows import OutboxCounts

# A `_created` series beside every counter doubles the output for a timestamp no panel uses (and
# multiprocess mode never has them): off, for one process as for several.
disable_created_metrics()  # type: ignore[no-untyped-call]

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
OUTBOX_CACHE_S = 2.0
LOOP_LAG_INTERVAL_S = 0.5

CALL_DURATION_BUCKETS_S = (5, 15, 30, 60, 120, 180, 300, 600, 1200, 1800, 3600)
TURN_LATENCY_BUCKETS_S = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 10.0)
BOT_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64)
TOOL_DURATION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LOOP_LAG_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
# A live gauge's file in the multiprocess folder: gauge_livesum_<pid>.db, gauge_liveall_<pid>.db...
_LIVE_GAUGE_FILE = re.compile(r"^gauge_live\w*?_(\d+)\.db$")

ReadOutbox = Callable[[], Awaitable["OutboxCounts"]]


def multiprocess_dir() -> Path | None:
    """Where the processes of `serve --workers N` write their values; None for one process."""
    path = os.environ.get(MULTIPROC_DIR_ENV)
    return Path(path) if path else None


@contextlib.contextmanager
def shared_by_workers(workers: int) -> Iterator[Path | None]:
    """Around `serve`'s uvicorn.run: with several workers, the folder they all write their values to.

    Set before the workers start, so each imports prometheus-client in multiprocess mode. An
    operator's own PROMETHEUS_MULTIPROC_DIR is used and emptied of the last run's files (stale
    values would add up with the new ones); otherwise a temporary folder, removed at exit.
    """
    chosen = multiprocess_dir()
    if chosen is not None:
        chosen.mkdir(parents=True, exist_ok=True)
        for stale in chosen.glob("*.db"):
            stale.unlink()
        yield chosen
        return
    if workers == 1:
        yield None
        return
    folder = Path(tempfile.mkdtemp(prefix="voicebot-metrics-"))
    os.environ[MULTIPROC_DIR_ENV] = str(folder)
    try:
        yield folder
    finally:
        del os.environ[MULTIPROC_DIR_ENV]
        shutil.rmtree(folder, ignore_errors=True)


class Metrics:
    """The `voicebot_` families and the calls that feed them (see the module docstring)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._outbox_cache: tuple[float, OutboxCounts | None] | None = None

        # calls
        self._calls_active = Gauge(
            "voicebot_calls_active", "Calls in progress.", registry=r, multiprocess_mode="livesum"
        )
        self._calls_started = Counter("voicebot_calls_started", "Calls whose media stream began.", registry=r)
        self._calls = Counter("voicebot_calls", "Calls ended, by outcome.", ["outcome"], registry=r)
        self._call_duration = Histogram(
            "voicebot_call_duration_seconds",
            "How long calls lasted, from the stream's start to its end.",
            registry=r,
            buckets=CALL_DURATION_BUCKETS_S,
        )
        # turns
        self._turn_latency = Histogram(
            "voicebot_turn_latency_seconds",
            "The caller's end of speech to the first bot audio sent to Twilio (the caller's wait).",
            registry=r,
            buckets=TURN_LATENCY_BUCKETS_S,
        )
        self._turn_bot_latency = Histogram(
            "voicebot_turn_bot_latency_seconds",
            "The bot's own part of a turn's wait: first model audio received to first frame sent.",
            registry=r,
            buckets=BOT_LATENCY_BUCKETS_S,
        )
        self._barge_ins = Counter("voicebot_barge_ins", "Times a caller talked over the bot.", registry=r)
        self._truncates = Counter(
            "voicebot_truncates",
            "Model items cut at what the caller heard (conversation.item.truncate).",
            registry=r,
        )
        # the Realtime API
        self._reconnects = Counter(
            "voicebot_realtime_reconnects", "Realtime sockets lost mid-call and reopened.", registry=r
        )
        self._refusals = Counter(
            "voicebot_realtime_refusals", "Realtime connections refused (bad key, quota, outage).", registry=r
        )
        self._rotations = Counter(
            "voicebot_realtime_rotations",
            "Realtime sessions replaced before OpenAI's time limit.",
            registry=r,
        )
        self._fallbacks = Counter(
            "voicebot_fallback_redirects",
            "Calls handed to the fallback TwiML (the model out of reach).",
            registry=r,
        )
        self._realtime_junk = Counter(
            "voicebot_realtime_junk_events",
            "Realtime server events the bot could not use, by kind.",
            ["kind"],
            registry=r,
        )
        self._tokens = Counter(
            "voicebot_realtime_tokens",
            "Realtime tokens, by modality (text, audio) and kind (input, cached input, output).",
            ["modality", "kind"],
            registry=r,
        )
        self._cost = Counter(
            "voicebot_realtime_cost_usd",
            "Estimated Realtime cost in US dollars, at the PRICE_* settings.",
            registry=r,
        )
        # the Media Stream
        self._rejections = Counter(
            "voicebot_stream_rejections",
            "Media streams refused before a call began, by reason.",
            ["reason"],
            registry=r,
        )
        self._junk_frames = Counter(
            "voicebot_junk_frames", "Malformed Media Streams frames skipped, by kind.", ["kind"], registry=r
        )
        self._frames_dropped = Counter(
            "voicebot_uplink_frames_dropped",
            "Caller audio frames dropped because the Realtime socket fell behind.",
            registry=r,
        )
        self._frames_before_start = Counter(
            "voicebot_frames_before_start", "Media frames that arrived before the stream's start.", registry=r
        )
        # tools and deliveries
        self._tool_calls = Counter(
            "voicebot_tool_calls",
            "Tool calls, by channel, tool and result.",
            ["channel", "tool", "result"],
            registry=r,
        )
        self._tool_duration = Histogram(
            "voicebot_tool_duration_seconds",
            "How long tools took, by channel and tool.",
            ["channel", "tool"],
            registry=r,
            buckets=TOOL_DURATION_BUCKETS_S,
        )
        self._sms = Counter(
            "voicebot_sms",
            "SMS outcomes (sent, failed: refused by Twilio, dead: gave up, retry) with Twilio's code.",
            ["status", "code"],
            registry=r,
        )
        self._webhook_attempts = Counter(
            "voicebot_webhook_attempts",
            "Webhook attempts, by event and result: delivered, failed (retried), refused (4xx), gone (410).",
            ["event", "result"],
            registry=r,
        )
        # the process
        self._loop_lag = Histogram(
            "voicebot_event_loop_lag_seconds",
            f"How late a {LOOP_LAG_INTERVAL_S:g} s timer fires: how long any callback waited for the loop.",
            registry=r,
            buckets=LOOP_LAG_BUCKETS_S,
        )
        Gauge(
            "voicebot_processes", "Processes serving the app.", registry=r, multiprocess_mode="livesum"
        ).set(1)
        Gauge(
            "voicebot_build_info", "The bot's version.", ["version"], registry=r, multiprocess_mode="max"
        ).labels(__version__).set(1)

    # --- calls ---------------------------------------------------------------------------

    def call_started(self) -> None:
        self._calls_started.inc()
        self._calls_active.inc()

    def call_ended(self, outcome: str, duration_s: float) -> None:
        self._calls_active.dec()
        self._calls.labels(outcome).inc()
        self._call_duration.observe(duration_s)

    def turn_timed(self, latency_ms: int, bot_ms: int) -> None:
        """One answered turn: the caller's whole wait, and the bot's part of it."""
        self._turn_latency.observe(latency_ms / 1000)
        self._turn_bot_latency.observe(bot_ms / 1000)

    def barge_in(self, truncated_items: int) -> None:
        self._barge_ins.inc()
        self._truncates.inc(truncated_items)

    def response_priced(self, tokens: Mapping[str, int], cost_usd: float) -> None:
        """One Realtime response's tokens (keys `text_input`... from bot.pricing) and their cost."""
        for modality in MODALITIES:
            for kind in KINDS:
                count = tokens.get(f"{modality}_{kind}", 0)
                if count:
                    self._tokens.labels(modality, kind).inc(count)
        if cost_usd:
            self._cost.inc(cost_usd)

    # --- the Realtime API ------------------------------------------------------------------

    def realtime_reconnected(self) -> None:
        self._reconnects.inc()

    def realtime_refused(self) -> None:
        self._refusals.inc()

    def realtime_rotated(self) -> None:
        self._rotations.inc()

    def fallback_redirected(self) -> None:
        self._fallbacks.inc()

    def realtime_junk_event(self, kind: str) -> None:
        self._realtime_junk.labels(kind).inc()

    # --- the Media Stream ------------------------------------------------------------------

    def stream_rejected(self, reason: str) -> None:
        self._rejections.labels(reason).inc()

    def junk_frame(self, kind: str) -> None:
        self._junk_frames.labels(kind).inc()

    def uplink_frame_dropped(self) -> None:
        self._frames_dropped.inc()

    def frame_before_start(self) -> None:
        self._frames_before_start.inc()

    # --- tools and deliveries --------------------------------------------------------------

    def tool_ran(self, channel: str, tool: str, result: str, seconds: float) -> None:
        """`tool` must be one of the channel's tool names (or "unknown"): labels stay few."""
        self._tool_calls.labels(channel, tool, result).inc()
        self._tool_duration.labels(channel, tool).observe(seconds)

    def sms_outcome(self, status: str, code: int | None) -> None:
        self._sms.labels(status, "" if code is None else str(code)).inc()

    def webhook_attempt(self, event: str, result: str) -> None:
        self._webhook_attempts.labels(event, result).inc()

    # --- the process -----------------------------------------------------------------------

    async def watch_event_loop(self, interval_s: float = LOOP_LAG_INTERVAL_S) -> None:
        """Runs for the app's life: one timer a half second, its lateness observed."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + interval_s
            await asyncio.sleep(interval_s)
            self._loop_lag.observe(max(0.0, loop.time() - due))

    # --- reading ---------------------------------------------------------------------------

    def sample(self, name: str, **labels: str) -> float:
        """One value of this process (0 when never set), for /healthz and tests."""
        return self.registry.get_sample_value(name, labels) or 0.0

    def samples(self, name: str, label: str) -> dict[str, float]:
        """A labelled family's values in this process, added up by one label (for tests)."""
        found: dict[str, float] = {}
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name == name and sample.value:
                    key = sample.labels[label]
                    found[key] = found.get(key, 0.0) + sample.value
        return found

    async def exposition(self, read_outbox: ReadOutbox | None, now: float) -> bytes:
        """The text a scrape gets: every process's values, then the outbox's."""
        outbox = await self._outbox_counts(read_outbox, now)
        processes = await asyncio.to_thread(self._processes_text)
        return processes + generate_latest(_Snapshot(_outbox_families(outbox, now)))

    def _processes_text(self) -> bytes:
        """Reads the multiprocess folder's files, so it runs off the event loop."""
        folder = multiprocess_dir()
        if folder is None:
            return generate_latest(self.registry)
        forget_dead_processes(folder)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, str(folder))  # type: ignore[no-untyped-call]
        return generate_latest(merged)

    async def _outbox_counts(self, read_outbox: ReadOutbox | None, now: float) -> OutboxCounts | None:
        cached = self._outbox_cache
        if cached is not None and now - cached[0] < OUTBOX_CACHE_S:
            return cached[1]
        counts: OutboxCounts | None = None
        if read_outbox is not None:
            try:
                counts = await read_outbox()
            except Exception:  # the outbox says why in /healthz; here it is just not available
                counts = None
        self._outbox_cache = (now, counts)
        return counts


def forget_dead_processes(folder: Path) -> None:
    """Drops the live gauges of workers that are gone (killed, crashed), as a clean exit would."""
    for file in folder.glob("gauge_live*.db"):
        found = _LIVE_GAUGE_FILE.match(file.name)
        if found is not None and not _alive(int(found.group(1))):
            mark_process_dead(int(found.group(1)), str(folder))  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _outbox_families(counts: OutboxCounts | None, now: float) -> list[Metric]:
    available = GaugeMetricFamily(
        "voicebot_outbox_available", "1 when the outbox database answered this scrape, else 0."
    )
    available.add_metric([], 0 if counts is None else 1)
    if counts is None:
        return [available]
    undelivered = GaugeMetricFamily(
        "voicebot_outbox_pending",
        "Deliveries not yet made (waiting, pending, in flight), by channel.",
        labels=["channel"],
    )
    failed = GaugeMetricFamily(
        "voicebot_outbox_failed",
        "Deliveries that failed or were given up on, by channel (retry them).",
        labels=["channel"],
    )
    for channel, rows in counts.undelivered.items():
        undelivered.add_metric([channel], rows)
    for channel, rows in counts.failed.items():
        failed.add_metric([channel], rows)
    age = GaugeMetricFamily(
        "voicebot_outbox_oldest_pending_age_seconds", "How long the oldest delivery not yet made has waited."
    )
    oldest = counts.oldest_undelivered_at
    age.add_metric([], 0.0 if oldest is None else max(0.0, now - oldest))
    return [available, undelivered, failed, age]


class _Snapshot:
    """Families computed once, served as a collector (for `generate_latest`)."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)
