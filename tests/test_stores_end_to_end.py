"""A chain of stores on one deployment: each call is its dialled store's, from greeting to call center.

One deployment (the bot under uvicorn, the Realtime and Twilio stand-ins) answers three numbers:
Appliance World Downtown (English, the sample appliance catalog), Green Thumb Garden Center
(Spanish, a garden catalog, its own texting number, staff and call center), and any other number
(the default store: the deployment's settings). Every caller asks the same things (the model's
script is the same), so whatever differs between the calls comes from their store.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook
from store_files import GARDEN_SKUS, appliance_store, new_webhook_secret, write_garden_catalog, write_stores

from bot.catalog import Catalog
from bot.settings import SAMPLE_CATALOG_PATH
from bot.sim.phone import PhoneCall, TwimlVerb
from bot.sim.realtime import Scenario, SimSession, ToolCall, Turn
from bot.sim.stack import SMS_FROM, STORE_PERSON, SimStack
from bot.sim.webhook_receiver import Delivery, WebhookReceiver
from bot.twiml import render_transfer_twiml
from bot.wav import read_wav

pytestmark = pytest.mark.anyio

AUDIO = SAMPLE_CATALOG_PATH.parent.parent / "sim" / "audio"
DOWNTOWN = "+15557650002"
GARDEN = "+15557650003"
UNLISTED = "+15557659999"
GARDEN_SMS_FROM = "+15550002222"
GARDEN_STAFF = "+15557650100"
DOWNTOWN_STAFF = "+15557650200"
DOWNTOWN_CALLER, GARDEN_CALLER, OTHER_CALLER = "+15551230001", "+15551230002", "+15551230003"
APPLIANCE_SKUS = {record["sku"] for record in json.loads(SAMPLE_CATALOG_PATH.read_text())}
GARDEN_GREETING = "¡Gracias por llamar a Green Thumb! ¿Qué busca hoy?"
# The same three requests on every call: a search, a text of the first product found, a person.
SCENARIO = Scenario(
    greeting="Hello!",
    turns=[
        Turn(
            hears="Do you have a lawn mower or a washer?",
            tool_calls=[ToolCall("search_products", {"query": "lawn mower washer"})],
            say="{summary}",
            audio_ms=600,
        ),
        Turn(
            hears="Text me the first one.",
            tool_calls=[ToolCall("send_product_details", {"skus": ["{products.0.sku}"]})],
            say="{message}",
            audio_ms=600,
        ),
        Turn(
            hears="Can I talk to a person?",
            tool_calls=[ToolCall("transfer_to_person", {"reason": "asked for a person"})],
            say="Connecting you now.",
            audio_ms=600,
        ),
    ],
)


@dataclass
class Chain:
    stack: SimStack
    downtown_receiver: WebhookReceiver
    garden_receiver: WebhookReceiver
    garden_secret: str
    downtown_secret: str
    after_stream: dict[str, list[TwimlVerb]]


async def take_turn(call: PhoneCall, wav: str | None) -> None:
    if wav is not None:
        await call.say(read_wav(AUDIO / wav).data)
    await call.wait_for_audio(timeout=15)
    await call.wait_until_quiet(quiet_ms=700, timeout=15)


async def whole_call(stack: SimStack, caller: str, called: str) -> list[TwimlVerb]:
    """Greeting, the search, the text, then the transfer (which ends the call, as Twilio does).

    Returns what the voice webhook's TwiML has Twilio do once the stream ends on its own."""
    async with stack.dial(caller, called=called, pace=False) as call:
        await take_turn(call, None)
        await take_turn(call, "caller_washers.wav")
        await take_turn(call, "caller_text_me.wav")
        await call.say(read_wav(AUDIO / "caller_person.wav").data)
        await call.wait_closed(timeout=15)
    return list(call.dial.verbs[1:])


def stores_file(
    folder: Path, downtown: WebhookReceiver, garden: WebhookReceiver, secrets: tuple[str, str]
) -> Path:
    write_garden_catalog(folder)
    return write_stores(
        folder / "stores.json",
        {
            "downtown": appliance_store(
                DOWNTOWN,
                transfer_number=DOWNTOWN_STAFF,
                webhook_url=downtown.url,
                webhook_secret=secrets[0],
            ),
            "garden": {
                "name": "Green Thumb Garden Center",
                "numbers": [GARDEN],
                "language": "es",
                "catalog": "garden.json",
                "greeting": GARDEN_GREETING,
                "transfer_number": GARDEN_STAFF,
                "sms_from": GARDEN_SMS_FROM,
                "webhook_url": garden.url,
                "webhook_secret": secrets[1],
            },
        },
    )


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def chain(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Chain]:
    """Three whole calls, one to each store, on one deployment; then every webhook delivered."""
    folder = tmp_path_factory.mktemp("stores")
    secrets = (new_webhook_secret(), new_webhook_secret())
    async with WebhookReceiver() as downtown_receiver, WebhookReceiver() as garden_receiver:
        path = stores_file(folder, downtown_receiver, garden_receiver, secrets)
        async with SimStack(SCENARIO, env={"STORES_PATH": str(path)}) as stack:
            after_stream = {
                DOWNTOWN: await whole_call(stack, DOWNTOWN_CALLER, DOWNTOWN),
                GARDEN: await whole_call(stack, GARDEN_CALLER, GARDEN),
                UNLISTED: await whole_call(stack, OTHER_CALLER, UNLISTED),
            }
            for receiver in (downtown_receiver, garden_receiver, stack.receiver):
                await receiver.wait_until(partial(delivered_both, receiver), 15)
            yield Chain(stack, downtown_receiver, garden_receiver, secrets[1], secrets[0], after_stream)


