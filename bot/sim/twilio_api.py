"""A local stand-in for the Twilio REST API (2010-04-01): Messages and live-call updates.

It answers like Twilio does where the bot depends on it: Basic auth against the account SID and
auth token, form-encoded requests, Twilio-shaped JSON resources and pages, Twilio error bodies
(`code`, `message`, `more_info`, `status`), and fault switches for the failures the bot must
survive: 5xx (optionally after creating the message, the ambiguous case), 429 with Retry-After,
responses held back long enough for a client to time out, and a Twilio slow to create messages.

Calls: the bot only updates calls Twilio created, which the stand-in never sees (the simulated
phone dials the app directly). So an unknown call SID is taken as a live call on its first
update, unless `known_calls_only=True`, when only SIDs added to `calls_in_progress` are live and
others get 404 (20404). A call hung up with `Status=completed` moves to `calls_ended`; any later
update of it gets 400 (21220), as Twilio answers for a call that is no longer in progress.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import math
import re
import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode

from starlette.applications import Starlette
from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bot.cli import CommandParser, port_number
from bot.logs import mask_phone
from bot.settings import SettingsError, load_settings
from bot.sim.server import LocalServer

API_VERSION = "2010-04-01"
MAX_BODY_CHARS = 1600
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
GSM7_SEGMENT_CHARS = (160, 153)
UCS2_SEGMENT_CHARS = (70, 67)
E164 = re.compile(r"^\+[1-9][0-9]{7,14}$")
GSM7_CHARS = set(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    "ÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà^{}\\[~]|€"
)
FAULT_CODES = {429: 20429, 500: 20500, 502: 20500, 503: 20503}

Recorder = Callable[[str, dict[str, Any]], None]


def new_sid(prefix: str) -> str:
    """A Twilio-style SID: two letters and 32 lowercase hex digits."""
    return prefix + secrets.token_hex(16)


def rfc2822(moment: datetime) -> str:
    """Twilio's date format, e.g. 'Mon, 16 Aug 2010 03:45:01 +0000'."""
    return format_datetime(moment.astimezone(UTC).replace(microsecond=0))


def count_segments(body: str) -> int:
    """How many SMS segments Twilio would bill for this body (GSM-7 or UCS-2)."""
    single, multi = GSM7_SEGMENT_CHARS if set(body) <= GSM7_CHARS else UCS2_SEGMENT_CHARS
    if len(body) <= single:
        return 1
    return math.ceil(len(body) / multi)


async def read_form(request: Request) -> FormData:
    """The url-encoded request body (Twilio's only request format), without python-multipart."""
    body = (await request.body()).decode("utf-8", errors="replace")
    fields: list[tuple[str, str | UploadFile]] = list(parse_qsl(body, keep_blank_values=True))
    return FormData(fields)


def parse_twilio_date(value: str) -> datetime:
    """A `DateSent` filter value: 'YYYY-MM-DD' or 'YYYY-MM-DDTHH:MM:SSZ' (UTC)."""
    if len(value) == 10:
        return datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC)
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


class TwilioApiError(Exception):
    """A Twilio error answer: HTTP status plus Twilio's numeric code and message."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        body = {
            "code": self.code,
            "message": self.message,
            "more_info": f"https://www.twilio.com/docs/errors/{self.code}",
            "status": self.status,
        }
        return JSONResponse(body, status_code=self.status, headers=headers)


@dataclass(slots=True)
class _Fault:
    status: int
    create_anyway: bool = False
    retry_after_s: int | None = None
    hang_s: float = 0.0


class TwilioApiSimulator:
    """The stand-in. `await start()` serves on 127.0.0.1; `base_url` is TWILIO_API_BASE.

    Records: `messages` (each created message resource, with `media_urls`), `call_updates`
    (call SID and the fields posted); `on_record(kind, entry)` hears each as it happens, and
    each request refused for its credentials (kind `auth_refused`). Numbers refused like Twilio
    refuses them: add to `invalid_numbers` (21211), `unsubscribed` (21610), `landlines` (21614).
    Fault switches: `fail_next`, `hang_next` (the next requests, whatever they are);
    `create_delay_s` (every message create takes that long, the message appearing only at its
    end, as when Twilio is slow); `ambiguous_once` (numbers whose next create is carried out,
    then answered 500).
    """

    def __init__(
        self,
        account_sid: str | None = None,
        auth_token: str | None = None,
        *,
        known_calls_only: bool = False,
        on_record: Recorder | None = None,
    ) -> None:
        self.account_sid = account_sid or new_sid("AC")
        self.auth_token = auth_token or secrets.token_hex(16)
        self.known_calls_only = known_calls_only
        self.messages: list[dict[str, Any]] = []
        self.call_updates: list[dict[str, Any]] = []
        self.unsubscribed: set[str] = set()
        self.invalid_numbers: set[str] = set()
        self.landlines: set[str] = set()
        self.calls_in_progress: set[str] = set()
        self.calls_ended: set[str] = set()
        self.request_count = 0
        self.create_delay_s = 0.0
        self.ambiguous_once: set[str] = set()
        self._faults: list[_Fault] = []
        self._on_record = on_record
        self._server: LocalServer | None = None
        self._stopping = asyncio.Event()
        base = "/2010-04-01/Accounts/{account_sid}"
        self.app = Starlette(
            routes=[
                Route(base + "/Messages.json", self._messages, methods=["GET", "POST"]),
                Route(base + "/Messages/{sid}.json", self._fetch_message, methods=["GET"]),
                Route(base + "/Calls/{sid}.json", self._update_call, methods=["POST"]),
            ]
        )

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("the Twilio API simulator is not started")
        return self._server.base_url

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._stopping = asyncio.Event()
        self._server = LocalServer(self.app, host=host, port=port, timeout_graceful_shutdown=1)
        await self._server.start()

    async def stop(self) -> None:
        """Stop serving; held-back responses are released first, so stopping is prompt."""
        self._stopping.set()
        if self._server is not None:
            await self._server.stop()

    async def __aenter__(self) -> TwilioApiSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def reset(self) -> None:
        """Forget every record, number list, call and pending fault (one simulator, many tests)."""
        for collection in (self.messages, self.call_updates, self._faults):
            collection.clear()
        for numbers in (self.unsubscribed, self.invalid_numbers, self.landlines, self.ambiguous_once):
            numbers.clear()
        self.create_delay_s = 0.0
        self.calls_in_progress.clear()
        self.calls_ended.clear()
        self.request_count = 0

    def fail_next(
        self,
        n: int,
        status: int = 500,
        create_anyway: bool = False,
        retry_after: int | None = None,
    ) -> None:
        """Answer the next `n` API requests with `status` (500, 429, 503...).

        With `create_anyway`, a message create is carried out before the error is returned: the
        caller's phone gets the text but the client is told it failed.
        """
        self._faults += [_Fault(status, create_anyway, retry_after) for _ in range(n)]

    def hang_next(self, n: int, seconds: float) -> None:
        """Carry out the next `n` requests, then hold each response back for `seconds`."""
        self._faults += [_Fault(200, hang_s=seconds) for _ in range(n)]

    def messages_to(self, number: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["to"] == number]

    def _record(self, kind: str, entry: dict[str, Any]) -> None:
        if self._on_record is not None:
            self._on_record(kind, entry)

    async def _guard(self, request: Request) -> _Fault | None:
        """Auth first (as Twilio does), then the next queued fault, if any."""
        self.request_count += 1
        if not self._authorized(request):
            self._record("auth_refused", {"path": request.url.path})
            raise TwilioApiError(401, 20003, "Authenticate")
        return self._faults.pop(0) if self._faults else None

    def _authorized(self, request: Request) -> bool:
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        path_account = request.path_params["account_sid"]
        return (
            secrets.compare_digest(user, self.account_sid)
            and secrets.compare_digest(password, self.auth_token)
            and path_account == self.account_sid
        )

    async def _answer(self, fault: _Fault | None, make: Callable[[], Response], *, creates: bool) -> Response:
        """Apply a fault around `make` (the real work): fail before, fail after, or delay."""
        if fault is not None and fault.status >= 400:
            if creates and fault.create_anyway:
                make()
            code = FAULT_CODES.get(fault.status, 20500)
            message = "Too Many Requests" if fault.status == 429 else "Internal Server Error"
            headers = {"Retry-After": str(fault.retry_after_s)} if fault.retry_after_s else None
            return TwilioApiError(fault.status, code, message).response(headers)
        response = make()
        if fault is not None and fault.hang_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), fault.hang_s)
        return response

    async def _messages(self, request: Request) -> Response:
        try:
            fault = await self._guard(request)
            if request.method == "GET":
                return await self._answer(fault, lambda: self._list_messages(request), creates=False)
            form = await read_form(request)
            self._validate_message(form)
        except TwilioApiError as exc:
            return exc.response(
                {"WWW-Authenticate": 'Basic realm="Twilio API"'} if exc.status == 401 else None
            )
        if self.create_delay_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.create_delay_s)
        to = str(form.get("To", ""))
        if fault is None and to in self.ambiguous_once:
            self.ambiguous_once.discard(to)
            fault = _Fault(500, create_anyway=True)
        return await self._answer(fault, lambda: self._create_message(form), creates=True)

    def _validate_message(self, form: FormData) -> None:
        to = str(form.get("To", ""))
        sender = str(form.get("From", ""))
        body = str(form.get("Body", ""))
        if not to:
            raise TwilioApiError(400, 21604, "A 'To' phone number is required.")
        if not sender and not form.get("MessagingServiceSid"):
            raise TwilioApiError(400, 21603, "A 'From' phone number is required.")
        if sender and not E164.match(sender):
            raise TwilioApiError(400, 21212, f"The 'From' number {sender} is not a valid phone number.")
        if not body and not form.getlist("MediaUrl"):
            raise TwilioApiError(400, 21602, "Message body is required.")
        if len(body) > MAX_BODY_CHARS:
            raise TwilioApiError(
                400, 21617, "The concatenated message body exceeds the 1600 character limit."
            )
        if not E164.match(to) or to in self.invalid_numbers:
            raise TwilioApiError(400, 21211, f"The 'To' number {to} is not a valid phone number.")
        if to in self.unsubscribed:
            raise TwilioApiError(400, 21610, "Attempt to send to unsubscribed recipient")
        if to in self.landlines:
            raise TwilioApiError(400, 21614, f"'To' number {to} is not a valid mobile number")

    def _create_message(self, form: FormData) -> Response:
        now = datetime.now(UTC)
        sid = new_sid("SM")
        body = str(form.get("Body", ""))
        media = [str(url) for url in form.getlist("MediaUrl")]
        service = form.get("MessagingServiceSid")
        path = f"/{API_VERSION}/Accounts/{self.account_sid}/Messages/{sid}"
        resource: dict[str, Any] = {
            "account_sid": self.account_sid,
            "api_version": API_VERSION,
            "body": body,
            "date_created": rfc2822(now),
            "date_sent": None,
            "date_updated": rfc2822(now),
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": form.get("From") or None,
            "messaging_service_sid": service,
            "num_media": str(len(media)),
            "num_segments": "0" if service else str(count_segments(body)),
            "price": None,
            "price_unit": "USD",
            "sid": sid,
            "status": "accepted" if service and not form.get("From") else "queued",
            "subresource_uris": {"media": f"{path}/Media.json", "feedback": f"{path}/Feedback.json"},
            "to": form.get("To"),
            "uri": f"{path}.json",
        }
        answer = JSONResponse(resource, status_code=201)
        stored = dict(resource, status="delivered", date_sent=resource["date_created"])
        stored["media_urls"] = media
        self.messages.append(stored)
        self._record("message", stored)
        return answer

    def _list_messages(self, request: Request) -> Response:
        query = request.query_params
        try:
            page_size = min(int(query.get("PageSize", DEFAULT_PAGE_SIZE)), MAX_PAGE_SIZE)
            page = int(query.get("Page", 0))
            exact = query.get("DateSent")
            after = query.get("DateSent>")
            before = query.get("DateSent<")
            bounds = [parse_twilio_date(v) if v else None for v in (exact, after, before)]
        except ValueError as exc:
            raise TwilioApiError(400, 20001, f"Invalid parameter: {exc}") from None
        selected = []
        for message in reversed(self.messages):
            sent = parse_rfc2822(message["date_sent"])
            if "To" in query and message["to"] != query["To"]:
                continue
            if "From" in query and message["from"] != query["From"]:
                continue
            if bounds[0] and sent.date() != bounds[0].date():
                continue
            if bounds[1] and sent < bounds[1]:
                continue
            if bounds[2] and sent > bounds[2]:
                continue
            selected.append({k: v for k, v in message.items() if k != "media_urls"})
        start = page * page_size
        chunk = selected[start : start + page_size]
        base = f"/{API_VERSION}/Accounts/{self.account_sid}/Messages.json"
        params = {k: v for k, v in query.items() if k not in ("Page", "PageSize", "PageToken")}

        def page_uri(number: int) -> str:
            return base + "?" + urlencode({**params, "PageSize": page_size, "Page": number})

        has_next = start + page_size < len(selected)
        return JSONResponse(
            {
                "end": start + max(len(chunk), 1) - 1,
                "first_page_uri": page_uri(0),
                "messages": chunk,
                "next_page_uri": page_uri(page + 1) if has_next else None,
                "page": page,
                "page_size": page_size,
                "previous_page_uri": page_uri(page - 1) if page > 0 else None,
                "start": start,
                "uri": page_uri(page),
            }
        )

    async def _fetch_message(self, request: Request) -> Response:
        try:
            fault = await self._guard(request)
            sid = request.path_params["sid"]
            found = next((m for m in self.messages if m["sid"] == sid), None)
            if found is None:
                raise TwilioApiError(404, 20404, f"The requested resource {request.url.path} was not found")
        except TwilioApiError as exc:
            return exc.response()
        resource = {k: v for k, v in found.items() if k != "media_urls"}
        return await self._answer(fault, lambda: JSONResponse(resource), creates=False)

    async def _update_call(self, request: Request) -> Response:
        try:
            fault = await self._guard(request)
            sid = request.path_params["sid"]
            form = await read_form(request)
            fields = {k: str(form[k]) for k in ("Twiml", "Url", "Method", "Status") if k in form}
            self._check_call_update(sid, fields, request.url.path)
        except TwilioApiError as exc:
            return exc.response()
        return await self._answer(fault, lambda: self._apply_call_update(sid, fields), creates=True)

    def _check_call_update(self, sid: str, fields: dict[str, str], path: str) -> None:
        status = fields.get("Status")
        if status is not None and status not in ("completed", "canceled"):
            raise TwilioApiError(400, 21218, f"Invalid value '{status}' for Status")
        if "Twiml" in fields and "Url" in fields:
            raise TwilioApiError(400, 21220, "Cannot specify both Url and Twiml")
        if sid in self.calls_ended:
            raise TwilioApiError(400, 21220, "Call is not in-progress. Cannot redirect.")
        if sid not in self.calls_in_progress:
            if self.known_calls_only or not re.fullmatch(r"CA[0-9a-f]{32}", sid):
                raise TwilioApiError(404, 20404, f"The requested resource {path} was not found")
            self.calls_in_progress.add(sid)

    def _apply_call_update(self, sid: str, fields: dict[str, str]) -> Response:
        status = "in-progress"
        if fields.get("Status") in ("completed", "canceled"):
            self.calls_in_progress.discard(sid)
            self.calls_ended.add(sid)
            status = "completed"
        update = {"call_sid": sid, **fields}
        self.call_updates.append(update)
        self._record("call_update", update)
        now = rfc2822(datetime.now(UTC))
        return JSONResponse(
            {
                "sid": sid,
                "account_sid": self.account_sid,
                "api_version": API_VERSION,
                "status": status,
                "date_updated": now,
                "direction": "inbound",
                "uri": f"/{API_VERSION}/Accounts/{self.account_sid}/Calls/{sid}.json",
            }
        )


def parse_rfc2822(value: str) -> datetime:
    return datetime.strptime(value, "%a, %d %b %Y %H:%M:%S %z")


CLI_PROG = "python -m bot sim twilio-api"
CLI_DESCRIPTION = (
    "A local stand-in for Twilio's REST API on 127.0.0.1: it accepts the bot's SMS (Messages) "
    "and live-call updates (transfers, hang-ups), answers as Twilio does, and prints each one. "
    "It accepts one account: TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN from the environment or "
    ".env (the same settings the bot reads), else a random SID and token it prints. Runs until "
    "Ctrl-C."
)
EXAMPLE_FROM_NUMBER = "+15550001111"


def main(argv: list[str]) -> int:
    """`python -m bot sim twilio-api --port N`: serve until Ctrl-C, printing what arrives."""
    parser = CommandParser(prog=CLI_PROG, description=CLI_DESCRIPTION)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=port_number, default=0, help="port (default 0: any free port)")
    parser.add_argument("--account-sid", help="the account to accept (default: as described above)")
    parser.add_argument("--auth-token", help="its auth token (default: as described above)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        parser.error(str(exc))
    account_sid = args.account_sid or settings.twilio_account_sid
    auth_token = args.auth_token or settings.twilio_auth_token

    def show(kind: str, entry: dict[str, Any]) -> None:
        if kind == "auth_refused":
            print(
                f"refused {entry['path']} with 401 (Twilio error 20003): the client's "
                "TWILIO_ACCOUNT_SID or TWILIO_AUTH_TOKEN is not the one above",
                file=sys.stderr,
                flush=True,
            )
            return
        if kind == "message":
            body = "\n".join("    " + line for line in str(entry["body"]).splitlines())
            sms = f"SMS {entry['sid']} to {mask_phone(entry['to'])} from {entry['from']}"
            print(f"{sms}:\n{body}", flush=True)
        else:
            fields = " ".join(f"{k}={v}" for k, v in entry.items() if k != "call_sid")
            print(f"call {entry['call_sid']} updated: {' '.join(fields.split())}", flush=True)

    async def serve() -> None:
        sim = TwilioApiSimulator(account_sid, auth_token, on_record=show)
        await sim.start(args.host, args.port)
        token_line = (
            "TWILIO_AUTH_TOKEN: the one already set (environment or .env) is the token accepted"
            if args.auth_token is None and settings.twilio_auth_token
            else f"TWILIO_AUTH_TOKEN={sim.auth_token}"
        )
        lines = [
            "Twilio REST simulator up. Give the bot (and `python -m bot call`) these settings:",
            f"  TWILIO_API_BASE={sim.base_url}",
            f"  TWILIO_ACCOUNT_SID={sim.account_sid}",
            f"  {token_line}",
            f"  TWILIO_FROM_NUMBER={settings.twilio_from_number or EXAMPLE_FROM_NUMBER}",
        ]
        if "TWILIO_API_BASE" in settings.model_fields_set and settings.twilio_api_base != sim.base_url:
            lines.append(f"  note: TWILIO_API_BASE is {settings.twilio_api_base} here, not this simulator")
        print("\n".join(lines), flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await sim.stop()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    except OSError as exc:
        print(f"{CLI_PROG}: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0
