"""The agent: what the model is told, the tools it may call, and what running a tool returns.

The model speaks; product data travels as ProductsCollection JSON, never through the model's
voice. So tool results are short spoken-style summaries. There are two toolsets over the same
catalog: the phone's (`StoreTools`: the details go by SMS and webhook through the outbox, and the
call can be transferred or ended) and the browser's (`BrowserTools`: the details go to the page
as product cards).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bot.catalog import Catalog, SearchHit
from bot.logs import CallLog, mask_phone
from bot.products import JsonData, Product, ProductsCollection, with_absolute_links

log = logging.getLogger(__name__)

AGENT_INSTRUCTIONS = """\
You are the phone assistant of a store. You are speaking on a phone line.
- Be brief and natural: one or two short sentences per turn, then let the caller talk.
- Use search_products to find what the caller asks for. Mention at most three products, by
  name and price in words (for example "four hundred and eleven dollars"), with one reason each.
- Never read out SKUs, links, web addresses, JSON, or long numbers. Those are for the text.
- Offer to text the details. When the caller agrees, call send_product_details with the SKUs of
  the products you talked about, then say the text is on its way. If its result says no text
  can be sent, tell the caller so; never promise a text that was not sent.
- If a tool reports an error, say so simply and offer an alternative.
- If the caller asks for a person, or you cannot help, call transfer_to_person.
- When the caller says goodbye or has what they need, say a short goodbye and call end_call.
- Speak the caller's language; default to English.
"""

BROWSER_INSTRUCTIONS = """\
You are the assistant of a store, on the store's web page. The customer talks to you through
their microphone and hears you through their speakers, or types; they see a screen.
- Be brief and natural: one or two short sentences per turn, then let the customer talk.
- Use search_products to find what the customer asks for. Mention at most three products, by
  name and price in words (for example "four hundred and eleven dollars"), with one reason each.
- Never read out SKUs, links, web addresses, JSON, or long numbers. Those are on the screen.
- Whenever you mention products, call show_products with their SKUs so the customer sees them as
  cards (pictures, prices, questions and answers, 3D and AR views, video, technical sheet), and
  say they are on the screen.
