"""Back-pressure through the real app (docs/reliability.md rows 13 and 14): a Realtime side that stops
reading, and a Twilio side that stops reading, over real sockets on 127.0.0.1 (SimStack).

Loopback TCP buffers auto-tune to megabytes, so a stuck reader takes minutes to back up. The
tests either push more audio than the kernel can hold (row 13) or pin the buffers small (row 14)
so the bridge's own bounded queues are what fill.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from polling import until
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from bot.settings import PACKAGE_DIR
from bot.sim.phone import BYTES_PER_MS, FRAME_BYTES, PhoneCall
from bot.sim.realtime import Scenario, Turn
from bot.sim.stack import SimStack
from bot.wav import read_wav

pytestmark = pytest.mark.anyio

WASHERS = read_wav(PACKAGE_DIR / "sim" / "audio" / "caller_washers.wav").data
LONG_GREETING = "Hello, thanks for calling the store. How can I help you today with anything at all? "
# Well over what the loopback kernel buffers hold (about 4 MB, 3000 PCM16 appends): the rest
# must go through the bridge's up-link queue.
BURST_FRAMES = 6000
LOUD_ULAW = b"\x10"
STALL_S = 2.0
STALE_FRAMES_MAX = 400
LOOP_PROBE_S = 0.01
# A reader that waited on the stalled socket would hold the loop for the whole stall (2 s). The
# loop here also runs the phone's unpaced burst and the simulators, beside other tests: how short
# its lag stays under load is bench/calls.py's to measure, not this test's.
LOOP_LAG_P99_MAX_S = 0.25
# Row 14: a short down-link bound and small socket buffers, so a stuck phone backs up in seconds.
TEST_DOWNLINK_MAX_MESSAGES = 100
APP_SNDBUF_BYTES = 8192
PHONE_RCVBUF_BYTES = 32768
LONG_REPLY_MS = 60_000
STUCK_CALL_END_S = 25
# Messages the bridge queues while the phone's socket holds writes: two 100 ms chunks and their marks.
HELD_MESSAGES = 4


async def _probe_loop_lag(samples: list[float], stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        started = loop.time()
        await asyncio.sleep(LOOP_PROBE_S)
        samples.append(loop.time() - started - LOOP_PROBE_S)


def _frames_sent(call: PhoneCall) -> int:
    return sum(1 for event in call.events if event.direction == "out" and event.kind == "media")


async def test_a_stalled_realtime_drops_and_counts_old_caller_audio_while_both_calls_go_on() -> None:
    async with SimStack(Scenario(greeting=LONG_GREETING * 2, turns=[])) as stack:
        metrics = stack.runtime.metrics
        flooding = await stack.dial(pace=False)
        other = await stack.dial("+15551230002")
        await flooding.wait_for_audio(5)
        await other.wait_for_audio(5)
        flooding_session, _ = stack.realtime.sessions
        sent_before = _frames_sent(flooding)
        appends_before = flooding_session.audio_appends
        other_heard_before = other.received_audio_ms()
        lag: list[float] = []
        stop_probe = asyncio.Event()
        probe = asyncio.create_task(_probe_loop_lag(lag, stop_probe))

        stack.realtime.read_delay_s = STALL_S
        started = time.monotonic()
        await flooding.say(LOUD_ULAW * FRAME_BYTES * BURST_FRAMES)
        burst_s = time.monotonic() - started
        dropped_while_stalled = metrics.sample("voicebot_uplink_frames_dropped_total")
        other_heard_during_stall = other.received_audio_ms() - other_heard_before
        stack.realtime.read_delay_s = 0.0
        stop_probe.set()
        await probe

        assert burst_s < 6.0, "the Twilio reader kept up with the burst while Realtime stalled"
        assert dropped_while_stalled > BURST_FRAMES // 4
        assert flooding.connected and other.connected
        assert other_heard_during_stall > 500, "the other call's bot audio kept flowing"
        lag.sort()
        assert lag[int(len(lag) * 0.99)] < LOOP_LAG_P99_MAX_S

        async with asyncio.timeout(STALL_S + 8):
            while True:
                delivered = flooding_session.audio_appends - appends_before
                dropped = metrics.sample("voicebot_uplink_frames_dropped_total")
                missing = _frames_sent(flooding) - sent_before - delivered - dropped
                if missing <= 10:
                    break
                await asyncio.sleep(0.1)
        assert flooding.connected, "every frame sent was delivered or counted as dropped, call still up"
        # Stale audio that still reached the model: the bridge's 2 s queue plus about a second in
        # the socket buffers (the Realtime socket's kernel buffer is pinned small), plus what the
        # slowed server read meanwhile. Kernel auto-tuning alone used to hold over 30 s of it.
        assert delivered <= STALE_FRAMES_MAX


async def test_a_phone_that_stops_reading_is_closed_by_the_app_with_the_down_link_bounded() -> None:
    scenario = Scenario(greeting="Hi.", turns=[Turn(say="A very long answer.", audio_ms=LONG_REPLY_MS)])
    async with SimStack(scenario) as stack:
        stack.realtime.audio_speed = 50.0
        deps = stack.runtime.bridge
        assert deps is not None
        deps.downlink_max_messages = TEST_DOWNLINK_MAX_MESSAGES
        listener = stack._server._sock if stack._server is not None else None
        assert listener is not None
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, APP_SNDBUF_BYTES)
        phone = await stack.dial(pace=False)
        assert phone._ws is not None
        phone_socket = phone._ws.transport.get_extra_info("socket")
        phone_socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, PHONE_RCVBUF_BYTES)
        phone.pause_reading()
        await phone.say(WASHERS)

        largest_queue = 0
        # The socket buffers fill first (4-6 s at the bridge's 2x pacing, more on a busy machine),
        # then the bounded queue, then the close waits at most CLOSE_TIMEOUT_S for the phone.
        async with asyncio.timeout(STUCK_CALL_END_S):
            while phone.call_sid in deps.active_calls:
                largest_queue = max(largest_queue, len(deps.active_calls[phone.call_sid]._down))
                await asyncio.sleep(0.05)
        assert largest_queue <= TEST_DOWNLINK_MAX_MESSAGES
        assert sum(deps.metrics.samples("voicebot_calls_total", "outcome").values()) == 1
        phone.resume_reading()
        # Nothing of the close frame got through; the socket closes once its buffer drains.
        await phone.wait_closed(STUCK_CALL_END_S)
        assert phone.closed_by_app


async def test_messages_held_while_the_phone_socket_pauses_writing_arrive_once_each_and_in_order() -> None:
    """The bridge sends from the task that has a message while its writer idles; while uvicorn's
    transport has paused writing (over its high-water mark) such a send would wait, so it is
    queued for the writer instead: neither sent twice, nor lost, nor overtaken."""
    async with SimStack(Scenario(greeting=LONG_GREETING, turns=[])) as stack:
        deps = stack.runtime.bridge
        assert deps is not None and stack._server is not None
        phone = await stack.dial()
        await phone.wait_for_audio(5)
        bridge = deps.active_calls[phone.call_sid]
        (socket_protocol,) = [
            connection
            for connection in stack._server._server.server_state.connections
            if isinstance(connection, WebSocketsSansIOProtocol)
        ]

        socket_protocol.pause_writing()  # what its transport calls past the high-water mark
        await until(lambda: len(bridge._down) >= HELD_MESSAGES)
        marks_before = _marks(phone)
        socket_protocol.resume_writing()
        await until(lambda: not bridge._down and len(_marks(phone)) >= len(marks_before) + 2 * HELD_MESSAGES)
        await phone.hang_up()

    received_ms = 0
    marks = 0
    for event in phone.events:
        if event.direction == "in" and event.kind == "media":
            received_ms += int(event.detail) // BYTES_PER_MS
        elif event.direction == "in" and event.kind == "mark":
            _, end_ms, _ = event.detail.split(":", 2)
            assert int(end_ms) == received_ms, f"mark {event.detail} after {received_ms} ms of audio"
            marks += 1
    assert marks >= len(marks_before) + 2 * HELD_MESSAGES


def _marks(call: PhoneCall) -> list[str]:
    return [event.detail for event in call.events if event.direction == "in" and event.kind == "mark"]
