"""The console across `serve --workers N`: every worker's calls, whichever worker the page reached.

Each worker has its own calls, and its own call feed (bot/feed.py). `serve` gives the workers a
private folder (VOICEBOT_FEED_DIR); each serves its feed there on a Unix socket, one JSON event a
line. A console's stream, on whichever worker it lands, subscribes to its own feed and to every
sibling's socket, merges their snapshots into one, then passes every event on. A sibling that
goes away (a restart) ends the stream, and the page reconnects to a fresh merged snapshot.

Only an open console creates these connections, so with nobody watching nothing runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from bot.feed import RECENT_CALLS, SUBSCRIBER_QUEUE_EVENTS, CallFeed

log = logging.getLogger(__name__)

FEED_DIR_ENV = "VOICEBOT_FEED_DIR"
SNAPSHOT_WAIT_S = 3.0
# A snapshot with a few hundred calls and their transcripts is far below this.
MAX_LINE_BYTES = 64 * 1024 * 1024


def feed_dir() -> Path | None:
    path = os.environ.get(FEED_DIR_ENV)
    return Path(path) if path else None


@contextlib.contextmanager
def shared_feed_folder(workers: int) -> Iterator[None]:
    """Around `serve`'s uvicorn.run: with several workers, the folder where they find each other."""
    if workers == 1:
        yield
        return
    folder = tempfile.mkdtemp(prefix="voicebot-feeds-")
    os.environ[FEED_DIR_ENV] = folder
    try:
        yield
    finally:
        del os.environ[FEED_DIR_ENV]
        shutil.rmtree(folder, ignore_errors=True)


class WorkerFeeds:
    """This worker's feed served to its siblings, and a subscription to all of them at once."""

    def __init__(self, feed: CallFeed, folder: Path, *, worker: str | None = None) -> None:
        """`worker`: this worker's name in the folder (default: its process id)."""
        self._feed = feed
        self._folder = folder
        self._path = folder / f"feed-{worker or os.getpid()}.sock"
        self._server: asyncio.Server | None = None
        self._readers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self._path))

    async def stop(self) -> None:
        """Stops serving; siblings' consoles reading this worker see their stream end at once."""
        if self._server is not None:
            self._server.close()
            for writer in list(self._readers):
                writer.close()
            await self._server.wait_closed()
            self._server = None
        self._path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A sibling's console reads this worker's feed until it hangs up (its end of file)."""
        self._readers.add(writer)
        hung_up = asyncio.ensure_future(reader.read())
        try:
            async with self._feed.subscribe() as events:
                while True:
                    event = asyncio.ensure_future(events.get())
                    await asyncio.wait({event, hung_up}, return_when=asyncio.FIRST_COMPLETED)
                    if not event.done():
                        event.cancel()
                        return
                    text = event.result()
                    if text is None:
                        return
                    writer.write(text.encode() + b"\n")
                    await writer.drain()
        except (ConnectionError, OSError):
            return
        finally:
            hung_up.cancel()
            self._readers.discard(writer)
            writer.close()

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[str | None]]:
        """Like CallFeed.subscribe, over every worker: one merged snapshot, then every event."""
        merged: asyncio.Queue[str | None] = asyncio.Queue(SUBSCRIBER_QUEUE_EVENTS)
        async with contextlib.AsyncExitStack() as stack:
            local = await stack.enter_async_context(self._feed.subscribe())
            sources: list[Source] = [local]
            for path in sorted(self._folder.glob("feed-*.sock")):
                if path != self._path:
                    reader = await self._connect(path, stack)
                    if reader is not None:
                        sources.append(reader)
            answered = [(source, await _read(source, SNAPSHOT_WAIT_S)) for source in sources]
            answered = [(source, snapshot) for source, snapshot in answered if snapshot is not None]
            merged.put_nowait(json.dumps(_merge([json.loads(snapshot or "") for _, snapshot in answered])))
            pumps = [asyncio.create_task(_pump(source, merged)) for source, _ in answered]
            for pump in pumps:
                stack.callback(pump.cancel)
            yield merged

    async def _connect(self, path: Path, stack: contextlib.AsyncExitStack) -> asyncio.StreamReader | None:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(path), limit=MAX_LINE_BYTES), SNAPSHOT_WAIT_S
            )
        except (OSError, TimeoutError):
            return None  # a worker that is gone (its socket file outlived it) or not answering
        stack.callback(writer.close)
        return reader


Source = asyncio.Queue[str | None] | asyncio.StreamReader


async def _read(source: Source, timeout_s: float | None = None) -> str | None:
    """A source's next event; None when it ended (or, with a timeout, did not answer in time)."""
    if isinstance(source, asyncio.Queue):
        return await source.get()
    try:
        async with asyncio.timeout(timeout_s):
            line = await source.readline()
    except (TimeoutError, ValueError, ConnectionError):
        return None
    return line.decode().rstrip("\n") or None


async def _pump(source: Source, merged: asyncio.Queue[str | None]) -> None:
    """Passes a source's events on; when it ends, so does the stream (the page then reconnects)."""
    while True:
        event = await _read(source)
        if event is None or merged.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                merged.get_nowait()
            merged.put_nowait(None)
            return
        merged.put_nowait(event)


def _merge(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    """One snapshot of every worker's calls: all live ones, the latest ended ones across them all."""
    recent = sorted(
        (call for s in snapshots for call in s["recent"]), key=lambda c: c["started_at"], reverse=True
    )
    return {
        "type": "snapshot",
        "now": snapshots[0]["now"] if snapshots else 0,
        "live": [call for s in snapshots for call in s["live"]],
        "recent": recent[:RECENT_CALLS],
    }
