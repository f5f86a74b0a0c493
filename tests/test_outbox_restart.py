"""kill -9 mid-relay, restart: nothing queued is lost, the SMS goes out once, webhooks keep their id.

The relay runs in a subprocess (`python -m bot outbox relay`) against the Twilio stand-in and a
webhook receiver in this test. The first process is killed while its SMS request hangs (Twilio
has created the message but not answered) and while a webhook is between retries; the second
takes the rows over once the dead relay's lease expires (short timeouts make that ~7 s), settles
the SMS by lookup and finishes the webhooks under the same ids.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from standardwebhooks import Webhook

from bot.outbox import Outbox, OutboxRow
from bot.outbox.sqlite import SqliteStore
from bot.products import ProductsCollection
from bot.settings import SAMPLE_CATALOG_PATH
from bot.sim.twilio_api import TwilioApiSimulator
from bot.sim.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[1]
CALLER = "+15551230001"
STORE = "+15557654321"
SECRET = "whsec_" + base64.b64encode(b"restart test secret, 32 bytes..!").decode()
WAIT_S = 20.0
RELAY_COMMAND = (sys.executable, "-m", "bot", "outbox", "relay")


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    """The call center: down (503) until the test clears the script, then 200."""
    async with WebhookReceiver(script=[(503, {})] * 1000) as hooks:
        yield hooks


async def spawn_relay(env: dict[str, str], log_path: Path) -> asyncio.subprocess.Process:
    log = log_path.open("ab")
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bot",
            "outbox",
            "relay",
            cwd=log_path.parent,
            env=env,
            stdout=log,
            stderr=log,
        )
    finally:
        log.close()


async def settled_rows(db: Path) -> list[OutboxRow]:
    """The outbox once the relay has recorded every outcome (it writes just after each answer)."""
    async with Outbox(SqliteStore(db)) as outbox:
        for _ in range(int(WAIT_S / 0.05)):
            rows = await outbox.list_rows()
            if all(r.state == "sent" for r in rows):
                return rows
            await asyncio.sleep(0.05)
    return rows


def collection() -> ProductsCollection:
    products = json.loads(SAMPLE_CATALOG_PATH.read_text())[:2]
    document = {
        "TextMessage": "Your washers.",
        "JsonData": {"jsonType": "ProductsCollection", "products": products},
    }
    return ProductsCollection.model_validate_json(json.dumps(document))


async def test_a_relay_killed_mid_retry_resumes_after_restart_with_nothing_lost(
    tmp_path: Path, receiver: WebhookReceiver
) -> None:
    created = asyncio.Event()
    sim = TwilioApiSimulator(on_record=lambda kind, entry: created.set())
    await sim.start()
    db = tmp_path / "outbox.sqlite3"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DATABASE_PATH": str(db),
        "TWILIO_ACCOUNT_SID": sim.account_sid,
        "TWILIO_AUTH_TOKEN": sim.auth_token,
        "TWILIO_FROM_NUMBER": STORE,
        "TWILIO_API_BASE": sim.base_url,
        "WEBHOOK_URL": receiver.url,
        "WEBHOOK_SECRET": SECRET,
        "WEBHOOK_RETRY_SCHEDULE_S": ",".join(["0.2"] * 100),
        "TWILIO_TIMEOUT_S": "2",
        "WEBHOOK_TIMEOUT_S": "2",
        "LOG_FORMAT": "text",
    }
    log_path = tmp_path / "relay.log"
    try:
        async with Outbox(SqliteStore(db)) as outbox:
            products_id = await outbox.add_product_details(
                call_sid="CA" + "b" * 32, caller=CALLER, collection=collection()
            )
            call_id = await outbox.add_call_completed(
                call_sid="CA" + "b" * 32, caller=CALLER, record={"duration_s": 61}
            )
            assert call_id is not None
        sim.hang_next(1, seconds=30)

        first = await spawn_relay(env, log_path)
        async with asyncio.timeout(WAIT_S):
            await created.wait()
        await receiver.wait_until(lambda: len(receiver.received) >= 2, WAIT_S)
        first.kill()
        assert await first.wait() == -9

        receiver.script.clear()
        second = await spawn_relay(env, log_path)
        await receiver.wait_until(
            lambda: len({r.headers["webhook-id"] for r in receiver.acknowledged()}) == 2, WAIT_S
        )
        rows = await settled_rows(db)
        second.kill()
        await second.wait()
    except BaseException:
        print(log_path.read_text() if log_path.exists() else "(no relay log)")
        raise
    finally:
        await sim.stop()

    assert len(sim.messages_to(CALLER)) == 1
    by_id: dict[str, list[int]] = {}
    for delivery in receiver.received:
        by_id.setdefault(delivery.headers["webhook-id"], []).append(delivery.status)
        if delivery.status == 200:
            Webhook(SECRET).verify(delivery.body, delivery.headers)
    assert set(by_id) == {products_id, call_id}
    assert all(statuses.count(200) == 1 for statuses in by_id.values())
    assert by_id[call_id][0] == 503
    assert {(r.message_id, r.channel, r.state) for r in rows} == {
        (products_id, "sms", "sent"),
        (products_id, "webhook", "sent"),
        (call_id, "webhook", "sent"),
    }
    sms_row = next(r for r in rows if r.channel == "sms")
    assert sms_row.result == [sim.messages[0]["sid"]]
