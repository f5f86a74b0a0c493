"""The console's call feed, as plain calls: what it publishes, to whom, and that with nobody
watching it does nothing at all."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from bot.call import TranscriptEntry
from bot.catalog import Catalog
from bot.feed import SUBSCRIBER_QUEUE_EVENTS, CallFeed
from bot.products import JsonData, ProductsCollection
from bot.settings import SAMPLE_CATALOG_PATH

pytestmark = pytest.mark.anyio

CALL_SID = "CA" + "3" * 32
CALLER = "+15551230001"
MEDIA = "https://cdn.example.com/media/"


@dataclass
class LiveCall:
    """What the feed reads from a call in progress (the LiveSource side of bot.call.Call)."""

    started_ms: int = 1_000
    transcript: list[TranscriptEntry] = field(default_factory=list)
    doing: str = "listening"

    def activity(self, now_ms: int) -> str:
        return self.doing


def new_feed() -> CallFeed:
    return CallFeed(
        media_base_url=MEDIA, now_ms=lambda: 5_000, wall_clock=lambda: 1_700_000_000.0, sample_every_s=0.01
    )


async def next_events(queue: asyncio.Queue[str | None], count: int) -> list[dict[str, Any]]:
    events = []
    for _ in range(count):
        async with asyncio.timeout(2):
            text = await queue.get()
        assert text is not None
        events.append(json.loads(text))
    return events


async def test_with_nobody_watching_nothing_is_published_and_no_timer_runs() -> None:
    feed = new_feed()
    call = LiveCall()
    feed.call_started(CALL_SID, CALLER, call)
    call.transcript.append(TranscriptEntry("user", "Hello?", 1_500))
    feed.turn_timed(CALL_SID, 800, 2)
    assert not feed.watched
    assert [task.get_name() for task in asyncio.all_tasks()].count("console-feed-sampler") == 0


async def test_a_subscriber_gets_the_snapshot_first_then_each_line_and_state_as_they_come() -> None:
    feed = new_feed()
    call = LiveCall(transcript=[TranscriptEntry("assistant", "Hi, how can I help?", 1_200)])
    feed.call_started(CALL_SID, CALLER, call)
    async with feed.subscribe() as queue:
        [snapshot] = await next_events(queue, 1)
        [live] = snapshot["live"]
        assert snapshot["type"] == "snapshot" and snapshot["now"] == 1_700_000_000.0
        assert (live["caller"], live["state"]) == ("***0001", "listening")
        assert [line["text"] for line in live["lines"]] == ["Hi, how can I help?"]
        assert live["lines"][0]["at_ms"] == 200
        call.transcript.append(TranscriptEntry("user", "Washing machines, please.", 3_000))
        call.doing = "tool_running"
        events = await next_events(queue, 2)
    assert {event["type"] for event in events} == {"line", "state"}
    line = next(event["line"] for event in events if event["type"] == "line")
    assert (line["role"], line["text"], line["at_ms"], line["index"]) == (
        "user",
        "Washing machines, please.",
        2_000,
        1,
    )


async def test_a_line_cut_short_by_a_barge_in_is_sent_again_under_the_same_index() -> None:
    feed = new_feed()
    said = TranscriptEntry("assistant", "The SmartWash is on sale this week and", 1_500)
    call = LiveCall(transcript=[said])
    feed.call_started(CALL_SID, CALLER, call)
    async with feed.subscribe() as queue:
        await next_events(queue, 1)
        said.text, said.interrupted = "The SmartWash is on sale", True
        [event] = await next_events(queue, 1)
    assert event["line"] == {
        "role": "assistant",
        "text": "The SmartWash is on sale",
        "at_ms": 500,
        "interrupted": True,
        "index": 0,
    }


async def test_no_full_phone_number_leaves_the_feed() -> None:
    feed = new_feed()
    call = LiveCall(transcript=[TranscriptEntry("user", "Call me back on 555 123 4567.", 1_100)])
    feed.call_started(CALL_SID, "+15551230001", call)
    async with feed.subscribe() as queue:
        feed.tool_ran(
            CALL_SID, "transfer_to_person", '{"reason": "call +15557654321"}', outcome="ok", at_ms=9, ms=1
        )
        feed.call_ended(CALL_SID, {"transcript": [{"role": "user", "text": "It's 5551234567", "at_ms": 0}]})
        text = "".join([await queue.get() or "" for _ in range(3)])
    for digits in ("5551230001", "5551234567", "5557654321", "555 123 4567"):
        assert digits not in text
    assert "***4567" in text and "***0001" in text


async def test_products_sent_become_cards_with_the_price_after_discount_and_absolute_links() -> None:
    feed = new_feed()
    feed.call_started(CALL_SID, CALLER, LiveCall())
    products, _ = Catalog.load(SAMPLE_CATALOG_PATH).get(["WM-2024-X500"])
    feed.products_sent(
        CALL_SID, ProductsCollection(TextMessage="Here.", JsonData=JsonData(products=products))
    )
    [card] = feed.snapshot()["live"][0]["products"]
    assert (card["name"], card["price"], card["price_after_discount"]) == (
        "SmartWash Pro 500 Front Load Washer",
        899.99,
        764.99,
    )
    assert card["picture"] == MEDIA + "smartwash_pro_500_front_load_washer_profile.jpg"
    assert set(card["links"]) == {"3D view", "AR view", "Video", "Technical sheet"}


async def test_an_ended_call_moves_to_the_recent_calls_newest_first_fifty_kept() -> None:
    feed = new_feed()
    for n in range(52):
        sid = f"CA{n:032d}"
        feed.call_started(sid, CALLER, LiveCall())
        feed.call_ended(
            sid, {"duration_s": n, "outcome": "caller_hung_up", "cost_usd": 0.01, "transcript": []}
        )
    snapshot = feed.snapshot()
    assert snapshot["live"] == []
    assert [call["duration_s"] for call in snapshot["recent"]][:3] == [51, 50, 49]
    assert len(snapshot["recent"]) == 50


async def test_a_console_that_falls_behind_is_let_go_and_the_others_keep_their_feed() -> None:
    feed = new_feed()
    feed.call_started(CALL_SID, CALLER, LiveCall())
    async with feed.subscribe() as slow, feed.subscribe() as fast:
        for n in range(SUBSCRIBER_QUEUE_EVENTS):
            feed.turn_timed(CALL_SID, n, 1)
            if n % 100 == 0:
                while not fast.empty():
                    fast.get_nowait()
        items = [slow.get_nowait() for _ in range(slow.qsize())]
        assert items[-1] is None, "the slow one is told to reconnect"
        feed.turn_timed(CALL_SID, 1, 1)
        assert slow.empty() and not fast.empty()


async def test_the_timer_stops_when_the_last_console_leaves() -> None:
    feed = new_feed()
    async with feed.subscribe():
        assert feed.watched
        assert "console-feed-sampler" in {task.get_name() for task in asyncio.all_tasks()}
    await asyncio.sleep(0)
    assert not feed.watched
    assert "console-feed-sampler" not in {task.get_name() for task in asyncio.all_tasks() if not task.done()}


async def test_what_happened_besides_words_is_a_line_of_its_own_and_tool_entries_are_not() -> None:
    feed = new_feed()
    call = LiveCall(
        transcript=[
            TranscriptEntry("tool", '{"found": 2}', 1_100, tool_name="search_products", call_id="c1"),
            TranscriptEntry("event", "idle_prompt", 11_000),
        ]
    )
    feed.call_started(CALL_SID, CALLER, call, store="Downtown")
    [live] = feed.snapshot()["live"]
    assert [(line["role"], line["text"]) for line in live["lines"]] == [("event", "idle_prompt")]
    assert live["store"] == "Downtown"
