"""/console over HTTP: off by default, the operator's password, the page's own files under a strict
policy, the live feed's framing, the outbox view, and a retry only the page itself may ask for.
(The page in a real browser: tests/test_console_browser.py.)"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from bot.app import create_app
from bot.console import FAILED_LOGINS_PER_MINUTE
from bot.settings import load_settings
from bot.sim.server import LocalServer

pytestmark = pytest.mark.anyio

PASSWORD = "correct horse battery"
OPERATOR = ("operator", PASSWORD)
ROUTES = ["/console", "/console/assets/console.js", "/console/feed", "/console/outbox"]


async def served(tmp_path: Path, **env: str) -> AsyncIterator[str]:
    settings = load_settings({"DATABASE_PATH": str(tmp_path / "outbox.sqlite3"), **env}, dotenv=None)
    async with LocalServer(create_app(settings)) as server:
        yield server.base_url


@pytest.fixture
async def url(tmp_path: Path) -> AsyncIterator[str]:
    async for base_url in served(tmp_path, CONSOLE_PASSWORD=PASSWORD):
        yield base_url


async def test_without_a_console_password_every_console_route_is_404(tmp_path: Path) -> None:
    async for base_url in served(tmp_path):
        async with httpx.AsyncClient(auth=OPERATOR) as client:
            for route in ROUTES:
                assert (await client.get(base_url + route)).status_code == 404, route
            assert (await client.post(base_url + "/console/outbox/msg_X/retry")).status_code == 404


@pytest.mark.parametrize("auth", [None, ("operator", "wrong password"), ("admin", PASSWORD)])
async def test_every_route_asks_for_the_operators_password(url: str, auth: tuple[str, str] | None) -> None:
    async with httpx.AsyncClient(auth=auth) as client:
        for route in ROUTES:
            response = await client.get(url + route)
            assert response.status_code == 401, route
            assert response.headers["www-authenticate"].startswith('Basic realm="voicebot console"')
            assert "Phone line" not in response.text


async def test_the_page_and_its_files_come_from_this_app_under_a_strict_policy(url: str) -> None:
    async with httpx.AsyncClient(auth=OPERATOR) as client:
        page = await client.get(url + "/console")
        script = await client.get(url + "/console/assets/console.js")
        for name in ("app.py", "..%2Fapp.py", "index.html", "nope.js"):
            assert (await client.get(url + "/console/assets/" + name)).status_code == 404, name
    assert page.status_code == 200 and "Phone line" in page.text
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy and "unsafe" not in policy
    assert page.headers["cache-control"] == "no-store"
    assert script.headers["content-type"].startswith("text/javascript")
    assert "http://" not in page.text.replace("http://www.w3.org", "")  # nothing from another host
    assert "EventSource" in script.text


async def test_past_the_limit_of_wrong_passwords_even_the_right_one_waits(url: str) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(FAILED_LOGINS_PER_MINUTE):
            assert (await client.get(url + "/console", auth=("operator", "guess"))).status_code == 401
        blocked = await client.get(url + "/console", auth=OPERATOR)
    assert blocked.status_code == 429 and int(blocked.headers["retry-after"]) > 0


async def test_the_feed_is_server_sent_events_starting_with_a_snapshot(url: str) -> None:
    async with httpx.AsyncClient(auth=OPERATOR) as client:
        async with client.stream("GET", url + "/console/feed") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = response.aiter_lines()
            assert await anext(lines) == "retry: 2000"
            assert await anext(lines) == ""
            first = await anext(lines)
    assert first.startswith("data: ")
    snapshot = json.loads(first.removeprefix("data: "))
    assert (snapshot["type"], snapshot["live"], snapshot["recent"]) == ("snapshot", [], [])


async def test_the_outbox_view_counts_by_channel(url: str) -> None:
    async with httpx.AsyncClient(auth=OPERATOR) as client:
        response = await client.get(url + "/console/outbox")
    assert response.json() == {
        "pending": {"sms": 0, "webhook": 0},
        "failed": {"sms": 0, "webhook": 0},
        "rows": [],
    }


@pytest.mark.parametrize("origin", [None, "https://evil.example.com", "null"])
async def test_a_retry_not_sent_by_the_console_page_itself_is_refused(url: str, origin: str | None) -> None:
    headers = {"Origin": origin} if origin else {}
    async with httpx.AsyncClient(auth=OPERATOR) as client:
        response = await client.post(url + "/console/outbox/msg_" + "A" * 24 + "/retry", headers=headers)
    assert response.status_code == 403


async def test_a_retry_of_a_message_with_nothing_failed_says_so(url: str) -> None:
    async with httpx.AsyncClient(auth=OPERATOR, headers={"Origin": url}) as client:
        unknown = await client.post(url + "/console/outbox/msg_" + "A" * 24 + "/retry")
        malformed = await client.post(url + "/console/outbox/not-an-id/retry")
    assert unknown.status_code == 409 and "nothing to retry" in unknown.json()["error"]
    assert malformed.status_code == 404
