"""The OpenAI Realtime client: the session the bot asks for, and the socket that carries it."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidProxy, InvalidStatus

from bot.realtime_events import MAX_EVENT_CHARS, Ignored, Malformed, ServerEvent, parse_server_event
from bot.realtime_socket import RealtimeSocket, open_socket
from bot.settings import Settings
from bot.tools import Agent


def audio_format(settings: Settings) -> dict[str, Any]:
    """The Realtime audio format for both directions: PCM16 24 kHz, or Twilio's mu-law as is."""
    if settings.audio_format == "pcmu":
        return {"type": "audio/pcmu"}
    return {"type": "audio/pcm", "rate": 24000}


def turn_detection(settings: Settings) -> dict[str, Any]:
    if settings.turn_detection == "semantic_vad":
        return {
            "type": "semantic_vad",
            "eagerness": "auto",
            "create_response": True,
            "interrupt_response": True,
        }
    return {
        "type": "server_vad",
        "threshold": settings.vad_threshold,
        "prefix_padding_ms": settings.vad_prefix_padding_ms,
        "silence_duration_ms": settings.vad_silence_duration_ms,
        "create_response": True,
        "interrupt_response": True,
    }


def transcription(settings: Settings, agent: Agent) -> dict[str, Any]:
    """Caller transcription, with the store's language as a hint (none: the model detects it)."""
    config: dict[str, Any] = {"model": settings.transcription_model}
    if agent.transcription_language:
        config["language"] = agent.transcription_language
    return config


def session_config(settings: Settings, agent: Agent) -> dict[str, Any]:
    """The `session` object of `session.update`; `/session` sends a browser agent's for browsers."""
    fmt = audio_format(settings)
    return {
        "type": "realtime",
        "instructions": agent.instructions,
        "output_modalities": ["audio"],
        "audio": {
            "input": {
                "format": fmt,
                "turn_detection": turn_detection(settings),
                "transcription": transcription(settings, agent),
                "noise_reduction": {"type": "near_field"},
            },
            "output": {"format": fmt, "voice": agent.voice},
        },
        "tools": agent.tools,
        "tool_choice": "auto",
    }


def session_update_event(settings: Settings, agent: Agent) -> dict[str, Any]:
    """The first client event of every session (and of every reconnect)."""
    return {"type": "session.update", "session": session_config(settings, agent)}


# --- the socket -----------------------------------------------------------------------

# Server events are small (an audio delta is a few KB); a session.updated echoing the tools and
# instructions is the largest. A tight cap keeps a misbehaving peer from costing memory.
REALTIME_MAX_MESSAGE_BYTES = MAX_EVENT_CHARS
REALTIME_OPEN_TIMEOUT_S = 5.0
REALTIME_CONNECT_ATTEMPTS = 3
REALTIME_RETRY_BASE_S = 0.25
REALTIME_RETRY_MAX_S = 2.0
REFUSAL_BODY_CHARS = 300
# About one second of appended audio (base64 in JSON). Linux doubles what is asked and would
# otherwise auto-tune to megabytes: a stalled Realtime server would then soak up a minute of
# caller audio in the kernel, stale by the time it is read, before the bridge's own bounded
# queue (which drops the oldest) ever filled.
REALTIME_SEND_BUFFER_BYTES = {"pcm16": 32 * 1024, "pcmu": 8 * 1024}


class RealtimeError(Exception):
    """The Realtime API could not be reached or used."""


