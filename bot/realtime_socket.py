"""The WebSocket under a Realtime session: websockets' Sans-I/O protocol on an asyncio transport.

Every caller frame becomes one `input_audio_buffer.append`, fifty sends a second per call, the
bridge's most frequent act. websockets' asyncio connection wraps each send in an async context
manager and a drain check; framing the message and writing it is a third of that cost (about 6 us
against 17-22 us per send, and 18-20% of the app's CPU under the peer benchmark's load). So this
connection keeps the same library's protocol (handshake, size limit, ping and pong, the closing
handshake) and does the I/O itself: a send frames and writes at once, and waits only while
the transport has asked it to (its buffer over the high-water mark).

Text frames, the only data this socket sends, are framed here rather than by the protocol: its
general framer (a Frame object, checks, a BytesIO, a getrandom call for each 4-byte mask) costs
4.7 us a message against 0.9 us for a header, a mask and the library's own C masking. Masks come
from the same CSPRNG (os.urandom), read a page at a time. Control frames (ping, pong, close) stay
with the protocol, which keeps the connection's state.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import ssl
import struct
from collections import deque
from collections.abc import Callable, Mapping
from typing import NoReturn, cast

from websockets.client import ClientProtocol
from websockets.exceptions import InvalidProxy, InvalidProxyMessage
from websockets.frames import Frame, Opcode
from websockets.headers import build_authorization_basic, build_host
from websockets.protocol import State
from websockets.proxy import Proxy, get_proxy, parse_proxy
from websockets.uri import WebSocketURI, parse_uri

try:
    from websockets.speedups import apply_mask
except ImportError:  # a build without the C extension: the library's own fallback
    from websockets.utils import apply_mask

# As websockets' own client: a ping every 20 s, and a peer that has not answered the last one by
# the next is gone (a NAT that dropped the flow, a host that vanished) and the socket is closed.
KEEPALIVE_INTERVAL_S = 20.0
# How long a closing handshake may take before the TCP connection is simply closed.
CLOSE_TIMEOUT_S = 10.0
# Server events waiting for the reader: past the high mark the socket stops reading (TCP then
# holds the server back), below the low mark it reads again.
READ_QUEUE_HIGH = 64
READ_QUEUE_LOW = 16
# A proxy's answer to CONNECT is a status line and a few headers.
PROXY_REPLY_MAX_BYTES = 16 * 1024
# Masking keys drawn from the OS at once: 1024 frames' worth, 20 s of one call's up-link.
MASK_POOL_BYTES = 4096
# FIN and the text opcode; then the mask bit with the length or its marker (RFC 6455, 5.2).
_TEXT_FIN = 0x81
_MASKED = 0x80
_LENGTH_16 = 126
_LENGTH_64 = 127
_HEAD_16 = struct.Struct("!BBH")
_HEAD_64 = struct.Struct("!BBQ")


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One verifying context for the process: building one loads the CA store, tens of ms."""
    return ssl.create_default_context()


async def open_socket(
    url: str,
    headers: Mapping[str, str],
    *,
    max_size: int,
    open_timeout_s: float,
    keepalive_s: float = KEEPALIVE_INTERVAL_S,
    close_timeout_s: float = CLOSE_TIMEOUT_S,
) -> RealtimeSocket:
    """Connects and completes the opening handshake.

    Goes through the proxy the environment names for the URL (HTTPS_PROXY, NO_PROXY, as
    websockets' own client and httpx do), when it is an http:// one: a CONNECT tunnel.

    Raises OSError or TimeoutError when the server cannot be reached in time, InvalidStatus
    (with the response's status and body) when it refuses the upgrade, InvalidHandshake when it
    answers something that is not a WebSocket handshake (ProxyError when the proxy refuses the
    tunnel), and InvalidProxy when the proxy's address cannot be used."""
    uri = parse_uri(url)
    protocol = ClientProtocol(uri, max_size=max_size)
    request = protocol.connect()
    for name, value in headers.items():
        request.headers[name] = value
    loop = asyncio.get_running_loop()
    proxy = get_proxy(uri)

    def new_socket() -> RealtimeSocket:
        return RealtimeSocket(protocol, keepalive_s, close_timeout_s)

    async with asyncio.timeout(open_timeout_s):
        if proxy is None:
            _, connection = await loop.create_connection(
                new_socket, uri.host, uri.port, ssl=_tls_context() if uri.secure else None
            )
        else:
            connection = await _open_tunnel(parse_proxy(proxy), uri, new_socket)
        try:
            protocol.send_request(request)
            connection.write_pending()
            await connection.opened
        except BaseException:
            connection.abort()
            raise
    return connection


