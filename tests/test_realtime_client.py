"""The Realtime client over real sockets: against the Realtime simulator, and a tiny server that
counts handshakes for the retry rules."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator

import pytest
from polling import until
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from bot.realtime import (
    REALTIME_MAX_MESSAGE_BYTES,
    RealtimeClient,
    RealtimeRefused,
    RealtimeUnavailable,
    connect_realtime,
    retry_delay_s,
    session_update_event,
)
from bot.realtime_events import Malformed, ServerEvent, SessionCreated
from bot.settings import Settings
from bot.sim.realtime import RealtimeSimulator, Scenario
from bot.tools import Agent, phone_tools
from bot.words import en

pytestmark = pytest.mark.anyio
API_KEY = "sk-test-realtime-client"
AGENT = Agent("You are the store's phone assistant.", phone_tools(en.WORDS), "marin", "en")


def settings_for(url: str, **extra: str) -> Settings:
    return Settings.model_validate({"OPENAI_API_KEY": API_KEY, "OPENAI_REALTIME_URL": url, **extra})


@pytest.fixture
async def sim() -> AsyncIterator[RealtimeSimulator]:
    async with RealtimeSimulator(Scenario(greeting="Hello!", turns=[]), api_key=API_KEY) as simulator:
        yield simulator


async def first_events(client: RealtimeClient, count: int) -> list[ServerEvent | Malformed]:
    events: list[ServerEvent | Malformed] = []
    async with asyncio.timeout(5):
        async for event in client.events():
            events.append(event)
            if len(events) == count:
                break
    return events


async def test_the_first_client_event_is_session_update_from_settings(sim: RealtimeSimulator) -> None:
    settings = settings_for(sim.url)
    client = await RealtimeClient.open(settings, AGENT)
    [created] = await first_events(client, 1)
    await client.close()
    assert isinstance(created, SessionCreated) and created.session_id.startswith("sess_")
    assert sim.sessions[0].events_received[0] == session_update_event(settings, AGENT)


@pytest.mark.parametrize("audio_format", ["pcm16", "pcmu"])
async def test_the_simulator_accepts_the_session_in_both_audio_modes(
    sim: RealtimeSimulator, audio_format: str
) -> None:
    settings = settings_for(sim.url, AUDIO_FORMAT=audio_format)
    client = await RealtimeClient.open(settings, AGENT)
    session = sim.sessions[0]
    await until(lambda: session.session["audio"]["output"]["voice"] == AGENT.voice)
    await client.close()
    expected = {"type": "audio/pcmu"} if audio_format == "pcmu" else {"type": "audio/pcm", "rate": 24000}
    assert session.session["audio"]["output"]["format"] == expected
    assert session.session["audio"]["input"]["format"] == expected


async def test_no_beta_header_is_sent(sim: RealtimeSimulator) -> None:
    client = await RealtimeClient.open(settings_for(sim.url), AGENT)
    await first_events(client, 1)
    await client.close()
    assert sim.sessions[0].beta_header is False


async def test_close_leaves_no_session_open(sim: RealtimeSimulator) -> None:
    client = await RealtimeClient.open(settings_for(sim.url), AGENT)
    await first_events(client, 1)
    await client.close()
    for _ in range(200):
        if not sim.open_connections:
            break
        await asyncio.sleep(0.01)
    assert sim.open_connections == 0
    assert client.close_code == 1000


async def test_only_an_open_socket_takes_an_event_without_waiting(sim: RealtimeSimulator) -> None:
    """The bridge's Twilio reader sends a caller frame itself only then: a closing socket's send
    waits for the close to finish, which must never hold up the phone's side."""
    client = await RealtimeClient.open(settings_for(sim.url), AGENT)
    await first_events(client, 1)
    assert client.try_send(json.dumps({"type": "input_audio_buffer.clear"}))
    received = sim.sessions[0].events_received
    await until(lambda: [event["type"] for event in received][-1:] == ["input_audio_buffer.clear"])
    closing = asyncio.create_task(client.close())
    await asyncio.sleep(0)
    assert not client.try_send(json.dumps({"type": "response.create"}))
    await closing
    assert not client.try_send(json.dumps({"type": "response.create"}))


async def test_a_dropped_socket_ends_the_event_stream_without_raising(sim: RealtimeSimulator) -> None:
    client = await RealtimeClient.open(settings_for(sim.url), AGENT)
    await first_events(client, 1)
    sim.close_with(1001, "Your session hit the maximum duration of 60 minutes.")
    async with asyncio.timeout(5):
        rest = [event async for event in client.events()]
    assert rest == []
    assert client.close_code == 1001


