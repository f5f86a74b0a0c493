"""GET /session: ephemeral Realtime secrets for browsers, against the local OpenAI stand-in."""

from __future__ import annotations

import asyncio
import socket
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from store_files import write_garden_catalog, write_stores

from bot.app import create_app
from bot.catalog import Catalog
from bot.ephemeral import retry_after_seconds
from bot.settings import SAMPLE_CATALOG_PATH, Settings, load_settings
from bot.sim.realtime import RealtimeSimulator, Scenario
from bot.sim.server import LocalServer
from bot.stores import Store, default_store
from bot.tools import browser_agent, phone_agent

pytestmark = pytest.mark.anyio

SIM_KEY = "sk-sim-session-test"
ALLOWED = "https://shop.example.com"
NOW = datetime.now().astimezone()


def the_default_store(settings: Settings) -> Store:
    return default_store(settings, Catalog.load(SAMPLE_CATALOG_PATH))


@pytest.fixture
async def openai_sim() -> AsyncIterator[RealtimeSimulator]:
    sim = RealtimeSimulator(Scenario(greeting="Hello!", turns=[]), api_key=SIM_KEY)
    await sim.start()
    yield sim
    await sim.stop()


def plain_settings(**env: str) -> Settings:
    database = str(Path(tempfile.mkdtemp()) / "outbox.sqlite3")
    return load_settings({"DATABASE_PATH": database, **env}, dotenv=None)


def make_settings(sim: RealtimeSimulator, **overrides: str) -> Settings:
    env = {
        "OPENAI_API_KEY": SIM_KEY,
        "OPENAI_BASE_URL": sim.base_url,
        "CORS_ORIGINS": ALLOWED,
        "SESSION_RATE_LIMIT_PER_MINUTE": "3",
    }
    return plain_settings(**{**env, **overrides})


def closed_port() -> int:
    """A loopback port nothing listens on: connecting to it is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """A loopback server that accepts connections and reads, but never answers."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def app_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with LocalServer(create_app(settings)) as server:
        async with httpx.AsyncClient(base_url=server.base_url) as client:
            yield client


