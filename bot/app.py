"""The web app: Twilio's voice webhook, the Media Streams socket, the browser assistant, health.

Routes are listed first; each handler is short and hands real work to its module.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST as PROMETHEUS_CONTENT_TYPE
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket
from twilio.request_validator import RequestValidator, get_signature_algorithm

from bot import __version__
from bot.bridge import BridgeDeps, serve_media_stream
from bot.catalog import CatalogError
from bot.cli import CommandParser, port_number, positive_int
from bot.console import (
    CONSOLE_DIR,
    FAILED_LOGINS_PER_MINUTE,
    PAGE_HEADERS,
    asset,
    event_stream,
    operator_refusal,
    outbox_view,
    retry,
    same_secret,
)
from bot.ephemeral import OpenAIRefused, OpenAITimedOut, OpenAIUnreachable, mint_client_secret
from bot.feed import CallFeed
from bot.logs import CallLog, configure_logging, mask_phone
from bot.metrics import Metrics, shared_by_workers
from bot.outbox import Outbox, open_outbox, running_outbox
from bot.ratelimit import SlidingWindowLimiter
from bot.settings import Settings, SettingsError, load_settings
from bot.stores import DEFAULT_STORE_ID, Store, Stores, StoresError
from bot.stream_token import mint_stream_token
from bot.tools import BrowserTools, OutboxUnavailable, StoreTools
from bot.twilio_rest import TwilioRest
from bot.twilio_stream import MAX_MESSAGE_BYTES, UVICORN_WS
from bot.twiml import render_fallback_twiml, render_stream_twiml
from bot.worker_feeds import WorkerFeeds, feed_dir, shared_feed_folder

log = logging.getLogger(__name__)

MAX_WEBHOOK_BODY_BYTES = 64 * 1024
MAX_TOOL_REQUEST_BYTES = 16 * 1024
TWIML_MEDIA_TYPE = "text/xml"
ASSISTANT_DIR = Path(__file__).parent / "web" / "assistant"
# How long a browser waits when OpenAI is busy and did not say (it usually sends Retry-After).
BUSY_RETRY_AFTER_S = 2
MAX_RETRY_AFTER_S = 60


def create_app(
    settings: Settings, *, clock: Callable[[], float] = time.time, stores: Stores | None = None
) -> Starlette:
    """`stores`: already loaded (and so checked) by the caller; else the lifespan loads them.

    `clock` (epoch seconds) is also the clock stores' opening hours are read on.
    """
    routes = [
        Route("/twiml/voice", voice_webhook, methods=["POST"]),
        Route("/session", browser_session, methods=["GET", "OPTIONS"]),
        Route("/", assistant_page, methods=["GET"]),
        Route("/assistant/tools/{name}", assistant_tool, methods=["POST", "OPTIONS"]),
        Mount("/assistant", app=StaticFiles(directory=ASSISTANT_DIR), name="assistant"),
        Route("/console", console_page, methods=["GET"]),
        Route("/console/assets/{name}", console_asset, methods=["GET"]),
        Route("/console/feed", console_feed, methods=["GET"]),
        Route("/console/outbox", console_outbox, methods=["GET"]),
        Route("/console/outbox/{message_id}/retry", console_retry, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        WebSocketRoute("/media-stream", media_stream),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.runtime = Runtime(settings=settings, clock=clock, stores=stores)
    return app


@dataclass
class Runtime:
    """Everything the handlers share, built once per app (the I/O parts in the lifespan)."""

    settings: Settings
    clock: Callable[[], float]
    metrics: Metrics = field(default_factory=Metrics)
    stream_key: bytes = b""
    session_limiter: SlidingWindowLimiter = field(init=False)
    tools_limiter: SlidingWindowLimiter = field(init=False)
    console_limiter: SlidingWindowLimiter = field(init=False)
    feed: CallFeed | None = field(init=False)
    worker_feeds: WorkerFeeds | None = None
    stores: Stores | None = None
    http: httpx.AsyncClient | None = None
    bridge: BridgeDeps | None = None
    outbox: Outbox | None = None

    def __post_init__(self) -> None:
        self.stream_key = stream_signing_key(self.settings)
        self.session_limiter = SlidingWindowLimiter(
            self.settings.session_rate_limit_per_minute, 60.0, clock=self.clock
        )
        self.tools_limiter = SlidingWindowLimiter(
            self.settings.assistant_tools_rate_limit_per_minute, 60.0, clock=self.clock
        )
        self.console_limiter = SlidingWindowLimiter(FAILED_LOGINS_PER_MINUTE, 60.0, clock=self.clock)
        # Only with the console on does the bridge tell a feed about its calls.
        console_on = self.settings.console_password is not None
        media = self.settings.media_base_url
        self.feed = CallFeed(media_base_url=media, wall_clock=self.clock) if console_on else None

    def local_now(self) -> datetime:
        return datetime.fromtimestamp(self.clock()).astimezone()

    def degraded(self) -> dict[str, str]:
        """Why the bot is not fully working right now, for /healthz."""
        reasons: dict[str, str] = {}
        if self.outbox is not None:
            reasons.update(self.outbox.problems())
        if self.bridge is not None and self.bridge.realtime_refusal:
            reasons["realtime"] = self.bridge.realtime_refusal
        return reasons


def stream_signing_key(settings: Settings) -> bytes:
    """The configured key; else one derived from the Twilio token; else a per-process secret.

    A per-process secret only works where one process serves every call: `serve` refuses to
    start several workers, or instances sharing DATABASE_URL, without a stable key.
    """
    if settings.stream_signing_key:
        return settings.stream_signing_key.encode()
    if settings.twilio_auth_token:
        return ("voicebot-stream-token:" + settings.twilio_auth_token).encode()
    return secrets.token_bytes(32)


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    """Open the stores and their catalogs (fail fast), the HTTP client, the outbox and its relay,
    the call bridge; watch the stores file and the catalogs while serving."""
    runtime: Runtime = app.state.runtime
    settings = runtime.settings
    for feature, reason in settings.disabled_features().items():
        log.warning("feature disabled: %s", reason, extra={"feature": feature})
    stores = runtime.stores
    if stores is None:
        stores = runtime.stores = await asyncio.to_thread(Stores.load, settings)
    metrics = runtime.metrics
    async with httpx.AsyncClient(follow_redirects=False) as http:
        twilio = TwilioRest.from_settings(settings, http)
        async with running_outbox(settings, http, twilio=twilio, stores=stores, metrics=metrics) as outbox:

            def tools_for(store: Store) -> StoreTools:
                return StoreTools(
                    store, outbox, twilio=twilio is not None, clock=runtime.local_now, metrics=metrics
                )

            runtime.http, runtime.outbox = http, outbox
            runtime.bridge = BridgeDeps(
                settings=settings,
                stream_key=runtime.stream_key,
                stores=stores,
                tools_for=tools_for,
                twilio=twilio,
                outbox=outbox,
                metrics=metrics,
                feed=runtime.feed,
                wall_clock=runtime.clock,
            )
            watchers = [
                asyncio.create_task(stores.watch(), name="stores-watch"),
                asyncio.create_task(metrics.watch_event_loop(), name="event-loop-lag"),
            ]
            siblings = feed_dir()
            if runtime.feed is not None and siblings is not None:
                runtime.worker_feeds = WorkerFeeds(runtime.feed, siblings)
                await runtime.worker_feeds.start()
            try:
                yield
            finally:
                if runtime.worker_feeds is not None:
                    await runtime.worker_feeds.stop()
                    runtime.worker_feeds = None
                for watcher in watchers:
                    watcher.cancel()
                await asyncio.gather(*watchers, return_exceptions=True)
                runtime.http = runtime.outbox = runtime.bridge = None


async def media_stream(websocket: WebSocket) -> None:
    runtime: Runtime = websocket.app.state.runtime
    assert runtime.bridge is not None, "the app's lifespan builds the bridge"
    await serve_media_stream(websocket, runtime.bridge)


# --- POST /twiml/voice -----------------------------------------------------------------


class VoiceWebhook(BaseModel):
    """The fields of Twilio's incoming-call request that the bot relies on."""

    model_config = ConfigDict(extra="ignore")

    CallSid: str = Field(pattern=r"^CA[0-9a-fA-F]{32}$")
    AccountSid: str = Field(pattern=r"^AC[0-9a-fA-F]{32}$")
    From: str = Field("", max_length=128)
    To: str = Field("", max_length=128)


