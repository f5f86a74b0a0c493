"""The agent: what the model is told, the tools it may call, and what running a tool returns.

The model speaks; product data travels as ProductsCollection JSON, never through the model's
voice. So tool results are short spoken-style summaries. Everything is a store's (bot/stores.py):
its catalog, its numbers and call center, and its words (bot/words/), which say what the model
is told and what the results tell it to say. There are two toolsets over a store's catalog: the
phone's (`StoreTools`: the details go by SMS and webhook through the outbox, and the call can be
transferred or ended) and the browser's (`BrowserTools`: the details go to the page as cards).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bot.catalog import Catalog, SearchHit
from bot.logs import CallLog, mask_phone
from bot.metrics import Metrics
from bot.products import JsonData, Product, ProductsCollection, with_absolute_links
from bot.stores import Destination, Store, local_now
from bot.words import BY_CODE, ResultWords, SmsWords, Words, en

log = logging.getLogger(__name__)

def search_tool(words: Words, *, phone: bool) -> dict[str, Any]:
    """search_products, pointing the model at the tool that takes its SKUs on this channel."""
    tools = words.tools
    skus_for = tools.search_skus_for_phone if phone else tools.search_skus_for_browser
    return {
        "type": "function",
        "name": "search_products",
        "description": tools.search.format(skus_for=skus_for),
        "parameters": {
            "type": "object",
            "properties": {
                "query": {
                    "type": "string",
                    "description": tools.query_phone if phone else tools.query_browser,
                },
                "max_price": {"type": "number", "description": tools.max_price},
                "brand": {"type": "string", "description": tools.brand},
                "min_rating": {"type": "number", "description": tools.min_rating},
            },
            "required": ["query"],
            "additionalProperties": False,
        },
    }


def phone_tools(words: Words, *, ask_language: bool = False) -> list[dict[str, Any]]:
    """The phone's tools. `ask_language`: send_product_details asks which language the text is in
    (stores whose language is `auto` learn the caller's from the model)."""
    tools = words.tools
    send_properties: dict[str, Any] = {
        "skus": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 10},
        "note": {"type": "string", "description": tools.note},
    }
    if ask_language:
        send_properties["language"] = {
            "type": "string",
            "enum": list(SMS_LANGUAGES),
            "description": tools.language,
        }
    return [
        search_tool(words, phone=True),
        {
            "type": "function",
            "name": "send_product_details",
            "description": tools.send,
            "parameters": {
                "type": "object",
                "properties": send_properties,
                "required": ["skus"],
                "additionalProperties": False,
            },
        },
        {
            "type": "function",
            "name": "transfer_to_person",
            "description": tools.transfer,
            "parameters": {
                "type": "object",
                "properties": {"reason": {"type": "string", "description": tools.reason}},
                "required": ["reason"],
                "additionalProperties": False,
            },
        },
        {
            "type": "function",
            "name": "end_call",
            "description": tools.end_call,
            "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
        },
    ]


def browser_tools(words: Words) -> list[dict[str, Any]]:
    """The browser's agent: the phone's minus texting, transfers and hanging up, plus show_products."""
    return [
        search_tool(words, phone=False),
        {
            "type": "function",
            "name": "show_products",
            "description": words.tools.show,
            "parameters": {
                "type": "object",
                "properties": {
                    "skus": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 10},
                },
                "required": ["skus"],
                "additionalProperties": False,
            },
        },
    ]


SMS_LANGUAGES = tuple(BY_CODE)
TOOL_DEFINITIONS = phone_tools(en.WORDS)
PHONE_TOOL_NAMES = tuple(tool["name"] for tool in TOOL_DEFINITIONS)
BROWSER_TOOL_NAMES = tuple(tool["name"] for tool in browser_tools(en.WORDS))


