"""The agent's tools through `StoreTools.run`: success and error paths, speakable summaries."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from bot.catalog import Catalog
from bot.metrics import Metrics
from bot.products import ProductsCollection
from bot.settings import SAMPLE_CATALOG_PATH
from bot.stores import Destination, HoursConfig, Store
from bot.tools import (
    TOOL_DEFINITIONS,
    BrowserTools,
    CallContext,
    OutboxUnavailable,
    SmsOutcome,
    StoreTools,
    ToolResult,
    phone_tools,
)
from bot.words import en, es

CALL = CallContext(
    call_sid="CA0123456789abcdef0123456789abcdef", caller="+15551234567", called="+15557654321"
)
SEED_PRODUCT_KEYS = {
    "sku", "name", "brand", "profilePic", "description", "price", "rate", "discount", "images",
    "Link3D", "LinkAR", "LinkVideo", "TechnicalSheet", "FAQS",
}  # fmt: skip
SAMPLE_SKUS = {record["sku"] for record in json.loads(SAMPLE_CATALOG_PATH.read_text())}


@dataclass
class RecordingOutbox:
    """A DetailsOutbox that keeps what it was given, or fails the way it is told to."""

    failure: Exception | None = None
    sms: SmsOutcome | None = None
    messages: list[tuple[str, str, ProductsCollection]] = field(default_factory=list)
    destinations: list[Destination] = field(default_factory=list)

    async def add_product_details(
        self, *, call_sid: str, caller: str, collection: ProductsCollection, destination: Destination
    ) -> str:
        if self.failure is not None:
            raise self.failure
        self.messages.append((call_sid, caller, collection))
        self.destinations.append(destination)
        return f"msg-{len(self.messages)}"

    async def sms_outcome(self, message_id: str, timeout_s: float) -> SmsOutcome | None:
        """Twilio's answer as the test sets it; None plays a Twilio slower than `timeout_s`."""
        return self.sms


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.load(SAMPLE_CATALOG_PATH)


def make_tools(
    catalog: Catalog,
    outbox: RecordingOutbox | None = None,
    *,
    sms_enabled: bool = True,
    transfer_enabled: bool = True,
) -> StoreTools:
    """A store's tools: texting without a sender number, transferring without a number, are off."""
    store = Store(
        id="default",
        name=None,
        language="auto",
        voice="marin",
        catalog=catalog,
        sms_from="+15550001111" if sms_enabled else None,
        transfer_number="+15557654321" if transfer_enabled else None,
    )
    return StoreTools(store, outbox or RecordingOutbox(), twilio=True)


async def call(tools: StoreTools, name: str, arguments: Any, context: CallContext = CALL) -> dict[str, Any]:
    raw = arguments if isinstance(arguments, str) else json.dumps(arguments)
    result = await tools.run(name, raw, context)
    output: dict[str, Any] = json.loads(result.output)
    output["_action"] = result.action
    return output


def assert_speakable(text: str) -> None:
    """No SKU, link, JSON or long number: the model reads this sentence out."""
    assert not any(sku in text for sku in SAMPLE_SKUS), text
    assert not re.search(r"https?://|www\.|[{}\[\]\"]|\d{5,}", text), text


@pytest.mark.anyio
async def test_every_defined_tool_is_handled(catalog: Catalog) -> None:
    tools = make_tools(catalog)
    for definition in TOOL_DEFINITIONS:
        output = await call(tools, definition["name"], "{}")
        assert "there is no tool" not in output.get("error", "")


@pytest.mark.anyio
async def test_search_returns_a_speakable_summary_and_the_skus_as_data(catalog: Catalog) -> None:
    output = await call(make_tools(catalog), "search_products", {"query": "a quiet washer for my big family"})
    assert output["found"] == 5
    assert output["summary"].startswith(
        "Best matches: the SmartWash Pro 500 Front Load Washer by CleanTech, $764.99, "
        "ideal for large families;"
    )
    assert output["summary"].count(";") == 2  # three products spoken, no more
    first = output["products"][0]
    assert first == {
        "sku": "WM-2024-X500",
        "name": "SmartWash Pro 500 Front Load Washer",
        "brand": "CleanTech",
        "price": 764.99,
        "rating": 4.7,
        "highlight": "ideal for large families",
    }
    assert_speakable(output["summary"])


