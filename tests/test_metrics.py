"""GET /metrics: Prometheus's text format, the voicebot_ families, the outbox read at scrape time,
and the optional bearer token. (Calls moving these families: tests/test_metrics_end_to_end.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from scrape import Scrape, scrape

from bot.app import Runtime, create_app
from bot.catalog import Catalog
from bot.metrics import Metrics
from bot.outbox.rows import OutboxCounts
from bot.products import JsonData, ProductsCollection
from bot.settings import SAMPLE_CATALOG_PATH, load_settings
from bot.sim.server import LocalServer

pytestmark = pytest.mark.anyio

TOKEN = "a-metrics-token-for-tests"
CALLER = "+15551230001"


async def serve(tmp_path: Path, **env: str) -> AsyncIterator[tuple[str, Runtime]]:
    settings = load_settings({"DATABASE_PATH": str(tmp_path / "outbox.sqlite3"), **env}, dotenv=None)
    app = create_app(settings)
    async with LocalServer(app) as server:
        yield server.base_url, app.state.runtime


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[tuple[str, Runtime]]:
    async for served in serve(tmp_path):
        yield served


@pytest.fixture
async def guarded(tmp_path: Path) -> AsyncIterator[tuple[str, Runtime]]:
    async for served in serve(tmp_path, METRICS_TOKEN=TOKEN):
        yield served


async def test_a_scrape_holds_every_family_an_operator_watches(app: tuple[str, Runtime]) -> None:
    url, _ = app
    names = (await scrape(url)).names()
    for family in (
        "voicebot_calls_active",
        "voicebot_calls_started_total",
        "voicebot_call_duration_seconds_count",
        "voicebot_turn_latency_seconds_count",
        "voicebot_turn_bot_latency_seconds_count",
        "voicebot_barge_ins_total",
        "voicebot_truncates_total",
        "voicebot_realtime_reconnects_total",
        "voicebot_realtime_refusals_total",
        "voicebot_realtime_rotations_total",
        "voicebot_uplink_frames_dropped_total",
        "voicebot_realtime_cost_usd_total",
        "voicebot_event_loop_lag_seconds_count",
        "voicebot_outbox_pending",
        "voicebot_outbox_failed",
        "voicebot_outbox_oldest_pending_age_seconds",
        "voicebot_outbox_available",
        "voicebot_processes",
        "voicebot_build_info",
    ):
        assert family in names, family
    assert all(name.startswith("voicebot_") for name in names)


async def test_the_event_loop_lag_is_measured_while_the_app_runs(app: tuple[str, Runtime]) -> None:
    url, _ = app
    await asyncio.sleep(1.2)
    assert (await scrape(url)).value("voicebot_event_loop_lag_seconds_count") >= 2


async def test_the_outbox_gauges_come_from_the_database_at_scrape_time(app: tuple[str, Runtime]) -> None:
    url, runtime = app
    assert runtime.outbox is not None
    catalog = Catalog.load(SAMPLE_CATALOG_PATH)
    products, _ = catalog.get(["WM-2024-X500"])
    details = ProductsCollection(TextMessage="Here you are.", JsonData=JsonData(products=products))
    await runtime.outbox.add_product_details(call_sid="CA" + "1" * 32, caller=CALLER, collection=details)
    # No Twilio account here: the relay records the SMS as failed, and it stays failed.
    for _ in range(100):
        if (await runtime.outbox.counts()).failed["sms"] == 1:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(2.1)  # past the scrape cache
    after = await scrape(url)
    assert after.value("voicebot_outbox_available") == 1
    assert after.value("voicebot_outbox_failed", channel="sms") == 1
    assert after.value("voicebot_outbox_pending", channel="sms") == 0
    assert after.value("voicebot_sms_total", status="failed", code="") == 1


async def test_without_the_token_a_guarded_scrape_is_refused_with_a_bearer_challenge(
    guarded: tuple[str, Runtime],
) -> None:
    url, _ = guarded
    async with httpx.AsyncClient() as client:
        for headers in ({}, {"Authorization": "Bearer wrong-token-of-some-length"}, {"Authorization": TOKEN}):
            response = await client.get(url + "/metrics", headers=headers)
            assert response.status_code == 401
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert "voicebot_" not in response.text
    assert (await scrape(url, TOKEN)).value("voicebot_processes") == 1


async def test_the_oldest_waiting_delivery_ages_with_the_clock() -> None:
    metrics = Metrics()
    waiting = OutboxCounts({"sms": 1, "webhook": 0}, {"sms": 0, "webhook": 0}, 1000.0)

    async def counts() -> OutboxCounts:
        return waiting

    text = (await metrics.exposition(counts, now=1042.5)).decode()
    assert Scrape.parse(text).value("voicebot_outbox_oldest_pending_age_seconds") == 42.5


async def test_an_outbox_that_does_not_answer_shows_as_unavailable_not_as_an_error() -> None:
    async def broken() -> OutboxCounts:
        raise OSError("database is locked")

    scraped = Scrape.parse((await Metrics().exposition(broken, now=0)).decode())
    assert scraped.value("voicebot_outbox_available") == 0
    assert "voicebot_outbox_pending" not in scraped.names()