async def voice_webhook(request: Request) -> Response:
    runtime: Runtime = request.app.state.runtime
    settings = runtime.settings
    form = await read_form(request)
    if form is None:
        return Response(status_code=400)
    if not twilio_signature_is_valid(request, form, settings):
        log.warning("voice webhook refused: bad or missing signature", extra={"path": request.url.path})
        return Response(status_code=403)
    try:
        call = VoiceWebhook.model_validate(dict(form))
    except ValidationError:
        log.warning("voice webhook refused: signed but not an incoming-call request")
        return Response(status_code=400)
    call_log = CallLog(log, call_sid=call.CallSid)
    assert runtime.stores is not None, "the app's lifespan loads the stores"
    store = runtime.stores.for_number(call.To)
    if not settings.openai_enabled:
        call_log.warning("no OpenAI key: answering with the fallback TwiML")
        twiml = render_fallback_twiml(store.transfer_to(runtime.local_now()), store.words.code)
        return Response(twiml, media_type=TWIML_MEDIA_TYPE)
    token = mint_stream_token(
        runtime.stream_key, call.CallSid, runtime.clock(), settings.stream_token_ttl_s, store.id
    )
    stream_url = websocket_base_url(public_base_url(request, settings)) + "/media-stream"
    call_log.info(
        "incoming call",
        extra={"caller": mask_phone(call.From), "called": mask_phone(call.To), "store": store.id},
    )
    twiml = render_stream_twiml(
        stream_url=stream_url,
        caller=call.From,
        called=call.To,
        token=token,
        store=store.id,
        language=store.words.code,
    )
    return Response(twiml, media_type=TWIML_MEDIA_TYPE)


