"""The bot's Twilio REST client: send an SMS, find recent ones, update a live call.

Built on the twilio package's typed API (`Client(..., http_client=...)` and its `*_async`
methods) with a transport backed by the app's shared `httpx.AsyncClient`, so there is one
connection pool, explicit timeouts, and TWILIO_API_BASE can point at the local stand-in.

Every failure becomes one of three exceptions, because the callers' only question is "may I
try again, and is it safe?":
- `TwilioPermanentError`: Twilio refused (bad number, opted out, auth...). Retrying won't help.
- `TwilioRetryableError`: the request was not processed (429, or no connection was made).
- `TwilioAmbiguousError`: a 5xx or a timeout after the request left: it may have been carried out.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import httpx
from twilio.base import values
from twilio.base.exceptions import TwilioRestException
from twilio.http import AsyncHttpClient
from twilio.http.response import Response as TwilioResponse
from twilio.rest import Client

from bot.logs import mask_phone, mask_phones_in
from bot.settings import Settings

log = logging.getLogger(__name__)

TWILIO_TIMEOUT_S = 10.0
TWILIO_CONNECT_TIMEOUT_S = 5.0
RECENT_MESSAGES_LIMIT = 100
RECENT_MESSAGES_PAGE_SIZE = 50
CALL_NOT_IN_PROGRESS = 21220
UNABLE_PREFIX = re.compile(r"^Unable to \w+ record: ")


class TwilioError(Exception):
    """Base of the three outcomes below."""


class TwilioPermanentError(TwilioError):
    """Twilio refused the request for a reason a retry cannot fix (code as in Twilio's docs)."""

    def __init__(self, code: int | None, message: str, status: int | None = None) -> None:
        super().__init__(f"Twilio error {code}: {message}")
        self.code, self.message, self.status = code, message, status


class TwilioRetryableError(TwilioError):
    """The request was not carried out (429, or the connection could not be made)."""

    def __init__(self, retry_after_s: float | None, reason: str) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class TwilioAmbiguousError(TwilioError):
    """A 5xx or a timeout after sending: Twilio may have carried the request out."""


@dataclass(frozen=True, slots=True)
class SentMessage:
    """A message found by `recent_messages`."""

    sid: str
    body: str
    date_created: datetime | None
    status: str


def retry_after_seconds(value: str | None) -> float | None:
    """An HTTP Retry-After header (delta-seconds or an HTTP date) as seconds, or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - datetime.now(moment.tzinfo).timestamp())


class HttpxTwilioTransport(AsyncHttpClient):  # type: ignore[misc]  # twilio ships no type hints
    """The twilio package's async transport, on httpx, pointed at `api_base`.

    It raises the retryable and ambiguous outcomes itself because only here are the response
    headers (Retry-After) and the kind of network failure still visible; 4xx answers go back to
    the twilio package, which turns them into `TwilioRestException`.
    """

    def __init__(self, http: httpx.AsyncClient, api_base: str, timeout_s: float) -> None:
        super().__init__(log, True, timeout_s)
        self._http = http
        self._base = urlsplit(api_base.rstrip("/"))
        self._timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, TWILIO_CONNECT_TIMEOUT_S))

    def _rewrite(self, url: str) -> str:
        parts = urlsplit(url)
        if not parts.netloc.endswith("twilio.com"):
            return url
        path = self._base.path + parts.path
        return urlunsplit((self._base.scheme, self._base.netloc, path, parts.query, parts.fragment))

    async def request(
        self,
        method: str,
        uri: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109  (twilio's transport interface)
        allow_redirects: bool = False,
    ) -> TwilioResponse:
        try:
            response = await self._http.request(
                method,
                self._rewrite(uri),
                params=params,  # type: ignore[arg-type]
                data=data,
                headers=headers,
                auth=auth,
                timeout=self._timeout if timeout is None else httpx.Timeout(timeout),
                follow_redirects=allow_redirects,
            )
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise TwilioRetryableError(None, f"Twilio unreachable: {exc!r}") from exc
        except httpx.TimeoutException as exc:
            raise TwilioAmbiguousError(f"Twilio did not answer in time: {exc!r}") from exc
        except httpx.TransportError as exc:
            raise TwilioAmbiguousError(f"connection to Twilio broke: {exc!r}") from exc
        if response.status_code == 429:
            wait_s = retry_after_seconds(response.headers.get("retry-after"))
            raise TwilioRetryableError(wait_s, "Twilio rate limit (429)")
        if response.status_code >= 500:
            raise TwilioAmbiguousError(f"Twilio answered {response.status_code}")
        return TwilioResponse(response.status_code, response.text, response.headers)


class TwilioRest:
    """The three REST calls the bot makes, with Twilio's failures mapped to our exceptions."""

    def __init__(
        self,
        *,
        account_sid: str,
        auth_token: str,
        http: httpx.AsyncClient,
        from_number: str | None = None,
        api_base: str = "https://api.twilio.com",
        timeout_s: float = TWILIO_TIMEOUT_S,
    ) -> None:
        self.from_number = from_number
        transport = HttpxTwilioTransport(http, api_base, timeout_s)
        # `environment` pins the client to what we pass: TWILIO_REGION/EDGE must not reroute it.
        self._client = Client(account_sid, auth_token, http_client=transport, environment={"": ""})

    @classmethod
    def from_settings(cls, settings: Settings, http: httpx.AsyncClient) -> TwilioRest | None:
        """A client when Twilio credentials are configured, else None (the feature is off)."""
        if not (settings.twilio_account_sid and settings.twilio_auth_token):
            return None
        return cls(
            account_sid=settings.twilio_account_sid,
            auth_token=settings.twilio_auth_token,
            http=http,
            from_number=settings.twilio_from_number,
            api_base=settings.twilio_api_base,
            timeout_s=settings.twilio_timeout_s,
        )

    async def send_sms(
        self, to: str, body: str, media_urls: Sequence[str] = (), *, from_: str | None = None
    ) -> str:
        """Create one message from `from_` (default TWILIO_FROM_NUMBER); returns its SID.

        Not idempotent: see TwilioAmbiguousError.
        """
        sender = from_ or self.from_number
        if not sender:
            raise TwilioPermanentError(None, "no sender: TWILIO_FROM_NUMBER is not set")
        try:
            message = await self._client.messages.create_async(
                to=to, from_=sender, body=body, media_url=list(media_urls) or None
            )
        except TwilioRestException as exc:
            raise permanent(exc) from exc
        log.info("sms accepted", extra={"to": mask_phone(to), "sid": message.sid})
        return str(message.sid)

    async def recent_messages(
        self, to: str, since: datetime, *, from_: str | None = None
    ) -> list[SentMessage]:
        """Our messages (from `from_`, default TWILIO_FROM_NUMBER) to `to` created at or after
        `since` (aware datetime), newest first.

        Filtered by creation time here rather than with Twilio's `DateSent>` because a message
        still queued has no send date yet, and that is exactly the one an ambiguous send needs.
        """
        try:
            found = await self._client.messages.list_async(
                to=to,
                from_=from_ or self.from_number or values.unset,
                limit=RECENT_MESSAGES_LIMIT,
                page_size=RECENT_MESSAGES_PAGE_SIZE,
            )
        except TwilioRestException as exc:
            raise permanent(exc) from exc
        return [
            SentMessage(str(m.sid), m.body or "", m.date_created, str(m.status))
            for m in found
            if m.date_created is None or m.date_created >= since
        ]

    async def update_call(
        self,
        call_sid: str,
        *,
        twiml: str | None = None,
        status: Literal["completed"] | None = None,
    ) -> None:
        """Redirect a live call to new TwiML, or hang it up. Hanging up an ended call is a success."""
        try:
            await self._client.calls(call_sid).update_async(twiml=twiml, status=status)
        except TwilioRestException as exc:
            if status == "completed" and exc.code == CALL_NOT_IN_PROGRESS:
                return
            raise permanent(exc) from exc


def permanent(exc: TwilioRestException) -> TwilioPermanentError:
    """Twilio's 4xx answer as our permanent error, keeping its code and message.

    Twilio's messages quote the number ("The 'To' number +1555… is not valid"): masked here, so
    no log line, outbox row or webhook carries it whole.
    """
    code = exc.code if isinstance(exc.code, int) else None
    message = mask_phones_in(UNABLE_PREFIX.sub("", str(exc.msg)))
    return TwilioPermanentError(code, message, exc.status)