@pytest.mark.anyio
@pytest.mark.parametrize(
    "query",
    [
        "washin machine",
        "dryers",
        "fridge with ice",
        "robot vacuum",
        "gas range",
        "microwave",
        "air conditioner",
    ],
)
async def test_no_summary_contains_a_sku_a_link_or_json(catalog: Catalog, query: str) -> None:
    output = await call(make_tools(catalog), "search_products", {"query": query})
    assert output["found"] > 0
    assert_speakable(output["summary"])
    assert all(p["highlight"] and "http" not in p["highlight"] for p in output["products"])


@pytest.mark.anyio
async def test_search_applies_price_brand_and_rating_filters(catalog: Catalog) -> None:
    arguments = {"query": "washer", "max_price": 900, "brand": "aurora", "min_rating": 4.5}
    output = await call(make_tools(catalog), "search_products", arguments)
    assert [p["sku"] for p in output["products"]] == ["WM-2026-0005"]
    assert output["summary"] == (
        "Best match: the Aurora Essential 800 Compact Washer, $525.59, capacity and quiet direct drive motor."
    )


@pytest.mark.anyio
async def test_a_search_emptied_by_filters_names_the_limits_and_the_closest_product(
    catalog: Catalog,
) -> None:
    output = await call(make_tools(catalog), "search_products", {"query": "washer", "max_price": 100})
    assert output["found"] == 0 and output["products"] == []
    assert output["summary"].startswith("Nothing matches that under $100. Without those limits")
    assert_speakable(output["summary"])


@pytest.mark.anyio
async def test_an_unknown_brand_is_answered_with_the_brands_the_store_has(catalog: Catalog) -> None:
    output = await call(make_tools(catalog), "search_products", {"query": "washer", "brand": "Bosch"})
    assert output["found"] == 0
    assert "no brand called Bosch" in output["summary"] and "CleanTech" in output["summary"]


@pytest.mark.anyio
async def test_a_query_matching_nothing_asks_the_caller_to_rephrase(catalog: Catalog) -> None:
    output = await call(make_tools(catalog), "search_products", {"query": "zqxv"})
    assert output["found"] == 0
    assert "describe it another way" in output["summary"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("arguments", "reason"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ({}, "query: Field required"),
        ({"query": 5}, "query: Input should be a valid string"),
        ({"query": "washer", "max_price": "cheap"}, "max_price: Input should be a valid number"),
        ({"query": "washer", "min_rating": 9}, "min_rating: Input should be less than or equal to 5"),
        ({"query": "washer", "colour": "red"}, "colour: Extra inputs are not permitted"),
        ('{"query": "washer", "max_price": NaN}', "max_price"),
    ],
)
async def test_bad_search_arguments_return_an_error_not_an_exception(
    catalog: Catalog, arguments: Any, reason: str
) -> None:
    output = await call(make_tools(catalog), "search_products", arguments)
    assert reason in output["error"]
    assert output["_action"] is None


@pytest.mark.anyio
async def test_send_details_says_the_text_went_out_once_twilio_accepted_it(catalog: Catalog) -> None:
    outbox = RecordingOutbox(sms=SmsOutcome("sent", None, None))
    output = await call(make_tools(catalog, outbox), "send_product_details", {"skus": ["WM-2024-X500"]})
    assert output["sent"] is True and output["sms"] == "sent"


