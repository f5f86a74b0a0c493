"""`python -m bot ...` as an operator runs it: real subprocesses, real ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def run_bot(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_without_a_command_the_usage_lists_every_command() -> None:
    result = run_bot()
    assert result.returncode == 0
    for command in ("serve", "demo", "call", "sim", "catalog", "outbox"):
        assert f"  {command} " in result.stdout


def test_an_unknown_command_exits_2_with_the_usage() -> None:
    result = run_bot("launch")
    assert result.returncode == 2
    assert "unknown command 'launch'" in result.stderr


def test_serve_refuses_to_start_on_a_bad_setting_and_names_it() -> None:
    result = run_bot("serve", env={"PORT": "eighty", "AUDIO_FORMAT": "wav"})
    assert result.returncode == 2
    assert "PORT" in result.stderr and "AUDIO_FORMAT" in result.stderr


def test_serve_answers_health_checks_on_the_port_it_is_given(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DATABASE_PATH": str(tmp_path / "outbox.sqlite3"),
        "OPENAI_API_KEY": "",
        "OPENAI": "",
        "LOG_LEVEL": "WARNING",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "bot", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).json()
                break
            except httpx.TransportError:
                assert server.poll() is None, server.communicate()[1]
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.1)
        assert health["status"] == "ok"
        assert health["features"]["realtime"] is False
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=20)
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status tells how it ended.
    assert server.returncode in (0, -signal.SIGTERM), stderr
    assert "Traceback" not in stderr
    assert "OPENAI_API_KEY is not set" in stderr


def test_serve_refuses_an_unreadable_catalog_naming_the_file_and_the_error(tmp_path: Path) -> None:
    broken = tmp_path / "catalog.json"
    broken.write_text('[{"sku": "WM-1"')
    result = run_bot("serve", env={"CATALOG_PATH": str(broken)})
    assert result.returncode == 2
    assert str(broken) in result.stderr and "not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr
