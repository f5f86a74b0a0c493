"""The relay: delivers due outbox rows, once per SMS and at least once per webhook, through faults.

- SMS to the caller through Twilio. Message creation is not idempotent, so a 5xx or a timeout
  marks the row *ambiguous*, and the next attempt first lists the caller's recent messages for
  the row's reference ("Ref K7Q2"): found means sent, not found means send. A 429 is retried
  after its Retry-After; Twilio's refusals (21211, 21610, 21614...) are recorded, never retried.
- SMS go from the row's store's number (TWILIO_FROM_NUMBER for the default store).
- Webhooks to the row's store's call center (WEBHOOK_URL for the default store), signed with
  that store's secret, looked up when sent (rows never hold one), the Standard Webhooks way:
  `webhook-id` is the message id on every attempt, `webhook-timestamp` and `webhook-signature`
  are fresh per attempt. A
  `products.sent` event waits for its SMS to settle so it can report the SMS status. Timeouts,
  connection errors, 3xx (never followed), 408, 429 and 5xx are retried on
  WEBHOOK_RETRY_SCHEDULE_S with jitter (Retry-After honoured when longer); other 4xx are
  recorded as permanent; an exhausted schedule dead-letters the row with an alert log. A 410
  disables that URL for every relay sharing the outbox, with one alert log line, until an
  operator runs `python -m bot outbox enable-webhooks`; its rows wait meanwhile (other stores'
  call centers go on receiving theirs).

Any number of relays (processes, machines) may share one outbox. A relay leases the rows it
claims for longer than its longest single request (TWILIO_TIMEOUT_S or WEBHOOK_TIMEOUT_S plus a
margin), renews the lease before a request when less than that is left, and sends nothing on a
row it no longer holds. A relay that dies leaves its rows to whoever claims them once the lease
expires: an SMS is looked up before any resend, a webhook re-sent under the same id. A relay
that stops cleanly hands its rows back at once. A result that could not be written (full disk,
database down) is handed back as soon as writes work again, so the row resumes without a restart.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import httpx

from bot import __version__
from bot.logs import CallLog, mask_phone
from bot.metrics import Metrics
from bot.outbox.messages import (
    SmsPart,
    SmsStyle,
    iso_utc,
    parts_from_json,
    parts_json,
    products_sent_body,
    sign_webhook,
    sms_ref_line,
    sms_reference,
    sms_report,
    webhook_key,
)
from bot.outbox.outbox import Outbox, open_outbox
from bot.outbox.rows import Channel, DisabledEndpoint, OutboxRow, RowKey, State
from bot.products import ProductsCollection
from bot.settings import Settings
from bot.stores import Stores
from bot.tools import OutboxUnavailable, can_receive_sms
from bot.twilio_rest import (
    TwilioAmbiguousError,
    TwilioPermanentError,
    TwilioRest,
    TwilioRetryableError,
    retry_after_seconds,
)

log = logging.getLogger(__name__)

SMS_RETRY_SCHEDULE_S = (2.0, 10.0, 30.0, 120.0, 600.0, 1800.0)
SMS_LOOKUP_MARGIN_S = 3600.0
JITTER_FRACTION = 0.2
RETRY_AFTER_MAX_S = 86400.0
MAX_CONCURRENT_DELIVERIES = 8
ERROR_SNIPPET_BYTES = 300
STOP_GRACE_S = 5.0
DB_RETRY_S = 5.0
# Room a lease keeps beyond the request it covers: the renewal's own round trip, clock skew.
LEASE_MARGIN_S = 5.0
ENDPOINT_CHECK_S = 2.0
PURGE_EVERY_S = 3600.0
PURGE_BATCH_ROWS = 500
SECONDS_PER_DAY = 86400.0
CHANNELS: tuple[Channel, ...] = ("sms", "webhook")

T = TypeVar("T")


# An attempt's verdict as /metrics names it: a retried one simply failed.
WEBHOOK_RESULTS = {"delivered": "delivered", "retry": "failed", "permanent": "refused", "gone": "gone"}


class LeaseLost(Exception):
    """Another relay holds the row now (this one's lease expired): stop without sending."""


def relay_owner_id() -> str:
    """Names this relay on the rows it leases: host and pid for operators, plus a random tag."""
    return f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}"


@dataclass(frozen=True, slots=True)
class WebhookOutcome:
    """One webhook attempt's result: delivered, retry (maybe after `retry_after_s`), permanent, gone."""

    verdict: Literal["delivered", "retry", "permanent", "gone"]
    reason: str
    status: int | None = None
    retry_after_s: float | None = None


def classify_webhook_response(status: int, headers: httpx.Headers, snippet: str) -> WebhookOutcome:
    """What a receiver's HTTP answer means for the delivery."""
    if 200 <= status < 300:
        return WebhookOutcome("delivered", f"HTTP {status}", status)
    if 300 <= status < 400:
        target = headers.get("location", "?")
        return WebhookOutcome("retry", f"HTTP {status} redirect to {target} (not followed)", status)
    if status in (408, 429) or status >= 500:
        wait_s = retry_after_seconds(headers.get("retry-after"))
        return WebhookOutcome("retry", f"HTTP {status} {snippet}".strip(), status, wait_s)
    if status == 410:
        return WebhookOutcome("gone", "HTTP 410 Gone: the receiver retired this endpoint", status)
    return WebhookOutcome("permanent", f"HTTP {status} {snippet}".strip(), status)


def backoff_delay(
    schedule: Sequence[float], failures: int, rng: random.Random, retry_after_s: float | None
) -> float | None:
    """Seconds before the next attempt after `failures` failed ones; None when the schedule is spent."""
    if failures > len(schedule):
        return None
    delay = schedule[failures - 1] * rng.uniform(1 - JITTER_FRACTION, 1 + JITTER_FRACTION)
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, RETRY_AFTER_MAX_S))
    return delay


@dataclass(slots=True)
class Claim:
    """A row this relay holds: as it was when claimed, and until when the lease runs."""

    row: OutboxRow
    lease_until: float


@dataclass(slots=True)
class Relay:
    """Relays due outbox rows: SMS through Twilio, webhooks to call centers, at most N at a time.

    `clock` (epoch seconds) and `sleep` are injectable so tests step through hours of retries
    without waiting; `relay_due()` runs one round, `start()` runs rounds whenever rows fall due,
    are queued, or (polling) other processes may have queued some. `stores` knows each store's
    webhook secret; without it only the default store's (WEBHOOK_SECRET) is known.
    """

    outbox: Outbox
    settings: Settings
    http: httpx.AsyncClient
    twilio: TwilioRest | None
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    rng: random.Random = field(default_factory=random.Random)
    max_concurrent: int = MAX_CONCURRENT_DELIVERIES
    owner: str = field(default_factory=relay_owner_id)
    db_retry_s: float = DB_RETRY_S
    endpoint_check_s: float = ENDPOINT_CHECK_S
    stores: Stores | None = None
    metrics: Metrics = field(default_factory=Metrics)
    _wake: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _loop_task: asyncio.Task[None] | None = field(default=None, init=False)
    _inflight: dict[RowKey, asyncio.Task[None]] = field(default_factory=dict, init=False)
    _orphans: set[RowKey] = field(default_factory=set, init=False)
    _endpoint_checked_at: float = field(default=float("-inf"), init=False)
    _purged_at: float = field(default=float("-inf"), init=False)
    _outage: str | None = field(default=None, init=False)

    @property
    def lease_s(self) -> float:
        """Longer than any single request the relay makes, so one in flight is never taken over."""
        return max(self.settings.twilio_timeout_s, self.settings.webhook_timeout_s) + LEASE_MARGIN_S

    async def next_due_at(self) -> float | None:
        """When this relay next has a row to take (webhooks to a disabled URL wait, not counted)."""
        return await self.outbox.next_due_at(CHANNELS, self.settings.webhook_url)

    async def start(self) -> None:
        self.outbox.add_listener(self._wake.set)
        self._loop_task = asyncio.create_task(self._run(), name="outbox-relay")

    async def stop(self) -> None:
        """Stop taking rows; give in-flight attempts a moment, then cancel and hand back the rest."""
        self.outbox.remove_listener(self._wake.set)
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        if self._inflight:
            _, pending = await asyncio.wait(set(self._inflight.values()), timeout=STOP_GRACE_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        try:
            released = await self.outbox.release(self.owner)
        except OutboxUnavailable as exc:
            log.warning(
                "could not hand back interrupted deliveries: they resume when their lease expires",
                extra={"reason": str(exc)},
            )
            return
        if released:
            log.info("handed back deliveries interrupted by shutdown", extra={"rows": released})

    async def relay_due(self) -> int:
        """One round: relay every row due now (up to the concurrency cap), wait, return how many."""
        await self._maintain()
        claims = await self._claim(self.max_concurrent)
        await asyncio.gather(*(self._relay(claim) for claim in claims))
        return len(claims)

    async def purge_settled(self, batch_rows: int = PURGE_BATCH_ROWS) -> int:
        """Delete rows settled more than OUTBOX_RETENTION_DAYS ago, a small batch per transaction."""
        before = self.clock() - self.settings.outbox_retention_days * SECONDS_PER_DAY
        total = 0
        while True:
            purged = await self.outbox.purge(before, batch_rows)
            total += purged
            if purged < batch_rows:
                break
        if total:
            log.info(
                "purged settled deliveries past the retention period",
                extra={"rows": total, "retention_days": self.settings.outbox_retention_days},
            )
        return total

    # -- the loop

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self._maintain()
                for claim in await self._claim(self.max_concurrent - len(self._inflight)):
                    self._spawn(claim)
                next_at = await self.next_due_at()
            except OutboxUnavailable as exc:
                if self._outage is None:
                    log.error(
                        "outbox unavailable: relaying paused until it is back", extra={"reason": str(exc)}
                    )
                self._outage = str(exc)
                await self._wait_for_wake(self.db_retry_s)
                continue
            if self._outage is not None:
                log.info("outbox available again: relaying resumed")
                self._outage = None
            if len(self._inflight) >= self.max_concurrent:
                await self._wake.wait()
                continue
            wait_s = self.outbox.store.poll_interval_s
            if next_at is not None:
                wait_s = min(wait_s, next_at - self.clock())
            if wait_s > 0:
                await self._wait_for_wake(wait_s)

    async def _maintain(self) -> None:
        """Wait out an unwritable outbox, hand back rows whose outcome it missed, check, purge.

        While the last write failed, nothing is claimed until a message-sized write fits again
        (the probe raises until then, and the loop backs off).
        """
        if self.outbox.problem:
            await self.outbox.probe()
        if self._orphans:
            orphans = self._orphans - set(self._inflight)
            released = await self.outbox.release(self.owner, orphans)
            self._orphans -= orphans
            if released:
                log.info("resuming deliveries whose outcome could not be recorded", extra={"rows": released})
        await self._check_endpoint()
        if self.clock() - self._purged_at >= PURGE_EVERY_S:
            self._purged_at = self.clock()
            await self.purge_settled()

    async def _check_endpoint(self) -> None:
        """Learn which webhook URLs any relay or an operator disabled (or re-enabled)."""
        now = asyncio.get_running_loop().time()
        if now - self._endpoint_checked_at < self.endpoint_check_s:
            return
        self._endpoint_checked_at = now
        disabled = await self.outbox.disabled_endpoints()
        still = {endpoint.url for endpoint in disabled}
        for endpoint in self.outbox.disabled_webhooks:
            if endpoint.url not in still:
                log.info("webhooks re-enabled: held events go out now", extra={"url": endpoint.url})
        self.outbox.disabled_webhooks = disabled

    async def _claim(self, limit: int) -> list[Claim]:
        now = self.clock()
        lease_until = now + self.lease_s
        rows = await self.outbox.claim(
            now, limit, CHANNELS, self.owner, lease_until, self.settings.webhook_url
        )
        claims = []
        for row in rows:
            if row.key in self._inflight:
                continue  # our own attempt still runs: claiming it again only renewed the lease
            if row.state == "sending":
                CallLog(log, call_sid=row.call_sid, message_id=row.message_id, channel=row.channel).warning(
                    "taking over a delivery whose relay stopped renewing its lease",
                    extra={"previous_owner": row.lease_owner},
                )
            claims.append(Claim(row, lease_until))
        return claims

    def _spawn(self, claim: Claim) -> None:
        key = claim.row.key
        task = asyncio.create_task(self._relay(claim))
        self._inflight[key] = task

        def finished(_: asyncio.Task[None]) -> None:
            if self._inflight.get(key) is task:
                del self._inflight[key]
            self._wake.set()

        task.add_done_callback(finished)

    async def _wait_for_wake(self, delay: float) -> None:
        waiter = asyncio.ensure_future(self._wake.wait())
        sleeper = asyncio.ensure_future(self.sleep(delay))
        try:
            await asyncio.wait({waiter, sleeper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            sleeper.cancel()

    async def _relay(self, claim: Claim) -> None:
        row = claim.row
        call_log = CallLog(log, call_sid=row.call_sid, message_id=row.message_id, channel=row.channel)
        try:
            if row.channel == "sms":
                await self._relay_sms(claim, call_log)
            else:
                await self._relay_webhook(claim, call_log)
        except LeaseLost:
            call_log.warning("another relay took this delivery over after our lease expired; leaving it")
        except OutboxUnavailable as exc:
            self._orphans.add(row.key)
            call_log.error(
                "could not record a delivery attempt: it resumes once the outbox is writable",
                extra={"reason": str(exc)},
            )
        except Exception:
            call_log.exception("delivery attempt crashed: the row is retried when its lease expires")

    async def _hold(self, claim: Claim, request_timeout_s: float) -> None:
        """Make sure the lease outlasts the request about to go out, or stop if it is lost."""
        now = self.clock()
        if claim.lease_until - now >= request_timeout_s + LEASE_MARGIN_S:
            return
        until = now + self.lease_s
        if not await self.outbox.renew(claim.row.key, self.owner, until):
            raise LeaseLost
        claim.lease_until = until

    async def _record(self, claim: Claim, **fields: Any) -> None:
        if not await self.outbox.record(claim.row.key, self.owner, **fields):
            raise LeaseLost

    # -- SMS

    async def _relay_sms(self, claim: Claim, call_log: CallLog) -> None:
        row = claim.row
        sender = row.sender or (self.twilio.from_number if self.twilio is not None else None)
        if self.twilio is None or not sender:
            await self._settle_sms(claim, call_log, "failed", [], None, "texting is not configured")
            return
        if not row.recipient or not can_receive_sms(row.recipient):
            await self._settle_sms(
                claim, call_log, "failed", [], None, "the caller's number cannot get texts"
            )
            return
        parts = self._sms_parts(row)
        sids: list[str | None] = list(row.result) or [None] * len(parts)
        if row.body is None:
            await self._record(claim, body=parts_json(parts), result=sids)
        # "sending": taken over from a relay that died mid-attempt, so just as uncertain.
        if row.state in ("ambiguous", "sending"):
            if not await self._look_up_sent(claim, call_log, parts, sids, sender):
                return
        for n, part in enumerate(parts):
            if sids[n] is not None:
                continue
            await self._hold(claim, self.settings.twilio_timeout_s)
            try:
                sids[n] = await self._twilio(
                    self.twilio.send_sms(row.recipient, part.body, part.media_urls, from_=sender)
                )
            except TwilioRetryableError as exc:
                await self._retry_sms(claim, call_log, "pending", str(exc), exc.retry_after_s, sids)
                return
            except TwilioAmbiguousError as exc:
                await self._retry_sms(claim, call_log, "ambiguous", str(exc), None, sids)
                return
            except TwilioPermanentError as exc:
                await self._settle_sms(claim, call_log, "failed", sids, exc.code, exc.message)
                return
            if n + 1 < len(parts):  # the last part's SID is written with the outcome
                await self._record(claim, result=sids)
        await self._settle_sms(claim, call_log, "sent", sids, None, None)

    async def _look_up_sent(
        self, claim: Claim, call_log: CallLog, parts: list[SmsPart], sids: list[str | None], sender: str
    ) -> bool:
        """Fill in the SIDs of parts Twilio created after all; False when the attempt ends here."""
        row = claim.row
        assert self.twilio is not None and row.recipient is not None
        since = datetime.fromtimestamp(row.created_at - SMS_LOOKUP_MARGIN_S, UTC)
        await self._hold(claim, self.settings.twilio_timeout_s)
        try:
            recent = await self._twilio(self.twilio.recent_messages(row.recipient, since, from_=sender))
        except TwilioPermanentError as exc:
            await self._settle_sms(
                claim, call_log, "failed", sids, exc.code, f"lookup refused: {exc.message}"
            )
            return False
        except (TwilioRetryableError, TwilioAmbiguousError) as exc:
            await self._retry_sms(claim, call_log, "ambiguous", f"lookup failed: {exc}", None, sids)
            return False
        reference = sms_reference(row.message_id)
        for n, sid in enumerate(sids):
            ref_line = sms_ref_line(reference, n + 1, len(parts))
            match = next((m for m in recent if ref_line in m.body), None) if sid is None else None
            if match is not None:
                sids[n] = match.sid
                call_log.info("ambiguous SMS found already sent", extra={"sid": match.sid, "part": n + 1})
        await self._record(claim, result=sids)
        return True

    async def _twilio(self, request: Awaitable[T]) -> T:
        """A Twilio request bounded as a whole (not per read), so it always ends within the lease."""
        timeout_s = self.settings.twilio_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                return await request
        except TimeoutError as exc:
            raise TwilioAmbiguousError(f"Twilio did not answer within {timeout_s:g} s") from exc

    def _sms_parts(self, row: OutboxRow) -> list[SmsPart]:
        """The text written when the message was queued (rows queued by version 1 have none yet)."""
        if row.body is not None:
            return parts_from_json(row.body)
        collection = ProductsCollection.model_validate(row.payload["data"]["collection"])
        style = SmsStyle(self.settings.media_base_url, self.settings.sms_include_picture)
        return style.render(row.message_id, collection)

    async def _retry_sms(
        self,
        claim: Claim,
        call_log: CallLog,
        state: State,
        reason: str,
        retry_after_s: float | None,
        sids: list[str | None],
    ) -> None:
        attempts = claim.row.attempts + 1
        delay = backoff_delay(SMS_RETRY_SCHEDULE_S, attempts, self.rng, retry_after_s)
        if delay is None:
            give_up = f"gave up after {attempts} attempts: {reason}"
            call_log.error("SMS dead-lettered", extra={"alert": True, "reason": give_up})
            await self._settle_sms(claim, call_log, "dead", sids, None, give_up)
            return
        call_log.warning(
            "SMS attempt failed; will retry", extra={"reason": reason, "retry_in_s": round(delay, 1)}
        )
        await self._record(
            claim, state=state, next_attempt_at=self.clock() + delay, last_error=reason, result=sids
        )
        self.metrics.sms_outcome("retry", None)

    async def _settle_sms(
        self,
        claim: Claim,
        call_log: CallLog,
        state: State,
        sids: list[str | None],
        error_code: int | None,
        reason: str | None,
    ) -> None:
        now = self.clock()

        def hook_body(data: dict[str, Any]) -> str:
            return products_sent_body(data, sms_report(state, error_code, reason, sids), now)

        settled = await self.outbox.settle_sms(
            claim.row.message_id,
            self.owner,
            state=state,
            sids=sids,
            error_code=error_code,
            last_error=reason,
            hook_body=hook_body,
        )
        if not settled:
            raise LeaseLost
        self.metrics.sms_outcome(state, error_code)
        to = mask_phone(claim.row.recipient)
        if state == "sent":
            call_log.info("SMS sent", extra={"to": to, "parts": len(sids)})
        else:
            call_log.warning("SMS not sent", extra={"to": to, "code": error_code, "reason": reason})

    # -- webhooks

    def _webhook_secret(self, store_id: str | None) -> str | None:
        """The store's secret now (the default store's is WEBHOOK_SECRET)."""
        if self.stores is not None:
            return self.stores.webhook_secret(store_id)
        return self.settings.webhook_secret if store_id is None else None

    async def _relay_webhook(self, claim: Claim, call_log: CallLog) -> None:
        row = claim.row
        if row.body is None:
            raise RuntimeError("a webhook row was claimed without a body")
        url, secret = row.endpoint or self.settings.webhook_url, self._webhook_secret(row.store_id)
        if not url or not secret:
            store = f"store {row.store_id!r}" if row.store_id else "the default store"
            why = f"{store} has no call center configured (its webhook URL or secret)"
            await self._retry_webhook(claim, call_log, WebhookOutcome("retry", why))
            return
        await self._hold(claim, self.settings.webhook_timeout_s)
        outcome = await self._post_webhook(url, webhook_key(secret), row.message_id, row.body)
        if outcome.verdict == "delivered":
            await self._record(claim, state="sent", next_attempt_at=None, last_error=None, error_code=None)
            call_log.info("webhook delivered", extra={"status": outcome.status, "attempt": row.attempts + 1})
        elif outcome.verdict == "gone":
            await self._hold_for_operator(claim, call_log, url, outcome)
        elif outcome.verdict == "permanent":
            await self._record(
                claim,
                state="failed",
                next_attempt_at=None,
                last_error=outcome.reason,
                error_code=outcome.status,
            )
            call_log.error("webhook refused", extra={"reason": outcome.reason, "event": row.kind})
        else:
            await self._retry_webhook(claim, call_log, outcome)
        self.metrics.webhook_attempt(row.kind, WEBHOOK_RESULTS[outcome.verdict])

    async def _hold_for_operator(
        self, claim: Claim, call_log: CallLog, url: str, outcome: WebhookOutcome
    ) -> None:
        """410 Gone: disable the URL for every relay; the event waits, not counted as an attempt."""
        now = self.clock()
        reason = f"the webhook receiver answered 410 Gone at {iso_utc(now)}: webhooks are held"
        newly_disabled = await self.outbox.disable_endpoint(url, reason)
        if all(endpoint.url != url for endpoint in self.outbox.disabled_webhooks):
            self.outbox.disabled_webhooks.append(DisabledEndpoint(url, now, reason))
        await self._record(
            claim,
            state="pending",
            attempts=claim.row.attempts,
            next_attempt_at=now,
            last_error=outcome.reason,
            error_code=outcome.status,
        )
        if newly_disabled:
            call_log.error(
                "webhook endpoint answered 410 Gone: webhooks are held until an operator re-enables "
                "them with `python -m bot outbox enable-webhooks`",
                extra={"alert": True, "event": claim.row.kind, "url": url},
            )
        else:
            call_log.info("webhook held: its endpoint is disabled", extra={"event": claim.row.kind})

    async def _retry_webhook(self, claim: Claim, call_log: CallLog, outcome: WebhookOutcome) -> None:
        row = claim.row
        delay = backoff_delay(
            self.settings.webhook_retry_schedule_s, row.attempts + 1, self.rng, outcome.retry_after_s
        )
        if delay is None:
            reason = f"gave up after {row.attempts + 1} attempts: {outcome.reason}"
            await self._record(
                claim, state="dead", next_attempt_at=None, last_error=reason, error_code=outcome.status
            )
            call_log.error(
                "webhook dead-lettered", extra={"alert": True, "reason": reason, "event": row.kind}
            )
            return
        await self._record(
            claim,
            state="pending",
            next_attempt_at=self.clock() + delay,
            last_error=outcome.reason,
            error_code=outcome.status,
        )
        call_log.warning(
            "webhook attempt failed; will retry",
            extra={"reason": outcome.reason, "retry_in_s": round(delay, 1)},
        )

    async def _post_webhook(self, url: str, key: bytes, message_id: str, body: str) -> WebhookOutcome:
        timestamp = int(self.clock())
        headers = {
            "content-type": "application/json",
            "user-agent": f"voicebot-webhooks/{__version__}",
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign_webhook(key, message_id, timestamp, body),
        }
        timeout_s = self.settings.webhook_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                async with self.http.stream(
                    "POST",
                    url,
                    content=body.encode(),
                    headers=headers,
                    timeout=httpx.Timeout(timeout_s),
                    follow_redirects=False,
                ) as response:
                    snippet = await _read_snippet(response)
        except (TimeoutError, httpx.TimeoutException):
            return WebhookOutcome("retry", f"no answer within {timeout_s:g} s")
        except httpx.HTTPError as exc:
            return WebhookOutcome("retry", f"connection failed: {type(exc).__name__} {exc}".strip())
        return classify_webhook_response(response.status_code, response.headers, snippet)


async def _read_snippet(response: httpx.Response) -> str:
    """The start of a receiver's answer, for the error reason; the rest is not read."""
    data = b""
    async for chunk in response.aiter_bytes():
        data += chunk
        if len(data) >= ERROR_SNIPPET_BYTES:
            break
    return " ".join(data[:ERROR_SNIPPET_BYTES].decode("utf-8", errors="replace").split())


@asynccontextmanager
async def running_outbox(
    settings: Settings,
    http: httpx.AsyncClient,
    *,
    twilio: TwilioRest | None = None,
    stores: Stores | None = None,
    metrics: Metrics | None = None,
) -> AsyncIterator[Outbox]:
    """Open the configured outbox and relay it until the block exits (the app's lifespan)."""
    outbox = await open_outbox(settings)
    twilio = twilio or TwilioRest.from_settings(settings, http)
    relay = Relay(outbox, settings, http, twilio, stores=stores, metrics=metrics or Metrics())
    await relay.start()
    try:
        yield outbox
    finally:
        await relay.stop()
        await outbox.close()
