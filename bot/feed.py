"""The console's live feed: the calls in progress, line by line, and the calls that just ended.

The bridge tells the feed a few things per call (started, a tool ran, products sent, a turn's
latency, ended). What changes inside a call between those (what it is doing, each transcript
line) the feed reads from the call itself, five times a second, and only while someone watches:
with no console open there is no timer, no event and nothing per frame or per line, just one
entry per call in progress and a short list of ended ones.

Nothing leaves the feed with a phone number in it: callers are masked, and any run of seven
digits or more in what was said is masked too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from bot.logs import mask_numbers_in, mask_phone
from bot.products import ProductsCollection, with_absolute_links

log = logging.getLogger(__name__)

SAMPLE_EVERY_S = 0.2
RECENT_CALLS = 50
# A console that reads slower than calls happen is dropped; its page reconnects to a snapshot.
SUBSCRIBER_QUEUE_EVENTS = 2000
# Lines that may still change after they were shown (a barge-in trims what the bot said).
REVISABLE_LINES = 4
TOOL_SUMMARY_CHARS = 120

Event = dict[str, Any]


class Line(Protocol):
    """A transcript entry as `bot.call` keeps it: the caller's words, the bot's, a tool call, or
    an event of the call (the bot asked a silent caller whether they are still there...)."""

    @property
    def role(self) -> str: ...
    @property
    def text(self) -> str: ...
    @property
    def at_ms(self) -> int: ...
    @property
    def interrupted(self) -> bool: ...


class LiveSource(Protocol):
    """What the feed reads from a call in progress (`bot.call.Call`)."""

    @property
    def started_ms(self) -> int: ...
    @property
    def transcript(self) -> Sequence[Line]: ...

    def activity(self, now_ms: int) -> str: ...


@dataclass
class LiveCall:
    """One call in progress, as the console shows it, and how much of it subscribers have seen."""

    call_sid: str
    caller: str
    started_at: float
    source: LiveSource
    store: str | None = None
    tools: list[Event] = field(default_factory=list)
    products: list[Event] = field(default_factory=list)
    turns: list[Event] = field(default_factory=list)
    state: str = ""
    lines: list[Event] = field(default_factory=list)
    transcript_read: int = 0

    def view(self) -> Event:
        return {
            "call_sid": self.call_sid,
            "caller": self.caller,
            "store": self.store,
            "started_at": self.started_at,
            "state": self.state,
            "lines": self.lines,
            "tools": self.tools,
            "products": self.products,
            "turns": self.turns,
        }


class CallFeed:
    """Calls in progress and recently ended, for the operators' console (see the module docstring).

    `now_ms` is the clock the calls' `now_ms` come from (the event loop's, in milliseconds).
    """

    def __init__(
        self,
        *,
        media_base_url: str,
        now_ms: Callable[[], int] | None = None,
        wall_clock: Callable[[], float] = time.time,
        sample_every_s: float = SAMPLE_EVERY_S,
    ) -> None:
        self._media_base_url = media_base_url
        self._now_ms = now_ms or (lambda: int(asyncio.get_running_loop().time() * 1000))
        self._wall_clock = wall_clock
        self._sample_every_s = sample_every_s
        self._live: dict[str, LiveCall] = {}
        self._recent: deque[Event] = deque(maxlen=RECENT_CALLS)
        self._subscribers: set[asyncio.Queue[str | None]] = set()
        self._sampler: asyncio.Task[None] | None = None

    @property
    def watched(self) -> bool:
        return bool(self._subscribers)

    # --- what the bridge reports -------------------------------------------------------------

    def call_started(
        self, call_sid: str, caller: str, source: LiveSource, *, store: str | None = None
    ) -> None:
        """`store`: the store's name, where the deployment has several (bot/stores.py)."""
        live = LiveCall(call_sid, mask_phone(caller) or "unknown", self._wall_clock(), source, store)
        self._live[call_sid] = live
        if self._subscribers:
            self._read(live)
            self._publish({"type": "call", "call": live.view()})

    def tool_ran(
        self, call_sid: str, name: str, arguments: str, *, outcome: str, at_ms: int, ms: int
    ) -> None:
        """`at_ms`: when the model asked for it, from the call's start; `ms`: how long it took."""
        live = self._live.get(call_sid)
        if live is None:
            return
        summary = summarize_arguments(name, arguments)
        tool = {"name": name, "summary": summary, "outcome": outcome, "at_ms": at_ms, "ms": ms}
        live.tools.append(tool)
        self._publish({"type": "tool", "call_sid": call_sid, "tool": tool})

    def products_sent(self, call_sid: str, collection: ProductsCollection) -> None:
        live = self._live.get(call_sid)
        if live is None:
            return
        cards = [self._card(product) for product in collection.JsonData.products]
        live.products.extend(cards)
        self._publish({"type": "products", "call_sid": call_sid, "products": cards})

    def turn_timed(self, call_sid: str, latency_ms: int, bot_ms: int) -> None:
        live = self._live.get(call_sid)
        if live is None:
            return
        turn = {"latency_ms": latency_ms, "bot_ms": bot_ms}
        live.turns.append(turn)
        self._publish({"type": "turn", "call_sid": call_sid, "turn": turn})

    def call_ended(self, call_sid: str, record: dict[str, Any]) -> None:
        """`record`: the end-of-call record (bot.call.Call.record plus the bridge's fields)."""
        live = self._live.pop(call_sid, None)
        if live is None:
            return
        ended = {
            "call_sid": call_sid,
            "caller": live.caller,
            "store": live.store,
            "started_at": live.started_at,
            "duration_s": record.get("duration_s"),
            "outcome": record.get("outcome"),
            "cost_usd": record.get("cost_usd"),
            "lines": [
                _line(e["role"], e["text"], e["at_ms"], e.get("interrupted", False))
                for e in record.get("transcript", [])
                if e["role"] != "tool"
            ],
            "tools": live.tools,
            "products": live.products,
            "turns": live.turns,
        }
        self._recent.appendleft(ended)
        self._publish({"type": "ended", "call": ended})

    # --- what the console reads ------------------------------------------------------------

    def snapshot(self) -> Event:
        """Everything the console shows, as of now (those already watching get what changed first)."""
        self._catch_up()
        return {
            "type": "snapshot",
            "now": self._wall_clock(),
            "live": [live.view() for live in self._live.values()],
            "recent": list(self._recent),
        }

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[str | None]]:
        """A queue of JSON events, the snapshot first; None means this subscriber fell behind."""
        queue: asyncio.Queue[str | None] = asyncio.Queue(SUBSCRIBER_QUEUE_EVENTS)
        queue.put_nowait(json.dumps(self.snapshot()))
        self._subscribers.add(queue)
        if self._sampler is None:
            self._sampler = asyncio.create_task(self._sample(), name="console-feed-sampler")
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)
            if not self._subscribers and self._sampler is not None:
                self._sampler.cancel()
                self._sampler = None

    # --- internals ---------------------------------------------------------------------------

    def _publish(self, event: Event) -> None:
        if not self._subscribers:
            return
        text = json.dumps(event)
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(text)
            except asyncio.QueueFull:
                log.warning("console fell behind the live feed: it reconnects to a fresh snapshot")
                self._subscribers.discard(queue)
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
                queue.put_nowait(None)

    async def _sample(self) -> None:
        """While someone watches: each call's state and new transcript lines, as they change."""
        while True:
            await asyncio.sleep(self._sample_every_s)
            self._catch_up()

    def _catch_up(self) -> None:
        for live in list(self._live.values()):
            for event in self._read(live):
                self._publish(event)

    def _read(self, live: LiveCall) -> list[Event]:
        """Brings `live` up to date with its call; returns the events for what changed."""
        events: list[Event] = []
        state = live.source.activity(self._now_ms())
        if state != live.state:
            live.state = state
            events.append({"type": "state", "call_sid": live.call_sid, "state": state})
        transcript = live.source.transcript
        for index in range(max(0, live.transcript_read - REVISABLE_LINES), len(transcript)):
            entry = transcript[index]
            if entry.role == "tool":
                continue
            line = _line(entry.role, entry.text, entry.at_ms - live.source.started_ms, entry.interrupted)
            line["index"] = index
            known = next((shown for shown in reversed(live.lines) if shown["index"] == index), None)
            if known == line:
                continue
            if known is None:
                live.lines.append(line)
            else:
                known.update(line)
            events.append({"type": "line", "call_sid": live.call_sid, "line": line})
        live.transcript_read = len(transcript)
        return events

    def _card(self, product: Any) -> Event:
        shown = with_absolute_links(product, self._media_base_url)
        return {
            "sku": shown.sku,
            "name": shown.name,
            "brand": shown.brand,
            "picture": shown.profilePic,
            "price": shown.price,
            "discount": shown.discount,
            "price_after_discount": shown.price_after_discount,
            "links": {
                label: link
                for label, link in (
                    ("3D view", shown.Link3D),
                    ("AR view", shown.LinkAR),
                    ("Video", shown.LinkVideo),
                    ("Technical sheet", shown.TechnicalSheet),
                )
                if link
            },
        }


def _line(role: str, text: str, at_ms: int, interrupted: bool) -> Event:
    """A transcript line as the console gets it: who, what (numbers masked), when, cut short or not."""
    return {"role": role, "text": mask_numbers_in(text), "at_ms": at_ms, "interrupted": interrupted}


def summarize_arguments(name: str, arguments: str) -> str:
    """A few words on what the model asked a tool for, numbers masked (never the raw JSON)."""
    try:
        parsed = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        return "arguments that are not JSON"
    if not isinstance(parsed, dict):
        return ""
    if name == "search_products":
        summary = str(parsed.get("query", ""))
    elif name == "send_product_details":
        skus = parsed.get("skus")
        summary = f"{len(skus)} product{'s' if len(skus) != 1 else ''}" if isinstance(skus, list) else ""
    elif name == "transfer_to_person":
        summary = str(parsed.get("reason", ""))
    else:
        summary = ""
    return mask_numbers_in(summary[:TOOL_SUMMARY_CHARS])