async def test_a_browser_gets_a_fresh_secret_for_the_browser_agent_and_where_to_use_it(
    openai_sim: RealtimeSimulator,
) -> None:
    settings = make_settings(openai_sim)
    async for client in app_client(settings):
        first = await client.get("/session", headers={"Origin": ALLOWED})
        second = await client.get("/session", headers={"Origin": ALLOWED})
    assert first.status_code == 200
    body = first.json()
    assert body["value"].startswith("ek_")
    assert body["value"] != second.json()["value"], "a secret is never cached"
    assert body["realtime_url"] == settings.realtime_connect_url
    assert first.headers["cache-control"] == "no-store"
    assert first.headers["access-control-allow-origin"] == ALLOWED
    store = the_default_store(settings)
    assert body["session"]["instructions"] == browser_agent(store, NOW).instructions
    assert [t["name"] for t in body["session"]["tools"]] == ["search_products", "show_products"]
    assert body["session"]["audio"]["output"]["voice"] == phone_agent(store, NOW).voice
    assert body["session"]["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert SIM_KEY not in first.text


def test_the_browser_agent_is_the_phone_agent_minus_the_phone() -> None:
    store = the_default_store(plain_settings(STORE_LANGUAGE="en"))
    phone_agent_, browser_agent_ = phone_agent(store, NOW), browser_agent(store, NOW)
    phone = {t["name"]: t for t in phone_agent_.tools}
    browser = {t["name"]: t for t in browser_agent_.tools}
    assert set(browser) == {"search_products", "show_products"}
    for key in ("required", "additionalProperties"):
        assert browser["search_products"]["parameters"][key] == phone["search_products"]["parameters"][key]
    assert browser["search_products"]["parameters"]["properties"].keys() == (
        phone["search_products"]["parameters"]["properties"].keys()
    )
    for line in ("Never read out SKUs, links, web addresses, JSON", "one or two short sentences"):
        assert line in phone_agent_.instructions and line in browser_agent_.instructions
    for phone_only in ("send_product_details", "transfer_to_person", "end_call", "text the"):
        assert phone_only not in browser_agent_.instructions


async def test_an_openai_refusal_becomes_502_with_openais_reason(openai_sim: RealtimeSimulator) -> None:
    async for client in app_client(make_settings(openai_sim, OPENAI_API_KEY="sk-wrong")):
        response = await client.get("/session")
    assert response.status_code == 502
    assert "OpenAI refused" in response.json()["error"]
    assert "key" in response.json()["error"].lower()
    assert "sk-wrong" not in response.text


async def test_a_busy_openai_becomes_503_with_retry_after(openai_sim: RealtimeSimulator) -> None:
    openai_sim.reject_client_secrets_status = 503
    async for client in app_client(make_settings(openai_sim)):
        busy = await client.get("/session")
        openai_sim.reject_client_secrets_status = None
        recovered = await client.get("/session")
    assert busy.status_code == 503
    assert "busy" in busy.json()["error"] and int(busy.headers["retry-after"]) >= 1
    assert recovered.status_code == 200


async def test_an_exhausted_quota_is_a_refusal_not_a_retry(openai_sim: RealtimeSimulator) -> None:
    openai_sim.reject_client_secrets_status = 429
    async for client in app_client(make_settings(openai_sim)):
        response = await client.get("/session")
    assert response.status_code == 502
    assert "quota" in response.json()["error"]
    assert "retry-after" not in response.headers


async def test_an_unreachable_openai_becomes_502_saying_unreachable_and_why() -> None:
    nowhere = f"http://127.0.0.1:{closed_port()}"
    async for client in app_client(plain_settings(OPENAI_API_KEY="sk-x", OPENAI_BASE_URL=nowhere)):
        response = await client.get("/session")
    assert response.status_code == 502
    error = response.json()["error"]
    assert error.startswith("OpenAI unreachable (ConnectError")
    assert "sk-x" not in response.text


async def test_an_openai_that_never_answers_becomes_504_after_the_configured_time() -> None:
    async with silent_server() as port:
        settings = plain_settings(
            OPENAI_API_KEY="sk-x", OPENAI_BASE_URL=f"http://127.0.0.1:{port}", OPENAI_TIMEOUT_S="0.3"
        )
        async for client in app_client(settings):
            response = await client.get("/session")
    assert response.status_code == 504
    assert response.json()["error"] == "OpenAI did not answer (no answer within 0.3 s)"


async def test_without_a_key_the_endpoint_says_so_with_503() -> None:
    async for client in app_client(plain_settings()):
        response = await client.get("/session")
    assert response.status_code == 503
    assert "OPENAI_API_KEY" in response.json()["error"]


async def test_one_client_beyond_the_rate_limit_gets_429_with_retry_after(
    openai_sim: RealtimeSimulator,
) -> None:
    async for client in app_client(make_settings(openai_sim)):
        statuses = [(await client.get("/session")).status_code for _ in range(4)]
        limited = await client.get("/session")
    assert statuses == [200, 200, 200, 429]
    assert limited.status_code == 429
    assert int(limited.headers["retry-after"]) >= 1


async def test_a_preflight_from_an_allowed_origin_is_answered_for_that_origin(
    openai_sim: RealtimeSimulator,
) -> None:
    headers = {"Origin": ALLOWED, "Access-Control-Request-Method": "GET"}
    async for client in app_client(make_settings(openai_sim)):
        response = await client.options("/session", headers=headers)
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == ALLOWED
    assert "GET" in response.headers["access-control-allow-methods"]


async def test_a_refused_origin_gets_403_and_no_cors_header(openai_sim: RealtimeSimulator) -> None:
    async for client in app_client(make_settings(openai_sim)):
        preflight = await client.options(
            "/session",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
        )
        simple = await client.get("/session", headers={"Origin": "https://evil.example"})
    for response in (preflight, simple):
        assert response.status_code == 403
        assert "access-control-allow-origin" not in response.headers


async def test_the_apps_own_page_is_allowed_without_cors_origins(openai_sim: RealtimeSimulator) -> None:
    async for client in app_client(make_settings(openai_sim, CORS_ORIGINS="")):
        own_origin = str(client.base_url).rstrip("/")
        response = await client.get("/session", headers={"Origin": own_origin})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == own_origin


async def test_no_origin_is_allowed_by_default(openai_sim: RealtimeSimulator) -> None:
    async for client in app_client(make_settings(openai_sim, CORS_ORIGINS="")):
        response = await client.get("/session", headers={"Origin": ALLOWED})
    assert response.status_code == 403


@pytest.mark.parametrize(
    ("header", "seconds"),
    [(None, None), ("3", 3.0), ("0.5", 0.5), ("inf", None), ("nan", None), ("-1", None),
     ("Wed, 21 Oct 2015 07:28:00 GMT", None)],
)  # fmt: skip
def test_only_a_sane_retry_after_from_openai_is_passed_on(header: str | None, seconds: float | None) -> None:
    assert retry_after_seconds(header) == seconds


async def test_a_stores_browser_gets_that_stores_agent_in_its_language(
    openai_sim: RealtimeSimulator, tmp_path: Path
) -> None:
    write_garden_catalog(tmp_path)
    garden = {
        "name": "Green Thumb", "numbers": ["+15557650003"], "language": "es", "catalog": "garden.json",
        "voice": "cedar",
    }  # fmt: skip
    stores = write_stores(tmp_path / "stores.json", {"garden": garden})
    async for client in app_client(make_settings(openai_sim, STORES_PATH=str(stores))):
        mine = await client.get("/session?store=garden", headers={"Origin": ALLOWED})
        unknown = await client.get("/session?store=mall", headers={"Origin": ALLOWED})
    session = mine.json()["session"]
    assert session["instructions"].startswith("Eres el asistente de una tienda, en la página web")
    assert "La tienda es Green Thumb." in session["instructions"]
    assert session["audio"]["output"]["voice"] == "cedar"
    assert session["audio"]["input"]["transcription"]["language"] == "es"
    assert unknown.status_code == 404 and "no store 'mall'" in unknown.json()["error"]
    assert len(openai_sim.client_secret_requests) == 1, "no secret is minted for a store that does not exist"