async def read_form(request: Request) -> FormData | None:
    """The url-encoded form (Twilio's only format), or None when too large or not decodable.

    Any other content type reads as no fields, so it fails the signature check (403).
    """
    declared = request.headers.get("content-length", "0")
    if not declared.isdigit() or int(declared) > MAX_WEBHOOK_BODY_BYTES:
        return None
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        return FormData()
    body = await request.body()
    try:
        fields = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=200)
    except (UnicodeDecodeError, ValueError):
        return None
    items: list[tuple[str, str | UploadFile]] = [(name, value) for name, value in fields]
    return FormData(items)


def public_base_url(request: Request, settings: Settings) -> str:
    """The URL Twilio used to reach us: PUBLIC_URL, else what the proxy in front says."""
    if settings.public_url:
        return settings.public_url
    proto = request.headers.get("x-forwarded-proto", request.url.scheme).split(",")[0].strip()
    host = request.headers.get("x-forwarded-host") or request.headers.get("host", "")
    return f"{proto}://{host.split(',')[0].strip()}"


def websocket_base_url(http_base_url: str) -> str:
    if http_base_url.startswith("https://"):
        return "wss://" + http_base_url.removeprefix("https://")
    return "ws://" + http_base_url.removeprefix("http://")


def twilio_signature_is_valid(request: Request, form: FormData, settings: Settings) -> bool:
    """Twilio signs the full public URL it requested plus the sorted form parameters."""
    signature = request.headers.get("x-twilio-signature")
    if not signature or not settings.twilio_auth_token:
        return False
    url = public_base_url(request, settings) + request.url.path
    if request.url.query:
        url += "?" + request.url.query
    algorithm = get_signature_algorithm(
        request.headers.get("x-twilio-webhooks-signature-settings")
    )
    validator = RequestValidator(settings.twilio_auth_token)
    return bool(validator.validate(url, form, signature, algorithm=algorithm))


# --- GET /session ----------------------------------------------------------------------