async def _open_tunnel(
    proxy: Proxy, uri: WebSocketURI, new_socket: Callable[[], RealtimeSocket]
) -> RealtimeSocket:
    """A TCP connection to the proxy, a CONNECT to the Realtime host, then TLS inside it."""
    if proxy.scheme != "http":
        raise InvalidProxy(f"{proxy.scheme}://{proxy.host}", "only http:// proxies are supported")
    target = build_host(uri.host, uri.port, uri.secure, always_include_port=True)
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
    if proxy.user_info is not None:
        lines.append(f"Proxy-Authorization: {build_authorization_basic(*proxy.user_info)}")
    loop = asyncio.get_running_loop()
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    transport, tunnel = await loop.create_connection(lambda: _Tunnel(request), proxy.host, proxy.port)
    try:
        await tunnel.established
        connection = new_socket()
        if uri.secure:
            tls = await loop.start_tls(transport, connection, _tls_context(), server_hostname=uri.host)
            assert tls is not None, "the loop gave no transport for TLS"
            transport = tls
        else:
            transport.set_protocol(connection)
        connection.connection_made(transport)
    except BaseException:
        transport.abort()
        raise
    return connection


class _Tunnel(asyncio.Protocol):
    """Asks a proxy for a tunnel and waits for its yes (any 2xx) or no."""

    def __init__(self, request: bytes) -> None:
        self._request = request
        self._reply = b""
        self.established: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).write(self._request)

    def data_received(self, data: bytes) -> None:
        if self.established.done():
            return
        self._reply += data
        head, end, _ = self._reply.partition(b"\r\n\r\n")
        if not end:
            if len(self._reply) > PROXY_REPLY_MAX_BYTES:
                self.established.set_exception(InvalidProxyMessage("the proxy's answer never ended"))
            return
        status = head.split(b"\r\n", 1)[0].decode("latin-1")
        code = status.split(" ", 2)[1] if status.count(" ") else ""
        if code.isascii() and code.isdigit() and 200 <= int(code) < 300:
            self.established.set_result(None)
        else:
            self.established.set_exception(
                InvalidProxyMessage(f"the proxy refused the tunnel: {status[:80]}")
            )

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.established.done():
            self.established.set_exception(exc or ConnectionResetError("the proxy closed the connection"))


