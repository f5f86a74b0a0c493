"""Hostile Media Streams input beside a real call (docs/reliability.md rows 3, 5-9), fuzzed.

Hypothesis draws streams of random and malformed messages: wrong JSON shapes and types, Unicode
in every string field, huge and non-finite numbers, deep nesting, binary frames, truncated or
non-ASCII base64, out-of-order and foreign-stream events, and frames past the size cap. Each
stream is played into `/media-stream` of `python -m bot serve` (its own process, so its memory
and file descriptors are its own) while a second, real call talks to the bot beside them.

Each fuzzed stream either goes on until the phone hangs up or is closed as the rows say (1008 for
a policy breach, 1009 past the size cap, 1000 for its own `stop`); no exception leaves a handler
(the app logs no error). The call beside keeps its 50 appends a second and gets its answer, and
the app's memory and file descriptors come back to where they started.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from bot.settings import PACKAGE_DIR
from bot.sim.phone import CallEnded, PhoneCall
from bot.sim.realtime import Scenario, ToolCall, Turn
from bot.sim.server import ServeProcess
from bot.sim.stack import SimStack
from bot.twilio_stream import MAX_MESSAGE_BYTES
from bot.wav import read_wav

pytestmark = pytest.mark.anyio

STREAMS = 40
WARM_UP_STREAMS = 6
MAX_FRAMES_PER_STREAM = 30
OWN_STREAM = "MZ-OWN-STREAM"
FOREIGN_STREAM = "MZ" + "f" * 32
CLOSE_CODES = {1000, 1008, 1009}
PLAY_TIMEOUT_S = 20
# The call beside sends a frame every 20 ms; a second's worth of slack covers the window's edges.
APPENDS_PER_S_MIN = 48
# A leak of each fuzzed call's state (about 150 KB per call in bench/calls.py) would pass this.
RSS_GROWTH_MAX_BYTES = 3 * 1024 * 1024
WASHERS = read_wav(PACKAGE_DIR / "sim" / "audio" / "caller_washers.wav").data
SCENARIO = Scenario(
    greeting="Hi there!",
    turns=[
        Turn(
            say="We have two washers.",
            tool_calls=[ToolCall("search_products", {"query": "washer"})],
            hears="Do you have washers?",
        )
    ],
)

# --- what hypothesis draws ------------------------------------------------------------------

TEXT = st.text(max_size=24)
SCALARS = st.none() | st.booleans() | st.integers(-(2**200), 2**200) | st.floats() | TEXT
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)
STREAM_SIDS = st.sampled_from([OWN_STREAM, OWN_STREAM, FOREIGN_STREAM]) | SCALARS
COUNTS = (
    st.integers(0, 10**6).map(str)
    | st.integers(-(2**80), 2**80)
    | st.floats()
    | st.text(alphabet="0123456789²³\u0663\u0661\uff11-+.e ", max_size=12)
    | SCALARS
)
VALID_BASE64 = st.binary(max_size=320).map(lambda audio: base64.b64encode(audio).decode())
PAYLOADS = (
    VALID_BASE64
    | VALID_BASE64.map(lambda text: text[:-1])
    | VALID_BASE64.map(lambda text: "é" + text[1:])
    | TEXT
    | SCALARS
)
MARK_NAMES = st.from_regex(r"\A[0-9]{1,2}:[0-9²٣]{1,5}:item_\w{0,6}\Z") | TEXT | SCALARS


def message(event: str, **fields: st.SearchStrategy[object]) -> st.SearchStrategy[dict[str, object]]:
    return st.fixed_dictionaries({"event": st.just(event), "streamSid": STREAM_SIDS, **fields})


MESSAGES = st.one_of(
    message(
        "media",
        media=st.fixed_dictionaries(
            {"track": TEXT, "chunk": COUNTS, "timestamp": COUNTS, "payload": PAYLOADS}
        )
        | JSON_VALUES,
    ),
    message("mark", mark=st.fixed_dictionaries({"name": MARK_NAMES}) | JSON_VALUES),
    message("dtmf", dtmf=st.fixed_dictionaries({"digit": TEXT | SCALARS}) | JSON_VALUES),
    message("stop", stop=st.fixed_dictionaries({"callSid": TEXT}) | JSON_VALUES),
    message(
        "start",
        start=st.fixed_dictionaries(
            {
                "streamSid": STREAM_SIDS,
                "callSid": TEXT | SCALARS,
                "customParameters": st.dictionaries(TEXT, TEXT | JSON_VALUES, max_size=3) | JSON_VALUES,
                "mediaFormat": st.fixed_dictionaries(
                    {"encoding": TEXT | SCALARS, "sampleRate": COUNTS, "channels": COUNTS}
                ),
                "tracks": JSON_VALUES,
            }
        )
        | JSON_VALUES,
    ),
    st.fixed_dictionaries({"event": st.just("connected"), "protocol": SCALARS, "version": SCALARS}),
    st.dictionaries(
        st.sampled_from(["event", "streamSid", "media", "start", "mark", "stop"]) | TEXT, JSON_VALUES
    ),
)
JSON_FRAMES = MESSAGES.map(json.dumps)
FRAMES = st.one_of(
    JSON_FRAMES,
    JSON_FRAMES,
    JSON_FRAMES,
    JSON_FRAMES.map(lambda text: text[: len(text) // 2]),
    st.binary(max_size=64),
    st.text(max_size=64),
    st.integers(50, 5000).map(lambda n: "[" * n + "]" * n),
    st.integers(50, 3000).map(lambda n: '{"event": "media", "media": ' * n + "{}" + "}" * n),
)


@dataclass(frozen=True)
class Stream:
    """One fuzzed Media Stream: whether it starts properly first, what it sends, how it ends."""

    started: bool
    frames: list[str | bytes]
    oversized_last: bool


STREAM_SCRIPTS = st.builds(
    Stream, st.booleans(), st.lists(FRAMES, max_size=MAX_FRAMES_PER_STREAM), st.booleans()
)


def draw_streams(count: int) -> list[Stream]:
    """`count` streams drawn by hypothesis (generation only: they are played in one live run)."""
    drawn: list[Stream] = []

    @settings(
        max_examples=count,
        database=None,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(STREAM_SCRIPTS)
    def collect(stream: Stream) -> None:
        drawn.append(stream)

    collect()
    return drawn


# --- playing them ---------------------------------------------------------------------------


async def play(stack: SimStack, stream: Stream) -> PhoneCall:
    """Dials like Twilio, sends the stream, hangs up if the app has not closed it; the call."""
    call = await stack.dial("+15551239999", start_stream=False, record_frames=False)
    if stream.started:
        await call.send_start()
    for frame in stream.frames:
        if not call.connected:
            break
        with contextlib.suppress(CallEnded):
            await call.send_raw(
                frame.replace(OWN_STREAM, call.stream_sid) if isinstance(frame, str) else frame
            )
    # A frame over the cap is refused by its header; sent mid-call, the media beside it would race
    # the app's close with a TCP reset (see PhoneCall.send_oversized).
    if stream.oversized_last and not stream.started and call.connected:
        await call.send_oversized(MAX_MESSAGE_BYTES + 1)
        await call.wait_closed(5.0)
    if call.connected:
        await call.hang_up()
    await call.wait_closed(10.0)
    return call


def errors_in(log: str) -> list[str]:
    """Log lines at error level or above, and tracebacks, from the app's JSON log."""
    found = []
    for line in log.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            if "Traceback" in line or "Exception in ASGI" in line:
                found.append(line)
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "critical"):
            found.append(line)
    return found