async def browser_session(request: Request) -> Response:
    runtime: Runtime = request.app.state.runtime
    settings = runtime.settings
    refusal, cors = guard_browser_request(request, runtime.session_limiter, "GET, OPTIONS")
    if refusal is not None:
        return refusal
    if not settings.openai_enabled:
        return JSONResponse(
            {"error": "the Realtime API is not configured on this server (OPENAI_API_KEY)"},
            status_code=503,
            headers=cors,
        )
    assert runtime.http is not None, "the app's lifespan creates the HTTP client"
    store, refusal = requested_store(request, cors)
    if refusal is not None:
        return refusal
    no_store = {**cors, "Cache-Control": "no-store"}
    try:
        secret = await mint_client_secret(runtime.http, settings, store, runtime.local_now())
    except OpenAIRefused as exc:
        log.warning("OpenAI refused a client secret", extra={"status": exc.status})
        if exc.temporary:
            wait_s = min(MAX_RETRY_AFTER_S, math.ceil(exc.retry_after_s or BUSY_RETRY_AFTER_S))
            body = {"error": f"OpenAI is busy, try again shortly: {exc.message}"}
            return JSONResponse(body, 503, headers={**no_store, "Retry-After": str(wait_s)})
        return JSONResponse({"error": f"OpenAI refused: {exc.message}"}, 502, headers=no_store)
    except OpenAIUnreachable as exc:
        log.warning("OpenAI unreachable for a client secret: %s", exc)
        return JSONResponse({"error": f"OpenAI unreachable ({exc})"}, 502, headers=no_store)
    except OpenAITimedOut as exc:
        log.warning("OpenAI did not answer a client secret request: %s", exc)
        return JSONResponse({"error": f"OpenAI did not answer ({exc})"}, 504, headers=no_store)
    # Where the secret is valid, so a browser needs one request to (re)connect.
    return JSONResponse({**secret, "realtime_url": settings.realtime_connect_url}, headers=no_store)


def requested_store(request: Request, cors: dict[str, str]) -> tuple[Store, Response | None]:
    """The store a browser asks for (`?store=<id>`, default: the default store), or a 404."""
    runtime: Runtime = request.app.state.runtime
    assert runtime.stores is not None, "the app's lifespan loads the stores"
    store_id = request.query_params.get("store") or DEFAULT_STORE_ID
    store = runtime.stores.get(store_id)
    if store is None:
        body = {"error": f"no store {store_id[:64]!r}: use the id of a store in STORES_PATH"}
        return runtime.stores.default, JSONResponse(body, status_code=404, headers=cors)
    return store, None


def guard_browser_request(
    request: Request, limiter: SlidingWindowLimiter, methods: str
) -> tuple[Response | None, dict[str, str]]:
    """The checks every browser endpoint makes: (a refusal or preflight answer, CORS headers).

    The app's own page is always allowed; other origins only when listed in CORS_ORIGINS.
    """
    runtime: Runtime = request.app.state.runtime
    origin = request.headers.get("origin")
    if origin is not None and not origin_allowed(origin, request, runtime.settings):
        return JSONResponse({"error": "origin not allowed"}, status_code=403), {}
    cors = cors_headers(origin)
    if request.method == "OPTIONS":
        preflight = {**PREFLIGHT_HEADERS, "Access-Control-Allow-Methods": methods}
        return Response(status_code=204, headers={**cors, **preflight}), cors
    client = request.client.host if request.client else "unknown"
    wait_s = limiter.hit(client)
    if wait_s is not None:
        headers = {**cors, "Retry-After": str(int(wait_s))}
        return JSONResponse({"error": "too many requests"}, status_code=429, headers=headers), cors
    return None, cors


def origin_allowed(origin: str, request: Request, settings: Settings) -> bool:
    origin = origin.rstrip("/")
    return origin in settings.cors_origins or origin == public_base_url(request, settings)


PREFLIGHT_HEADERS = {
    "Access-Control-Allow-Headers": "Content-Type",
    "Access-Control-Max-Age": "600",
}


def cors_headers(origin: str | None) -> dict[str, str]:
    """Only called for allowed origins (or none): echo the origin, never '*'."""
    if origin is None:
        return {"Vary": "Origin"}
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}


# --- GET / and POST /assistant/tools/{name}: the browser assistant -----------------------


async def assistant_page(request: Request) -> Response:
    """The page; its scripts, styles and worklets come from /assistant/ (this app only)."""
    settings: Settings = request.app.state.runtime.settings
    headers = {"Content-Security-Policy": page_policy(settings), "Cache-Control": "no-cache"}
    return FileResponse(ASSISTANT_DIR / "index.html", headers=headers)


def page_policy(settings: Settings) -> str:
    """Code only from this app; sockets to this app and the Realtime API; pictures from anywhere."""
    realtime = urlsplit(settings.openai_realtime_url)
    return "; ".join(
        (
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data: https: http:",
            f"connect-src 'self' {realtime.scheme}://{realtime.netloc}",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'self'",
        )
    )


