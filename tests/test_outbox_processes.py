"""Separate `serve` processes share one outbox, and one dies mid-relay: no SMS twice, nothing lost.

Run on PostgreSQL, then on one SQLite file. 200 product messages for different callers (half
queued before the processes start, half while they relay); the Twilio stand-in takes 1 s per
create, creating the message at the end of that second, and answers 500 after creating it for
some callers; some callers opted out of texts (Twilio refuses them, 21610). Two processes
relay; one is killed with SIGKILL while its requests are in flight and started again; a third
starts late. Timeouts are short (TWILIO_TIMEOUT_S and WEBHOOK_TIMEOUT_S 3 s, so a lease of 8 s)
to keep the test near 20 s.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from outbox_rig import collection
from standardwebhooks import Webhook

from bot.outbox import Outbox, OutboxRow
from bot.outbox.postgres import PostgresStore
from bot.outbox.rows import SETTLED_STATES
from bot.outbox.sqlite import SqliteStore
from bot.outbox.store import OutboxStore
from bot.sim.postgres import LocalPostgres
from bot.sim.server import ServeProcess
from bot.sim.twilio_api import TwilioApiSimulator
from bot.sim.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.anyio

MESSAGES = 200
CREATE_DELAY_S = 1.0
SECRET = "whsec_" + base64.b64encode(b"processes test secret, 32 bytes!").decode()
CALLERS = [f"+1555{n:07d}" for n in range(MESSAGES)]
OPTED_OUT = {caller for n, caller in enumerate(CALLERS) if n % 25 == 3}
AMBIGUOUS = {caller for n, caller in enumerate(CALLERS) if n % 10 == 5}
SETTLE_TIMEOUT_S = 60.0


class Created:
    """Counts the messages the Twilio stand-in creates; `reach(n)` waits for the n-th."""

    def __init__(self) -> None:
        self.count = 0
        self.changed = asyncio.Event()

    def __call__(self, kind: str, entry: dict[str, Any]) -> None:
        if kind == "message":
            self.count += 1
            self.changed.set()

    async def reach(self, count: int) -> None:
        async with asyncio.timeout(SETTLE_TIMEOUT_S):
            while self.count < count:
                self.changed.clear()
                await self.changed.wait()


StandIns = tuple[TwilioApiSimulator, Created, WebhookReceiver]


@pytest.fixture
async def stand_ins() -> AsyncIterator[StandIns]:
    created = Created()
    async with TwilioApiSimulator(on_record=created) as twilio, WebhookReceiver() as receiver:
        twilio.create_delay_s = CREATE_DELAY_S
        twilio.unsubscribed |= OPTED_OUT
        twilio.ambiguous_once |= AMBIGUOUS
        yield twilio, created, receiver


def database(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> tuple[dict[str, str], OutboxStore]:
    if kind == "sqlite":
        path = tmp_path / "outbox.sqlite3"
        return {"DATABASE_PATH": str(path)}, SqliteStore(path)
    server: LocalPostgres = request.getfixturevalue("postgres")
    url = server.create_database()
    return {"DATABASE_URL": url}, PostgresStore(url)


async def queue(outbox: Outbox, callers: list[str]) -> list[str]:
    return [
        await outbox.add_product_details(call_sid="CA" + f"{n:032x}", caller=caller, collection=collection(1))
        for n, caller in enumerate(callers)
    ]


@pytest.mark.parametrize("kind", ["postgres", "sqlite"])
async def test_processes_sharing_an_outbox_send_each_sms_once_and_lose_nothing_when_one_is_killed(
    kind: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    stand_ins: StandIns,
) -> None:
    twilio, created, receiver = stand_ins
    db_env, store = database(kind, tmp_path, request)
    env = {
        **db_env,
        "TWILIO_ACCOUNT_SID": twilio.account_sid,
        "TWILIO_AUTH_TOKEN": twilio.auth_token,
        "TWILIO_FROM_NUMBER": "+15550001111",
        "TWILIO_API_BASE": twilio.base_url,
        "TWILIO_TIMEOUT_S": "3",
        "WEBHOOK_URL": receiver.url,
        "WEBHOOK_SECRET": SECRET,
        "WEBHOOK_TIMEOUT_S": "3",
        "OPENAI_API_KEY": "",
        "LOG_LEVEL": "WARNING",
        "LOG_FORMAT": "text",
    }
    started = time.monotonic()
    processes: list[ServeProcess] = []
    async with Outbox(store) as outbox:
        ids = await queue(outbox, CALLERS[: MESSAGES // 2])
        try:
            processes += [spawn("a", tmp_path, env), spawn("b", tmp_path, env)]
            await asyncio.gather(*(p.wait_healthy() for p in processes))
            ids += await queue(outbox, CALLERS[MESSAGES // 2 :])

            await created.reach(40)
            processes[0].kill()  # mid-relay: its creates are in flight
            processes.append(spawn("a-again", tmp_path, env))
            await created.reach(100)
            processes.append(spawn("c-late", tmp_path, env))

            await receiver.wait_until(
                lambda: {d.headers["webhook-id"] for d in receiver.acknowledged()} >= set(ids),
                SETTLE_TIMEOUT_S,
            )
            rows = await settled(outbox)
        except BaseException:
            for process in processes:
                print(f"--- {process.name}\n{process.log_tail()}")
            raise
        finally:
            await asyncio.gather(*(p.stop() for p in processes))
    print(
        f"{kind}: settled in {time.monotonic() - started:.1f} s; {len(twilio.messages)} SMS, "
        f"{len(receiver.received)} webhook deliveries for {MESSAGES} events"
    )

    for caller in CALLERS:
        assert len(twilio.messages_to(caller)) == (0 if caller in OPTED_OUT else 1), caller
    states = {(row.channel, row.state, row.error_code) for row in rows}
    assert states == {("sms", "sent", None), ("sms", "failed", 21610), ("webhook", "sent", None)}
    assert len(rows) == 2 * MESSAGES
    events = check_webhooks(receiver, set(ids))
    for caller, message_id in zip(CALLERS, ids, strict=True):
        sms = events[message_id]["data"]["sms"]
        if caller in OPTED_OUT:
            assert sms["status"] == "failed" and sms["error"]["code"] == 21610
        else:
            assert sms == {"status": "sent", "message_sids": [twilio.messages_to(caller)[0]["sid"]]}
    logs = "".join(p.log_path.read_text() for p in processes)
    assert "taking over a delivery whose relay stopped renewing its lease" in logs, "none was in flight"


def spawn(name: str, folder: Path, env: dict[str, str]) -> ServeProcess:
    """A `serve` process started now, not waited for (the test decides when it must be up)."""
    process = ServeProcess({**os.environ, **env}, folder, name=name)
    process.spawn()
    return process


async def settled(outbox: Outbox) -> list[OutboxRow]:
    """The rows once every outcome is written (a relay records it just after the answer)."""
    for _ in range(int(SETTLE_TIMEOUT_S / 0.1)):
        rows = await outbox.list_rows()
        if all(row.state in SETTLED_STATES for row in rows):
            return rows
        await asyncio.sleep(0.1)
    return rows


def check_webhooks(receiver: WebhookReceiver, ids: set[str]) -> dict[str, dict[str, Any]]:
    """Every event arrived (at least once), each id always with the same signed body."""
    bodies: dict[str, set[bytes]] = {}
    for delivery in receiver.received:
        bodies.setdefault(delivery.headers["webhook-id"], set()).add(delivery.body)
        Webhook(SECRET).verify(delivery.body, delivery.headers)
    assert set(bodies) == ids
    assert all(len(each) == 1 for each in bodies.values())
    return {message_id: json.loads(next(iter(body))) for message_id, body in bodies.items()}
