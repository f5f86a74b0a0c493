"""Mints short-lived Realtime client secrets so browsers never see the server's API key."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

import httpx

from bot.realtime import session_config
from bot.settings import Settings
from bot.stores import Store
from bot.tools import browser_agent

CLIENT_SECRET_TTL_S = 600


class OpenAIRefused(Exception):
    """OpenAI answered with an error; `message` is its own explanation."""

    def __init__(
        self, status: int, message: str, *, code: str | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(f"OpenAI answered {status}: {message}")
        self.status = status
        self.message = message
        self.code = code
        self.retry_after_s = retry_after_s

    @property
    def temporary(self) -> bool:
        """Rate limited or overloaded: the same request may work in a moment (an empty quota won't)."""
        if self.status == 429:
            return self.code != "insufficient_quota"
        return self.status >= 500


class OpenAIUnreachable(Exception):
    """No connection to OpenAI (refused, DNS, TLS, dropped); the message says which."""


class OpenAITimedOut(Exception):
    """Connected, but OpenAI did not answer within OPENAI_TIMEOUT_S."""


def client_secret_request(settings: Settings, store: Store, now: datetime) -> dict[str, Any]:
    """The store's phone agent minus the phone (see `browser_agent`), in the browser's PCM16 audio."""
    browser = settings.model_copy(update={"audio_format": "pcm16"})
    return {
        "expires_after": {"anchor": "created_at", "seconds": CLIENT_SECRET_TTL_S},
        "session": {**session_config(browser, browser_agent(store, now)), "model": settings.realtime_model},
    }


async def mint_client_secret(
    http: httpx.AsyncClient, settings: Settings, store: Store, now: datetime
) -> dict[str, Any]:
    """OpenAI's JSON answer, unchanged. Never cached: every call mints a new secret."""
    url = settings.openai_base_url.rstrip("/") + "/v1/realtime/client_secrets"
    try:
        response = await http.post(
            url,
            json=client_secret_request(settings, store, now),
            headers={"Authorization": f"Bearer {settings.openai_api_key}"},
            timeout=settings.openai_timeout_s,
        )
    except (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout) as exc:
        raise OpenAITimedOut(f"no answer within {settings.openai_timeout_s:g} s") from exc
    except httpx.HTTPError as exc:
        detail = f": {exc}" if str(exc) else ""
        raise OpenAIUnreachable(type(exc).__name__ + detail) from exc
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code != 200 or not isinstance(body, dict) or "value" not in body:
        error = body.get("error") if isinstance(body, dict) else None
        error = error if isinstance(error, dict) else {}
        message, code = error.get("message"), error.get("code")
        raise OpenAIRefused(
            response.status_code,
            message if isinstance(message, str) else response.reason_phrase or "unexpected answer",
            code=code if isinstance(code, str) else None,
            retry_after_s=retry_after_seconds(response.headers.get("retry-after")),
        )
    return body


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After in seconds; None when absent or not a number (the HTTP-date form included)."""
    try:
        seconds = float(value) if value is not None else math.nan
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None
