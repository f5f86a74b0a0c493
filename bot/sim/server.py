"""Runs an ASGI app under uvicorn inside the current event loop, on a free local port."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import uvicorn

from bot.twilio_stream import MAX_MESSAGE_BYTES


class LocalServer:
    """`await server.start()` binds 127.0.0.1:port (0 = any free port); `base_url` says where."""

    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int = 0, **config: Any) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        settings: dict[str, Any] = {"log_config": None, "ws_max_size": MAX_MESSAGE_BYTES}
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
