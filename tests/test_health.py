"""GET /healthz tells an operator what is wrong right now, not only what is configured."""

from __future__ import annotations

import httpx
import pytest

from bot.sim.realtime import Scenario
from bot.sim.stack import SimStack

pytestmark = pytest.mark.anyio

SCENARIO = Scenario(greeting="Hello, thanks for calling the store.", turns=[])


async def health(stack: SimStack) -> dict[str, object]:
    async with httpx.AsyncClient() as client:
        body: dict[str, object] = (await client.get(stack.app_url + "/healthz")).json()
        return body


async def test_a_working_deployment_is_healthy_and_counts_its_calls() -> None:
    async with SimStack(SCENARIO) as stack:
        async with stack.dial() as call:
            await call.wait_for_audio(timeout=10)
            body = await health(stack)
    assert body["status"] == "ok"
    assert body["calls"] == {"active": 1, "started": 1}


async def test_a_refused_openai_key_turns_health_degraded_and_the_caller_gets_the_fallback() -> None:
    async with SimStack(SCENARIO, env={"OPENAI_API_KEY": "sk-revoked"}) as stack:
        async with stack.dial() as call:
            await call.wait_closed(timeout=5)
        body = await health(stack)
        [update] = stack.twilio_api.call_updates
    assert body["status"] == "degraded"
    assert "realtime" in body["degraded"]  # type: ignore[operator]
    assert "Sorry" in update["Twiml"]