def delivered_both(receiver: WebhookReceiver) -> bool:
    """The call's products.sent and call.completed events both reached the receiver."""
    return {d.event["type"] for d in receiver.acknowledged()} >= {"products.sent", "call.completed"}


def session_of(chain: Chain, store_name: str) -> SimSession:
    """The Realtime session of the call to that store (its instructions name the store)."""
    [session] = [s for s in chain.stack.realtime.sessions if store_name in session_instructions(s)]
    return session


def session_instructions(session: SimSession) -> str:
    update = next(e for e in session.events_received if e.get("type") == "session.update")
    return str(update["session"]["instructions"])


def found_skus(session: SimSession) -> set[str]:
    search = json.loads(session.tool_outputs[0][1])
    return {product["sku"] for product in search["products"]}


def products_sent(receiver: WebhookReceiver, secret: str) -> list[dict[str, Any]]:
    hooks: list[Delivery] = [d for d in receiver.acknowledged() if d.event["type"] == "products.sent"]
    return [Webhook(secret).verify(d.body, d.headers)["data"] for d in hooks]


# --- each call is its store's --------------------------------------------------------------


async def test_each_call_searches_only_its_stores_catalog(chain: Chain) -> None:
    garden = found_skus(session_of(chain, "Green Thumb Garden Center"))
    downtown = found_skus(session_of(chain, "Appliance World Downtown"))
    assert garden and garden <= set(GARDEN_SKUS)
    assert downtown and downtown <= APPLIANCE_SKUS
    assert any("Washer" in p.name for p in Catalog.load(SAMPLE_CATALOG_PATH).get(sorted(downtown))[0])


async def test_each_store_texts_its_own_product_from_its_own_number(chain: Chain) -> None:
    twilio = chain.stack.twilio_api
    [garden_sms] = twilio.messages_to(GARDEN_CALLER)
    [downtown_sms] = twilio.messages_to(DOWNTOWN_CALLER)
    [other_sms] = twilio.messages_to(OTHER_CALLER)
    assert garden_sms["from"] == GARDEN_SMS_FROM
    assert downtown_sms["from"] == SMS_FROM and other_sms["from"] == SMS_FROM
    assert "Lawn Mower" in garden_sms["body"] and "garden.example.com" in garden_sms["body"]
    assert "Washer" in downtown_sms["body"] and "garden.example.com" not in downtown_sms["body"]


async def test_each_stores_products_reach_only_its_own_call_center(chain: Chain) -> None:
    [garden] = products_sent(chain.garden_receiver, chain.garden_secret)
    [downtown] = products_sent(chain.downtown_receiver, chain.downtown_secret)
    [other] = products_sent(chain.stack.receiver, chain.stack.webhook_secret)
    assert {p["sku"] for p in garden["collection"]["JsonData"]["products"]} <= set(GARDEN_SKUS)
    assert {p["sku"] for p in downtown["collection"]["JsonData"]["products"]} <= APPLIANCE_SKUS
    assert garden["call_sid"] not in {downtown["call_sid"], other["call_sid"]}
    assert all(d.event["data"]["caller"] == "***0002" for d in chain.garden_receiver.received)


async def test_each_stores_call_record_goes_to_its_call_center_and_names_the_store(chain: Chain) -> None:
    for receiver, store in (
        (chain.garden_receiver, "garden"),
        (chain.downtown_receiver, "downtown"),
        (chain.stack.receiver, "default"),
    ):
        [record] = [d.event["data"] for d in receiver.acknowledged() if d.event["type"] == "call.completed"]
        assert record["store"] == store


async def test_each_call_is_transferred_to_its_stores_staff(chain: Chain) -> None:
    twiml = [update["Twiml"] for update in chain.stack.twilio_api.call_updates]
    assert twiml == [
        render_transfer_twiml(DOWNTOWN_STAFF),
        render_transfer_twiml(GARDEN_STAFF, "es"),
        render_transfer_twiml(STORE_PERSON),
    ]
    assert '<Say language="es-MX">Lo sentimos' in twiml[1], "what Twilio says, in the store's language"


async def test_an_unlisted_number_gets_the_default_store_as_without_stores(chain: Chain) -> None:
    sessions = chain.stack.realtime.sessions
    [default] = [s for s in sessions if "Appliance World" not in session_instructions(s)
                 and "Green Thumb" not in session_instructions(s)]  # fmt: skip
    instructions = session_instructions(default)
    assert "The store is" not in instructions
    assert "Speak the caller's language; default to English." in instructions
    update = next(e for e in default.events_received if e.get("type") == "session.update")
    assert "language" not in update["session"]["audio"]["input"]["transcription"]