@pytest.mark.anyio
async def test_send_details_tells_the_model_when_twilio_refused_the_callers_number(catalog: Catalog) -> None:
    outbox = RecordingOutbox(sms=SmsOutcome("failed", 21610, "Attempt to send to unsubscribed recipient"))
    output = await call(make_tools(catalog, outbox), "send_product_details", {"skus": ["WM-2024-X500"]})
    assert output["sms"] == "failed"
    assert "opted out" in output["message"]
    assert "couldn't text that number" in output["message"]
    assert_speakable(output["message"])


@pytest.mark.anyio
async def test_send_details_queues_a_seed_format_collection_before_answering(catalog: Catalog) -> None:
    outbox = RecordingOutbox()
    arguments = {"skus": ["DR-2025-0010", "WM-2024-X500"], "note": "  Ask for   Ana at the desk. "}
    output = await call(make_tools(catalog, outbox), "send_product_details", arguments)
    assert output == {
        "sent": True,
        "sms": "queued",
        "message": "Tell the caller the details are on their way by text.",
        "_action": None,
    }
    [(call_sid, caller, collection)] = outbox.messages
    assert (call_sid, caller) == (CALL.call_sid, CALL.caller)
    dumped = json.loads(collection.model_dump_json())
    assert ProductsCollection.model_validate(dumped) == collection
    assert set(dumped) == {"TextMessage", "JsonData"}
    assert set(dumped["JsonData"]) == {"jsonType", "products"}
    assert dumped["JsonData"]["jsonType"] == "ProductsCollection"
    assert dumped["TextMessage"] == (
        "Here are the details of the products we talked about. Ask for Ana at the desk."
    )
    assert [p["sku"] for p in dumped["JsonData"]["products"]] == ["DR-2025-0010", "WM-2024-X500"]
    assert all(set(p) == SEED_PRODUCT_KEYS for p in dumped["JsonData"]["products"])


@pytest.mark.anyio
async def test_the_sent_products_are_the_catalog_records_unchanged(catalog: Catalog) -> None:
    outbox = RecordingOutbox()
    await call(make_tools(catalog, outbox), "send_product_details", {"skus": ["WM-2024-X500"]})
    seed = json.loads(SAMPLE_CATALOG_PATH.read_text())[0]
    sent = json.loads(outbox.messages[0][2].model_dump_json())["JsonData"]["products"][0]
    assert sent == seed


@pytest.mark.anyio
async def test_unknown_skus_are_listed_and_nothing_is_sent(catalog: Catalog) -> None:
    outbox = RecordingOutbox()
    arguments = {"skus": ["WM-2024-X500", "WM-9999", "washer"]}
    output = await call(make_tools(catalog, outbox), "send_product_details", arguments)
    assert output["unknown_skus"] == ["WM-9999", "washer"]
    assert "WM-9999, washer" in output["error"] and "Nothing was sent" in output["error"]
    assert outbox.messages == []


@pytest.mark.anyio
async def test_an_unavailable_outbox_tells_the_model_the_text_was_not_sent(catalog: Catalog) -> None:
    outbox = RecordingOutbox(failure=OutboxUnavailable("database or disk is full"))
    output = await call(make_tools(catalog, outbox), "send_product_details", {"skus": ["WM-2024-X500"]})
    assert output["sent"] is False
    assert "could not send the text right now" in output["message"]
    assert "disk" not in output["message"]


@pytest.mark.anyio
async def test_an_unexpected_outbox_failure_becomes_an_error_output(catalog: Catalog) -> None:
    outbox = RecordingOutbox(failure=RuntimeError("boom"))
    output = await call(make_tools(catalog, outbox), "send_product_details", {"skus": ["WM-2024-X500"]})
    assert "failed unexpectedly" in output["error"] and "boom" not in output["error"]


@pytest.mark.anyio
async def test_with_sms_disabled_the_model_is_told_not_to_promise_a_text(catalog: Catalog) -> None:
    outbox = RecordingOutbox()
    tools = make_tools(catalog, outbox, sms_enabled=False)
    output = await call(tools, "send_product_details", {"skus": ["WM-2024-X500"]})
    assert output["sent"] is True and output["sms"] == "disabled"
    assert "do not promise a text" in output["message"]
    assert len(outbox.messages) == 1  # the call center still gets the details


