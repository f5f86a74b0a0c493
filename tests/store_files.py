"""Shared by the stores tests: a second catalog in another product family, and stores files.

The sample catalog is household appliances; the garden catalog below is lawn and garden power
tools, so a search answered from the wrong store's catalog cannot go unnoticed.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from pathlib import Path
from typing import Any

from bot.settings import SAMPLE_CATALOG_PATH

GARDEN_SKUS = ("GD-MOW-21", "GD-MOW-SP", "GD-BLOW-1", "GD-TRIM-1")


def garden_product(sku: str, name: str, brand: str, price: float, description: str) -> dict[str, Any]:
    slug = name.lower().replace(" ", "_")
    return {
        "sku": sku,
        "name": name,
        "brand": brand,
        "profilePic": f"{slug}.jpg",
        "description": description,
        "price": price,
        "rate": 4.5,
        "discount": 10,
        "images": [f"{slug}_side.jpg"],
        "Link3D": f"https://garden.example.com/3d/{slug}",
        "LinkAR": f"https://garden.example.com/ar/{slug}",
        "LinkVideo": f"https://garden.example.com/video/{slug}",
        "TechnicalSheet": f"https://garden.example.com/tech/{slug}.pdf",
        "FAQS": [{"question": "Is the battery included?", "answer": "Yes, with a charger."}],
    }


def garden_catalog() -> list[dict[str, Any]]:
    return [
        garden_product(
            "GD-MOW-21", "EcoMow 21 Cordless Lawn Mower", "EcoMow", 399.0,
            "Quiet battery lawn mower with a 21 inch deck, ideal for mid-size lawns.",
        ),
        garden_product(
            "GD-MOW-SP", "GreenCut Self-Propelled Lawn Mower", "GreenCut", 549.0,
            "Self-propelled gas lawn mower for large lawns and slopes.",
        ),
        garden_product(
            "GD-BLOW-1", "BreezeMax Leaf Blower", "BreezeMax", 179.0,
            "Cordless leaf blower that clears wet leaves and grass clippings.",
        ),
        garden_product(
            "GD-TRIM-1", "TrimPro String Trimmer", "TrimPro", 129.0,
            "Lightweight string trimmer for edges and long grass.",
        ),
    ]  # fmt: skip


def new_webhook_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def write_garden_catalog(folder: Path) -> Path:
    path = folder / "garden.json"
    path.write_text(json.dumps(garden_catalog()))
    return path


def write_stores(path: Path, stores: dict[str, dict[str, Any]], *, mtime_s: float | None = None) -> Path:
    """`{"stores": stores}` as JSON, its mtime pinned when given (a change shows whatever the clock)."""
    path.write_text(json.dumps({"stores": stores}, indent=2))
    if mtime_s is not None:
        os.utime(path, (mtime_s, mtime_s))
    return path


def appliance_store(number: str, **fields: Any) -> dict[str, Any]:
    """A store on the sample (appliance) catalog."""
    store = {"name": "Appliance World Downtown", "numbers": [number], "catalog": str(SAMPLE_CATALOG_PATH)}
    return {**store, **fields}
