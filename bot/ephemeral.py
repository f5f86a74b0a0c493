"""Mints short-lived Realtime client secrets so browsers never see the server's API key."""

from __future__ import annotations

from typing import Any

import httpx

from bot.realtime import session_config
from bot.settings import Settings

CLIENT_SECRET_TTL_S = 600
OPENAI_TIMEOUT = httpx.Timeout(10.0, connect=5.0)


class OpenAIRefused(Exception):
    """OpenAI answered with an error; `message` is its own explanation."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"OpenAI answered {status}: {message}")
        self.status = status
        self.message = message


class OpenAIUnreachable(Exception):
    """No answer from OpenAI (network error or timeout)."""


def client_secret_request(settings: Settings) -> dict[str, Any]:
    """The same agent as on the phone, in the browser's audio format (PCM16; WebRTC negotiates)."""
    browser = settings.model_copy(update={"audio_format": "pcm16"})
    return {
        "expires_after": {"anchor": "created_at", "seconds": CLIENT_SECRET_TTL_S},
        "session": {**session_config(browser), "model": settings.realtime_model},
    }


async def mint_client_secret(http: httpx.AsyncClient, settings: Settings) -> dict[str, Any]:
    """OpenAI's JSON answer, unchanged. Never cached: every call mints a new secret."""
    url = settings.openai_base_url.rstrip("/") + "/v1/realtime/client_secrets"
    try:
        response = await http.post(
            url,
            json=client_secret_request(settings),
            headers={"Authorization": f"Bearer {settings.openai_api_key}"},
            timeout=OPENAI_TIMEOUT,
        )
    except httpx.HTTPError as exc:
        raise OpenAIUnreachable(f"{type(exc).__name__} contacting OpenAI") from exc
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code != 200 or not isinstance(body, dict) or "value" not in body:
        raise OpenAIRefused(response.status_code, _error_message(body, response))
    return body


def _error_message(body: object, response: httpx.Response) -> str:
    if isinstance(body, dict):
        error = body.get("error")
        message = error.get("message") if isinstance(error, dict) else None
        if isinstance(message, str):
            return message
    return response.reason_phrase or "unexpected answer"