@pytest.mark.anyio
@pytest.mark.parametrize("caller", ["anonymous", "unknown", "client:alice", "+266696687", ""])
async def test_a_withheld_caller_id_cannot_get_a_text(catalog: Catalog, caller: str) -> None:
    context = CallContext(call_sid=CALL.call_sid, caller=caller, called=CALL.called)
    output = await call(make_tools(catalog), "send_product_details", {"skus": ["WM-2024-X500"]}, context)
    assert output["sms"] == "no_caller_number"
    assert "no text can be sent" in output["message"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("arguments", "reason"),
    [
        ({"skus": []}, "skus: List should have at least 1 item"),
        ({"skus": "WM-2024-X500"}, "skus: Input should be a valid list"),
        ({"skus": [f"S{n}" for n in range(11)]}, "skus: List should have at most 10 items"),
        ({"note": "hi"}, "skus: Field required"),
    ],
)
async def test_bad_send_arguments_return_an_error(catalog: Catalog, arguments: Any, reason: str) -> None:
    outbox = RecordingOutbox()
    output = await call(make_tools(catalog, outbox), "send_product_details", arguments)
    assert reason in output["error"]
    assert outbox.messages == []


@pytest.mark.anyio
async def test_transfer_asks_the_model_to_announce_it_and_requests_the_transfer(catalog: Catalog) -> None:
    output = await call(make_tools(catalog), "transfer_to_person", {"reason": "wants a person"})
    assert output["_action"] == "transfer" and output["transferring"] is True
    assert "connecting them" in output["message"]


@pytest.mark.anyio
async def test_transfer_when_disabled_offers_a_text_instead(catalog: Catalog) -> None:
    output = await call(make_tools(catalog, transfer_enabled=False), "transfer_to_person", {"reason": "x"})
    assert output["_action"] is None and output["transferring"] is False
    assert "offer to text" in output["message"]


@pytest.mark.anyio
async def test_transfer_when_disabled_and_sms_off_offers_no_text(catalog: Catalog) -> None:
    tools = make_tools(catalog, transfer_enabled=False, sms_enabled=False)
    output = await call(tools, "transfer_to_person", {"reason": "x"})
    assert "text" not in output["message"]


@pytest.mark.anyio
async def test_transfer_without_a_reason_is_a_bad_call(catalog: Catalog) -> None:
    output = await call(make_tools(catalog), "transfer_to_person", {})
    assert "reason: Field required" in output["error"] and output["_action"] is None


@pytest.mark.anyio
@pytest.mark.parametrize("arguments", ["", "{}", '{"reason": "done"}'])
async def test_end_call_ends_the_call(catalog: Catalog, arguments: str) -> None:
    result = await make_tools(catalog).run("end_call", arguments, CALL)
    assert result == ToolResult('{"ending": true}', action="end_call")


@pytest.mark.anyio
async def test_an_unknown_tool_is_an_error_naming_the_real_tools(catalog: Catalog) -> None:
    output = await call(make_tools(catalog), "delete_everything", {})
    assert "no tool named 'delete_everything'" in output["error"]
    assert "search_products" in output["error"]


# --- the browser's toolset ----------------------------------------------------------------------

MEDIA = "https://cdn.example.com/media/"


async def browse(
    catalog: Catalog, name: str, arguments: Any
) -> tuple[dict[str, Any], ProductsCollection | None]:
    raw = arguments if isinstance(arguments, str) else json.dumps(arguments)
    store = Store(id="default", name=None, language="auto", voice="marin", catalog=catalog)
    result = await BrowserTools(store, media_base_url=MEDIA).run(name, raw)
    return json.loads(result.output), result.collection