@dataclass(frozen=True, slots=True)
class Agent:
    """What a Realtime session is told, may call and sounds like, for one store and channel."""

    instructions: str
    tools: list[dict[str, Any]]
    voice: str
    transcription_language: str | None = None


def agent_instructions(store: Store, now: datetime, *, phone: bool) -> str:
    """The channel's instructions in the store's words, the language rule, then the store's own notes."""
    agent = store.words.agent
    text = agent.phone if phone else agent.browser
    text += (agent.speak_callers_language if store.language == "auto" else agent.speak_only_this) + "\n"
    notes = [agent.store_intro.format(store=store.name)] if store.name else []
    hours = store.hours_note(now)
    if hours:
        notes.append(hours)
    if store.notes:
        notes.append(store.notes.strip())
    if notes:
        text += agent.store_notes.format(notes="\n".join(notes)) + "\n"
    return text


def phone_agent(store: Store, now: datetime) -> Agent:
    return Agent(
        agent_instructions(store, now, phone=True),
        phone_tools(store.words, ask_language=store.language == "auto"),
        store.voice,
        store.transcription_language,
    )


def browser_agent(store: Store, now: datetime) -> Agent:
    return Agent(
        agent_instructions(store, now, phone=False),
        browser_tools(store.words),
        store.voice,
        store.transcription_language,
    )


def greeting_line(store: Store) -> str:
    """What the first response of a call is asked to say: the store's greeting, or a short hello."""
    agent = store.words.agent
    return agent.greet_with.format(greeting=store.greeting) if store.greeting else agent.greet


@dataclass(frozen=True, slots=True)
class CallContext:
    """Who is on the call, for tools that act on it (the caller's full number stays in here)."""

    call_sid: str
    caller: str
    called: str


CallAction = Literal["transfer", "end_call"]
# How a tool call went, for /metrics: ran and answered, answered with an error, or never ran.
ToolOutcome = Literal["ok", "error", "bad_arguments", "unknown_tool", "crashed"]


@dataclass(frozen=True, slots=True)
class ToolResult:
    """What the model gets back (`output`, a JSON string), what the call must do after it, and the
    products queued for the caller, if any (the console shows them)."""

    output: str
    action: CallAction | None = None
    collection: ProductsCollection | None = None


class Toolbox(Protocol):
    """Runs one tool call. Never raises: a bad call becomes an error the model can recover from."""

    async def run(self, name: str, arguments: str, context: CallContext) -> ToolResult: ...


SEARCH_LIMIT = 5
SPOKEN_PRODUCTS_MAX = 3
BRANDS_LISTED_MAX = 8
NOTE_MAX_CHARS = 300
# Twilio answers a send in well under a second; past this the tool says "on its way".
SMS_CONFIRM_WAIT_S = 2.0
# Twilio's stand-ins for a withheld caller ID (anonymous, restricted, blocked, unknown, unavailable).
WITHHELD_NUMBERS = frozenset(
    {"+266696687", "+7378742833", "+2562533", "+8656696", "+86282452253"}
)
_E164 = re.compile(r"^\+[1-9]\d{7,14}$")


class OutboxUnavailable(Exception):
    """The outbox could not store the message (disk full, database locked): nothing was queued.

    Defined here, not in bot.outbox, so tools need not import the outbox machinery; the
    outbox raises it and the tool turns it into an answer the model can speak.
    """


@dataclass(frozen=True, slots=True)
class SmsOutcome:
    """How an SMS ended: `state` sent, failed or dead, with Twilio's code and reason on failure."""

    state: str
    error_code: int | None
    reason: str | None


class DetailsOutbox(Protocol):
    """Where send_product_details leaves a ProductsCollection for the SMS and webhook relay."""

    async def add_product_details(
        self,
        *,
        call_sid: str,
        caller: str,
        collection: ProductsCollection,
        destination: Destination,
    ) -> str:
        """Store the message durably and return its id; raise OutboxUnavailable if it cannot."""
        ...

    async def sms_outcome(self, message_id: str, timeout_s: float) -> SmsOutcome | None:
        """The SMS's settled outcome, or None if it is not settled within `timeout_s`."""
        ...


