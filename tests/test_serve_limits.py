"""`python -m bot serve` holds its message cap (docs/reliability.md row 7): the real entry point in a
subprocess, with uvicorn configured as operators run it, dialled by the simulated phone."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.sim.phone import CallEnded, dial
from bot.sim.server import ServeProcess
from bot.twilio_stream import MAX_MESSAGE_BYTES

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parent.parent
ACCOUNT_SID = "AC" + "5" * 32
AUTH_TOKEN = "serve-limits-auth-token"
MIB = 1024 * 1024
# Five whole 20 MiB messages would add 100 MiB if any were buffered; the cap reads a frame header.
RSS_GROWTH_MAX_BYTES = 8 * MIB


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """One event loop for the module, so one `serve` process serves all its tests."""
    return "asyncio"


@pytest.fixture(scope="module")
async def served(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ServeProcess]:
    workdir = tmp_path_factory.mktemp("serve")
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DATABASE_PATH": str(workdir / "outbox.sqlite3"),
        "OPENAI_API_KEY": "sk-never-reached",
        "OPENAI_REALTIME_URL": "ws://127.0.0.1:9/v1/realtime",
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "LOG_LEVEL": "WARNING",
    }
    async with ServeProcess(env, workdir) as server:
        yield server
    assert "Traceback" not in server.log_text()


@pytest.mark.parametrize("size", [MIB, 20 * MIB], ids=["1MiB", "20MiB"])
async def test_serve_closes_a_message_over_the_cap_with_1009(served: ServeProcess, size: int) -> None:
    call = await dial(served.base_url, account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, start_stream=False)
    await call.send_oversized(size)
    await call.wait_closed(5.0)
    assert call.close_code == 1009
    assert size > MAX_MESSAGE_BYTES


async def test_serve_memory_stays_flat_through_whole_20_mib_messages(served: ServeProcess) -> None:
    """Sampled while the messages arrive, from before the first: a buffered message shows as a
    peak even when the allocator hands it back, and the first one would stay in its heap."""
    message = "x" * (20 * MIB)

    async def send_whole() -> None:
        call = await dial(served.base_url, account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, start_stream=False)
        with contextlib.suppress(CallEnded):
            await call.send_raw(message)
        await call.wait_closed(10.0)

    async def sample(into: list[int], stop: asyncio.Event) -> None:
        while not stop.is_set():
            into.append(served.rss_bytes())
            await asyncio.sleep(0.005)

    warm_up = await dial(served.base_url, account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, start_stream=False)
    await warm_up.hang_up()
    before = served.rss_bytes()
    samples: list[int] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample(samples, stop))
    for _ in range(5):
        await send_whole()
    stop.set()
    await sampler
    assert max(samples) - before < RSS_GROWTH_MAX_BYTES
    assert served.rss_bytes() - before < RSS_GROWTH_MAX_BYTES