class ToolCallRequest(BaseModel):
    """A tool call the model made in a browser's session: its arguments exactly as sent."""

    model_config = ConfigDict(extra="forbid")

    arguments: str = Field(max_length=MAX_TOOL_REQUEST_BYTES)


async def assistant_tool(request: Request) -> Response:
    """Runs a browser-safe tool; answers the output the page then gives the model, verbatim."""
    runtime: Runtime = request.app.state.runtime
    refusal, cors = guard_browser_request(request, runtime.tools_limiter, "POST, OPTIONS")
    if refusal is not None:
        return refusal
    store, refusal = requested_store(request, cors)
    if refusal is not None:
        return refusal
    tools = BrowserTools(store, media_base_url=runtime.settings.media_base_url, metrics=runtime.metrics)
    name = request.path_params["name"]
    headers = {**cors, "Cache-Control": "no-store"}
    if name not in BrowserTools.names:
        result = await tools.run(name, "{}")
        body = {"error": f"no browser tool named {name[:64]!r}", "output": result.output}
        return JSONResponse(body, status_code=404, headers=headers)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        return JSONResponse({"error": "send JSON (Content-Type: application/json)"}, 415, headers=cors)
    declared = request.headers.get("content-length", "")
    if not declared.isdigit() or int(declared) > MAX_TOOL_REQUEST_BYTES:
        return JSONResponse({"error": "the request body is missing or too large"}, 413, headers=cors)
    try:
        call = ToolCallRequest.model_validate_json(await request.body())
    except ValidationError as exc:
        reason = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": f"not a tool call ({reason})"}, status_code=422, headers=cors)
    result = await tools.run(name, call.arguments)
    collection = result.collection.model_dump(mode="json") if result.collection else None
    return JSONResponse({"output": result.output, "collection": collection}, headers=headers)


# --- /console: the operators' page, its live feed, the outbox ---------------------------


def console_refusal(request: Request) -> Response | None:
    runtime: Runtime = request.app.state.runtime
    return operator_refusal(request, runtime.settings.console_password, runtime.console_limiter)


async def console_page(request: Request) -> Response:
    if (refusal := console_refusal(request)) is not None:
        return refusal
    return FileResponse(CONSOLE_DIR / "index.html", headers=PAGE_HEADERS)


async def console_asset(request: Request) -> Response:
    if (refusal := console_refusal(request)) is not None:
        return refusal
    found = asset(request.path_params["name"])
    if found is None:
        return Response(status_code=404)
    path, media_type = found
    return FileResponse(path, media_type=media_type, headers=PAGE_HEADERS)


async def console_feed(request: Request) -> Response:
    """Server-sent events: a snapshot of the calls, then each change as it happens."""
    if (refusal := console_refusal(request)) is not None:
        return refusal
    runtime: Runtime = request.app.state.runtime
    assert runtime.feed is not None, "the console is on, so the app built its feed"
    calls = runtime.worker_feeds or runtime.feed  # every worker's calls under serve --workers N
    headers = {**PAGE_HEADERS, "X-Accel-Buffering": "no"}  # nginx: pass each event on at once
    return StreamingResponse(event_stream(calls), media_type="text/event-stream", headers=headers)


async def console_outbox(request: Request) -> Response:
    if (refusal := console_refusal(request)) is not None:
        return refusal
    outbox = request.app.state.runtime.outbox
    assert outbox is not None, "the app's lifespan opens the outbox"
    try:
        view = await outbox_view(outbox)
    except OutboxUnavailable as exc:
        return JSONResponse({"error": f"the outbox cannot be read: {exc}"}, 503, headers=NO_STORE)
    return JSONResponse(view, headers=NO_STORE)


async def console_retry(request: Request) -> Response:
    """The retry button. Basic credentials ride along on any site's request to this origin, so
    only a request the console page itself sent (its Origin is ours) is obeyed."""
    if (refusal := console_refusal(request)) is not None:
        return refusal
    runtime: Runtime = request.app.state.runtime
    origin = request.headers.get("origin", "").rstrip("/")
    if origin != public_base_url(request, runtime.settings):
        return JSONResponse({"error": "retry from the console page itself"}, 403, headers=NO_STORE)
    assert runtime.outbox is not None, "the app's lifespan opens the outbox"
    try:
        return await retry(runtime.outbox, request.path_params["message_id"])
    except OutboxUnavailable as exc:
        return JSONResponse({"error": f"the outbox cannot be written: {exc}"}, 503, headers=NO_STORE)


