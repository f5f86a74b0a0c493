"""`python -m bot outbox`: an operator lists, retries and re-enables deliveries, on either store."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest
from outbox_rig import CALLER, Rig, drain

from bot.outbox.cli import main
from bot.outbox.postgres import PostgresStore
from bot.outbox.sqlite import SqliteStore
from bot.sim.postgres import free_port

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """One event loop for the module, so the stand-ins start once, not once per test."""
    return "asyncio"


def db_of(rig: Rig) -> str:
    store = rig.stores()
    return str(store.path) if isinstance(store, SqliteStore) else store.url  # type: ignore[attr-defined]


async def run(rig: Rig, *args: str) -> int:
    """The command as an operator runs it, beside the running test (it opens its own store)."""
    return await asyncio.to_thread(main, ["--db", db_of(rig), *args])


async def test_the_list_shows_open_rows_with_masked_numbers_and_hides_sent_ones(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    rig.sim.unsubscribed.add(CALLER)
    failed_id = await rig.add()
    await rig.relay().relay_due()
    pending_id = await rig.add()
    assert await run(rig) == 0
    out = capsys.readouterr().out
    assert failed_id in out and pending_id in out and "[21610]" in out
    assert "***0001" in out and CALLER not in out
    assert "sent" not in out.split()


async def test_retry_requeues_a_failed_sms_which_is_then_looked_up_and_sent_once(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    rig.sim.unsubscribed.add(CALLER)
    message_id = await rig.add()
    relay = rig.relay()
    await drain(relay, rig.clock)
    rig.sim.unsubscribed.clear()
    assert await run(rig, "retry", message_id) == 0
    out = capsys.readouterr().out
    assert f"re-queued {message_id} sms (was failed: [21610]" in out and "looked up" in out
    await drain(relay, rig.clock)
    assert len(rig.sim.messages_to(CALLER)) == 1


async def test_retry_of_an_unknown_or_delivered_message_exits_1_saying_why(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    message_id = await rig.add()
    await drain(rig.relay(), rig.clock)
    assert await run(rig, "retry", message_id) == 1
    assert "no failed delivery (sms sent, webhook sent)" in capsys.readouterr().err
    assert await run(rig, "retry", "msg_NOSUCHMESSAGE") == 1
    assert "no message msg_NOSUCHMESSAGE" in capsys.readouterr().err


async def test_after_a_410_the_list_says_webhooks_are_off_until_enable_webhooks(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    rig.receiver.script = [(410, {})]
    message_id = await rig.add_record()
    relay = rig.relay()
    await drain(relay, rig.clock)
    assert await run(rig) == 0
    out = capsys.readouterr().out
    assert f"webhooks to {rig.receiver.url} are OFF" in out and message_id in out
    assert await run(rig, "enable-webhooks") == 0
    assert f"webhooks to {rig.receiver.url} re-enabled" in capsys.readouterr().out
    await drain(relay, rig.clock)
    assert [d.headers["webhook-id"] for d in rig.receiver.acknowledged()] == [message_id]


def test_an_unreachable_database_url_exits_2_with_one_line_naming_it() -> None:
    url = f"postgresql://bot:s3cret@127.0.0.1:{free_port()}/voicebot"
    done = subprocess.run(
        [sys.executable, "-m", "bot", "outbox"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "DATABASE_URL": url},
    )
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("DATABASE_URL postgresql://bot:***@127.0.0.1:") and "s3cret" not in line
    assert PostgresStore(url).target in line