class BadArguments(ValueError):
    """The model's arguments for a tool are not valid JSON or do not match the tool's schema."""


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SearchArgs(_Args):
    query: str = Field(max_length=500)
    max_price: float | None = Field(None, ge=0)
    brand: str | None = Field(None, max_length=100)
    min_rating: float | None = Field(None, ge=0, le=5)


class SendArgs(_Args):
    skus: list[str] = Field(min_length=1, max_length=10)
    note: str | None = Field(None, max_length=1000)
    # Only offered to `auto` stores; any other value falls back to the store's own language.
    language: str | None = Field(None, max_length=16)


class ShowArgs(_Args):
    skus: list[str] = Field(min_length=1, max_length=10)


class TransferArgs(_Args):
    reason: str = Field(max_length=500)


class EndArgs(_Args):
    # Hanging up must not fail over a stray argument.
    model_config = ConfigDict(extra="ignore", frozen=True)


ArgsT = TypeVar("ArgsT", bound=_Args)


def parse_arguments(model: type[ArgsT], arguments: str) -> ArgsT:
    """The tool's arguments, validated; raises BadArguments with a short reason for the model."""
    try:
        raw = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError as exc:
        raise BadArguments(f"arguments are not valid JSON ({exc.msg})") from None
    if not isinstance(raw, dict):
        raise BadArguments("arguments must be a JSON object")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        reasons = [
            f"{'.'.join(str(p) for p in err['loc']) or 'arguments'}: {err['msg']}"
            for err in exc.errors()
        ]
        raise BadArguments("; ".join(reasons)) from None


def can_receive_sms(caller: str) -> bool:
    """Only a real E.164 number can get a text (not anonymous, client:alice, sip:...)."""
    return bool(_E164.match(caller)) and caller not in WITHHELD_NUMBERS


def spoken_price(dollars: float) -> str:
    """'$764.99', or '$500' for whole dollars: short enough to say, words are the model's job."""
    return f"${dollars:,.0f}" if dollars == int(dollars) else f"${dollars:,.2f}"


def _output(**fields: Any) -> str:
    return json.dumps(fields, ensure_ascii=False)


def _error(message: str, **fields: Any) -> ToolResult:
    return ToolResult(_output(error=message, **fields))


def _mention(hit: SearchHit, words: ResultWords) -> str:
    product = hit.product
    name = product.name
    if not name.casefold().startswith(product.brand.casefold()):
        name = words.by_brand.format(name=name, brand=product.brand)
    reason = hit.highlight or words.rated.format(rate=f"{product.rate:g}")
    return words.mention.format(name=name, price=spoken_price(product.price_after_discount), reason=reason)


def search_summary(hits: list[SearchHit], words: ResultWords = en.RESULTS) -> str:
    """One sentence naming up to three products with a price and a reason each."""
    mentions = [_mention(hit, words) for hit in hits[:SPOKEN_PRODUCTS_MAX]]
    if len(mentions) > 1:
        mentions[-1] = words.last_joiner.format(mention=mentions[-1])
    template = words.best_matches if len(mentions) > 1 else words.best_match
    return template.format(mentions="; ".join(mentions))


def search_catalog(catalog: Catalog, args: SearchArgs, words: ResultWords = en.RESULTS) -> str:
    """Up to five matches with a sentence to speak; SKUs are in the data, never the sentence."""
    hits = catalog.search(
        args.query,
        max_price=args.max_price,
        brand=args.brand,
        min_rating=args.min_rating,
        limit=SEARCH_LIMIT,
    )
    products = [
        {
            "sku": hit.product.sku,
            "name": hit.product.name,
            "brand": hit.product.brand,
            "price": hit.product.price_after_discount,
            "rating": hit.product.rate,
            "highlight": hit.highlight,
        }
        for hit in hits
    ]
    summary = search_summary(hits, words) if hits else _no_match_summary(catalog, args, words)
    return _output(found=len(hits), summary=summary, products=products)


