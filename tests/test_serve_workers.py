"""`serve --workers 2`: a token minted by one worker is accepted by the other, and calls complete.

Twilio's webhook and its Media Stream are two connections; with several workers either may take
either. The test steers them: it pauses one worker (SIGSTOP) so the other accepts the webhook,
then swaps before the stream's upgrade. Both workers share one SQLite outbox, so their relays
also share its rows: each SMS goes out once, each webhook event arrives with one id.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from scrape import scrape

from bot.settings import SAMPLE_CATALOG_PATH
from bot.sim.phone import PhoneCall, dial
from bot.sim.realtime import RealtimeSimulator, Scenario, ToolCall, Turn
from bot.sim.server import ServeProcess
from bot.sim.twilio_api import TwilioApiSimulator
from bot.sim.webhook_receiver import WebhookReceiver
from bot.wav import read_wav

pytestmark = pytest.mark.anyio

AUDIO = SAMPLE_CATALOG_PATH.parent.parent / "sim" / "audio"
API_KEY = "sk-sim-workers"
CONSOLE_PASSWORD = "workers console password"
SECRET = "whsec_" + base64.b64encode(b"workers test secret, 32 bytes!!!").decode()
SCENARIO = Scenario(
    greeting="Hi, how can I help?",
    turns=[
        Turn(
            hears="Text me the washer.",
            tool_calls=[ToolCall("send_product_details", {"skus": ["WM-2024-X500"]})],
            say="{message}",
            audio_ms=600,
        )
    ],
)


def worker_pids(parent: int) -> list[int]:
    """uvicorn's worker processes (spawned children of the supervisor)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


async def both_workers(parent: int) -> list[int]:
    for _ in range(600):
        if len(workers := worker_pids(parent)) == 2:
            return workers
        await asyncio.sleep(0.05)
    raise AssertionError("uvicorn did not start two workers")


def metrics_folder(worker: int) -> Path:
    """The PROMETHEUS_MULTIPROC_DIR that serve handed its workers."""
    environ = dict(v.split(b"=", 1) for v in Path(f"/proc/{worker}/environ").read_bytes().split(b"\0") if v)
    return Path(environ[b"PROMETHEUS_MULTIPROC_DIR"].decode())


def pause(pid: int) -> None:
    """SIGSTOP, and wait until the kernel has stopped it: it accepts no connection now."""
    os.kill(pid, signal.SIGSTOP)
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        time.sleep(0.005)


def resume(pid: int) -> None:
    os.kill(pid, signal.SIGCONT)


@pytest.fixture
async def stand_ins() -> AsyncIterator[tuple[RealtimeSimulator, TwilioApiSimulator, WebhookReceiver]]:
    async with (
        RealtimeSimulator(SCENARIO, api_key=API_KEY) as realtime,
        TwilioApiSimulator() as twilio,
        WebhookReceiver() as receiver,
    ):
        yield realtime, twilio, receiver


async def test_a_stream_token_minted_by_one_worker_is_accepted_by_the_other_and_calls_complete(
    tmp_path: Path, stand_ins: tuple[RealtimeSimulator, TwilioApiSimulator, WebhookReceiver]
) -> None:
    realtime, twilio, receiver = stand_ins
    env = {
        "OPENAI_API_KEY": API_KEY,
        "OPENAI_REALTIME_URL": realtime.url,
        "OPENAI_BASE_URL": realtime.base_url,
        "TWILIO_ACCOUNT_SID": twilio.account_sid,
        "TWILIO_AUTH_TOKEN": twilio.auth_token,  # the stream-signing key derives from it
        "TWILIO_FROM_NUMBER": "+15550001111",
        "TWILIO_API_BASE": twilio.base_url,
        "WEBHOOK_URL": receiver.url,
        "WEBHOOK_SECRET": SECRET,
        "DATABASE_PATH": str(tmp_path / "outbox.sqlite3"),
        "LOG_LEVEL": "WARNING",
    }
    server = ServeProcess({**os.environ, **env}, tmp_path, "--workers", "2", name="serve")
    try:
        await server.start()
        first, second = await both_workers(server.pid)
        for paused in (second, first):
            pause(paused)  # each worker alone answers /healthz once: both are up
            try:
                async with httpx.AsyncClient(timeout=10) as client:
                    assert (await client.get(server.base_url + "/healthz")).status_code == 200
            finally:
                resume(paused)

        callers = {"+15551230101": (first, second), "+15551230102": (second, first)}
        for caller, (minting, streaming) in callers.items():
            await steered_call(server.base_url, twilio, caller, minting, streaming)
        await receiver.wait_until(
            lambda: len({d.headers["webhook-id"] for d in receiver.acknowledged()}) == 4, 20
        )
        scrapes = []
        for paused in (second, first):
            pause(paused)  # each worker alone answers a scrape: each must add both up
            try:
                scrapes.append(await scrape(server.base_url))
            finally:
                resume(paused)
    except BaseException:
        print(server.log_tail())
        raise
    finally:
        await server.stop()

    for caller in callers:
        assert len(twilio.messages_to(caller)) == 1
    events = [d.event for d in receiver.acknowledged()]
    assert sorted(e["type"] for e in events) == ["call.completed"] * 2 + ["products.sent"] * 2
    assert all(e["data"]["sms"]["status"] == "sent" for e in events if e["type"] == "products.sent")
    assert len(receiver.received) == 4, "no webhook went out twice"
    for scraped in scrapes:
        assert scraped.value("voicebot_processes") == 2
        tool = {"channel": "phone", "tool": "send_product_details", "result": "ok"}
        assert scraped.value("voicebot_tool_calls_total", **tool) == 2
        assert scraped.value("voicebot_sms_total", status="sent", code="") == 2
        delivered = {"products.sent": 2, "call.completed": 2}
        assert scraped.by("voicebot_webhook_attempts_total", "event") == delivered


