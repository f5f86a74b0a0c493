"""The agent: what the model is told, the tools it may call, and what running a tool returns.

The model speaks; product data travels as ProductsCollection JSON through the outbox (SMS and
webhook), never through the model's voice. So tool results are short spoken-style summaries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

AGENT_INSTRUCTIONS = """\
You are the phone assistant of a home-appliance store. You are speaking on a phone line.
- Be brief and natural: one or two short sentences per turn, then let the caller talk.
- Use search_products to find what the caller asks for. Mention at most three products, by
  name and price in words (for example "four hundred and eleven dollars"), with one reason each.
- Never read out SKUs, links, web addresses, JSON, or long numbers. Those are for the text.
- Offer to text the details. When the caller agrees, call send_product_details with the SKUs of
  the products you talked about, then say the text is on its way.
- If a tool reports an error, say so simply and offer an alternative.
- If the caller asks for a person, or you cannot help, call transfer_to_person.
- When the caller says goodbye or has what they need, say a short goodbye and call end_call.
- Speak the caller's language; default to English.
"""

GREETING_INSTRUCTIONS = (
    "Greet the caller in one short sentence as the store's assistant and ask what they are looking for."
)


TOOL_DEFINITIONS: list[dict[str, Any]] = [
    {
        "type": "function",
        "name": "search_products",
        "description": (
            "Search the store catalog. Returns up to five matches with name, brand, price after "
            "discount, rating and a one-line summary to speak, and each product's sku for "
            "send_product_details. Never read the sku aloud."
        ),
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "What the caller wants, in their words."},
                "max_price": {"type": "number", "description": "Highest price after discount, in dollars."},
                "brand": {"type": "string", "description": "Only this brand."},
                "min_rating": {"type": "number", "description": "Lowest customer rating, 0 to 5."},
            },
            "required": ["query"],
            "additionalProperties": False,
        },
    },
    {
        "type": "function",
        "name": "send_product_details",
        "description": (
            "Text the caller the details of these products (photos, 3D/AR views, video, technical "
            "sheet) and send them to the store's call center. Use the skus from search_products."
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