- If a tool reports an error, say so simply and offer an alternative.
- Speak the customer's language; default to English.
"""

GREETING_INSTRUCTIONS = (
    "Greet the caller in one short sentence as the store's assistant and ask what they are looking for."
)




def _search_tool(skus_go_to: str, person: str) -> dict[str, Any]:
    """search_products, pointing the model at the tool that takes its SKUs on this channel."""
    return {
        "type": "function",
        "name": "search_products",
        "description": (
            "Search the store catalog. Returns up to five matches with name, brand, price after "
            "discount, rating and a one-line summary to speak, and each product's sku for "
            f"{skus_go_to}. Never read the sku aloud."
        ),
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": f"What the {person} wants, in their words."},
                "max_price": {"type": "number", "description": "Highest price after discount, in dollars."},
                "brand": {"type": "string", "description": "Only this brand."},
                "min_rating": {"type": "number", "description": "Lowest customer rating, 0 to 5."},
            },
            "required": ["query"],
            "additionalProperties": False,
        },
    }


TOOL_DEFINITIONS: list[dict[str, Any]] = [
    _search_tool("send_product_details", "caller"),
    {
        "type": "function",
        "name": "send_product_details",
        "description": (
            "Text the caller the details of these products (photos, 3D/AR views, video, technical "
            "sheet) and send them to the store's call center. Use the skus from search_products. "
            "The result says whether a text is on its way."
        ),
        "parameters": {
            "type": "object",
            "properties": {
                "skus": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 10},
                "note": {"type": "string", "description": "A short note to include, optional."},
            },
            "required": ["skus"],
            "additionalProperties": False,
        },
    },
    {
        "type": "function",
        "name": "transfer_to_person",
        "description": "Connect the caller to a person at the store. Say you are connecting them first.",
        "parameters": {
            "type": "object",
            "properties": {"reason": {"type": "string", "description": "Why, in a few words."}},
            "required": ["reason"],
            "additionalProperties": False,
        },
    },
    {
        "type": "function",
        "name": "end_call",
        "description": "Hang up after you have said goodbye.",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
    },
]

# The browser's agent: the phone's minus texting, transfers and hanging up, plus show_products.
BROWSER_TOOL_DEFINITIONS: list[dict[str, Any]] = [
    _search_tool("show_products", "customer"),
    {
        "type": "function",
        "name": "show_products",
        "description": (
            "Show these products to the customer as cards on their screen: pictures, price, "
            "discount, rating, description, questions and answers, and links to the 3D view, AR "
            "view, video and technical sheet. Use the skus from search_products."
        ),
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


@dataclass(frozen=True, slots=True)
class Agent:
    """What a Realtime session is told and may call, for one channel (phone or browser)."""

    instructions: str
    tools: list[dict[str, Any]]


PHONE_AGENT = Agent(AGENT_INSTRUCTIONS, TOOL_DEFINITIONS)
BROWSER_AGENT = Agent(BROWSER_INSTRUCTIONS, BROWSER_TOOL_DEFINITIONS)


@dataclass(frozen=True, slots=True)
class CallContext:
    """Who is on the call, for tools that act on it (the caller's full number stays in here)."""

    call_sid: str
    caller: str
    called: str


CallAction = Literal["transfer", "end_call"]


@dataclass(frozen=True, slots=True)
class ToolResult:
    """What the model gets back (`output`, a JSON string) and what the call must do after it."""

    output: str
    action: CallAction | None = None


class Toolbox(Protocol):
    """Runs one tool call. Never raises: a bad call becomes an error the model can recover from."""

    async def run(self, name: str, arguments: str, context: CallContext) -> ToolResult: ...


SEARCH_LIMIT = 5
SPOKEN_PRODUCTS_MAX = 3
BRANDS_LISTED_MAX = 8
NOTE_MAX_CHARS = 300
DETAILS_TEXT = "Here are the details of the products we talked about."
SHOWN_TEXT = "Here are the products we are talking about."
# Twilio answers a send in well under a second; past this the tool says "on its way".
SMS_CONFIRM_WAIT_S = 2.0
SMS_REFUSAL_REASONS = {
    21211: "the number is not a valid mobile number",
    21408: "texts to that country are not enabled",
    21610: "the number has opted out of texts from the store",
    21612: "the number cannot receive texts from the store",
    21614: "the number is a landline",
}
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
        self, *, call_sid: str, caller: str, collection: ProductsCollection
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


def _mention(hit: SearchHit) -> str:
    product = hit.product
    name = product.name
    if not name.casefold().startswith(product.brand.casefold()):
        name = f"{name} by {product.brand}"
    reason = hit.highlight or f"rated {product.rate:g} out of 5"
    return f"the {name}, {spoken_price(product.price_after_discount)}, {reason}"


def search_summary(hits: list[SearchHit]) -> str:
    """One sentence naming up to three products with a price and a reason each."""
    mentions = [_mention(hit) for hit in hits[:SPOKEN_PRODUCTS_MAX]]
    if len(mentions) > 1:
        mentions[-1] = f"and {mentions[-1]}"
    joined = "; ".join(mentions)
    return f"Best match{'es' if len(mentions) > 1 else ''}: {joined}."


def search_catalog(catalog: Catalog, args: SearchArgs) -> str:
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
    summary = search_summary(hits) if hits else _no_match_summary(catalog, args)
    return _output(found=len(hits), summary=summary, products=products)


def _no_match_summary(catalog: Catalog, args: SearchArgs) -> str:
    brands = catalog.brands
    if args.brand and args.brand.strip().casefold() not in {b.casefold() for b in brands}:
        listed = ", ".join(brands[:BRANDS_LISTED_MAX])
        return f"The store has no brand called {args.brand}. Brands it has include {listed}."
    limits = []
    if args.max_price is not None:
        limits.append(f"under {spoken_price(args.max_price)}")
    if args.brand:
        limits.append(f"from {args.brand}")
    if args.min_rating is not None:
        limits.append(f"rated {args.min_rating:g} or more")
    if not limits:
        return "Nothing in the store matches that. Ask them to describe it another way."
    closest = catalog.search(args.query, limit=1)
    if not closest:
        return f"Nothing matches that {' and '.join(limits)}."
    return (
        f"Nothing matches that {' and '.join(limits)}. Without those limits the closest is "
        f"{_mention(closest[0])}."
    )


class StoreTools:
    """The agent's tools over the store's catalog and outbox (implements `Toolbox`)."""

    def __init__(
        self,
        catalog: Catalog,
        outbox: DetailsOutbox,
        *,
        sms_enabled: bool,
        transfer_enabled: bool,
    ) -> None:
        self._catalog = catalog
        self._outbox = outbox
        self._sms_enabled = sms_enabled
        self._transfer_enabled = transfer_enabled

    async def run(self, name: str, arguments: str, context: CallContext) -> ToolResult:
        """Run one tool call; every failure becomes an `{"error": ...}` output, never a raise."""
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
                known = ", ".join(tool["name"] for tool in TOOL_DEFINITIONS)
                call_log.warning("unknown tool requested", extra={"tool": name[:64]})
                return _error(f"there is no tool named {name[:64]!r}; the tools are {known}")
        except BadArguments as exc:
            call_log.warning("bad tool arguments", extra={"tool": name, "reason": str(exc)})
            return _error(f"{name}: {exc}. Fix the arguments and call it again.")
        except Exception:
            call_log.exception("tool failed", extra={"tool": name})
            return _error(f"{name} failed unexpectedly. Apologize and offer another way to help.")
        call_log.info("tool ran", extra={"tool": name, "action": result.action})
        return result

    def search_products(self, args: SearchArgs) -> ToolResult:
        return ToolResult(search_catalog(self._catalog, args))

    async def send_product_details(self, args: SendArgs, context: CallContext) -> ToolResult:
        """Queue the products as a ProductsCollection before answering, so nothing promised is lost."""
        products, unknown = self._catalog.get(args.skus)
        if unknown:
            return _error(
                "these skus are not in the catalog: "
                + ", ".join(unknown)
                + ". Nothing was sent. Use skus exactly as search_products returned them.",
                unknown_skus=unknown,
            )
        collection = build_collection(products, args.note)
        try:
            message_id = await self._outbox.add_product_details(
                call_sid=context.call_sid, caller=context.caller, collection=collection
            )
        except OutboxUnavailable as exc:
            CallLog(log, call_sid=context.call_sid).error(
                "product details not queued: outbox unavailable", extra={"reason": str(exc)}
            )
            return ToolResult(
                _output(
                    sent=False,
                    error="the details could not be stored for sending",
                    message=(
                        "Tell the caller you could not send the text right now"
                        + self._fallback_offer()
                    ),
                )
            )
        CallLog(log, call_sid=context.call_sid).info(
            "product details queued",
            extra={
                "message_id": message_id,
                "products": len(products),
                "caller": mask_phone(context.caller),
            },
        )
        if not self._sms_enabled:
            sms, message = "disabled", (
                "Texting is not available at this store, so do not promise a text. The store's "
                "team has the details" + self._fallback_offer()
            )
        elif not can_receive_sms(context.caller):
            sms, message = "no_caller_number", (
                "The caller's number is hidden, so no text can be sent to them; tell them so. "
                "The store's team has the details" + self._fallback_offer()
            )
        else:
            sms, message = await self._confirm_sms(message_id)
        return ToolResult(_output(sent=True, sms=sms, message=message))

    async def _confirm_sms(self, message_id: str) -> tuple[str, str]:
        """Waits briefly for Twilio's answer, so the bot never promises a text that was refused."""
        outcome = await self._outbox.sms_outcome(message_id, SMS_CONFIRM_WAIT_S)
        if outcome is None:
            return "queued", "Tell the caller the details are on their way by text."
        if outcome.state == "sent":
            return "sent", "Tell the caller the text with the details has been sent."
        reason = SMS_REFUSAL_REASONS.get(outcome.error_code or 0, "the text could not be delivered")
        return "failed", (
            f"The text could not be sent: {reason}. Tell the caller you couldn't text that number. "
            "The store's team has the details" + self._fallback_offer()
        )

    def _fallback_offer(self) -> str:
        if self._transfer_enabled:
            return "; offer to connect them to a person at the store."
        return "; offer to describe the products briefly instead."

    def transfer_to_person(self, args: TransferArgs) -> ToolResult:
        """Hand the call to the store's staff, or say honestly that nobody is available."""
        if self._transfer_enabled:
            return ToolResult(
                _output(
                    transferring=True,
                    message="Say in one short sentence that you are connecting them to a person now.",
                ),
                action="transfer",
            )
        offer = (
            "offer to text them the product details instead, or keep helping them yourself."
            if self._sms_enabled
            else "offer to keep helping them yourself."
        )
        return ToolResult(
            _output(
                transferring=False,
                message=f"Nobody from the store can take the call right now. Apologize briefly and {offer}",
            )
        )


@dataclass(frozen=True, slots=True)
class BrowserToolResult:
    """What the model gets back (`output`), and the products the page shows, if any."""

    output: str
    collection: ProductsCollection | None = None


class BrowserTools:
    """The browser assistant's tools over the store's catalog: search it, show products as cards.

    The page runs the model's tool calls through the app (`POST /assistant/tools/{name}`), so
    only these two exist there: nothing a browser can reach texts anyone or moves a phone call.
    """

    names = tuple(tool["name"] for tool in BROWSER_TOOL_DEFINITIONS)

    def __init__(self, catalog: Catalog, *, media_base_url: str) -> None:
        self._catalog = catalog
        self._media_base_url = media_base_url

    async def run(self, name: str, arguments: str) -> BrowserToolResult:
        """Run one tool call; every failure becomes an `{"error": ...}` output, never a raise."""
        try:
            if name == "search_products":
                query = parse_arguments(SearchArgs, arguments)
                result = BrowserToolResult(await asyncio.to_thread(search_catalog, self._catalog, query))
            elif name == "show_products":
                result = self.show_products(parse_arguments(ShowArgs, arguments))
            else:
                log.warning("unknown browser tool requested", extra={"tool": name[:64]})
                error = f"there is no tool named {name[:64]!r}; the tools are {', '.join(self.names)}"
                return BrowserToolResult(_output(error=error))
        except BadArguments as exc:
            log.warning("bad browser tool arguments", extra={"tool": name, "reason": str(exc)})
            return BrowserToolResult(_output(error=f"{name}: {exc}. Fix the arguments and call it again."))
        except Exception:
            log.exception("browser tool failed", extra={"tool": name})
            message = f"{name} failed unexpectedly. Apologize and offer another way to help."
            return BrowserToolResult(_output(error=message))
        shown = len(result.collection.JsonData.products) if result.collection else 0
        log.info("browser tool ran", extra={"tool": name, "products_shown": shown})
        return result

    def show_products(self, args: ShowArgs) -> BrowserToolResult:
        """The known products go to the page with links it can open; the model gets their names."""
        products, unknown = self._catalog.get(list(dict.fromkeys(args.skus)))
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
            "message": "The products are on the customer's screen now. Say so in a few words; "
            "never read their details or links out.",
        }
        if unknown:
            fields["unknown_skus"] = unknown
            fields["message"] += " Some skus were not in the catalog and are not shown."
        collection = ProductsCollection(TextMessage=SHOWN_TEXT, JsonData=JsonData(products=shown))
        return BrowserToolResult(_output(**fields), collection)


def build_collection(products: list[Product], note: str | None) -> ProductsCollection:
    """The seed's ProductsCollection: a short human text plus the full products."""
    text = DETAILS_TEXT
    cleaned = " ".join((note or "").split())[:NOTE_MAX_CHARS]
    if cleaned:
        text = f"{text} {cleaned}"
    return ProductsCollection(TextMessage=text, JsonData=JsonData(products=products))
