"""The Realtime session's WebSocket, against websockets' own server over real sockets: what it
must keep of a full client (fragments, pings both ways, flow control, closing, TLS) now that it
does its own I/O (docs/reliability.md rows 10, 11 and 13). Each runs on asyncio's own loop and
on uvloop, which `serve` uses."""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.utils import accept_key, apply_mask

from bot.realtime import RealtimeClient, RealtimeUnavailable
from bot.realtime_events import Malformed
from bot.realtime_socket import RealtimeSocket, _mask_keys, _tls_context, open_socket
from bot.settings import Settings
from bot.tools import Agent, phone_tools
from bot.words import en

pytestmark = pytest.mark.anyio
AGENT = Agent("You are the store's phone assistant.", phone_tools(en.WORDS), "marin", "en")
Handler = Callable[[ServerConnection], Awaitable[None]]


@pytest.fixture(params=["asyncio", "uvloop"])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return ("asyncio", {"use_uvloop": request.param == "uvloop"})


@asynccontextmanager
async def server(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[str]:
    async with serve(handler, "127.0.0.1", 0, ssl=tls, max_size=None) as running:
        port = running.sockets[0].getsockname()[1]
        yield f"{'wss' if tls else 'ws'}://127.0.0.1:{port}/v1/realtime"


def settings_for(url: str) -> Settings:
    return Settings.model_validate({"OPENAI_API_KEY": "sk-socket-tests", "OPENAI_REALTIME_URL": url})


async def open_to(url: str, **options: float) -> RealtimeSocket:
    return await open_socket(url, {}, max_size=1 << 20, open_timeout_s=5, **options)


async def idle(ws: ServerConnection) -> None:
    async for _ in ws:
        pass


async def test_a_fragmented_message_arrives_whole() -> None:
    async def fragments(ws: ServerConnection) -> None:
        await ws.send(['{"type": ', '"session.created"', "}"])
        await idle(ws)

    async with server(fragments) as url:
        socket = await open_to(url)
        assert await socket.recv() == '{"type": "session.created"}'
        await socket.close()


async def test_text_that_is_not_utf8_arrives_as_bytes_and_the_session_goes_on() -> None:
    """A broken text frame is one malformed event for the bridge to count, not a closed call."""

    async def broken_then_good(ws: ServerConnection) -> None:
        await ws.send(b'{"type": "\xff"}', text=True)
        await ws.send('{"type": "session.created", "session": {"id": "sess_1"}}')
        await idle(ws)

    async with server(broken_then_good) as url:
        socket = await open_to(url)
        assert await socket.recv() == b'{"type": "\xff"}'
        client = RealtimeClient(socket)
        events = client.events()
        async with asyncio.timeout(5):
            assert type(await anext(events)).__name__ == "SessionCreated"
        await client.close()


async def test_the_client_turns_a_binary_frame_into_a_malformed_event() -> None:
    async def binary(ws: ServerConnection) -> None:
        await ws.send(b"\x00\x01")
        await idle(ws)

    async with server(binary) as url:
        client = RealtimeClient(await open_to(url))
        async with asyncio.timeout(5):
            event = await anext(client.events())
        await client.close()
    assert isinstance(event, Malformed)


async def test_the_servers_pings_are_answered() -> None:
    latencies: list[float] = []

    async def pinging(ws: ServerConnection) -> None:
        pong = await ws.ping()
        latencies.append(await asyncio.wait_for(pong, 2))
        await ws.send("done")
        await idle(ws)

    async with server(pinging) as url:
        socket = await open_to(url)
        async with asyncio.timeout(5):
            assert await socket.recv() == "done"
        await socket.close()
    assert len(latencies) == 1


async def test_a_peer_that_answers_pings_stays_open() -> None:
    async with server(idle) as url:
        socket = await open_to(url, keepalive_s=0.02)
        await asyncio.sleep(0.3)
        assert socket.try_send('{"type": "input_audio_buffer.clear"}')
        await socket.close()
    assert socket.close_code == 1000


async def test_a_peer_that_stops_answering_pings_is_dropped() -> None:
    """A vanished peer (its host gone, a NAT that forgot the flow) never answers: the reader
    then sees the socket end instead of waiting forever for audio."""

    async def deaf(ws: ServerConnection) -> None:
        ws.transport.pause_reading()
        await asyncio.sleep(5)

    async with server(deaf) as url:
        socket = await open_to(url, keepalive_s=0.05, close_timeout_s=0.05)
        async with asyncio.timeout(2):
            with pytest.raises(ConnectionClosed):
                await socket.recv()
    assert socket.close_code == 1006
    assert not socket.try_send("{}")


async def test_close_waits_for_the_peer_then_gives_up_after_the_close_timeout() -> None:
    async def never_closing(ws: ServerConnection) -> None:
        ws.transport.pause_reading()
        await asyncio.sleep(5)

    async with server(never_closing) as url:
        socket = await open_to(url, close_timeout_s=0.1)
        started = time.monotonic()
        await socket.close()
        # uvloop's timers keep milliseconds: one may fire a millisecond early.
        assert 0.09 <= time.monotonic() - started < 1.0
    assert socket.close_code == 1006


async def test_a_send_waits_while_the_peer_does_not_read_and_resumes_when_it_does() -> None:
    reading = asyncio.Event()

    async def slow_reader(ws: ServerConnection) -> None:
        ws.transport.pause_reading()
        await reading.wait()
        ws.transport.resume_reading()
        await idle(ws)

    async with server(slow_reader) as url:
        socket = await open_to(url)
        socket.limit_send_buffer(4096)
        chunk = "x" * 65536
        blocked = None
        for _ in range(200):
            send = asyncio.create_task(socket.send(chunk))
            await asyncio.sleep(0.01)
            if not send.done():
                blocked = send
                break
        assert blocked is not None, "200 sends of 64 KB never waited"
        assert not socket.try_send("{}")
        reading.set()
        async with asyncio.timeout(5):
            await blocked
        await socket.close()
    assert socket.close_code == 1000


async def test_messages_of_every_frame_length_arrive_intact_through_send_and_try_send() -> None:
    """7-bit, 16-bit and 64-bit lengths at their edges; websockets' server also checks the masking."""
    received: list[str] = []

    async def collect(ws: ServerConnection) -> None:
        async for message in ws:
            received.append(str(message))

    sizes = [0, 1, 125, 126, 127, 65535, 65536, 70001]
    async with server(collect) as url:
        socket = await open_to(url)
        for size in sizes:
            assert socket.try_send("a" * size)
            await socket.send("é" * size)
        await socket.close()
    assert [len(message) for message in received] == [size for size in sizes for _ in range(2)]
    assert received[-1] == "é" * sizes[-1]


async def test_every_frame_carries_its_own_mask_key_across_refills_of_the_key_pool() -> None:
    """RFC 6455 5.3: an unpredictable key per frame, here 3,000 frames (three draws from the OS)."""
    frames: list[tuple[bytes, bytes]] = []
    done = asyncio.Event()

    async def raw_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        key = next(
            line.split(b":", 1)[1].strip().decode()
            for line in request.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            + f"Sec-WebSocket-Accept: {accept_key(key)}\r\n\r\n".encode()
        )
        while len(frames) < 3000:
            head = await reader.readexactly(2)
            assert head[0] == 0x81 and head[1] & 0x80, "a masked, final text frame"
            mask = await reader.readexactly(4)
            frames.append((mask, apply_mask(await reader.readexactly(head[1] & 0x7F), mask)))
        done.set()
        writer.close()

    listener = await asyncio.start_server(raw_server, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    async with listener:
        socket = await open_to(f"ws://127.0.0.1:{port}/v1/realtime")
        for n in range(3000):
            await socket.send(f"{n:04}")
        async with asyncio.timeout(5):
            await done.wait()
        socket.abort()
    assert [payload for _, payload in frames] == [f"{n:04}".encode() for n in range(3000)]
    # Three collisions among 3,000 random 32-bit keys: under one chance in a billion.
    assert len({mask for mask, _ in frames}) >= 2997


def test_a_forked_child_draws_mask_keys_of_its_own() -> None:
    """Keys the parent drew but had not used would otherwise be the child's next ones too."""
    _mask_keys.take()
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(write_end, _mask_keys.take())
        os._exit(0)
    os.waitpid(child, 0)
    childs_key = os.read(read_end, 4)
    os.close(read_end)
    os.close(write_end)
    assert childs_key != _mask_keys.take()


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (the openssl command line makes it)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command (apt-get install -y openssl)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture
def trusted(certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Path]]:
    """The certificate, trusted as the system's CA store (SSL_CERT_FILE). The client's TLS context
    is built once per process from that store: rebuilt around the test."""
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))
    _tls_context.cache_clear()
    yield certificate
    _tls_context.cache_clear()


