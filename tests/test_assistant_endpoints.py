"""The assistant's HTTP side over real sockets: the page, its files, and POST /assistant/tools/{name}."""

from __future__ import annotations

import json
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from store_files import GARDEN_SKUS, write_garden_catalog, write_stores

from bot.app import create_app
from bot.catalog import Catalog
from bot.settings import SAMPLE_CATALOG_PATH, load_settings
from bot.sim.server import LocalServer
from bot.tools import SearchArgs, search_catalog

pytestmark = pytest.mark.anyio

ALLOWED = "https://shop.example.com"
REALTIME_URL = "wss://realtime.example.net/v1/realtime"
JSON = {"Content-Type": "application/json"}


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    env = {
        "DATABASE_PATH": str(Path(tempfile.mkdtemp()) / "outbox.sqlite3"),
        "CORS_ORIGINS": ALLOWED,
        "OPENAI_REALTIME_URL": REALTIME_URL,
        "ASSISTANT_TOOLS_RATE_LIMIT_PER_MINUTE": "5",
    }
    async with LocalServer(create_app(load_settings(env, dotenv=None))) as server:
        async with httpx.AsyncClient(base_url=server.base_url) as http:
            yield http


async def run_tool(client: httpx.AsyncClient, name: str, arguments: object) -> httpx.Response:
    raw = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return await client.post(f"/assistant/tools/{name}", json={"arguments": raw})


# --- the page ---------------------------------------------------------------------------


async def test_the_page_loads_code_only_from_this_app(client: httpx.AsyncClient) -> None:
    page = await client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy
    assert "connect-src 'self' wss://realtime.example.net" in policy
    assert "http" not in page.text.replace('href="data:,"', ""), "no script, style or font from elsewhere"


@pytest.mark.parametrize(
    ("path", "media_type"),
    [
        ("/assistant/realtime-service.js", "text/javascript"),
        ("/assistant/assistant.js", "text/javascript"),
        ("/assistant/audio-io.js", "text/javascript"),
        ("/assistant/audio-worklets.js", "text/javascript"),
        ("/assistant/assistant.css", "text/css"),
    ],
)
async def test_the_pages_files_are_served_by_the_app(
    client: httpx.AsyncClient, path: str, media_type: str
) -> None:
    response = await client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(media_type)


async def test_realtime_service_keeps_the_seeds_interface(client: httpx.AsyncClient) -> None:
    source = (await client.get("/assistant/realtime-service.js")).text
    assert "export class RealtimeService" in source
    for member in (
        "static getInstance(",
        "connect(callbacks",
        "disconnect()",
        "sendMessage(text)",
        "getConnectionStatus()",
        "queryWithResponse(text, timeoutMs = DEFAULT_QUERY_TIMEOUT_MS)",
    ):
        assert member in source, member
    assert "DEFAULT_QUERY_TIMEOUT_MS = 10000" in source


# --- POST /assistant/tools/{name} ---------------------------------------------------------


async def test_search_answers_exactly_what_the_model_is_given(client: httpx.AsyncClient) -> None:
    response = await run_tool(client, "search_products", {"query": "washing machine"})
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    catalog = Catalog.load(SAMPLE_CATALOG_PATH)
    assert response.json() == {
        "output": search_catalog(catalog, SearchArgs.model_validate({"query": "washing machine"})),
        "collection": None,
    }


async def test_show_products_answers_the_collection_for_the_page_and_a_summary_for_the_model(
    client: httpx.AsyncClient,
) -> None:
    response = await run_tool(client, "show_products", {"skus": ["WM-2024-X500"]})
    body = response.json()
    assert response.status_code == 200
    collection = body["collection"]
    assert collection["JsonData"]["jsonType"] == "ProductsCollection"
    product = collection["JsonData"]["products"][0]
    assert (product["sku"], product["price"], product["discount"]) == ("WM-2024-X500", 899.99, 15)
    assert product["profilePic"].startswith("https://shop.example.com/media/")
    output = json.loads(body["output"])
    assert output["names"] == ["SmartWash Pro 500 Front Load Washer"]
    assert "http" not in body["output"]


async def test_bad_arguments_are_answered_as_an_error_the_model_can_fix(client: httpx.AsyncClient) -> None:
    response = await run_tool(client, "show_products", {"skus": "WM-2024-X500"})
    assert response.status_code == 200
    error = json.loads(response.json()["output"])["error"]
    assert "skus" in error and "call it again" in error
    assert response.json()["collection"] is None


