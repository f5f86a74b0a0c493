"""`python -m bot serve` as a real process for the tests that run several: start, wait, stop, kill.

Stdout and stderr go to a log file that a failing test prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bot.sim.postgres import free_port

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0


class ServeProcess:
    def __init__(self, name: str, folder: Path, env: dict[str, str], *args: str) -> None:
        self.name = name
        self.port = free_port()
        self.log_path = folder / f"{name}.log"
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bot", "serve", "--host", "127.0.0.1", "--port", str(self.port), *args],
            cwd=folder,
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        async with httpx.AsyncClient(timeout=1) as client:
            while True:
                assert self.proc.poll() is None, f"{self.name} exited:\n{self.log()}"
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(self.url + "/healthz")).status_code == 200:
                        return
                assert time.monotonic() < deadline, f"{self.name} did not come up:\n{self.log()}"
                await asyncio.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no hand-back, as when a machine dies."""
        self.proc.kill()
        self.proc.wait()

    async def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-6000:]
