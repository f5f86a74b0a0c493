"""The SMS text and the webhook signature: pure builders, tested without sockets."""

from __future__ import annotations

from datetime import UTC, datetime

from outbox_rig import CATALOG, MEDIA, SECRET, collection
from standardwebhooks import Webhook

from bot.outbox.messages import SMS_MAX_CHARS, event_body, render_sms, sign_webhook, webhook_key

# ---------------------------------------------------------------- the SMS text


def test_the_sms_names_each_product_with_its_discounted_price_and_absolute_links() -> None:
    parts = render_sms(collection(2), reference="K7Q2", media_base_url=MEDIA)
    assert len(parts) == 1
    body = parts[0].body
    assert body.startswith("Here are the washers we talked about.")
    assert "SmartWash Pro 500 Front Load Washer (CleanTech)\n$764.99, 15% off" in body
    assert f"Photo 1: {MEDIA}smartwash_pro_500_front_load_washer_profile.jpg" in body
    assert f"Photo 2: {MEDIA}smartwash_pro_500_front_load_washer_front.jpg" in body
    assert "3D view: https://shop.example.com/3d/smartwash_pro_500_front_load_washer" in body
    assert "Specs: https://shop.example.com/tech/smartwash_pro_500_front_load_washer.pdf" in body
    assert CATALOG[1]["name"] in body
    assert body.endswith("\n\nRef K7Q2")
    assert "{" not in body and "sku" not in body.lower()
    assert parts[0].media_urls == ()


def test_a_long_collection_is_split_into_parts_within_1600_characters_each_with_its_reference() -> None:
    parts = render_sms(collection(12), reference="K7Q2", media_base_url=MEDIA)
    assert len(parts) > 1
    assert all(len(p.body) <= SMS_MAX_CHARS for p in parts)
    assert [p.body.rsplit("\n", 1)[-1] for p in parts] == [
        f"Ref K7Q2 ({n}/{len(parts)})" for n in range(1, len(parts) + 1)
    ]
    text = "\n".join(p.body for p in parts)
    assert all(product["name"] in text for product in CATALOG[:12])


def test_the_picture_option_attaches_the_first_products_picture_to_the_first_part() -> None:
    parts = render_sms(collection(12), reference="K7Q2", media_base_url=MEDIA, include_picture=True)
    assert parts[0].media_urls == (f"{MEDIA}smartwash_pro_500_front_load_washer_profile.jpg",)
    assert all(p.media_urls == () for p in parts[1:])


def test_the_signature_is_the_one_stock_standard_webhooks_libraries_compute() -> None:
    body = event_body("call.completed", 1_700_000_000, {"duration_s": 3})
    signed = sign_webhook(webhook_key(SECRET), "msg_X", 1_700_000_000, body)
    assert signed == Webhook(SECRET).sign("msg_X", datetime.fromtimestamp(1_700_000_000, UTC), body)


def test_a_plain_secret_is_its_utf8_bytes() -> None:
    assert webhook_key("plain-text-secret") == b"plain-text-secret"
