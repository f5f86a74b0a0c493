"""The seed's product formats (Product, ProductsCollection) as pydantic models, field for field.

These cross every edge: the catalog file, the tool that builds a collection, the outbox, the SMS
and the call-center webhook. Field names are the seed's exact JSON keys, so `model_dump()` (or
`model_dump_json()`) gives the seed format back unchanged.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from typing import Literal
from urllib.parse import quote, urljoin

from pydantic import BaseModel, ConfigDict, Field

CENT = Decimal("0.01")
PERCENT = Decimal(100)


class FAQ(BaseModel):
    """One question a customer asked about a product, with the store's answer."""

    model_config = ConfigDict(frozen=True, strict=True, extra="ignore", str_strip_whitespace=True)

    question: str
    answer: str


class Product(BaseModel):
    """A product in the seed's format; prices in dollars, `discount` in percent, `rate` 0..5."""

    model_config = ConfigDict(
        frozen=True, strict=True, extra="ignore", str_strip_whitespace=True, allow_inf_nan=False
    )

    sku: str = Field(min_length=1, max_length=64)
    name: str = Field(min_length=1, max_length=300)
    brand: str = Field(min_length=1, max_length=100)
    profilePic: str | None = None
    description: str = ""
    price: float = Field(ge=0)
    rate: float = Field(0.0, ge=0, le=5)
    discount: float = Field(0.0, ge=0, le=100)
    images: list[str] = Field(default_factory=list)
    Link3D: str | None = None
    LinkAR: str | None = None
    LinkVideo: str | None = None
    TechnicalSheet: str | None = None
    FAQS: list[FAQ] = Field(default_factory=list)

    @property
    def price_after_discount(self) -> float:
        """The price the caller pays, rounded half-up to the cent (899.99 at 15% -> 764.99)."""
        price = Decimal(str(self.price))
        factor = (PERCENT - Decimal(str(self.discount))) / PERCENT
        return float((price * factor).quantize(CENT, rounding=ROUND_HALF_UP))


class JsonData(BaseModel):
    """The machine-readable half of a ProductsCollection."""

    model_config = ConfigDict(frozen=True, strict=True)

    jsonType: Literal["ProductsCollection"] = "ProductsCollection"
    products: list[Product]


class ProductsCollection(BaseModel):
    """What the caller gets by SMS and the call center by webhook: short text plus products."""

    model_config = ConfigDict(frozen=True, strict=True)

    TextMessage: str
    JsonData: JsonData


def absolute_url(link: str, media_base_url: str) -> str:
    """A catalog link as a URL a phone or browser can open: names like 'x_front.jpg' join MEDIA_BASE_URL."""
    base = media_base_url if media_base_url.endswith("/") else media_base_url + "/"
    return urljoin(base, quote(link.strip(), safe="/:?=&%#+@,;~"))


def with_absolute_links(product: Product, media_base_url: str) -> Product:
    """The product with every picture and link absolute, ready for a page to load or open."""

    def resolve(link: str | None) -> str | None:
        return absolute_url(link, media_base_url) if link else link

    return product.model_copy(
        update={
            "profilePic": resolve(product.profilePic),
            "images": [absolute_url(image, media_base_url) for image in product.images],
            "Link3D": resolve(product.Link3D),
            "LinkAR": resolve(product.LinkAR),
            "LinkVideo": resolve(product.LinkVideo),
            "TechnicalSheet": resolve(product.TechnicalSheet),
        }
    )
