"""The operators' console: who is on the line now, what was said, what was sent, what failed.

Off unless CONSOLE_PASSWORD is set: then every /console route asks for HTTP Basic (user
`operator`, compared in constant time, failures rate-limited per client); without it /console
answers 404, as if it did not exist. The page, its script and its style ship in bot/web/console/
and load from this app only (a strict Content-Security-Policy, no other host, so it works with no
internet). The live part is server-sent events from the call feed (bot/feed.py); the outbox part
is read from the database; the retry button is a POST that only this page's own origin may send.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from bot.logs import mask_numbers_in, mask_phone
from bot.outbox import Outbox, OutboxRow
from bot.outbox.rows import RETRYABLE_STATES, UNDELIVERED_STATES
from bot.ratelimit import SlidingWindowLimiter

CONSOLE_DIR = Path(__file__).parent / "web" / "console"
ASSETS = {"console.js": "text/javascript", "console.css": "text/css"}
OPERATOR = "operator"
CHALLENGE = {"WWW-Authenticate": 'Basic realm="voicebot console", charset="UTF-8"'}
FAILED_LOGINS_PER_MINUTE = 20
HEARTBEAT_S = 15.0
# The browser's EventSource reconnects this long after the feed drops (a restart, a deploy).
RECONNECT_MS = 2000
OUTBOX_ROWS_SHOWN = 50
MESSAGE_ID = re.compile(r"^msg_[0-9A-Z]{24}$")
POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        # Product pictures live on the store's media host (MEDIA_BASE_URL or the catalog's URLs).
        "img-src 'self' data: https: http:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
PAGE_HEADERS = {
    "Content-Security-Policy": POLICY,
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def operator_refusal(
    request: Request, password: str | None, failures: SlidingWindowLimiter
) -> Response | None:
    """None when the request carries the operator's credentials; else why not (404, 401 or 429).

    A client past FAILED_LOGINS_PER_MINUTE wrong passwords is refused before any check, so
    guessing goes no faster once the limit is reached, right guess or not.
    """
    if password is None:
        return Response(status_code=404)
    client = request.client.host if request.client else "unknown"
    wait_s = failures.blocked(client)
    if wait_s is not None:
        return Response("too many wrong passwords: wait a minute\n", 429, {"Retry-After": str(int(wait_s))})
    scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
    user, given = "", ""
    if scheme.lower() == "basic":
        try:
            user, _, given = base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            pass
    # Both compared every time, so the answer's timing tells nothing about which was wrong.
    right_user = same_secret(user, OPERATOR)
    right_password = same_secret(given, password)
    if right_user and right_password:
        return None
    if scheme:  # a wrong guess, not a browser's first visit without credentials
        failures.hit(client)
    return Response("the console needs the operator's password (CONSOLE_PASSWORD)\n", 401, headers=CHALLENGE)


def same_secret(given: str, expected: str) -> bool:
    """Constant-time, whatever the lengths: digests of equal size are compared, never the strings."""
    digest_given, digest_expected = (hashlib.sha256(text.encode()).digest() for text in (given, expected))
    return hmac.compare_digest(digest_given, digest_expected)


def asset(name: str) -> tuple[Path, str] | None:
    """One of the page's own files and its media type; None for anything else."""
    media_type = ASSETS.get(name)
    return (CONSOLE_DIR / name, media_type) if media_type else None


class CallsFeed(Protocol):
    """The calls a console shows: this process's (bot.feed.CallFeed), or every worker's."""

    def subscribe(self) -> AbstractAsyncContextManager[asyncio.Queue[str | None]]: ...


async def event_stream(feed: CallsFeed) -> AsyncIterator[str]:
    """The feed as server-sent events: the snapshot, then each change; a comment now and then
    keeps proxies from closing a quiet stream. Ends when this reader falls behind (the page
    reconnects to a fresh snapshot) or disconnects (the server stops iterating)."""
    yield f"retry: {RECONNECT_MS}\n\n"
    async with feed.subscribe() as events:
        while True:
            try:
                async with asyncio.timeout(HEARTBEAT_S):
                    event = await events.get()
            except TimeoutError:
                yield ": still here\n\n"
                continue
            if event is None:
                return
            yield f"data: {event}\n\n"


async def outbox_view(outbox: Outbox) -> dict[str, Any]:
    """Deliveries on their way and failed ones (the latest of each), with totals; numbers masked."""
    counts = await outbox.counts()
    rows = await outbox.list_rows(UNDELIVERED_STATES, latest=OUTBOX_ROWS_SHOWN)
    rows += await outbox.list_rows(RETRYABLE_STATES, latest=OUTBOX_ROWS_SHOWN)
    return {
        "pending": counts.undelivered,
        "failed": counts.failed,
        "rows": [row_view(row) for row in sorted(rows, key=lambda row: row.created_at, reverse=True)],
    }


def row_view(row: OutboxRow) -> dict[str, Any]:
    return {
        "message_id": row.message_id,
        "kind": row.kind,
        "channel": row.channel,
        "to": mask_phone(row.recipient) if row.recipient else None,
        "state": row.state,
        "attempts": row.attempts,
        "created_at": row.created_at,
        "next_attempt_at": row.next_attempt_at,
        "error_code": row.error_code,
        "reason": mask_numbers_in(row.last_error or ""),
        "retryable": row.state in RETRYABLE_STATES,
    }


async def retry(outbox: Outbox, message_id: str) -> Response:
    """Re-queues a message's failed deliveries (an SMS is looked up at Twilio before any resend)."""
    if not MESSAGE_ID.match(message_id):
        return JSONResponse({"error": "not a message id"}, 404)
    requeued = await outbox.requeue(message_id)
    if not requeued:
        return JSONResponse({"error": f"nothing to retry: {message_id} has no failed delivery"}, 409)
    return JSONResponse({"requeued": [{"channel": row.channel, "was": row.state} for row in requeued]})