def tls_server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


async def test_wss_opens_a_session_with_a_certificate_the_system_trusts(trusted: tuple[Path, Path]) -> None:
    received: list[str | bytes] = []

    async def first_event(ws: ServerConnection) -> None:
        received.append(await ws.recv())
        await idle(ws)

    async with server(first_event, tls_server_context(*trusted)) as url:
        settings = settings_for(url)
        client = await RealtimeClient.open(settings, AGENT)
        await client.close()
    assert client.close_code == 1000
    assert '"session.update"' in str(received[0])


async def test_wss_refuses_a_certificate_nobody_vouches_for(certificate: tuple[Path, Path]) -> None:
    async with server(idle, tls_server_context(*certificate)) as url:
        settings = settings_for(url)
        with pytest.raises(RealtimeUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            await RealtimeClient.open(settings, AGENT)


@asynccontextmanager
async def connect_proxy(refusal: bytes | None = None) -> AsyncIterator[tuple[str, list[bytes]]]:
    """An HTTP proxy that opens the tunnel CONNECT asks for and pipes bytes both ways (or
    answers `refusal` and hangs up); yields its URL and the CONNECT requests it got."""
    requests: list[bytes] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        requests.append(head)
        if refusal is not None:
            writer.write(refusal)
            writer.close()
            return
        host, port = head.split(b" ")[1].decode().rsplit(":", 1)
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await asyncio.gather(
            pipe(reader, upstream_writer), pipe(upstream_reader, writer), return_exceptions=True
        )

    proxy = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with proxy:
        yield f"http://127.0.0.1:{proxy.sockets[0].getsockname()[1]}", requests


def use_proxy(monkeypatch: pytest.MonkeyPatch, scheme: str, url: str) -> None:
    """Names `url` as the proxy for `scheme` URLs, as an operator's environment would."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setenv(f"{scheme.upper()}_PROXY", url)


async def test_the_socket_goes_through_the_proxy_the_environment_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def greet(ws: ServerConnection) -> None:
        await ws.send("hello through the tunnel")
        await idle(ws)

    async with server(greet) as url, connect_proxy() as (proxy_url, requests):
        use_proxy(monkeypatch, "http", proxy_url.replace("http://", "http://store:s3cret@"))
        socket = await open_to(url)
        async with asyncio.timeout(5):
            assert await socket.recv() == "hello through the tunnel"
        await socket.close()
    [request] = requests
    port = url.split(":")[2].split("/")[0]
    assert request.startswith(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n".encode())
    assert b"Proxy-Authorization: Basic c3RvcmU6czNjcmV0\r\n" in request


async def test_a_proxy_that_refuses_the_tunnel_leaves_the_session_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    refusal = b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n"
    async with server(idle) as url, connect_proxy(refusal) as (proxy_url, _):
        use_proxy(monkeypatch, "http", proxy_url)
        settings = settings_for(url)
        with pytest.raises(RealtimeUnavailable, match="407 Proxy Authentication Required"):
            await RealtimeClient.open(settings, AGENT)


async def test_wss_goes_through_the_https_proxy_with_tls_inside_the_tunnel(
    trusted: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenAI behind a corporate proxy: CONNECT, then the certificate checked end to end."""
    async with server(idle, tls_server_context(*trusted)) as url, connect_proxy() as (proxy_url, requests):
        use_proxy(monkeypatch, "https", proxy_url)
        settings = settings_for(url)
        client = await RealtimeClient.open(settings, AGENT)
        await client.close()
    assert client.close_code == 1000
    assert len(requests) == 1
