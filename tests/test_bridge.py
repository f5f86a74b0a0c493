"""The bridge over real sockets: the simulated phone dials a small app that mounts
`serve_media_stream`, the Realtime simulator plays the model and the Twilio API simulator takes
call updates. Each test is one behaviour of docs/reliability.md rows 3-14, 24, 25 and 28."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
from polling import until
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from twilio.request_validator import RequestValidator
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from bot.bridge import BridgeDeps, serve_media_stream
from bot.metrics import Metrics
from bot.settings import PACKAGE_DIR, Settings
from bot.sim.phone import PhoneCall, dial
from bot.sim.realtime import RealtimeSimulator, Scenario, ToolCall, Turn
from bot.sim.server import LocalServer
from bot.sim.twilio_api import TwilioApiSimulator
from bot.stores import Destination, Stores
from bot.stream_token import mint_stream_token
from bot.tools import CallContext, ToolResult
from bot.twilio_rest import TwilioRest
from bot.twiml import render_fallback_twiml, render_stream_twiml, render_transfer_twiml
from bot.wav import read_wav

pytestmark = pytest.mark.anyio

API_KEY = "sk-test-bridge"
STREAM_KEY = b"test-stream-key"
STORE_NUMBER = "+15557650000"
AUDIO_DIR = PACKAGE_DIR / "sim" / "audio"
WASHERS = read_wav(AUDIO_DIR / "caller_washers.wav").data
SCENARIO = Scenario(
    greeting="Hi there!",
    turns=[
        Turn(
            say="We have two washers.",
            tool_calls=[ToolCall("search_products", {"query": "washer"})],
            hears="Do you have washers?",
        ),
        Turn(say="The first one is quiet and efficient.", hears="Tell me more."),
    ],
)


class ScriptedToolbox:
    """The tools as the bridge sees them: records each call and answers from `results`."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any], CallContext]] = []
        self.results: dict[str, ToolResult] = {}

    async def run(self, name: str, arguments: str, context: CallContext) -> ToolResult:
        self.calls.append((name, json.loads(arguments or "{}"), context))
        return self.results.get(name, ToolResult(json.dumps({"found": 2, "summary": "two washers"})))


@dataclass
class RecordSink:
    records: list[dict[str, Any]] = field(default_factory=list)

    async def add_call_completed(
        self, *, call_sid: str, caller: str, record: dict[str, Any], destination: Destination
    ) -> str:
        self.records.append({"call_sid": call_sid, "caller": caller, "record": record})
        return f"msg_{len(self.records)}"


@dataclass
class Stack:
    """Everything a test call needs, on 127.0.0.1."""

    base_url: str
    deps: BridgeDeps
    realtime: RealtimeSimulator
    twilio_api: TwilioApiSimulator
    toolbox: ScriptedToolbox
    sink: RecordSink

    def dial(self, **options: Any) -> Any:
        return dial(
            self.base_url,
            account_sid=self.twilio_api.account_sid,
            auth_token=self.twilio_api.auth_token,
            **options,
        )

    async def ended(self) -> None:
        """Waits until no call is active (the bridge finished its clean-up)."""
        metrics = self.deps.metrics
        await until(
            lambda: (
                not self.deps.active_calls
                and ended_calls(metrics) == metrics.sample("voicebot_calls_started_total")
            )
        )


def ended_calls(metrics: Metrics) -> float:
    return sum(metrics.samples("voicebot_calls_total", "outcome").values())


def rejections(stack: Stack) -> dict[str, float]:
    return stack.deps.metrics.samples("voicebot_stream_rejections_total", "reason")


def junk(stack: Stack) -> dict[str, float]:
    return stack.deps.metrics.samples("voicebot_junk_frames_total", "kind")


