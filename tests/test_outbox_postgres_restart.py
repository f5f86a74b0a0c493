"""PostgreSQL restarts while the relay is sending and a call is in progress: nothing is lost.

The app runs in-process (SimStack) on its own PostgreSQL server, so the test can stop and start
that server. During the outage the call goes on: a `send_product_details` that cannot be stored
tells the model so (as for a full disk), and /healthz is degraded; once the database is back,
the pool reconnects, SMS whose outcome could not be written are looked up (never sent twice)
and every event is delivered.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from outbox_rig import collection

from bot.outbox import Outbox
from bot.outbox.postgres import PostgresStore
from bot.settings import SAMPLE_CATALOG_PATH
from bot.sim.phone import PhoneCall
from bot.sim.postgres import INSTALL_HINT, LocalPostgres, find_bin_dir
from bot.sim.realtime import Scenario, ToolCall, Turn
from bot.sim.stack import CALLER, SimStack
from bot.wav import read_wav

pytestmark = pytest.mark.anyio

AUDIO = SAMPLE_CATALOG_PATH.parent.parent / "sim" / "audio"
QUEUED = 30
TEXT_ME = Turn(
    hears="Text me the washer.",
    tool_calls=[ToolCall("send_product_details", {"skus": ["WM-2024-X500"]})],
    say="{message}",
    audio_ms=600,
)
SCENARIO = Scenario(greeting="Hi, how can I help?", turns=[TEXT_ME, TEXT_ME, TEXT_ME])


@pytest.fixture
def own_postgres() -> Iterator[LocalPostgres]:
    """A server of this test's own (the session's one must not restart under other tests)."""
    if find_bin_dir() is None:
        pytest.skip(f"no PostgreSQL server here: {INSTALL_HINT}")
    server = LocalPostgres()
    server.start()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture
async def stack(own_postgres: LocalPostgres) -> AsyncIterator[SimStack]:
    env = {
        "DATABASE_URL": own_postgres.url(),
        "WEBHOOK_RETRY_SCHEDULE_S": ",".join(["0.5"] * 20),
        "TWILIO_TIMEOUT_S": "3",
        "WEBHOOK_TIMEOUT_S": "3",
    }
    async with SimStack(SCENARIO, env=env) as stack:
        yield stack


async def take_turn(call: PhoneCall) -> None:
    await call.say(read_wav(AUDIO / "caller_text_me.wav").data)
    await call.wait_for_audio(timeout=15)
    await call.wait_until_quiet(quiet_ms=700, timeout=15)


async def health(stack: SimStack) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        body: dict[str, Any] = (await client.get(stack.app_url + "/healthz")).json()
        return body


async def wait_for_health(stack: SimStack, status: str) -> dict[str, Any]:
    for _ in range(300):
        body = await health(stack)
        if body["status"] == status:
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"/healthz never said {status}: {body}")


async def test_a_postgres_restart_mid_relay_loses_nothing_and_the_call_goes_on(
    own_postgres: LocalPostgres, stack: SimStack
) -> None:
    twilio = stack.twilio_api
    twilio.create_delay_s = 0.5
    callers = [f"+1555300{n:04d}" for n in range(QUEUED)]
    async with Outbox(PostgresStore(own_postgres.url())) as outbox:
        queued = [
            await outbox.add_product_details(
                call_sid="CA" + "c" * 32, caller=caller, collection=collection(1)
            )
            for caller in callers
        ]
    async with stack.dial(CALLER, pace=False) as call:
        await call.wait_for_audio(timeout=15)
        await call.wait_until_quiet(quiet_ms=700, timeout=15)
        await take_turn(call)  # details stored and texted
        for _ in range(200):
            if len(twilio.messages) >= 8:
                break
            await asyncio.sleep(0.05)

        await asyncio.to_thread(own_postgres.stop)  # mid-relay: creates are in flight
        await take_turn(call)  # the tool cannot store: the model is told, the call goes on
        degraded = await wait_for_health(stack, "degraded")
        await asyncio.to_thread(own_postgres.start)
        await wait_for_health(stack, "ok")
        await take_turn(call)  # stored again
    await stack.receiver.wait_until(
        lambda: len({d.headers["webhook-id"] for d in stack.receiver.acknowledged()}) == QUEUED + 3, 30
    )

    outputs = [json.loads(output) for _, output in stack.realtime.sessions[0].tool_outputs]
    assert [o["sent"] for o in outputs] == [True, False, True]
    assert "could not be stored" in outputs[1]["error"]
    assert len(stack.realtime.sessions) == 1, "the call kept its one Realtime session"
    assert "outbox" in degraded["degraded"]
    assert [len(twilio.messages_to(caller)) for caller in callers] == [1] * QUEUED
    assert len(twilio.messages_to(CALLER)) == 2, "one text per stored request"
    acknowledged = {d.headers["webhook-id"] for d in stack.receiver.acknowledged()}
    assert set(queued) <= acknowledged
    kinds = sorted(
        d.event["type"] for d in stack.receiver.acknowledged() if d.headers["webhook-id"] not in queued
    )
    assert kinds[:1] == ["call.completed"] and kinds.count("products.sent") >= 2
