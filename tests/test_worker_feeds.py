"""The console across workers, in one process: two call feeds, each served on its Unix socket,
read through either one."""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bot.call import TranscriptEntry
from bot.feed import CallFeed
from bot.worker_feeds import WorkerFeeds

pytestmark = pytest.mark.anyio


@dataclass
class LiveCall:
    started_ms: int = 0
    transcript: list[TranscriptEntry] = field(default_factory=list)

    def activity(self, now_ms: int) -> str:
        return "listening"


@dataclass
class Worker:
    feed: CallFeed
    feeds: WorkerFeeds


@pytest.fixture
async def workers() -> AsyncIterator[list[Worker]]:
    # A short path: a Unix socket's must stay under about 100 characters.
    with tempfile.TemporaryDirectory(prefix="feeds-") as folder:
        made = []
        for name in ("a", "b"):
            feed = CallFeed(media_base_url="https://cdn.example.com/", now_ms=lambda: 0, sample_every_s=0.01)
            made.append(Worker(feed, WorkerFeeds(feed, Path(folder), worker=name)))
        for worker in made:
            await worker.feeds.start()
        try:
            yield made
        finally:
            for worker in made:
                await worker.feeds.stop()


async def next_event(queue: asyncio.Queue[str | None]) -> dict[str, Any] | None:
    async with asyncio.timeout(5):
        text = await queue.get()
    return None if text is None else json.loads(text)


async def test_either_worker_shows_both_workers_calls_and_what_happens_on_them(workers: list[Worker]) -> None:
    a, b = workers
    a.feed.call_started("CA" + "a" * 32, "+15551230101", LiveCall())
    b.feed.call_started("CA" + "b" * 32, "+15551230102", LiveCall())
    b.feed.call_ended("CA" + "b" * 32, {"duration_s": 3, "outcome": "caller_hung_up", "transcript": []})
    async with a.feeds.subscribe() as events:
        snapshot = await next_event(events)
        assert snapshot is not None
        assert [call["caller"] for call in snapshot["live"]] == ["***0101"]
        assert [call["caller"] for call in snapshot["recent"]] == ["***0102"]
        b.feed.call_started("CA" + "c" * 32, "+15551230103", LiveCall())
        started = await next_event(events)
    assert started is not None and started["type"] == "call" and started["call"]["caller"] == "***0103"


async def test_a_worker_going_away_ends_the_stream_so_the_page_reconnects(workers: list[Worker]) -> None:
    a, b = workers
    async with a.feeds.subscribe() as events:
        await next_event(events)
        await b.feeds.stop()
        assert await next_event(events) is None


async def test_nobody_watching_means_no_connection_between_workers(workers: list[Worker]) -> None:
    a, b = workers
    async with a.feeds.subscribe():
        await asyncio.sleep(0.05)
        assert a.feed.watched and b.feed.watched
    for _ in range(100):
        if not b.feed.watched:
            break
        await asyncio.sleep(0.01)
    assert not a.feed.watched and not b.feed.watched