async def until(condition: Callable[[], bool], timeout_s: float) -> bool:
    for _ in range(int(timeout_s / 0.05)):
        if condition():
            return True
        await asyncio.sleep(0.05)
    return condition()


def frames_sent(call: PhoneCall) -> int:
    return sum(1 for event in call.events if event.direction == "out" and event.kind == "media")


def held(app: ServeProcess, stack: SimStack) -> list[str]:
    """The app's open descriptors but its keep-alive HTTP connections to the call center and the
    Twilio API (reused by its client, bounded by its pool, one more when two sends overlap)."""
    pooled = {urlsplit(url).netloc for url in (stack.receiver.url, stack.twilio_api.base_url)}
    return [fd for fd in app.open_fds() if fd.split()[-1] not in pooled]


def gained(now: list[str], before: list[str]) -> list[str]:
    """Descriptors held now beyond those held before. One still closing when `before` was taken
    (a warm-up stream's socket from the phone or to the Realtime simulator: each peer is done with
    a connection once its closing handshake is read, maybe before the app's end of it is gone) may
    be gone since, which is no leak."""
    return sorted((Counter(now) - Counter(before)).elements())


async def active_calls(stack: SimStack) -> int:
    async with httpx.AsyncClient(trust_env=False) as http:
        return int((await http.get(stack.app_url + "/healthz")).json()["calls"]["active"])


async def test_hostile_streams_end_only_as_the_rows_say_while_a_real_call_beside_them_goes_on() -> None:
    streams = draw_streams(STREAMS)
    async with SimStack(SCENARIO, env={"LOG_LEVEL": "WARNING"}, subprocess=True) as stack:
        app = stack.process
        assert app is not None
        beside = await stack.dial()
        await beside.wait_for_audio(10.0)
        await beside.wait_until_quiet(400, 10.0)
        session = stack.realtime.sessions[0]
        for stream in streams[:WARM_UP_STREAMS]:
            async with asyncio.timeout(PLAY_TIMEOUT_S):
                await play(stack, stream)
        assert await until(lambda: stack.realtime.open_connections == 1, 10.0)
        fds_before, rss_before = held(app, stack), app.rss_bytes()

        frames_before, appends_before = frames_sent(beside), session.audio_appends
        started = asyncio.get_running_loop().time()
        speaking = asyncio.create_task(beside.say(WASHERS))
        for stream in streams[WARM_UP_STREAMS:]:
            seen = len(app.log_text())
            try:
                async with asyncio.timeout(PLAY_TIMEOUT_S):
                    call = await play(stack, stream)
            except TimeoutError:
                raise AssertionError(f"stream not done in {PLAY_TIMEOUT_S} s: {stream}") from None
            assert call.close_code in CLOSE_CODES, (call.close_code, stream)
            assert errors_in(app.log_text()[seen:]) == [], stream
        await speaking
        answered = ("assistant", "We have two washers.")
        assert await until(lambda: answered in session.transcript, 15.0), session.transcript
        window_s = asyncio.get_running_loop().time() - started
        appends = session.audio_appends - appends_before
        frames = frames_sent(beside) - frames_before

        assert beside.connected
        assert appends / window_s >= APPENDS_PER_S_MIN
        assert appends >= frames - APPENDS_PER_S_MIN
        assert ("user", "Do you have washers?") in session.transcript
        assert await active_calls(stack) == 1
        assert await until(lambda: stack.realtime.open_connections == 1, 10.0)
        assert await until(lambda: not gained(held(app, stack), fds_before), 10.0), gained(
            held(app, stack), fds_before
        )
        assert app.rss_bytes() - rss_before < RSS_GROWTH_MAX_BYTES
        await beside.hang_up()
        log = app.log_text()
    assert errors_in(log) == []
