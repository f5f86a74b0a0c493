"""Runs the app for tests and tools: an ASGI app under uvicorn inside the current event loop
(`LocalServer`), or `python -m bot serve` as a subprocess (`ServeProcess`), on a free local port."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from bot.sim.postgres import free_port
from bot.twilio_stream import MAX_MESSAGE_BYTES, UVICORN_WS

SERVE_START_TIMEOUT_S = 30.0
SERVE_STOP_TIMEOUT_S = 20.0


class LocalServer:
    """`await server.start()` binds 127.0.0.1:port (0 = any free port); `base_url` says where."""

    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int = 0, **config: Any) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        settings: dict[str, Any] = {"log_config": None, "ws": UVICORN_WS, "ws_max_size": MAX_MESSAGE_BYTES}
        settings.update(config)
        self._server = uvicorn.Server(uvicorn.Config(app, lifespan="on", **settings))
        self._task: asyncio.Task[None] | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("uvicorn stopped before it started")
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        await self._task
        self._task = None

    async def __aenter__(self) -> LocalServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class ServeProcess:
    """`python -m bot serve` as a real process on a free local port, as operators run it.

    For tests of the entry point, of several processes sharing an outbox, or of the app's own
    memory and file descriptors apart from the simulators beside it. `env` is the whole
    environment and `args` go after `serve`; stdout and stderr go to `workdir/<name>.log`.
    `start()` spawns it and waits until /healthz answers; `spawn()` only spawns it.
    """

    def __init__(self, env: Mapping[str, str], workdir: Path, *args: str, name: str = "app") -> None:
        self.name = name
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"{name}.log"
        address = ["--host", "127.0.0.1", "--port", str(self.port)]
        self._command = [sys.executable, "-m", "bot", "serve", *address, *args]
        self._env = dict(env)
        self._workdir = workdir
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None, "start the process first"
        return self._proc.pid

    def spawn(self) -> None:
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self._command, env=self._env, cwd=self._workdir, stdout=log, stderr=subprocess.STDOUT
            )

    async def wait_healthy(self, timeout_s: float = SERVE_START_TIMEOUT_S) -> None:
        proc = self._proc
        assert proc is not None, "spawn the process first"
        async with httpx.AsyncClient(trust_env=False) as http:
            for _ in range(int(timeout_s / 0.05)):
                if proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {proc.returncode}:\n{self.log_tail()}")
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get(self.base_url + "/healthz", timeout=1)).status_code == 200:
                        return
                await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.name} did not come up in {timeout_s:.0f} s:\n{self.log_tail()}")

    async def start(self) -> None:
        self.spawn()
        await self.wait_healthy()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no hand-back, as when a machine dies."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()

    async def stop(self) -> int | None:
        """SIGTERM (uvicorn shuts down gracefully), SIGKILL past a bound; the exit status."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            try:
                await asyncio.to_thread(proc.wait, SERVE_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill()
        return proc.returncode

    async def __aenter__(self) -> ServeProcess:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc status")

    def open_fds(self) -> list[str]:
        """What each open descriptor is: a path, `pipe:[…]`, or a TCP socket as `tcp LOCAL REMOTE`."""
        tcp = _tcp_sockets(self.pid)
        targets = []
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            with contextlib.suppress(FileNotFoundError):
                target = os.readlink(f"/proc/{self.pid}/fd/{fd}")
                targets.append(tcp.get(target, target))
        return sorted(targets)

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_tail(self) -> str:
        """The end of the log, for a failing test to print."""
        return self.log_text()[-6000:]


def _tcp_sockets(pid: int) -> dict[str, str]:
    """`socket:[inode]` -> `tcp LOCAL REMOTE` (host:port) for the IPv4 sockets of a process."""
    sockets = {}
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        sockets[f"socket:[{fields[9]}]"] = f"tcp {_address(fields[1])} {_address(fields[2])}"
    return sockets


def _address(hex_address: str) -> str:
    host, port = hex_address.split(":")
    return f"{socket.inet_ntoa(bytes.fromhex(host)[::-1])}:{int(port, 16)}"