def make_app(deps: BridgeDeps) -> Starlette:
    async def voice(request: Request) -> Response:
        form = dict(parse_qsl((await request.body()).decode()))
        token = mint_stream_token(STREAM_KEY, form["CallSid"], time.time(), 120)
        stream_url = f"ws://{request.headers['host']}/media-stream"
        twiml = render_stream_twiml(
            stream_url=stream_url, caller=form.get("From", ""), called=form.get("To", ""), token=token
        )
        return Response(twiml, media_type="text/xml")

    async def media_stream(websocket: WebSocket) -> None:
        await serve_media_stream(websocket, deps)

    return Starlette(
        routes=[Route("/twiml/voice", voice, methods=["POST"]), WebSocketRoute("/media-stream", media_stream)]
    )


@pytest.fixture
async def stack(request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    overrides: dict[str, str] = getattr(request, "param", {})
    async with (
        RealtimeSimulator(SCENARIO, api_key=API_KEY) as realtime,
        TwilioApiSimulator() as twilio_api,
        httpx.AsyncClient() as http,
    ):
        settings = Settings.model_validate(
            {
                "OPENAI_API_KEY": API_KEY,
                "OPENAI_REALTIME_URL": realtime.url,
                "TWILIO_ACCOUNT_SID": twilio_api.account_sid,
                "TWILIO_AUTH_TOKEN": twilio_api.auth_token,
                "TWILIO_API_BASE": twilio_api.base_url,
                "STORE_PHONE_NUMBER": STORE_NUMBER,
                "REALTIME_RECONNECT_TIMEOUT_S": "2",
                **overrides,
            }
        )
        toolbox, sink = ScriptedToolbox(), RecordSink()
        deps = BridgeDeps(
            settings=settings,
            stream_key=STREAM_KEY,
            stores=Stores.load(settings),
            tools_for=lambda store: toolbox,
            twilio=TwilioRest.from_settings(settings, http),
            outbox=sink,
            start_timeout_s=0.5,
            control_grace_s=1.0,
        )
        async with LocalServer(make_app(deps), log_level="warning") as server:
            yield Stack(server.base_url, deps, realtime, twilio_api, toolbox, sink)


async def greeted(call: PhoneCall) -> None:
    await call.wait_for_audio(5.0)
    await call.wait_until_quiet(400, 10.0)


# --- a call -----------------------------------------------------------------------------


async def test_a_call_greets_answers_with_a_tool_and_ends_cleanly(stack: Stack) -> None:
    async with stack.dial(caller="+15551234567", pace=False) as call:
        await greeted(call)
        await call.say(WASHERS)
        await call.wait_for_audio(10.0)
        await call.wait_until_quiet(400, 10.0)
    await stack.ended()
    assert [(name, args) for name, args, _ in stack.toolbox.calls] == [
        ("search_products", {"query": "washer"})
    ]
    assert stack.toolbox.calls[0][2].caller == "+15551234567"
    assert stack.realtime.open_connections == 0
    [entry] = stack.sink.records
    record = entry["record"]
    assert entry["caller"] == "+15551234567"
    assert record["end_reason"] == "twilio_stop"
    roles = [turn["role"] for turn in record["transcript"]]
    assert roles.count("assistant") >= 2 and "user" in roles and "tool" in roles
    assert any(r["first_audio_latency_ms"] is not None for r in record["responses"])
    assert record["usage"]["output_audio_tokens"] > 0


def bridge_tasks() -> list[str]:
    return [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("bridge-")]


async def test_a_normal_hang_up_leaves_no_task_no_socket_and_no_error_log(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with stack.dial() as call:
        await greeted(call)
    await stack.ended()
    assert bridge_tasks() == []
    assert stack.realtime.open_connections == 0
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_a_close_without_stop_ends_the_call_the_same_way(stack: Stack) -> None:
    call = await stack.dial()
    await greeted(call)
    await call.hang_up(send_stop=False)
    await stack.ended()
    assert stack.sink.records[0]["record"]["end_reason"] == "twilio_closed"
    assert stack.realtime.open_connections == 0


async def test_a_stop_without_a_close_ends_the_call_and_the_app_closes_the_socket(stack: Stack) -> None:
    call = await stack.dial()
    await greeted(call)
    await call.hang_up(close=False)
    await call.wait_closed(3.0)
    await stack.ended()
    assert call.close_code == 1000
    assert stack.sink.records[0]["record"]["end_reason"] == "twilio_stop"
    assert stack.realtime.open_connections == 0
    assert bridge_tasks() == []


async def test_hanging_up_mid_tool_call_still_finishes_the_tool(stack: Stack) -> None:
    started, finished = asyncio.Event(), asyncio.Event()
    run = stack.toolbox.run

    async def slow_tool(name: str, arguments: str, context: CallContext) -> ToolResult:
        started.set()
        await asyncio.sleep(0.5)
        result = await run(name, arguments, context)
        finished.set()
        return result

    stack.toolbox.run = slow_tool  # type: ignore[method-assign]
    call = await stack.dial(pace=False)
    await call.say(WASHERS)
    async with asyncio.timeout(5):
        await started.wait()
    await call.hang_up()
    await stack.ended()
    assert finished.is_set()
    assert stack.realtime.open_connections == 0
    assert len(stack.sink.records) == 1


# --- the stream token and the start of a stream ----------------------------------------


def token_for(call_sid: str) -> str:
    return mint_stream_token(STREAM_KEY, call_sid, time.time(), 120)


@pytest.mark.parametrize(
    ("parameters", "reason"),
    [
        ({}, "missing"),
        ({"token": "not-a-token"}, "malformed"),
        ({"token": token_for("CA" + "0" * 32)}, "bad_signature"),
    ],
)
async def test_a_bad_stream_token_closes_1008_before_any_realtime_connect(
    stack: Stack, parameters: dict[str, str], reason: str
) -> None:
    call = await stack.dial(custom_parameters={"caller": "+15551230001", **parameters})
    await call.wait_closed(3.0)
    assert call.close_code == 1008
    assert rejections(stack) == {reason: 1}
    assert stack.realtime.sessions == []


async def test_an_upgrade_signed_with_the_wrong_token_is_refused_before_anything_opens(stack: Stack) -> None:
    call = await dial(
        stack.base_url, account_sid=stack.twilio_api.account_sid, auth_token="not-the-auth-token"
    )
    assert call.stream_error == "HTTP 403"
    assert rejections(stack) == {"bad_upgrade_signature": 1}
    assert stack.realtime.sessions == []


async def test_an_unsigned_upgrade_is_accepted_on_the_strength_of_the_stream_token(stack: Stack) -> None:
    async with stack.dial(sign_stream=False) as call:
        await greeted(call)
    assert rejections(stack) == {}


REQUIRE_SIGNED_UPGRADES = {"REQUIRE_UPGRADE_SIGNATURE": "true"}


@pytest.mark.parametrize("stack", [REQUIRE_SIGNED_UPGRADES], indirect=True)
async def test_with_signatures_required_an_unsigned_upgrade_is_refused_before_anything_opens(
    stack: Stack,
) -> None:
    call = await stack.dial(sign_stream=False)
    assert call.stream_error == "HTTP 403"
    assert rejections(stack) == {"unsigned_upgrade": 1}
    assert stack.realtime.sessions == []


@pytest.mark.parametrize("stack", [REQUIRE_SIGNED_UPGRADES], indirect=True)
async def test_with_signatures_required_the_upgrade_must_be_signed_over_its_wss_url(stack: Stack) -> None:
    """Behind a TLS proxy Twilio signs `wss://public-host/path`: the same over https is refused."""
    ws_url = stack.base_url.replace("http://", "ws://") + "/media-stream"
    public = "bot.example.com"
    validator = RequestValidator(stack.twilio_api.auth_token)
    statuses = []
    for signed in (f"wss://{public}/media-stream", f"https://{public}/media-stream"):
        headers = {
            "X-Twilio-Signature": validator.compute_signature(signed, {}),
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": public,
        }
        try:
            async with connect(ws_url, additional_headers=headers, open_timeout=3):
                statuses.append(101)
        except InvalidStatus as exc:
            statuses.append(exc.response.status_code)
    assert statuses == [101, 403]
    assert rejections(stack) == {"bad_upgrade_signature": 1}


@pytest.mark.parametrize("stack", [REQUIRE_SIGNED_UPGRADES], indirect=True)
async def test_with_signatures_required_a_signed_call_goes_through(stack: Stack) -> None:
    async with stack.dial() as call:
        await greeted(call)
    assert rejections(stack) == {}


async def test_an_expired_token_for_this_call_closes_1008(stack: Stack) -> None:
    stack.deps.wall_clock = lambda: time.time() + 1000
    call = await stack.dial()
    await call.wait_closed(3.0)
    assert call.close_code == 1008
    assert rejections(stack) == {"expired": 1}
    assert stack.realtime.sessions == []


async def test_media_before_start_is_ignored_and_nothing_opens_until_start(stack: Stack) -> None:
    call = await stack.dial(start_stream=False)
    for ts in range(0, 100, 20):
        await call.send_raw(media_frame(call.stream_sid, ts, "/" * 216))
    await asyncio.sleep(0.1)
    assert stack.realtime.sessions == []
    await call.send_start()
    await greeted(call)
    await call.hang_up()
    assert stack.deps.metrics.sample("voicebot_frames_before_start_total") == 5
    assert len(stack.realtime.sessions) == 1


async def test_no_start_in_time_closes_the_socket_with_1008_and_counts_it(stack: Stack) -> None:
    call = await stack.dial(start_stream=False)
    await call.wait_closed(3.0)
    assert call.close_code == 1008
    assert rejections(stack) == {"no_start": 1}
    assert stack.realtime.sessions == []


async def test_a_stop_without_start_closes_the_socket(stack: Stack) -> None:
    call = await stack.dial(start_stream=False)
    await call.send_raw(
        json.dumps({"event": "stop", "streamSid": call.stream_sid, "stop": {"callSid": call.call_sid}})
    )
    await call.wait_closed(3.0)
    assert call.closed_by_app and call.close_code == 1000
    assert stack.realtime.sessions == []


async def test_a_duplicate_start_is_ignored(stack: Stack) -> None:
    async with stack.dial() as call:
        await greeted(call)
        await call.send_start()
        await asyncio.sleep(0.2)
        assert call.connected
    await stack.ended()
    assert len(stack.realtime.sessions) == 1


def foreign(call: PhoneCall, event: str, **fields: Any) -> str:
    """A message naming a stream other than the call's own."""
    return json.dumps({"event": event, "streamSid": "MZ" + "f" * 32, **fields})


async def test_a_start_for_another_stream_mid_call_is_ignored_and_opens_nothing(stack: Stack) -> None:
    async with stack.dial() as call:
        await greeted(call)
        start = {
            "streamSid": "MZ" + "f" * 32,
            "callSid": call.call_sid,
            "accountSid": call.account_sid,
            "customParameters": dict(call.dial.parameters),
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        }
        await call.send_raw(foreign(call, "start", start=start))
        await asyncio.sleep(0.3)
        assert call.connected
    await stack.ended()
    assert junk(stack) == {"foreign_stream": 1}
    assert len(stack.realtime.sessions) == 1


async def test_a_stop_mark_or_dtmf_for_another_stream_neither_ends_nor_steers_the_call(stack: Stack) -> None:
    async with stack.dial() as call:
        await greeted(call)
        await call.send_raw(foreign(call, "stop", stop={"callSid": call.call_sid}))
        await call.send_raw(foreign(call, "dtmf", dtmf={"digit": "0"}))
        await call.send_raw(foreign(call, "mark", mark={"name": "0:99999:item_x"}))
        await asyncio.sleep(0.3)
        assert call.connected
        appends = stack.realtime.sessions[0].audio_appends
        await asyncio.sleep(0.2)
        assert stack.realtime.sessions[0].audio_appends > appends
    await stack.ended()
    assert junk(stack) == {"foreign_stream": 3}
    assert stack.twilio_api.call_updates == []
    assert stack.sink.records[0]["record"]["end_reason"] == "twilio_stop"


async def test_a_second_stream_for_the_same_call_is_refused(stack: Stack) -> None:
    async with stack.dial() as call:
        await greeted(call)
        second = await stack.dial(start_stream=False, custom_parameters=dict(call.dial.parameters))
        second.call_sid = call.call_sid
        await second.send_start()
        await second.wait_closed(3.0)
        assert second.close_code == 1008
        assert call.connected
    await stack.ended()
    assert rejections(stack) == {"duplicate_call": 1}
    assert len(stack.realtime.sessions) == 1


# --- bad frames -------------------------------------------------------------------------


def media_frame(stream_sid: str, ts: int, payload: str) -> str:
    media = {"track": "inbound", "chunk": "1", "timestamp": str(ts), "payload": payload}
    return json.dumps({"event": "media", "streamSid": stream_sid, "media": media})


JUNK: list[str | bytes] = [b"\x00\x01\x02", "not json", '["a"]', '{"no": "event"}', '{"event": "dance"}']


async def test_garbage_frames_are_dropped_and_counted_and_the_call_goes_on(stack: Stack) -> None:
    async with stack.dial() as call:
        await greeted(call)
        for frame in JUNK:
            await call.send_raw(frame)
        appends = stack.realtime.sessions[0].audio_appends
        await asyncio.sleep(0.3)
        assert call.connected
        assert stack.realtime.sessions[0].audio_appends > appends
    assert sum(junk(stack).values()) == len(JUNK)


async def test_invalid_base64_media_is_skipped_and_audio_keeps_flowing(stack: Stack) -> None:
    async with stack.dial() as call:
        await greeted(call)
        for n in range(5):
            await call.send_raw(media_frame(call.stream_sid, 100_000 + n, "abc"))
        appends = stack.realtime.sessions[0].audio_appends
        await asyncio.sleep(0.3)
        assert call.connected
        assert stack.realtime.sessions[0].audio_appends > appends
    assert junk(stack) == {"bad_payload": 5}


async def test_a_flood_of_garbage_closes_the_stream_with_1008(stack: Stack) -> None:
    call = await stack.dial()
    await greeted(call)
    for _ in range(40):
        await call.send_raw("garbage")
    await call.wait_closed(3.0)
    assert call.close_code == 1008
    await stack.ended()
    assert stack.sink.records[0]["record"]["end_reason"] == "junk_frames"
    assert stack.realtime.open_connections == 0


async def test_an_oversized_message_closes_1009_and_other_calls_go_on(stack: Stack) -> None:
    async with stack.dial() as other:
        await greeted(other)
        call = await stack.dial(start_stream=False)
        await call.send_oversized(1024 * 1024)
        await call.wait_closed(3.0)
        assert call.close_code == 1009
        await asyncio.sleep(0.2)
        assert other.connected
        assert len(stack.deps.active_calls) == 1
    await stack.ended()
    assert stack.realtime.open_connections == 0


# --- DTMF ------------------------------------------------------------------------------


async def test_a_dtmf_storm_transfers_once_after_the_connecting_line(stack: Stack) -> None:
    async with stack.dial() as call:
        await greeted(call)
        heard_before = call.heard_ms()
        for n in range(60):
            await call.press("0" if n % 2 else "Z")
        await until(lambda: bool(stack.twilio_api.call_updates), 8)
        heard_line = call.heard_ms() - heard_before
        await asyncio.sleep(0.3)
    [update] = stack.twilio_api.call_updates
    assert update["call_sid"] == call.call_sid
    assert update["Twiml"] == render_transfer_twiml(STORE_NUMBER)
    assert heard_line > 500, "the connecting line played before the transfer"
    await stack.ended()
    assert stack.sink.records[0]["record"]["outcome"] == "transferred"


# --- the Realtime side failing ---------------------------------------------------------


def client_events(stack: Stack, session: int) -> list[dict[str, Any]]:
    return stack.realtime.sessions[session].events_received


async def test_a_dropped_realtime_socket_reconnects_and_restores_the_earlier_turns(stack: Stack) -> None:
    async with stack.dial(pace=False) as call:
        await greeted(call)
        await call.say(WASHERS)
        await call.wait_for_audio(10.0)
        await call.wait_until_quiet(400, 10.0)
        stack.realtime.drop_after_events = 2
        await call.say(WASHERS)
        await until(lambda: len(stack.realtime.sessions) >= 2)
        await call.wait_for_audio(10.0)
    await stack.ended()
    restored = [e["item"] for e in client_events(stack, 1) if e["type"] == "conversation.item.create"]
    texts = [(i.get("role"), i["content"][0]["text"]) for i in restored if i["type"] == "message"]
    assert ("user", "Do you have washers?") in texts
    assert ("assistant", "We have two washers.") in texts
    assert [i["name"] for i in restored if i["type"] == "function_call"] == ["search_products"]
    assert client_events(stack, 1)[0]["type"] == "session.update"
    assert stack.deps.metrics.sample("voicebot_realtime_reconnects_total") == 1
    assert stack.realtime.open_connections == 0


async def test_when_reconnecting_fails_the_call_is_redirected_to_the_fallback(stack: Stack) -> None:
    async with stack.dial() as call:
        await greeted(call)
        stack.realtime.reject_handshake_status = 503
        stack.realtime.close_with(1011, "internal error")
        await until(lambda: bool(stack.twilio_api.call_updates), 5)
    [update] = stack.twilio_api.call_updates
    assert update["Twiml"] == render_fallback_twiml(STORE_NUMBER)
    await stack.ended()
    assert stack.sink.records[0]["record"]["outcome"] == "fallback"
    assert stack.realtime.open_connections == 0


async def test_a_refused_realtime_handshake_sends_the_fallback_within_3_s(stack: Stack) -> None:
    stack.realtime.reject_handshake_status = 401
    started = time.monotonic()
    async with stack.dial():
        await until(lambda: bool(stack.twilio_api.call_updates), 3)
    assert time.monotonic() - started < 3
    assert stack.twilio_api.call_updates[0]["Twiml"] == render_fallback_twiml(STORE_NUMBER)
    assert stack.deps.metrics.sample("voicebot_realtime_refusals_total") == 1
    assert len(stack.realtime.sessions) == 0


async def test_a_recoverable_realtime_error_is_logged_and_the_call_goes_on(stack: Stack) -> None:
    async with stack.dial() as call:
        await greeted(call)
        stack.realtime.inject_error("conversation_already_has_active_response", "busy")
        await asyncio.sleep(0.3)
        assert call.connected
    assert len(stack.realtime.sessions) == 1


async def test_malformed_realtime_events_are_counted_and_the_call_goes_on(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    stack.realtime.malformed_event_rate = 0.5
    async with stack.dial(pace=False) as call:
        await greeted(call)
        await call.say(WASHERS)
        await call.wait_for_audio(10.0)
        await call.wait_until_quiet(400, 10.0)
        assert call.connected
    await stack.ended()
    junk = stack.deps.metrics.samples("voicebot_realtime_junk_events_total", "kind")
    assert stack.realtime.malformed_events_sent > 20
    assert 0 < sum(junk.values()) <= stack.realtime.malformed_events_sent
    assert set(junk) <= {"binary", "not_json", "not_object", "too_deep", "no_type", "bad_field"}
    assert [name for name, _, _ in stack.toolbox.calls] == ["search_products"]
    assert len(stack.realtime.sessions) == 1
    record = stack.sink.records[0]["record"]
    assert record["end_reason"] == "twilio_stop"
    said = [turn["text"] for turn in record["transcript"] if turn["role"] == "assistant"]
    assert said == ["Hi there!", "We have two washers."]
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_an_unknown_parameter_error_is_logged_with_its_code_and_the_call_goes_on(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="bot.bridge")
    async with stack.dial() as call:
        await greeted(call)
        stack.realtime.inject_error("unknown_parameter", "Unknown parameter: 'session.temperature'.")
        await until(lambda: any(getattr(r, "code", None) == "unknown_parameter" for r in caplog.records))
        appends = stack.realtime.sessions[0].audio_appends
        await asyncio.sleep(0.2)
        assert call.connected
        assert stack.realtime.sessions[0].audio_appends > appends
    assert len(stack.realtime.sessions) == 1
    assert stack.deps.metrics.sample("voicebot_realtime_reconnects_total") == 0


def restored_items(stack: Stack, session: int) -> list[tuple[str | None, str]]:
    """(role or type, text or name) of the conversation items a session was seeded with."""
    items = [e["item"] for e in client_events(stack, session) if e["type"] == "conversation.item.create"]
    return [
        (item.get("role"), item["content"][0]["text"]) if item["type"] == "message" else (item["type"], "")
        for item in items
    ]


async def test_a_close_with_1001_takes_the_rollover_path_and_keeps_the_conversation(stack: Stack) -> None:
    async with stack.dial(pace=False) as call:
        await greeted(call)
        await call.say(WASHERS)
        await call.wait_for_audio(10.0)
        await call.wait_until_quiet(400, 10.0)
        stack.realtime.close_with(1001, "Your session hit the maximum duration of 60 minutes.")
        await until(lambda: len(stack.realtime.sessions) >= 2 and bool(client_events(stack, 1)))
        await asyncio.sleep(0.2)
        assert call.connected
    await stack.ended()
    assert client_events(stack, 1)[0]["type"] == "session.update"
    restored = restored_items(stack, 1)
    assert ("user", "Do you have washers?") in restored
    assert ("assistant", "We have two washers.") in restored
    assert ("function_call", "") in restored and ("function_call_output", "") in restored
    assert stack.deps.metrics.sample("voicebot_realtime_reconnects_total") == 1
    assert stack.twilio_api.call_updates == []


async def test_session_expired_takes_the_reconnect_path(stack: Stack) -> None:
    async with stack.dial() as call:
        await greeted(call)
        stack.realtime.inject_error("session_expired", "Your session expired.")
        await until(lambda: len(stack.realtime.sessions) >= 2)
        assert call.connected
    assert stack.deps.metrics.sample("voicebot_realtime_reconnects_total") == 1


async def test_a_rotated_session_is_seeded_with_the_conversation_so_far(stack: Stack) -> None:
    stack.deps.settings = stack.deps.settings.model_copy(update={"realtime_session_max_s": 1.0})
    async with stack.dial(pace=False) as call:
        await greeted(call)
        await call.say(WASHERS)
        await call.wait_for_audio(10.0)
        await call.wait_until_quiet(400, 10.0)
        answered = len(stack.realtime.sessions)
        await until(lambda: len(stack.realtime.sessions) > answered and bool(client_events(stack, -1)))
        assert call.connected
    restored = restored_items(stack, -1)
    assert restored[:2] == [("assistant", "Hi there!"), ("user", "Do you have washers?")]
    assert ("assistant", "We have two washers.") in restored
    assert ("function_call", "") in restored and ("function_call_output", "") in restored
    assert [e for e in call.events if e.kind == "clear"] == []


async def test_the_session_is_rotated_at_a_turn_boundary_without_a_word_or_a_clear(stack: Stack) -> None:
    stack.deps.settings = stack.deps.settings.model_copy(update={"realtime_session_max_s": 1.0})
    async with stack.dial() as call:
        await greeted(call)
        await until(lambda: len(stack.realtime.sessions) >= 2)
        await asyncio.sleep(0.2)
        assert call.connected
        assert stack.realtime.sessions[0].closed
        clears = [e for e in call.events if e.kind == "clear"]
    types = [e["type"] for e in client_events(stack, 1)]
    assert types[0] == "session.update"
    assert "response.create" not in types
    assert clears == []
    assert stack.deps.metrics.sample("voicebot_realtime_rotations_total") >= 1
