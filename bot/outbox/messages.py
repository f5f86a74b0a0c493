"""What the outbox sends, built from a stored row: the caller's SMS text and the signed webhooks.

Pure functions, no I/O: the relay and the webhook receiver stand-in share them, and tests reach
them without sockets.

WEBHOOK_SECRET is checked at start-up and kept in its `whsec_<base64>` form (bot/settings.py);
its key is the base64-decoded part, as every Standard Webhooks library reads it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from bot.products import Product, ProductsCollection, absolute_url
from bot.words import SmsWords, en

SMS_MAX_CHARS = 1600
REF_CHARS = 4
WHSEC_PREFIX = "whsec_"


def sms_reference(message_id: str) -> str:
    """The short code each SMS part ends with; an ambiguous send is looked up by it."""
    return message_id.removeprefix("msg_")[:REF_CHARS]


def iso_utc(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# ---------------------------------------------------------------- the SMS text


@dataclass(frozen=True, slots=True)
class SmsPart:
    """One Twilio message: its body (reference line included) and optional picture URLs."""

    body: str
    media_urls: tuple[str, ...] = ()


def price_line(product: Product, words: SmsWords = en.SMS) -> str:
    """'$764.99, 15% off' (or just '$899.99' without a discount)."""
    price = f"${product.price_after_discount:,.2f}"
    if not product.discount:
        return price
    return words.percent_off.format(price=price, discount=f"{product.discount:g}")


def product_lines(product: Product, media_base_url: str, words: SmsWords = en.SMS) -> list[str]:
    """A product as short lines: name, price, then each link with a label (product fields as
    the catalog has them, labels in the text's language)."""
    lines = [product.name if product.brand in product.name else f"{product.name} ({product.brand})"]
    lines.append(price_line(product, words))
    pictures = [p for p in (product.profilePic, *product.images) if p]
    for n, picture in enumerate(dict.fromkeys(pictures), start=1):
        lines.append(f"{words.photo} {n}: {absolute_url(picture, media_base_url)}")
    links = (
        (words.view_3d, product.Link3D),
        (words.view_ar, product.LinkAR),
        (words.video, product.LinkVideo),
        (words.specs, product.TechnicalSheet),
    )
    lines += [f"{label}: {absolute_url(link, media_base_url)}" for label, link in links if link]
    return lines


def render_sms(
    collection: ProductsCollection,
    *,
    reference: str,
    media_base_url: str,
    include_picture: bool = False,
    words: SmsWords = en.SMS,
) -> list[SmsPart]:
    """The caller's text, in as few parts as fit 1600 characters, each ending with its reference.

    Blocks (the intro, then one per product) are packed whole when they fit; a block longer than
    a part is split at line breaks, and a single over-long line is cut.
    """
    reserve = len(f"\n\nRef {reference} (99/99)")
    budget = SMS_MAX_CHARS - reserve
    blocks = [[collection.TextMessage.strip()]] if collection.TextMessage.strip() else []
    products = collection.JsonData.products
    blocks += [product_lines(p, media_base_url, words) for p in products]
    texts: list[str] = []
    current = ""
    for block in blocks:
        for chunk in _fit_block(block, budget):
            candidate = f"{current}\n\n{chunk}" if current else chunk
            if len(candidate) <= budget:
                current = candidate
            else:
                texts.append(current)
                current = chunk
    if current or not texts:
        texts.append(current)
    total = len(texts)
    parts = []
    for n, text in enumerate(texts, start=1):
        ref_line = sms_ref_line(reference, n, total)
        parts.append(SmsPart(f"{text}\n\n{ref_line}" if text else ref_line))
    if include_picture and products:
        first = products[0]
        picture = first.profilePic or next(iter(first.images), None)
        if picture:
            parts[0] = SmsPart(parts[0].body, (absolute_url(picture, media_base_url),))
    return parts


@dataclass(frozen=True, slots=True)
class SmsStyle:
    """How a message's text is written (MEDIA_BASE_URL, SMS_INCLUDE_PICTURE)."""

    media_base_url: str
    include_picture: bool = False

    def render(
        self, message_id: str, collection: ProductsCollection, words: SmsWords = en.SMS
    ) -> list[SmsPart]:
        return render_sms(
            collection,
            reference=sms_reference(message_id),
            media_base_url=self.media_base_url,
            include_picture=self.include_picture,
            words=words,
        )


def sms_ref_line(reference: str, part: int, total: int) -> str:
    return f"Ref {reference}" if total == 1 else f"Ref {reference} ({part}/{total})"


def _fit_block(lines: list[str], budget: int) -> list[str]:
    """A block as one chunk when it fits, else as line groups that each fit."""
    whole = "\n".join(lines)
    if len(whole) <= budget:
        return [whole]
    chunks: list[str] = []
    current = ""
    for raw in lines:
        line = raw[:budget]
        candidate = f"{current}\n{line}" if current else line
        if len(candidate) <= budget:
            current = candidate
        else:
            chunks.append(current)
            current = line
    chunks.append(current)
    return chunks


def parts_json(parts: list[SmsPart]) -> str:
    """The rendered parts as stored on the row, so every attempt sends the same text."""
    return json.dumps([{"body": p.body, "media_urls": list(p.media_urls)} for p in parts])


def parts_from_json(stored: str) -> list[SmsPart]:
    return [SmsPart(p["body"], tuple(p["media_urls"])) for p in json.loads(stored)]


# ---------------------------------------------------------------- webhooks


def webhook_key(secret: str) -> bytes:
    """The HMAC key: a `whsec_` secret is base64-decoded (as standardwebhooks does), else raw bytes."""
    if secret.startswith(WHSEC_PREFIX):
        return base64.b64decode(secret.removeprefix(WHSEC_PREFIX) + "==")
    return secret.encode()


def sign_webhook(key: bytes, message_id: str, timestamp: int, body: str) -> str:
    """The `webhook-signature` header: 'v1,' + base64(HMAC-SHA256 of 'id.timestamp.body')."""
    mac = hmac.new(key, f"{message_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def event_body(event_type: str, timestamp_s: float, data: dict[str, Any]) -> str:
    """A Standard Webhooks payload, serialized once so every attempt sends the same bytes."""
    event = {"type": event_type, "timestamp": iso_utc(timestamp_s), "data": data}
    return json.dumps(event, separators=(",", ":"))


def products_sent_body(row_payload: dict[str, Any], sms: dict[str, Any], timestamp_s: float) -> str:
    return event_body("products.sent", timestamp_s, {**row_payload, "sms": sms})


def sms_report(
    state: str, error_code: int | None, last_error: str | None, sids: list[str | None]
) -> dict[str, Any]:
    """The SMS outcome as the webhook reports it."""
    if state == "sent":
        return {"status": "sent", "message_sids": [s for s in sids if s]}
    return {"status": "failed", "error": {"code": error_code, "message": last_error or "not sent"}}
