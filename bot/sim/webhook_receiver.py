"""A call center's webhook endpoint on 127.0.0.1: records deliveries and answers from a script.

Each delivery is answered by the next scripted action, `(status, headers)` or `("hang", seconds)`,
then 200 once the script is empty, so tests can play a receiver that is down, slow or gone.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bot.outbox.messages import sign_webhook, webhook_key
from bot.sim.server import LocalServer

Action = tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Delivery:
    headers: dict[str, str]
    body: bytes
    status: int

    @property
    def event(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


@dataclass
class WebhookReceiver:
    script: list[Action] = field(default_factory=list)
    received: list[Delivery] = field(default_factory=list)
    active: int = 0
    peak: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        app = Starlette(routes=[Route("/hooks", self.handle, methods=["POST"])])
        self.server = LocalServer(app, timeout_graceful_shutdown=1)

    @property
    def url(self) -> str:
        return f"{self.server.base_url}/hooks"

    async def start(self) -> None:
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop()

    async def __aenter__(self) -> WebhookReceiver:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def handle(self, request: Request) -> Response:
        body = await request.body()
        action = self.script.pop(0) if self.script else (200, {})
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            if action[0] == "hang":
                await asyncio.sleep(action[1])
                action = (200, {})
            status, headers = action
            self.received.append(Delivery(dict(request.headers), body, status))
            self.changed.set()
            return Response("ok" if status < 300 else "nope", status_code=status, headers=headers)
        finally:
            self.active -= 1

    def acknowledged(self) -> list[Delivery]:
        return [d for d in self.received if 200 <= d.status < 300]

    async def wait_acknowledged(self, count: int, timeout_s: float = 5.0) -> None:
        await self.wait_until(lambda: len(self.acknowledged()) >= count, timeout_s)

    async def wait_until(self, done: Callable[[], bool], timeout_s: float = 5.0) -> None:
        """Returns once `done()` holds, checking after each delivery; TimeoutError otherwise."""
        async with asyncio.timeout(timeout_s):
            while not done():
                self.changed.clear()
                await self.changed.wait()


def signature_is_valid(delivery: Delivery, secret: str) -> bool:
    """Checks the Standard Webhooks signature the way a call center's receiver would."""
    headers = delivery.headers
    expected = sign_webhook(
        webhook_key(secret), headers["webhook-id"], int(headers["webhook-timestamp"]), delivery.body.decode()
    )
    offered = headers.get("webhook-signature", "").split()
    return any(hmac.compare_digest(expected, candidate) for candidate in offered)