@pytest.mark.parametrize("status", [401, 403])
async def test_a_refused_handshake_raises_refused_and_is_not_retried(status: int) -> None:
    async with CountingServer(refuse_with=[status] * 5) as server:
        with pytest.raises(RealtimeRefused) as caught:
            await connect_realtime(settings_for(server.url), AGENT, rng=lambda: 0.0)
    assert caught.value.status == status
    assert server.handshakes == 1


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_rate_limits_and_server_errors_are_retried_then_succeed(status: int) -> None:
    async with CountingServer(refuse_with=[status, status]) as server:
        client = await connect_realtime(settings_for(server.url), AGENT, rng=lambda: 0.0)
        await client.close()
    assert server.handshakes == 3


async def test_retries_are_bounded() -> None:
    async with CountingServer(refuse_with=[503] * 10) as server:
        with pytest.raises(RealtimeUnavailable):
            await connect_realtime(settings_for(server.url), AGENT, attempts=3, rng=lambda: 0.0)
    assert server.handshakes == 3


async def test_an_unreachable_server_is_unavailable_not_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(RealtimeUnavailable):
        await connect_realtime(
            settings_for(f"ws://127.0.0.1:{port}/v1/realtime"), AGENT, attempts=2, rng=lambda: 0.0
        )


async def test_a_missing_api_key_is_a_refusal_without_any_connection() -> None:
    settings = Settings.model_validate({"OPENAI_REALTIME_URL": "ws://127.0.0.1:9/v1/realtime"})
    with pytest.raises(RealtimeRefused):
        await connect_realtime(settings, AGENT)


async def test_an_oversized_server_message_closes_the_socket_with_1009() -> None:
    async with CountingServer(send_first="x" * (REALTIME_MAX_MESSAGE_BYTES + 1)) as server:
        client = await RealtimeClient.open(settings_for(server.url), AGENT)
        async with asyncio.timeout(5):
            events = [event async for event in client.events()]
    assert events == []
    assert server.close_codes == [1009]


async def test_the_handshake_carries_the_bearer_key_and_the_model() -> None:
    async with CountingServer() as server:
        settings = settings_for(server.url, REALTIME_MODEL="gpt-realtime-mini")
        client = await RealtimeClient.open(settings, AGENT)
        await client.close()
    [request] = server.requests
    assert request.headers["Authorization"] == f"Bearer {API_KEY}"
    assert "OpenAI-Beta" not in request.headers
    assert request.path == "/v1/realtime?model=gpt-realtime-mini"


class CountingServer:
    """A WebSocket server that refuses the first handshakes with given statuses, then accepts;
    `send_first` is sent once the client's first event (session.update) has arrived."""

    def __init__(self, refuse_with: list[int] | None = None, send_first: str | None = None) -> None:
        self.refuse_with = list(refuse_with or [])
        self.send_first = send_first
        self.handshakes = 0
        self.requests: list[Request] = []
        self.close_codes: list[int | None] = []
        self.url = ""
        self._server: Server | None = None

    def _check(self, connection: ServerConnection, request: Request) -> Response | None:
        self.handshakes += 1
        self.requests.append(request)
        if self.refuse_with:
            status = self.refuse_with.pop(0)
            body = json.dumps({"error": {"message": "no", "code": None}}).encode()
            return Response(status, "Refused", Headers({"Content-Length": str(len(body))}), body)
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            await ws.recv()
            if self.send_first is not None:
                await ws.send(self.send_first)
            async for _ in ws:
                pass
        self.close_codes.append(ws.close_code)

    async def __aenter__(self) -> CountingServer:
        self._server = await serve(self._handle, "127.0.0.1", 0, process_request=self._check)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"ws://127.0.0.1:{port}/v1/realtime"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


def test_retry_waits_double_up_to_a_cap_and_are_jittered_between_half_and_all_of_it() -> None:
    ceilings = [retry_delay_s(attempt, lambda: 1.0) for attempt in (1, 2, 3, 4, 5)]
    assert ceilings == [0.25, 0.5, 1.0, 2.0, 2.0]
    assert [retry_delay_s(attempt, lambda: 0.0) for attempt in (1, 2, 3)] == [0.125, 0.25, 0.5]
    assert retry_delay_s(2, lambda: 0.5) == 0.375
