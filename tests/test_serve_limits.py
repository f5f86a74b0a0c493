"""`python -m bot serve` holds its message cap (docs/reliability.md row 7): the real entry point in a
subprocess, with uvicorn configured as operators run it, dialled by the simulated phone."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bot.sim.phone import CallEnded, dial
from bot.twilio_stream import MAX_MESSAGE_BYTES

pytestmark = pytest.mark.anyio

ACCOUNT_SID = "AC" + "5" * 32
AUTH_TOKEN = "serve-limits-auth-token"
MIB = 1024 * 1024
# Five whole 20 MiB messages would add 100 MiB if any were buffered; the cap reads a frame header.
RSS_GROWTH_MAX_BYTES = 8 * MIB


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """`serve` on a free port: its base URL and process id."""
    workdir = tmp_path_factory.mktemp("serve")
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
        "DATABASE_PATH": str(workdir / "outbox.sqlite3"),
        "OPENAI_API_KEY": "sk-never-reached",
        "OPENAI_REALTIME_URL": "ws://127.0.0.1:9/v1/realtime",
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "LOG_LEVEL": "WARNING",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "bot", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(base_url + "/healthz", timeout=1)
                break
            except httpx.TransportError:
                assert server.poll() is None, server.communicate()[1]
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.1)
        yield base_url, server.pid
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=20)
        assert "Traceback" not in stderr, stderr



@pytest.mark.parametrize("size", [MIB, 20 * MIB], ids=["1MiB", "20MiB"])
async def test_serve_closes_a_message_over_the_cap_with_1009(served: tuple[str, int], size: int) -> None:
    base_url, _ = served
    call = await dial(base_url, account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, start_stream=False)
    await call.send_oversized(size)
    await call.wait_closed(5.0)
    assert call.close_code == 1009
    assert size > MAX_MESSAGE_BYTES


async def test_serve_memory_stays_flat_through_whole_20_mib_messages(served: tuple[str, int]) -> None:
    base_url, pid = served
    message = "x" * (20 * MIB)

    async def send_whole() -> None:
        call = await dial(base_url, account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, start_stream=False)
        with contextlib.suppress(CallEnded):
            await call.send_raw(message)
        await call.wait_closed(10.0)

    await send_whole()
    before = rss_bytes(pid)
    for _ in range(5):
        await send_whole()
    assert rss_bytes(pid) - before < RSS_GROWTH_MAX_BYTES