class RealtimeSocket(asyncio.Protocol):
    """One client WebSocket: `send`/`try_send` text, `recv` messages, `close`."""

    def __init__(self, protocol: ClientProtocol, keepalive_s: float, close_timeout_s: float) -> None:
        self._protocol = protocol
        self._keepalive_s = keepalive_s
        self._close_timeout_s = close_timeout_s
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = loop.create_future()
        self._closed: asyncio.Future[None] = loop.create_future()
        self._messages: deque[str | bytes] = deque()
        self._message_ready: asyncio.Future[None] | None = None
        self._fragments: list[bytes] = []
        self._fragments_text = False
        self._reading_paused = False
        self._writing_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._unanswered_ping: bytes | None = None
        self._keepalive: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None

    # --- what the session uses ------------------------------------------------------------

    def try_send(self, text: str) -> bool:
        """Sends `text` now if that cannot wait (open, nothing left in the write buffer)."""
        transport = self._transport
        if self._protocol.state is not State.OPEN or transport is None or transport.get_write_buffer_size():
            return False
        transport.write(_masked_text_frame(text.encode()))
        return True

    async def send(self, text: str) -> None:
        """Sends one text message, waiting while the transport's buffer is over its high mark.

        Raises ConnectionClosed once the socket is closing or closed."""
        transport = self._transport
        if self._protocol.state is not State.OPEN or transport is None:
            await self._raise_closed()
        transport.write(_masked_text_frame(text.encode()))
        while self._writing_paused and not self._closed.done():
            if self._drained is None:
                self._drained = self._loop.create_future()
            await self._drained

    async def recv(self) -> str | bytes:
        """The next message (text as str; binary, or text that is not UTF-8, as bytes).

        Raises ConnectionClosed once the socket is closed and every message was read."""
        while not self._messages:
            if self._closed.done():
                raise self._protocol.close_exc
            if self._message_ready is None:
                self._message_ready = self._loop.create_future()
            await self._message_ready
        if self._reading_paused and len(self._messages) <= READ_QUEUE_LOW:
            self._reading_paused = False
            if self._transport is not None:
                self._transport.resume_reading()
        return self._messages.popleft()

    async def close(self) -> None:
        """Closes with 1000 and waits for the peer to end the connection (for at most the close
        timeout, then the connection is dropped). Idempotent."""
        if self._protocol.state is State.OPEN:
            self._protocol.send_close(1000)
            self.write_pending()
            self._expect_close()
        elif self._protocol.state is State.CONNECTING:
            self.abort()
        await asyncio.shield(self._closed)

    @property
    def close_code(self) -> int | None:
        return self._protocol.close_code

    @property
    def close_reason(self) -> str | None:
        return self._protocol.close_reason

    def limit_send_buffer(self, size: int) -> None:
        """Sets the kernel's send buffer for this socket (SO_SNDBUF)."""
        if self._transport is None:
            return
        sock = self._transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without deriving from it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._protocol.receive_data(data)
        self._take_events()

    def eof_received(self) -> bool | None:
        self._protocol.receive_eof()
        self._take_events()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        # Idempotent; leaves the protocol CLOSED with the close codes it saw (1006 if none).
        self._protocol.receive_eof()
        for timer in (self._keepalive, self._close_timer):
            if timer is not None:
                timer.cancel()
        if not self.opened.done():
            failure = self._protocol.handshake_exc or exc
            self.opened.set_exception(failure or ConnectionResetError("closed during the handshake"))
        _settle(self._closed)
        _settle(self._message_ready)
        _settle(self._drained)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        _settle(self._drained)
        self._drained = None

    # --- inside ---------------------------------------------------------------------------

    def write_pending(self) -> None:
        """Writes what the protocol has for the peer; an empty chunk asks for a half-close."""
        transport = self._transport
        if transport is None:
            return
        for data in self._protocol.data_to_send():
            if data:
                transport.write(data)
            elif transport.can_write_eof():
                transport.write_eof()
            else:
                transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _take_events(self) -> None:
        protocol = self._protocol
        events = protocol.events_received()
        self.write_pending()
        if protocol.close_expected():
            self._expect_close()
        if not self.opened.done():
            self._settle_handshake()
        for event in events:
            if type(event) is Frame:
                self._on_frame(event)

    def _settle_handshake(self) -> None:
        protocol = self._protocol
        if protocol.handshake_exc is not None:
            self.opened.set_exception(protocol.handshake_exc)
        elif protocol.state is State.OPEN:
            self.opened.set_result(None)
            self._keepalive = self._loop.call_later(self._keepalive_s, self._ping)

    def _on_frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            self._fragments_text = opcode is Opcode.TEXT
            if frame.fin:
                self._deliver(bytes(frame.data), self._fragments_text)
            else:
                self._fragments = [bytes(frame.data)]
        elif opcode is Opcode.CONT:
            self._fragments.append(bytes(frame.data))
            if frame.fin:
                data, self._fragments = b"".join(self._fragments), []
                self._deliver(data, self._fragments_text)
        elif opcode is Opcode.PONG and frame.data == self._unanswered_ping:
            self._unanswered_ping = None

    def _deliver(self, data: bytes, text: bool) -> None:
        message: str | bytes = data
        if text:
            try:
                message = data.decode()
            except UnicodeDecodeError:
                message = data
        self._messages.append(message)
        _settle(self._message_ready)
        self._message_ready = None
        if not self._reading_paused and len(self._messages) >= READ_QUEUE_HIGH:
            self._reading_paused = True
            if self._transport is not None:
                self._transport.pause_reading()

    def _ping(self) -> None:
        protocol = self._protocol
        if protocol.state is not State.OPEN:
            return
        if self._unanswered_ping is not None:
            protocol.fail(1011, "keepalive ping timeout")
            self.write_pending()
            self._expect_close()
            return
        self._unanswered_ping = os.urandom(4)
        protocol.send_ping(self._unanswered_ping)
        self.write_pending()
        self._keepalive = self._loop.call_later(self._keepalive_s, self._ping)

    def _expect_close(self) -> None:
        """The peer should end the connection now; if it does not in time, we do."""
        if self._close_timer is None and self._transport is not None:
            self._close_timer = self._loop.call_later(self._close_timeout_s, self._transport.abort)

    async def _raise_closed(self) -> NoReturn:
        """Raises ConnectionClosed with the close codes, once they are known."""
        await asyncio.shield(self._closed)
        raise self._protocol.close_exc


class _MaskKeys:
    """Client masking keys (RFC 6455, 5.3: unpredictable, from a strong source of entropy)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forgets the keys drawn: a forked child must not reuse its parent's."""
        self._pool = b""
        self._at = 0

    def take(self) -> bytes:
        at = self._at
        if at == len(self._pool):
            self._pool = os.urandom(MASK_POOL_BYTES)
            at = 0
        self._at = at + 4
        return self._pool[at : at + 4]


_mask_keys = _MaskKeys()
os.register_at_fork(after_in_child=_mask_keys.reset)


def _masked_text_frame(payload: bytes) -> bytes:
    """One unfragmented text frame as a client sends it."""
    length = len(payload)
    if length < _LENGTH_16:
        head = bytes((_TEXT_FIN, _MASKED | length))
    elif length < 1 << 16:
        head = _HEAD_16.pack(_TEXT_FIN, _MASKED | _LENGTH_16, length)
    else:
        head = _HEAD_64.pack(_TEXT_FIN, _MASKED | _LENGTH_64, length)
    mask = _mask_keys.take()
    return head + mask + apply_mask(payload, mask)


def _settle(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)