def _no_match_summary(catalog: Catalog, args: SearchArgs, words: ResultWords) -> str:
    brands = catalog.brands
    if args.brand and args.brand.strip().casefold() not in {b.casefold() for b in brands}:
        listed = ", ".join(brands[:BRANDS_LISTED_MAX])
        return words.no_such_brand.format(brand=args.brand, brands=listed)
    limits = []
    if args.max_price is not None:
        limits.append(words.under_price.format(price=spoken_price(args.max_price)))
    if args.brand:
        limits.append(words.from_brand.format(brand=args.brand))
    if args.min_rating is not None:
        limits.append(words.rated_at_least.format(rating=f"{args.min_rating:g}"))
    if not limits:
        return words.nothing_matches
    joined = words.limits_joiner.join(limits)
    closest = catalog.search(args.query, limit=1)
    if not closest:
        return words.nothing_matches_limits.format(limits=joined)
    return words.closest_without_limits.format(limits=joined, mention=_mention(closest[0], words))


def outcome_of(output: str) -> ToolOutcome:
    """A tool's output says it failed the way every tool here does: an `error` field."""
    return "error" if "error" in json.loads(output) else "ok"


class StoreTools:
    """The agent's tools for one store: its catalog, its texting number and call center, its
    staff (implements `Toolbox`).

    `twilio`: whether Twilio credentials are configured (texts and transfers need them).
    `clock`: the wall clock opening hours are read on.
    """

    names = frozenset(PHONE_TOOL_NAMES)

    def __init__(
        self,
        store: Store,
        outbox: DetailsOutbox,
        *,
        twilio: bool,
        clock: Callable[[], datetime] = local_now,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self._outbox = outbox
        self._twilio = twilio
        self._clock = clock
        self._words = store.words.results
        self._metrics = metrics or Metrics()

    @property
    def sms_enabled(self) -> bool:
        return self._twilio and bool(self.store.sms_from)

    def transfer_number(self) -> str | None:
        """Where a transfer would go right now (None: nobody can take the call)."""
        return self.store.transfer_to(self._clock()) if self._twilio else None

    async def run(self, name: str, arguments: str, context: CallContext) -> ToolResult:
        """Run one tool call; every failure becomes an `{"error": ...}` output, never a raise."""
        started = time.perf_counter()
        result, outcome = await self._run(name, arguments, context)
        tool = name if name in self.names else "unknown"
        self._metrics.tool_ran("phone", tool, outcome, time.perf_counter() - started)
        return result

    async def _run(self, name: str, arguments: str, context: CallContext) -> tuple[ToolResult, ToolOutcome]:
        call_log = CallLog(log, call_sid=context.call_sid)
        try:
            if name == "search_products":
                query = parse_arguments(SearchArgs, arguments)
                # A broad query on a large catalog takes milliseconds: keep it off the event loop.
                result = await asyncio.to_thread(self.search_products, query)
            elif name == "send_product_details":
                args = parse_arguments(SendArgs, arguments)
                result = await self.send_product_details(args, context)
            elif name == "transfer_to_person":
                result = self.transfer_to_person(parse_arguments(TransferArgs, arguments))
            elif name == "end_call":
                parse_arguments(EndArgs, arguments)
                result = ToolResult(_output(ending=True), action="end_call")
            else:
                known = ", ".join(PHONE_TOOL_NAMES)
                call_log.warning("unknown tool requested", extra={"tool": name[:64]})
                return _error(f"there is no tool named {name[:64]!r}; the tools are {known}"), "unknown_tool"
        except BadArguments as exc:
            call_log.warning("bad tool arguments", extra={"tool": name, "reason": str(exc)})
            return _error(f"{name}: {exc}. Fix the arguments and call it again."), "bad_arguments"
        except Exception:
            call_log.exception("tool failed", extra={"tool": name})
            return _error(f"{name} failed unexpectedly. Apologize and offer another way to help."), "crashed"
        call_log.info("tool ran", extra={"tool": name, "action": result.action})
        return result, outcome_of(result.output)

    def search_products(self, args: SearchArgs) -> ToolResult:
        return ToolResult(search_catalog(self.store.catalog, args, self._words))

    def sms_words(self, args: SendArgs) -> SmsWords:
        """The text's language: the store's, or for an `auto` store the one the model reported."""
        if self.store.language == "auto" and args.language in BY_CODE:
            return BY_CODE[args.language].sms
        return self.store.words.sms

    async def send_product_details(self, args: SendArgs, context: CallContext) -> ToolResult:
        """Queue the products as a ProductsCollection before answering, so nothing promised is lost."""
        products, unknown = self.store.catalog.get(args.skus)
        if unknown:
            return _error(
                "these skus are not in the catalog: "
                + ", ".join(unknown)
                + ". Nothing was sent. Use skus exactly as search_products returned them.",
                unknown_skus=unknown,
            )
        sms = self.sms_words(args)
        collection = build_collection(products, args.note, sms)
        words = self._words
        try:
            message_id = await self._outbox.add_product_details(
                call_sid=context.call_sid,
                caller=context.caller,
                collection=collection,
                destination=self.store.destination(sms),
            )
        except OutboxUnavailable as exc:
            CallLog(log, call_sid=context.call_sid).error(
                "product details not queued: outbox unavailable", extra={"reason": str(exc)}
            )
            return ToolResult(
                _output(
                    sent=False,
                    error="the details could not be stored for sending",
                    message=words.not_stored.format(offer=self._fallback_offer()),
                )
            )
        CallLog(log, call_sid=context.call_sid).info(
            "product details queued",
            extra={
                "message_id": message_id,
                "products": len(products),
                "caller": mask_phone(context.caller),
                "store": self.store.id,
            },
        )
        if not self.sms_enabled:
            state, message = "disabled", words.texting_off.format(offer=self._fallback_offer())
        elif not can_receive_sms(context.caller):
            state, message = "no_caller_number", words.hidden_number.format(offer=self._fallback_offer())
        else:
            state, message = await self._confirm_sms(message_id)
        return ToolResult(_output(sent=True, sms=state, message=message), collection=collection)

    async def _confirm_sms(self, message_id: str) -> tuple[str, str]:
        """Waits briefly for Twilio's answer, so the bot never promises a text that was refused."""
        words = self._words
        outcome = await self._outbox.sms_outcome(message_id, SMS_CONFIRM_WAIT_S)
        if outcome is None:
            return "queued", words.text_on_its_way
        if outcome.state == "sent":
            return "sent", words.text_sent
        reason = words.refusals.get(outcome.error_code or 0, words.refusal_default)
        return "failed", words.text_failed.format(reason=reason, offer=self._fallback_offer())

    def _fallback_offer(self) -> str:
        return self._words.offer_person if self.transfer_number() else self._words.offer_describe

    def transfer_to_person(self, args: TransferArgs) -> ToolResult:
        """Hand the call to the store's staff, or say honestly that nobody is available."""
        words = self._words
        if self.transfer_number():
            return ToolResult(_output(transferring=True, message=words.transferring), action="transfer")
        offer = words.offer_text_or_help if self.sms_enabled else words.offer_help
        now = self._clock()
        if self._twilio and not self.store.is_open(now) and self.store.hours is not None:
            when = self.store.hours_note(now) or ""
            message = words.store_closed.format(when=when, offer=offer)
        else:
            message = words.nobody_available.format(offer=offer)
        return ToolResult(_output(transferring=False, message=message))


@dataclass(frozen=True, slots=True)
class BrowserToolResult:
    """What the model gets back (`output`), and the products the page shows, if any."""

    output: str
    collection: ProductsCollection | None = None


class BrowserTools:
    """The browser assistant's tools over one store's catalog: search it, show products as cards.

    The page runs the model's tool calls through the app (`POST /assistant/tools/{name}`), so
    only these two exist there: nothing a browser can reach texts anyone or moves a phone call.
    """

    names = BROWSER_TOOL_NAMES

    def __init__(self, store: Store, *, media_base_url: str, metrics: Metrics | None = None) -> None:
        self.store = store
        self._media_base_url = media_base_url
        self._metrics = metrics or Metrics()

    async def run(self, name: str, arguments: str) -> BrowserToolResult:
        """Run one tool call; every failure becomes an `{"error": ...}` output, never a raise."""
        started = time.perf_counter()
        result, outcome = await self._run(name, arguments)
        tool = name if name in self.names else "unknown"
        self._metrics.tool_ran("browser", tool, outcome, time.perf_counter() - started)
        return result

    async def _run(self, name: str, arguments: str) -> tuple[BrowserToolResult, ToolOutcome]:
        words = self.store.words.results
        try:
            if name == "search_products":
                query = parse_arguments(SearchArgs, arguments)
                output = await asyncio.to_thread(search_catalog, self.store.catalog, query, words)
                result = BrowserToolResult(output)
            elif name == "show_products":
                result = self.show_products(parse_arguments(ShowArgs, arguments))
            else:
                log.warning("unknown browser tool requested", extra={"tool": name[:64]})
                error = f"there is no tool named {name[:64]!r}; the tools are {', '.join(self.names)}"
                return BrowserToolResult(_output(error=error)), "unknown_tool"
        except BadArguments as exc:
            log.warning("bad browser tool arguments", extra={"tool": name, "reason": str(exc)})
            output = _output(error=f"{name}: {exc}. Fix the arguments and call it again.")
            return BrowserToolResult(output), "bad_arguments"
        except Exception:
            log.exception("browser tool failed", extra={"tool": name})
            message = f"{name} failed unexpectedly. Apologize and offer another way to help."
            return BrowserToolResult(_output(error=message)), "crashed"
        shown = len(result.collection.JsonData.products) if result.collection else 0
        log.info("browser tool ran", extra={"tool": name, "products_shown": shown, "store": self.store.id})
        return result, outcome_of(result.output)

    def show_products(self, args: ShowArgs) -> BrowserToolResult:
        """The known products go to the page with links it can open; the model gets their names."""
        words = self.store.words
        products, unknown = self.store.catalog.get(list(dict.fromkeys(args.skus)))
        if not products:
            message = (
                "none of these skus is in the catalog: " + ", ".join(unknown) + ". Nothing was "
                "shown. Use skus exactly as search_products returned them."
            )
            return BrowserToolResult(_output(error=message, unknown_skus=unknown))
        shown = [with_absolute_links(p, self._media_base_url) for p in products]
        fields: dict[str, Any] = {
            "shown": len(shown),
            "names": [p.name for p in shown],
            "message": words.results.shown,
        }
        if unknown:
            fields["unknown_skus"] = unknown
            fields["message"] += words.results.shown_some_unknown
        collection = ProductsCollection(TextMessage=words.sms.shown, JsonData=JsonData(products=shown))
        return BrowserToolResult(_output(**fields), collection)


def build_collection(
    products: list[Product], note: str | None, words: SmsWords = en.SMS
) -> ProductsCollection:
    """The seed's ProductsCollection: a short human text plus the full products."""
    text = words.details
    cleaned = " ".join((note or "").split())[:NOTE_MAX_CHARS]
    if cleaned:
        text = f"{text} {cleaned}"
    return ProductsCollection(TextMessage=text, JsonData=JsonData(products=products))