# --- a Spanish store beside an English one -----------------------------------------------


async def test_a_spanish_store_greets_instructs_and_transcribes_in_spanish(chain: Chain) -> None:
    garden = session_of(chain, "Green Thumb Garden Center")
    update = next(e for e in garden.events_received if e.get("type") == "session.update")
    assert update["session"]["audio"]["input"]["transcription"]["language"] == "es"
    assert update["session"]["instructions"].startswith("Eres el asistente telefónico de una tienda.")
    greeting = next(e for e in garden.events_received if e.get("type") == "response.create")
    assert f'Ahora mismo: Saluda a quien llama con estas palabras, y nada más: "{GARDEN_GREETING}"' in (
        greeting["response"]["instructions"]
    )
    tools = {tool["name"]: tool for tool in update["session"]["tools"]}
    assert tools["search_products"]["description"].startswith("Busca en el catálogo de la tienda.")


async def test_what_twilio_says_itself_for_a_spanish_store_is_spanish(chain: Chain) -> None:
    [say, _] = chain.after_stream[GARDEN]
    assert (say.name, say.attributes) == ("Say", {"language": "es-MX"})
    assert say.text.startswith("Lo sentimos, nuestro asistente tuvo un problema.")
    [english, _] = chain.after_stream[DOWNTOWN]
    assert english.text.startswith("Sorry, our assistant ran into a problem.")


async def test_a_spanish_stores_text_is_in_spanish_with_the_products_as_the_catalog_has_them(
    chain: Chain,
) -> None:
    [sms] = chain.stack.twilio_api.messages_to(GARDEN_CALLER)
    body = sms["body"]
    assert body.startswith("Estos son los detalles de los productos de los que hablamos.")
    assert re.search(r"\$\d+\.\d\d, 10% de descuento", body)
    assert "Foto 1: " in body and "Vista 3D: " in body and "Ficha técnica: " in body
    assert "Lawn Mower" in body, "product names stay as the catalog has them"
    garden = session_of(chain, "Green Thumb Garden Center")
    sent = json.loads(garden.tool_outputs[1][1])
    assert sent["message"].startswith("Dile a quien llama"), "the model is told what to say in Spanish"


async def test_the_english_store_beside_it_is_unchanged(chain: Chain) -> None:
    downtown = session_of(chain, "Appliance World Downtown")
    update = next(e for e in downtown.events_received if e.get("type") == "session.update")
    assert update["session"]["audio"]["input"]["transcription"]["language"] == "en"
    assert update["session"]["instructions"].startswith("You are the phone assistant of a store.")
    assert "- Speak English." in update["session"]["instructions"]
    [sms] = chain.stack.twilio_api.messages_to(DOWNTOWN_CALLER)
    assert sms["body"].startswith("Here are the details of the products we talked about.")
    assert "Photo 1: " in sms["body"] and "% off" in sms["body"]


# --- editing the stores file --------------------------------------------------------------


async def test_an_edit_while_a_call_is_on_changes_the_next_call_not_the_current_one(tmp_path: Path) -> None:
    async with WebhookReceiver() as downtown_receiver, WebhookReceiver() as garden_receiver:
        secrets = (new_webhook_secret(), new_webhook_secret())
        path = stores_file(tmp_path, downtown_receiver, garden_receiver, secrets)
        async with SimStack(SCENARIO, env={"STORES_PATH": str(path)}) as stack:
            async with stack.dial(GARDEN_CALLER, called=GARDEN, pace=False) as during:
                await take_turn(during, None)
                edited = json.loads(path.read_text())
                edited["stores"]["garden"].update(
                    greeting="Hola, habla Green Thumb Norte.",
                    sms_from="+15550003333",
                    transfer_number="+15557650300",
                )
                write_stores(path, edited["stores"], mtime_s=4_000_000_000)
                stores = stack.runtime.stores
                assert stores is not None and await asyncio.to_thread(stores.reload_if_changed)
                await take_turn(during, "caller_washers.wav")
                await take_turn(during, "caller_text_me.wav")
                await during.say(read_wav(AUDIO / "caller_person.wav").data)
                await during.wait_closed(timeout=15)
            async with stack.dial(OTHER_CALLER, called=GARDEN, pace=False) as after:
                await take_turn(after, None)
            first, second = stack.realtime.sessions[0], stack.realtime.sessions[1]
    greetings = [
        next(e for e in s.events_received if e.get("type") == "response.create")["response"]["instructions"]
        for s in (first, second)
    ]
    assert GARDEN_GREETING in greetings[0] and "Hola, habla Green Thumb Norte." in greetings[1]
    [sms] = stack.twilio_api.messages_to(GARDEN_CALLER)
    assert sms["from"] == GARDEN_SMS_FROM, "the call on the line keeps its store's number"
    assert stack.twilio_api.call_updates[0]["Twiml"] == render_transfer_twiml(GARDEN_STAFF, "es")