class RealtimeRefused(RealtimeError):
    """The handshake was answered with a refusal (bad key, no access): retrying cannot help."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"Realtime handshake refused with HTTP {status}: {detail}")
        self.status = status


class RealtimeUnavailable(RealtimeError):
    """Rate limits, server errors or the network kept the socket from opening."""


class RealtimeClient:
    """One Realtime session over one WebSocket: send client events, iterate server events."""

    def __init__(self, ws: RealtimeSocket) -> None:
        self._ws = ws

    @classmethod
    async def open(
        cls, settings: Settings, agent: Agent, *, open_timeout_s: float = REALTIME_OPEN_TIMEOUT_S
    ) -> RealtimeClient:
        """One attempt: handshake, then `session.update` at once (no wait for session.created)."""
        if not settings.openai_api_key:
            raise RealtimeRefused(401, "OPENAI_API_KEY is not set")
        try:
            ws = await open_socket(
                settings.realtime_connect_url,
                {"Authorization": f"Bearer {settings.openai_api_key}"},
                max_size=REALTIME_MAX_MESSAGE_BYTES,
                open_timeout_s=open_timeout_s,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            detail = bytes(exc.response.body or b"")[:REFUSAL_BODY_CHARS].decode("utf-8", "replace")
            if status == 429 or status >= 500:
                raise RealtimeUnavailable(f"HTTP {status}: {detail}") from None
            raise RealtimeRefused(status, detail) from None
        except (OSError, TimeoutError, InvalidHandshake, InvalidProxy) as exc:
            raise RealtimeUnavailable(f"{type(exc).__name__}: {exc}") from None
        ws.limit_send_buffer(REALTIME_SEND_BUFFER_BYTES[settings.audio_format])
        client = cls(ws)
        try:
            await client.send(json.dumps(session_update_event(settings, agent)))
        except ConnectionClosed as exc:
            raise RealtimeUnavailable(f"closed right after the handshake: {exc}") from None
        return client

    async def send(self, text: str) -> None:
        """Sends one client event (JSON text). Raises ConnectionClosed once the socket is gone."""
        await self._ws.send(text)

    def try_send(self, text: str) -> bool:
        """Sends one client event now if nothing is queued before it on the socket and the
        socket is open; False (nothing sent) otherwise, for the caller to queue it."""
        return self._ws.try_send(text)

    async def events(self) -> AsyncIterator[ServerEvent | Malformed]:
        """Server events, each frame parsed once, until the socket closes (how: `close_code`).

        Frames the bot cannot use come out as Malformed, for the caller to count; events it has
        no use for are skipped here."""
        ws = self._ws
        while True:
            try:
                message = await ws.recv()
            except ConnectionClosed:
                return
            event = parse_server_event(message)
            if not isinstance(event, Ignored):
                yield event

    @property
    def close_code(self) -> int | None:
        return self._ws.close_code

    @property
    def close_reason(self) -> str | None:
        return self._ws.close_reason

    async def close(self) -> None:
        """Closes the socket (idempotent); never leaves a session open at OpenAI."""
        await self._ws.close()


async def connect_realtime(
    settings: Settings,
    agent: Agent,
    *,
    attempts: int = REALTIME_CONNECT_ATTEMPTS,
    open_timeout_s: float = REALTIME_OPEN_TIMEOUT_S,
    rng: Callable[[], float] = random.random,
) -> RealtimeClient:
    """Opens a session, retrying rate limits, server errors and network failures with jittered
    backoff; a refusal (401/403 and other 4xx) is raised at once."""
    last: RealtimeUnavailable | None = None
    for attempt in range(attempts):
        if attempt:
            await asyncio.sleep(retry_delay_s(attempt, rng))
        try:
            return await RealtimeClient.open(settings, agent, open_timeout_s=open_timeout_s)
        except RealtimeUnavailable as exc:
            last = exc
    assert last is not None
    raise last


def retry_delay_s(attempt: int, rng: Callable[[], float]) -> float:
    """The wait before retry `attempt` (1, 2, ...): a doubling ceiling, capped, of which a random
    half to all is taken, so calls dropped together do not reconnect together."""
    ceiling: float = min(REALTIME_RETRY_MAX_S, REALTIME_RETRY_BASE_S * 2 ** (attempt - 1))
    return ceiling * (0.5 + rng() / 2)
