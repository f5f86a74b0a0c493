"""`python -m bot serve` refuses to start on a database or key it cannot use; /healthz tells why.

Each refusal is one line on stderr naming the setting and the reason, exit status 2, no traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from bot.sim.postgres import free_port
from bot.sim.realtime import Scenario
from bot.sim.stack import SimStack

pytestmark = pytest.mark.anyio


def serve(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bot", "serve", "--port", str(free_port()), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "DATABASE_PATH": str(tmp_path / "outbox.sqlite3"), **env},
    )


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    """The refusal: the one stderr line that is not a JSON log record."""
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    [line] = [line for line in done.stderr.splitlines() if not line.startswith("{")]
    return line


def test_an_unusable_database_path_stops_start_up_naming_it(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    line = one_line(serve(tmp_path, DATABASE_PATH=str(not_a_folder / "outbox.sqlite3")))
    assert line.startswith(f"DATABASE_PATH {not_a_folder}/outbox.sqlite3: cannot open the outbox (")


def test_an_unreachable_database_url_stops_start_up_naming_it_without_its_password(tmp_path: Path) -> None:
    url = f"postgresql://bot:s3cret@127.0.0.1:{free_port()}/voicebot"
    line = one_line(serve(tmp_path, DATABASE_URL=url, STREAM_SIGNING_KEY="k" * 32))
    assert line.startswith("DATABASE_URL postgresql://bot:***@127.0.0.1:") and "s3cret" not in line
    assert "ConnectionRefusedError" in line


@pytest.mark.parametrize(
    ("args", "env"),
    [(("--workers", "2"), {}), ((), {"WEB_CONCURRENCY": "3"}), ((), {"DATABASE_URL": "postgresql://db/bot"})],
)
def test_several_processes_without_a_stable_stream_signing_key_are_refused(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str]
) -> None:
    unset = {"STREAM_SIGNING_KEY": "", "TWILIO_AUTH_TOKEN": ""}
    line = one_line(serve(tmp_path, *args, **unset, **env))
    assert line.startswith("STREAM_SIGNING_KEY: not set") and "every other" in line


async def test_healthz_is_degraded_while_webhooks_are_held_after_a_410() -> None:
    async with SimStack(Scenario(greeting="Hello.", turns=[])) as stack:
        stack.receiver.script = [(410, {})]
        async with stack.dial() as call:
            await call.wait_for_audio(timeout=10)
        await stack.receiver.wait_until(lambda: len(stack.receiver.received) == 1, timeout_s=10)
        async with httpx.AsyncClient() as client:
            for _ in range(100):
                health = (await client.get(stack.app_url + "/healthz")).json()
                if health["status"] == "degraded":
                    break
    assert "python -m bot outbox enable-webhooks" in health["degraded"]["webhooks"]
    assert stack.receiver.received[0].status == 410


def test_a_bad_stores_file_stops_start_up_with_one_line_per_bad_store(tmp_path: Path) -> None:
    stores = tmp_path / "stores.json"
    stores.write_text(
        json.dumps(
            {
                "stores": {
                    "downtown": {"name": "Downtown", "numbers": ["555-0100"]},
                    "garden": {"name": "Garden", "numbers": ["+15557650003"], "catalog": "nope.json"},
                    "mall": {"name": "Mall", "numbers": ["+15557650004"]},
                }
            }
        )
    )
    done = serve(tmp_path, STORES_PATH=str(stores))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if not line.startswith("{")]
    assert [line.split(": store ")[1].split(":")[0] for line in lines] == ["'downtown'", "'garden'"]
    assert all(line.startswith(f"STORES_PATH {stores}: store ") for line in lines)