@pytest.mark.anyio
async def test_the_browser_searches_exactly_as_the_phone_does(catalog: Catalog) -> None:
    arguments = {"query": "quiet washer", "max_price": 900}
    browser, collection = await browse(catalog, "search_products", arguments)
    phone = await call(make_tools(catalog), "search_products", arguments)
    assert browser == {key: value for key, value in phone.items() if key != "_action"}
    assert collection is None


@pytest.mark.anyio
async def test_show_products_gives_the_page_the_catalog_records_with_links_it_can_open(
    catalog: Catalog,
) -> None:
    output, collection = await browse(catalog, "show_products", {"skus": ["WM-2024-X500", "DR-2024-0009"]})
    assert collection is not None
    assert collection.JsonData.jsonType == "ProductsCollection"
    shown = collection.JsonData.products
    assert [p.sku for p in shown] == ["WM-2024-X500", "DR-2024-0009"]
    record = catalog.get(["WM-2024-X500"])[0][0]
    assert (shown[0].name, shown[0].price, shown[0].discount, shown[0].FAQS) == (
        record.name, record.price, record.discount, record.FAQS
    )
    assert shown[0].profilePic == MEDIA + "smartwash_pro_500_front_load_washer_profile.jpg"
    assert all(image.startswith(MEDIA) for image in shown[0].images)
    assert shown[0].Link3D == record.Link3D, "absolute links stay as they are"
    assert set(collection.model_dump()["JsonData"]["products"][0]) == SEED_PRODUCT_KEYS
    assert output["shown"] == 2 and output["names"] == [p.name for p in shown]
    assert_speakable(output["message"])
    assert "http" not in json.dumps(output), "the model never gets a link to read out"


@pytest.mark.anyio
async def test_show_products_shows_the_known_skus_and_names_the_unknown(catalog: Catalog) -> None:
    output, collection = await browse(catalog, "show_products", {"skus": ["WM-2024-X500", "NOPE-1"]})
    assert collection is not None and [p.sku for p in collection.JsonData.products] == ["WM-2024-X500"]
    assert output["unknown_skus"] == ["NOPE-1"] and output["shown"] == 1


@pytest.mark.anyio
async def test_show_products_with_no_known_sku_is_an_error_and_shows_nothing(catalog: Catalog) -> None:
    output, collection = await browse(catalog, "show_products", {"skus": ["NOPE-1"]})
    assert collection is None
    assert "NOPE-1" in output["error"] and "Nothing was shown" in output["error"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("arguments", "reason"),
    [("{}", "skus: Field required"), ('{"skus": []}', "skus"), ("not json", "not valid JSON")],
)
async def test_bad_show_arguments_return_an_error(catalog: Catalog, arguments: str, reason: str) -> None:
    output, collection = await browse(catalog, "show_products", arguments)
    assert reason in output["error"] and collection is None


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["send_product_details", "transfer_to_person", "end_call"])
async def test_the_browser_has_no_phone_tools(catalog: Catalog, name: str) -> None:
    output, _ = await browse(catalog, name, {"skus": ["WM-2024-X500"]})
    assert f"no tool named '{name}'" in output["error"]
    assert "search_products, show_products" in output["error"]


# --- a store's hours and language -----------------------------------------------------------


def store_with(catalog: Catalog, **fields: Any) -> Store:
    base: dict[str, Any] = {"id": "downtown", "name": "Downtown", "language": "en", "voice": "marin"}
    return Store(catalog=catalog, **{**base, **fields})


@pytest.mark.anyio
async def test_outside_opening_hours_nobody_takes_a_transfer_and_the_model_is_told_why(
    catalog: Catalog,
) -> None:
    hours = HoursConfig(timezone="America/New_York", monday="09:00-18:00").opening_hours()
    store = store_with(catalog, transfer_number="+15557654321", hours=hours)
    monday_night = datetime(2025, 6, 9, 22, 0, tzinfo=ZoneInfo("America/New_York"))
    tools = StoreTools(store, RecordingOutbox(), twilio=True, clock=lambda: monday_night)
    output = await call(tools, "transfer_to_person", {"reason": "wants a person"})
    assert output["_action"] is None and output["transferring"] is False
    assert "The store is closed now, so nobody can take the call." in output["message"]
    assert "it opens again on Monday at 09:00" in output["message"]
    monday_morning = monday_night.replace(hour=10)
    open_tools = StoreTools(store, RecordingOutbox(), twilio=True, clock=lambda: monday_morning)
    assert (await call(open_tools, "transfer_to_person", {"reason": "x"}))["_action"] == "transfer"