async def test_a_killed_worker_is_replaced_and_its_live_gauges_no_longer_count(tmp_path: Path) -> None:
    env = {"STREAM_SIGNING_KEY": "k" * 32, "DATABASE_PATH": str(tmp_path / "outbox.sqlite3")}
    server = ServeProcess({**os.environ, **env}, tmp_path, "--workers", "2", name="serve")
    try:
        await server.start()
        workers = await both_workers(server.pid)
        folder = metrics_folder(workers[0])
        os.kill(workers[0], signal.SIGKILL)
        for _ in range(600):
            if (now := worker_pids(server.pid)) and len(now) == 2 and workers[0] not in now:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("uvicorn did not replace the killed worker")
        seen = []  # the dead worker's gauge must never count: 1 until its successor is up, then 2
        for _ in range(300):
            seen.append((await scrape(server.base_url)).value("voicebot_processes"))
            if seen[-1] == 2:
                break
            await asyncio.sleep(0.05)
        assert seen[-1] == 2 and max(seen) == 2, seen
    except BaseException:
        print(server.log_tail())
        raise
    finally:
        await server.stop()
    assert not folder.exists(), "serve removes the metrics folder it made"


async def steered_dial(
    url: str, twilio: TwilioApiSimulator, caller: str, minting: int, streaming: int
) -> PhoneCall:
    """The webhook to `minting`, the stream to `streaming`; returns the call once greeted."""

    async def swap() -> None:
        resume(streaming)
        pause(minting)

    pause(streaming)
    try:
        call: PhoneCall = await dial(
            url,
            account_sid=twilio.account_sid,
            auth_token=twilio.auth_token,
            caller=caller,
            pace=False,
            before_stream=swap,
        )
    finally:
        resume(minting)
        resume(streaming)
    try:
        await call.wait_for_audio(timeout=15)  # the greeting: the token was accepted
        await call.wait_until_quiet(quiet_ms=700, timeout=15)
    except BaseException:
        await call.hang_up()
        raise
    return call


async def steered_call(
    url: str, twilio: TwilioApiSimulator, caller: str, minting: int, streaming: int
) -> None:
    """A whole call whose stream `streaming` serves (see steered_dial)."""
    call = await steered_dial(url, twilio, caller, minting, streaming)
    try:
        await call.say(read_wav(AUDIO / "caller_text_me.wav").data)
        await call.wait_for_audio(timeout=15)
        await call.wait_until_quiet(quiet_ms=700, timeout=15)
    finally:
        await call.hang_up()


async def test_the_console_on_either_worker_shows_every_workers_calls(
    tmp_path: Path, stand_ins: tuple[RealtimeSimulator, TwilioApiSimulator, WebhookReceiver]
) -> None:
    realtime, twilio, _ = stand_ins
    env = {
        "OPENAI_API_KEY": API_KEY,
        "OPENAI_REALTIME_URL": realtime.url,
        "OPENAI_BASE_URL": realtime.base_url,
        "TWILIO_ACCOUNT_SID": twilio.account_sid,
        "TWILIO_AUTH_TOKEN": twilio.auth_token,
        "TWILIO_API_BASE": twilio.base_url,
        "DATABASE_PATH": str(tmp_path / "outbox.sqlite3"),
        "CONSOLE_PASSWORD": CONSOLE_PASSWORD,
        "LOG_LEVEL": "WARNING",
    }
    server = ServeProcess({**os.environ, **env}, tmp_path, "--workers", "2", name="serve")
    calls: list[PhoneCall] = []
    try:
        await server.start()
        first, second = await both_workers(server.pid)
        calls.append(await steered_dial(server.base_url, twilio, "+15551230101", second, first))
        calls.append(await steered_dial(server.base_url, twilio, "+15551230102", first, second))
        for answering, other in ((first, second), (second, first)):
            snapshot = await console_snapshot(server.base_url, answering, other)
            assert sorted(call["caller"] for call in snapshot["live"]) == ["***0101", "***0102"], answering
    except BaseException:
        print(server.log_tail())
        raise
    finally:
        for call in calls:
            await call.hang_up()
        await server.stop()


async def console_snapshot(url: str, answering: int, other: int) -> dict[str, Any]:
    """The first event of /console/feed, served by `answering` (the other paused while it connects)."""
    pause(other)
    try:
        async with httpx.AsyncClient(auth=("operator", CONSOLE_PASSWORD), timeout=15) as client:
            async with client.stream("GET", url + "/console/feed") as response:
                resume(other)
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        snapshot: dict[str, Any] = json.loads(line.removeprefix("data: "))
                        return snapshot
    finally:
        resume(other)
    raise AssertionError("the feed ended before its snapshot")
