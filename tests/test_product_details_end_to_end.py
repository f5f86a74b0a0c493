"""A caller asks for washing machines and gets the details by text; the call center by webhook.

Everything runs over real sockets: the bot under uvicorn, the phone, the Realtime simulator,
the Twilio REST stand-in and a webhook receiver (checked with the stock standardwebhooks).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator

import pytest
from standardwebhooks import Webhook

from bot.catalog import Catalog
from bot.settings import SAMPLE_CATALOG_PATH
from bot.sim.phone import PhoneCall
from bot.sim.realtime import Scenario, ToolCall, Turn
from bot.sim.stack import CALLER, SimStack
from bot.wav import read_wav

pytestmark = pytest.mark.anyio

AUDIO = SAMPLE_CATALOG_PATH.parent.parent / "sim" / "audio"
SKUS = ["WM-2024-X500", "WM-2025-0001"]
REPLY_MS = 800
SCENARIO = Scenario(
    greeting="Hi, how can I help?",
    turns=[
        Turn(
            hears="Show me washing machines.",
            tool_calls=[ToolCall("search_products", {"query": "washing machines"})],
            say="{summary} Shall I text you the details?",
            audio_ms=REPLY_MS,
        ),
        Turn(
            hears="Yes, text me.",
            tool_calls=[ToolCall("send_product_details", {"skus": SKUS})],
            say="Done, the details are on their way.",
            audio_ms=REPLY_MS,
        ),
    ],
)


async def take_turn(call: PhoneCall, wav: str | None) -> None:
    if wav is not None:
        await call.say(read_wav(AUDIO / wav).data)
    await call.wait_for_audio(timeout=15)
    await call.wait_until_quiet(quiet_ms=700, timeout=15)


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """One event loop for the module, so the call below is placed once for all its tests."""
    return "asyncio"


@pytest.fixture(scope="module")
async def finished_call() -> AsyncIterator[SimStack]:
    """One whole call: greeting, the washers question, the request for a text, hang-up."""
    async with SimStack(SCENARIO, env={"WEBHOOK_RETRY_SCHEDULE_S": "0.2,0.2,0.2"}) as stack:
        async with stack.dial(CALLER, pace=False) as call:
            await take_turn(call, None)
            await take_turn(call, "caller_washers.wav")
            await take_turn(call, "caller_text_me.wav")
        await stack.receiver.wait_until(
            lambda: {d.event["type"] for d in stack.receiver.acknowledged()}
            >= {"products.sent", "call.completed"},
            timeout_s=15,
        )
        yield stack


async def test_the_search_tool_runs_with_the_callers_words_and_the_caller_hears_its_summary(
    finished_call: SimStack,
) -> None:
    session = finished_call.realtime.sessions[0]
    search_output = json.loads(session.tool_outputs[0][1])
    assert search_output["found"] >= 2
    assert all("Washer" in p["name"] for p in search_output["products"][:2])
    spoken = [text for role, text in session.transcript if role == "assistant"]
    assert any(search_output["summary"] in text for text in spoken)


async def test_nothing_the_model_speaks_carries_json_urls_or_skus(finished_call: SimStack) -> None:
    session = finished_call.realtime.sessions[0]
    spoken = " ".join(text for role, text in session.transcript if role == "assistant")
    assert not re.search(r"https?://|www\.|[{}\[\]]", spoken)
    catalog = Catalog.load(SAMPLE_CATALOG_PATH)
    for hit in catalog.search("washing machines", limit=10):
        assert hit.product.sku not in spoken


async def test_the_caller_receives_exactly_one_sms_with_the_product_links(finished_call: SimStack) -> None:
    [sms] = finished_call.twilio_api.messages_to(CALLER)
    assert "SmartWash Pro 500 Front Load Washer" in sms["body"]
    assert "Aurora Plus 600 Front Load Washer" in sms["body"]
    assert "https://shop.example.com/3d/smartwash_pro_500_front_load_washer" in sms["body"]
    assert "{" not in sms["body"]


async def test_the_call_center_gets_the_signed_products_collection(finished_call: SimStack) -> None:
    [delivery] = [
        d for d in finished_call.receiver.acknowledged() if d.event["type"] == "products.sent"
    ]
    event = Webhook(finished_call.webhook_secret).verify(delivery.body, delivery.headers)
    collection = event["data"]["collection"]
    assert collection["JsonData"]["jsonType"] == "ProductsCollection"
    assert [p["sku"] for p in collection["JsonData"]["products"]] == SKUS
    assert set(collection) == {"TextMessage", "JsonData"}
    assert event["data"]["caller"] == "***0001"
    assert event["data"]["sms"]["status"] == "sent"


async def test_the_end_of_call_record_reaches_the_call_center_with_the_transcript(
    finished_call: SimStack,
) -> None:
    [delivery] = [
        d for d in finished_call.receiver.acknowledged() if d.event["type"] == "call.completed"
    ]
    record = Webhook(finished_call.webhook_secret).verify(delivery.body, delivery.headers)["data"]
    roles = [turn["role"] for turn in record["transcript"]]
    assert roles.count("user") == 2 and "assistant" in roles
    assert CALLER not in delivery.body.decode()


async def test_a_caller_who_opted_out_of_texts_hears_so_and_the_call_center_still_gets_the_details() -> None:
    scenario = Scenario(
        greeting="Hi, how can I help?",
        turns=[
            Turn(
                hears="Text me the washer.",
                tool_calls=[ToolCall("send_product_details", {"skus": SKUS[:1]})],
                say="{message}",
                audio_ms=REPLY_MS,
            )
        ],
    )
    async with SimStack(scenario) as stack:
        stack.twilio_api.unsubscribed.add(CALLER)
        async with stack.dial(CALLER, pace=False) as call:
            await take_turn(call, None)
            await take_turn(call, "caller_text_me.wav")
        await stack.receiver.wait_until(
            lambda: any(d.event["type"] == "products.sent" for d in stack.receiver.acknowledged()),
            timeout_s=15,
        )
    tool_output = json.loads(stack.realtime.sessions[0].tool_outputs[0][1])
    assert tool_output["sms"] == "failed"
    spoken = [text for role, text in stack.realtime.sessions[0].transcript if role == "assistant"]
    assert any("couldn't text that number" in text for text in spoken)
    assert stack.twilio_api.messages_to(CALLER) == []
    [delivery] = [d for d in stack.receiver.acknowledged() if d.event["type"] == "products.sent"]
    sms = Webhook(stack.webhook_secret).verify(delivery.body, delivery.headers)["data"]["sms"]
    assert sms["status"] == "failed" and sms["error"]["code"] == 21610