@pytest.mark.anyio
async def test_an_auto_store_texts_in_the_language_the_model_says_the_caller_speaks(catalog: Catalog) -> None:
    outbox = RecordingOutbox(sms=SmsOutcome("sent", None, None))
    tools = StoreTools(store_with(catalog, language="auto", sms_from="+15550001111"), outbox, twilio=True)
    await call(tools, "send_product_details", {"skus": ["WM-2024-X500"], "language": "es"})
    await call(tools, "send_product_details", {"skus": ["WM-2024-X500"], "language": "tlh"})
    assert [d.sms.photo for d in outbox.destinations] == ["Foto", "Photo"]
    assert outbox.messages[0][2].TextMessage == es.SMS.details
    schema = {t["name"]: t for t in phone_tools(en.WORDS, ask_language=True)}["send_product_details"]
    assert schema["parameters"]["properties"]["language"]["enum"] == ["en", "es"]


@pytest.mark.anyio
async def test_a_spanish_store_texts_in_spanish_whatever_the_model_says(catalog: Catalog) -> None:
    outbox = RecordingOutbox(sms=SmsOutcome("sent", None, None))
    tools = StoreTools(store_with(catalog, language="es", sms_from="+15550001111"), outbox, twilio=True)
    output = await call(tools, "send_product_details", {"skus": ["WM-2024-X500"], "language": "en"})
    assert outbox.destinations[0].sms == es.SMS
    assert output["message"] == es.RESULTS.text_sent
    assert "language" not in {t["name"]: t for t in phone_tools(es.WORDS)}["send_product_details"][
        "parameters"
    ]["properties"]


@pytest.mark.anyio
async def test_each_tool_call_is_counted_by_tool_and_result_unknown_names_pooled(catalog: Catalog) -> None:
    metrics = Metrics()
    store = Store(id="default", name=None, language="auto", voice="marin", catalog=catalog)
    tools = StoreTools(store, RecordingOutbox(), twilio=True, metrics=metrics)
    await call(tools, "search_products", {"query": "washer"})
    await call(tools, "send_product_details", {"skus": ["NOPE-1"]})
    await call(tools, "send_product_details", "not json")
    await call(tools, "order_pizza", {})
    await call(tools, "drop_tables", {})
    counted = {
        (tool, result): metrics.sample("voicebot_tool_calls_total", channel="phone", tool=tool, result=result)
        for tool, result in [
            ("search_products", "ok"),
            ("send_product_details", "error"),
            ("send_product_details", "bad_arguments"),
            ("unknown", "unknown_tool"),
        ]
    }
    assert counted == {
        ("search_products", "ok"): 1,
        ("send_product_details", "error"): 1,
        ("send_product_details", "bad_arguments"): 1,
        ("unknown", "unknown_tool"): 2,
    }
    timed = metrics.sample("voicebot_tool_duration_seconds_count", channel="phone", tool="search_products")
    assert timed == 1


@pytest.mark.anyio
async def test_browser_tool_calls_are_counted_on_their_own_channel(catalog: Catalog) -> None:
    metrics = Metrics()
    store = Store(id="default", name=None, language="auto", voice="marin", catalog=catalog)
    tools = BrowserTools(store, media_base_url=MEDIA, metrics=metrics)
    await tools.run("show_products", json.dumps({"skus": ["WM-2024-X500"]}))
    sample = metrics.sample("voicebot_tool_calls_total", channel="browser", tool="show_products", result="ok")
    assert sample == 1