@pytest.mark.parametrize("name", ["send_product_details", "transfer_to_person", "end_call", "nope"])
async def test_only_the_browser_tools_can_be_run(client: httpx.AsyncClient, name: str) -> None:
    response = await run_tool(client, name, {"skus": ["WM-2024-X500"]})
    assert response.status_code == 404
    assert "no tool named" in json.loads(response.json()["output"])["error"]


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [
        ('{"arguments": "{}"}', {"Content-Type": "text/plain"}, 415),
        ('{"arguments": 3}', JSON, 422),
        ('{"arguments": "{}", "extra": 1}', JSON, 422),
        ("not json", JSON, 422),
        (json.dumps({"arguments": "x" * 20_000}), JSON, 413),
    ],
    ids=["not-json-type", "arguments-not-a-string", "unknown-field", "not-json", "too-large"],
)
async def test_a_request_that_is_not_a_tool_call_is_refused(
    client: httpx.AsyncClient, body: str, headers: dict[str, str], status: int
) -> None:
    response = await client.post("/assistant/tools/search_products", content=body, headers=headers)
    assert response.status_code == status
    assert response.json()["error"]


async def test_tool_calls_beyond_the_rate_limit_get_429_with_retry_after(client: httpx.AsyncClient) -> None:
    statuses = [(await run_tool(client, "search_products", {"query": "dryer"})).status_code for _ in range(6)]
    assert statuses == [200] * 5 + [429]
    limited = await run_tool(client, "search_products", {"query": "dryer"})
    assert int(limited.headers["retry-after"]) >= 1


async def test_tools_answer_listed_origins_and_the_apps_own_page_only(client: httpx.AsyncClient) -> None:
    arguments = {"arguments": json.dumps({"query": "dryer"})}
    own = str(client.base_url).rstrip("/")
    for origin, status in ((ALLOWED, 200), (own, 200), ("https://evil.example", 403)):
        response = await client.post(
            "/assistant/tools/search_products", json=arguments, headers={"Origin": origin}
        )
        assert response.status_code == status, origin
        assert response.headers.get("access-control-allow-origin") == (origin if status == 200 else None)


async def test_a_preflight_for_the_tools_allows_post_with_json(client: httpx.AsyncClient) -> None:
    headers = {"Origin": ALLOWED, "Access-Control-Request-Method": "POST"}
    response = await client.options("/assistant/tools/show_products", headers=headers)
    assert response.status_code == 204
    assert "POST" in response.headers["access-control-allow-methods"]
    assert "Content-Type" in response.headers["access-control-allow-headers"]


# --- a store's page -----------------------------------------------------------------------------


@pytest.fixture
async def chain_client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The app of a deployment with a Spanish garden center beside the default store."""
    write_garden_catalog(tmp_path)
    garden = {"name": "Green Thumb", "numbers": ["+15557650003"], "language": "es", "catalog": "garden.json"}
    stores = write_stores(tmp_path / "stores.json", {"garden": garden})
    env = {"DATABASE_PATH": str(tmp_path / "outbox.sqlite3"), "STORES_PATH": str(stores)}
    async with LocalServer(create_app(load_settings(env, dotenv=None))) as server:
        async with httpx.AsyncClient(base_url=server.base_url) as http:
            yield http


async def test_a_stores_page_searches_that_stores_catalog_in_its_language(
    chain_client: httpx.AsyncClient,
) -> None:
    arguments = {"arguments": json.dumps({"query": "lawn mower"})}
    garden = (await chain_client.post("/assistant/tools/search_products?store=garden", json=arguments)).json()
    output = json.loads(garden["output"])
    assert {p["sku"] for p in output["products"][:2]} == set(GARDEN_SKUS[:2])
    assert output["summary"].startswith("Lo mejor: ")
    default = (await chain_client.post("/assistant/tools/search_products", json=arguments)).json()
    assert not set(GARDEN_SKUS) & {p["sku"] for p in json.loads(default["output"])["products"]}


async def test_an_unknown_store_is_refused_naming_it(chain_client: httpx.AsyncClient) -> None:
    arguments = {"arguments": json.dumps({"query": "lawn mower"})}
    response = await chain_client.post("/assistant/tools/search_products?store=mall", json=arguments)
    assert response.status_code == 404
    assert "no store 'mall'" in response.json()["error"]