NO_STORE = {"Cache-Control": "no-store"}


# --- GET /healthz ----------------------------------------------------------------------


async def healthz(request: Request) -> Response:
    runtime: Runtime = request.app.state.runtime
    degraded = runtime.degraded()
    body: dict[str, Any] = {
        "status": "degraded" if degraded else "ok",
        "version": __version__,
        "features": runtime.settings.features(),
    }
    if degraded:
        body["degraded"] = degraded
    if runtime.bridge is not None:
        started = int(runtime.metrics.sample("voicebot_calls_started_total"))
        body["calls"] = {"active": len(runtime.bridge.active_calls), "started": started}
    return JSONResponse(body)


# --- GET /metrics ----------------------------------------------------------------------


async def metrics_endpoint(request: Request) -> Response:
    """Prometheus's text format; behind `Authorization: Bearer METRICS_TOKEN` when that is set."""
    runtime: Runtime = request.app.state.runtime
    token = runtime.settings.metrics_token
    if token is not None and not bearer_token_matches(request, token):
        return Response("metrics need the bearer token (METRICS_TOKEN)\n", 401, headers=BEARER_CHALLENGE)
    outbox = runtime.outbox
    body = await runtime.metrics.exposition(outbox.counts if outbox else None, runtime.clock())
    return Response(body, media_type=PROMETHEUS_CONTENT_TYPE, headers={"Cache-Control": "no-store"})


BEARER_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="metrics"'}


def bearer_token_matches(request: Request, token: str) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and same_secret(given.strip(), token)


# --- python -m bot serve ---------------------------------------------------------------


def app_from_environment() -> Starlette:
    """The app as `serve` runs it in each worker process: settings from the environment and .env."""
    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    return create_app(settings)


def shared_key_problem(settings: Settings, workers: int) -> str | None:
    """Why several processes could not share stream tokens, or None when they can."""
    if settings.stream_signing_key or settings.twilio_auth_token:
        return None
    if workers == 1 and not settings.database_url:
        return None
    why = f"--workers {workers}" if workers > 1 else "DATABASE_URL (instances that share work)"
    return (
        f"STREAM_SIGNING_KEY: not set, nor TWILIO_AUTH_TOKEN to derive it from; with {why}, a stream "
        "token minted by one process must be accepted by every other: set STREAM_SIGNING_KEY to one "
        "random value on every instance"
    )


async def check_outbox(settings: Settings) -> None:
    """Open (creating or migrating) and close the outbox, so a bad database stops start-up early."""
    outbox = await open_outbox(settings)
    await outbox.close()


def main(argv: list[str]) -> int:
    parser = CommandParser(
        prog="python -m bot serve",
        description=(
            "Run the voice bot under uvicorn. Settings come from the environment and a .env file "
            "in the current folder (see the README's Configuration table)."
        ),
    )
    parser.add_argument("--host", help="bind address (default: HOST or 0.0.0.0)")
    parser.add_argument("--port", type=port_number, help="port (default: PORT or 5052)")
    parser.add_argument(
        "--workers", type=positive_int, help="worker processes (default: WEB_CONCURRENCY, else 1)"
    )
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    workers = args.workers or settings.web_concurrency
    problem = shared_key_problem(settings, workers)
    if problem is not None:
        print(problem, file=sys.stderr)
        return 2
    try:
        stores = Stores.load(settings)
    except CatalogError as exc:
        print(f"CATALOG_PATH: {exc}", file=sys.stderr)
        return 2
    except StoresError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        asyncio.run(check_outbox(settings))
    except OutboxUnavailable as exc:
        print(exc, file=sys.stderr)
        return 2
    # One process serves the app built here, with the stores and catalogs already loaded; several
    # workers each build their own through the factory (uvicorn needs an import string to spawn them).
    app: Starlette | str = "bot.app:app_from_environment"
    with shared_by_workers(workers), shared_feed_folder(workers):
        if workers == 1:
            app = create_app(settings, stores=stores)
        uvicorn.run(
            app,
            factory=workers > 1,
            workers=workers,
            host=args.host or settings.host,
            port=args.port or settings.port,
            ws=UVICORN_WS,
            ws_max_size=MAX_MESSAGE_BYTES,
            log_config=None,
            proxy_headers=True,
        )
    return 0
