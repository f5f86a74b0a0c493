"""The catalog: loading and validation, forgiving search with filters, reloads that never break."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from bot.catalog import Catalog, CatalogError, main
from bot.products import Product, ProductsCollection
from bot.settings import SAMPLE_CATALOG_PATH

BIKE_KINDS = {
    "Road Bike": "Lightweight carbon frame road bike for fast group rides and racing.",
    "Mountain Bike": "Full suspension mountain bike for rough trails, with hydraulic disc brakes.",
    "Electric Bike": "Electric commuter bike with a removable battery and pedal assist for the city.",
    "Kids Bike": "Small bike for children learning to ride, with training wheels.",
    "Hybrid Bike": "Comfortable hybrid bike for commuting and weekend paths, upright position.",
}
BIKE_BRANDS = ("Velora", "Trailmark", "Cobalt")


def product(sku: str, name: str, **fields: Any) -> dict[str, Any]:
    """A seed-format product record with plausible defaults."""
    record: dict[str, Any] = {
        "sku": sku,
        "name": name,
        "brand": "Acme",
        "profilePic": f"{sku.lower()}_profile.jpg",
        "description": f"The {name}.",
        "price": 100.0,
        "rate": 4.0,
        "discount": 0,
        "images": [f"{sku.lower()}_front.jpg"],
        "Link3D": f"https://shop.example.com/3d/{sku}",
        "LinkAR": f"https://shop.example.com/ar/{sku}",
        "LinkVideo": f"https://shop.example.com/video/{sku}",
        "TechnicalSheet": f"https://shop.example.com/tech/{sku}.pdf",
        "FAQS": [{"question": "What is the warranty?", "answer": "2 years."}],
    }
    record.update(fields)
    return record


def bike_catalog() -> list[dict[str, Any]]:
    """Fifteen bicycles: five kinds by three brands, prices and ratings spread out."""
    records = []
    for k, (kind, description) in enumerate(BIKE_KINDS.items()):
        for b, brand in enumerate(BIKE_BRANDS):
            records.append(
                product(
                    f"BK-{k}{b}",
                    f"{brand} {['Aero', 'Ridge', 'Volt', 'Sprout', 'Metro'][k]} {b + 1} {kind}",
                    brand=brand,
                    description=description,
                    price=300.0 + 400 * k + 150 * b,
                    rate=3.5 + 0.5 * b,
                    discount=10 * b,
                    FAQS=[{"question": f"Is the {kind.lower()} assembled?", "answer": "Yes."}],
                )
            )
    return records


def write(path: Path, content: str | bytes, *, mtime_s: float) -> Path:
    """Write the file and pin its mtime, so a change is visible whatever the clock's resolution."""
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    os.utime(path, (mtime_s, mtime_s))
    return path


@pytest.fixture(scope="module")
def sample() -> Catalog:
    return Catalog.load(SAMPLE_CATALOG_PATH)


@pytest.fixture(scope="module")
def bikes(tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    path = tmp_path_factory.mktemp("bikes") / "bikes.json"
    path.write_text(json.dumps(bike_catalog()))
    return Catalog.load(path)


def test_the_sample_catalog_loads_every_product_without_issues(sample: Catalog) -> None:
    assert len(sample) == 43
    assert sample.issues == ()


def test_a_quiet_washer_for_a_big_family_finds_the_large_family_front_loader_first(
    sample: Catalog,
) -> None:
    hits = sample.search("a quiet washer for my big family")
    assert hits[0].product.sku == "WM-2024-X500"
    assert "large families" in hits[0].highlight
    assert all(hit.product.name.endswith("Washer") for hit in hits[:3])
    assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)


def test_a_misspelled_washing_machine_still_finds_washers(sample: Catalog) -> None:
    hits = sample.search("washin machine")
    assert len(hits) == 5
    assert all(hit.product.sku.startswith("WM-") for hit in hits)


def test_plural_and_stemmed_words_match(sample: Catalog) -> None:
    assert {hit.product.sku[:3] for hit in sample.search("dryers")} == {"DR-"}
    assert {hit.product.sku[:3] for hit in sample.search("refrigerators")} == {"RF-"}


def test_an_everyday_synonym_finds_the_catalog_word(sample: Catalog) -> None:
    assert {hit.product.sku[:3] for hit in sample.search("fridge")} == {"RF-"}


def test_max_price_filters_on_the_price_after_discount(sample: Catalog) -> None:
    hits = sample.search("washer", max_price=800)
    assert hits
    assert all(hit.product.price_after_discount <= 800 for hit in hits)
    # 899.99 with 15% off is 764.99: in range only because the discount counts.
    assert "WM-2024-X500" in {hit.product.sku for hit in hits}


def test_min_price_excludes_cheaper_products(sample: Catalog) -> None:
    hits = sample.search("washer", min_price=900)
    assert hits
    assert all(hit.product.price_after_discount >= 900 for hit in hits)


def test_brand_filter_ignores_case(sample: Catalog) -> None:
    hits = sample.search("washer", brand="kelvin")
    assert {hit.product.sku for hit in hits} == {"WM-2025-0004", "WM-2024-0006"}


def test_min_rating_keeps_only_well_rated_products(sample: Catalog) -> None:
    hits = sample.search("dryer", min_rating=4.7)
    assert {hit.product.sku for hit in hits} == {"DR-2024-0009", "DR-2025-0010", "DR-2024-0012"}


def test_limit_caps_the_number_of_hits(sample: Catalog) -> None:
    assert len(sample.search("washer", limit=2)) == 2
    assert len(sample.search("washer", limit=50)) == 7


def test_an_empty_or_nonsense_query_returns_nothing(sample: Catalog) -> None:
    assert sample.search("") == []
    assert sample.search("the of and") == []
    assert sample.search("xq zzvk") == []


def test_a_query_without_words_but_with_filters_lists_the_best_rated_matches(
    sample: Catalog,
) -> None:
    hits = sample.search("", brand="Kelvin", max_price=1000, limit=3)
    assert [hit.product.rate for hit in hits] == sorted((h.product.rate for h in hits), reverse=True)
    assert all(h.product.brand == "Kelvin" and h.product.price_after_discount <= 1000 for h in hits)


def test_highlights_are_speakable(sample: Catalog) -> None:
    for query in ("washer", "quiet dishwasher", "robot vacuum", "gas range", "air conditioner"):
        for hit in sample.search(query):
            assert hit.highlight
            assert "http" not in hit.highlight and hit.product.sku not in hit.highlight


def test_get_returns_products_in_request_order_and_the_unknown_skus(sample: Catalog) -> None:
    found, unknown = sample.get(["DR-2025-0010", "nope", "wm-2024-x500", "DR-2025-0010"])
    assert [p.sku for p in found] == ["DR-2025-0010", "WM-2024-X500"]
    assert unknown == ["nope"]


def test_a_second_product_family_is_searchable(bikes: Catalog) -> None:
    hits = bikes.search("electric bike to commute to work")
    assert hits[0].product.name.endswith("Electric Bike")
    assert bikes.search("mountian bike")[0].product.name.endswith("Mountain Bike")
    assert {h.product.name.split()[-2] for h in bikes.search("bicycle for my kid", limit=3)} == {
        "Kids"
    }


def test_filters_work_on_the_second_product_family(bikes: Catalog) -> None:
    hits = bikes.search("bike", brand="COBALT", max_price=1200, min_rating=4, limit=10)
    assert hits
    assert all(h.product.brand == "Cobalt" for h in hits)
    assert all(h.product.price_after_discount <= 1200 and h.product.rate >= 4 for h in hits)
    assert bikes.search("bike", min_rating=5) == []


def test_a_products_collection_document_is_accepted(tmp_path: Path) -> None:
    document = {
        "TextMessage": "x",
        "JsonData": {"jsonType": "ProductsCollection", "products": bike_catalog()[:2]},
    }
    path = tmp_path / "collection.json"
    path.write_text(json.dumps(document))
    assert len(Catalog.load(path)) == 2


def test_bad_records_are_reported_by_index_and_field_while_good_ones_load(tmp_path: Path) -> None:
    records = [
        product("A-1", "Good One"),
        product("A-2", "Bad Price", price="cheap"),
        {k: v for k, v in product("A-3", "No Name").items() if k != "name"},
        product("A-4", "Too Good", rate=7),
        "not a product",
        product("a-1", "Duplicate"),
        product("A-5", "Bad FAQ", FAQS=[{"question": "Q?"}]),
        product("A-6", "Good Two", discount=20),
    ]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(records))
    catalog = Catalog.load(path)
    assert len(catalog) == 2
    assert [(i.index, i.field) for i in catalog.issues] == [
        (1, "price"),
        (2, "name"),
        (3, "rate"),
        (4, "(record)"),
        (5, "sku"),
        (6, "FAQS.0.answer"),
    ]
    assert "duplicate" in catalog.issues[4].message


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ('[{"sku": "A-1", ', "not valid JSON"),
        ('{"products": []}', "expected a JSON list"),
        ("[]", "no valid product"),
        ('[{"sku": "A-1"}]', "no valid product"),
    ],
)
def test_an_unusable_file_is_rejected_with_its_path_and_reason(
    tmp_path: Path, content: str, reason: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(CatalogError) as caught:
        Catalog.load(path)
    assert str(path) in str(caught.value) and reason in str(caught.value)


def test_a_missing_file_fails_at_load(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="cannot read"):
        Catalog.load(tmp_path / "absent.json")


def test_price_after_discount_rounds_to_the_cent() -> None:
    assert Product.model_validate(product("X", "X", price=899.99, discount=15)).price_after_discount == 764.99
    assert Product.model_validate(product("X", "X", price=10.005, discount=0)).price_after_discount == 10.01


def test_a_products_collection_dumps_exactly_the_seed_keys() -> None:
    record = product("X-1", "Thing")
    collection = ProductsCollection.model_validate(
        {"TextMessage": "hi", "JsonData": {"jsonType": "ProductsCollection", "products": [record]}}
    )
    dumped = json.loads(collection.model_dump_json())
    assert dumped == {
        "TextMessage": "hi",
        "JsonData": {"jsonType": "ProductsCollection", "products": [record]},
    }


def test_reload_picks_up_a_changed_file(tmp_path: Path) -> None:
    path = write(tmp_path / "c.json", json.dumps(bike_catalog()), mtime_s=1_000)
    catalog = Catalog.load(path)
    assert catalog.reload_if_changed() is False
    write(path, json.dumps([product("TV-1", "Cinema 65 OLED Television")]), mtime_s=2_000)
    assert catalog.reload_if_changed() is True
    assert [h.product.sku for h in catalog.search("television")] == ["TV-1"]
    assert catalog.search("bike") == []


def test_a_file_rewritten_with_the_same_content_is_not_reloaded(tmp_path: Path) -> None:
    content = json.dumps(bike_catalog())
    path = write(tmp_path / "c.json", content, mtime_s=1_000)
    catalog = Catalog.load(path)
    write(path, content, mtime_s=2_000)
    assert catalog.reload_if_changed() is False


@pytest.mark.parametrize("broken", ["[{", "[]", '{"JsonData": 1}', None])
def test_a_broken_or_missing_file_on_reload_keeps_the_last_good_catalog(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, broken: str | None
) -> None:
    path = write(tmp_path / "c.json", json.dumps(bike_catalog()), mtime_s=1_000)
    catalog = Catalog.load(path)
    if broken is None:
        path.unlink()
    else:
        write(path, broken, mtime_s=2_000)
    with caplog.at_level(logging.ERROR, logger="bot.catalog"):
        assert catalog.reload_if_changed() is False
        assert catalog.reload_if_changed() is False
    assert len(catalog) == 15 and catalog.search("mountain bike")
    rejected = [r for r in caplog.records if "still serving the last good catalog" in r.getMessage()]
    assert len(rejected) == 1


def test_a_fixed_file_after_a_broken_one_is_loaded(tmp_path: Path) -> None:
    path = write(tmp_path / "c.json", json.dumps(bike_catalog()), mtime_s=1_000)
    catalog = Catalog.load(path)
    write(path, "[{", mtime_s=2_000)
    assert catalog.reload_if_changed() is False
    write(path, json.dumps([product("TV-1", "Cinema Television")]), mtime_s=3_000)
    assert catalog.reload_if_changed() is True
    assert len(catalog) == 1


def test_searches_from_many_threads_survive_reloads(tmp_path: Path) -> None:
    versions = [json.dumps(bike_catalog()), json.dumps(bike_catalog()[:5])]
    path = write(tmp_path / "c.json", versions[0], mtime_s=1_000)
    catalog = Catalog.load(path)
    errors: list[BaseException] = []
    stop = threading.Event()

    def search_forever() -> None:
        try:
            while not stop.is_set():
                assert catalog.search("road bike")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=search_forever) for _ in range(3)]
    for thread in threads:
        thread.start()
    for n in range(20):
        write(path, versions[(n + 1) % 2], mtime_s=2_000 + n)
        assert catalog.reload_if_changed() is True
    stop.set()
    for thread in threads:
        thread.join()
    assert errors == []


@pytest.mark.parametrize("command", ["check", "import"])
def test_cli_check_prints_one_line_per_bad_record_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    path = tmp_path / "mixed.json"
    records = [
        product("A-1", "Good"),
        product("A-2", "Bad", rate=9, price=-1),
        product("A-3", "Bad Too", discount="10%"),
    ]
    path.write_text(json.dumps(records))
    assert main([command, str(path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"{path}: 1 product load, 2 records skipped",
        "record 1 (sku 'A-2'): price: Input should be greater than or equal to 0; "
        "rate: Input should be less than or equal to 5",
        "record 2 (sku 'A-3'): discount: Input should be a valid number",
    ]


def test_cli_check_of_a_clean_catalog_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(SAMPLE_CATALOG_PATH)]) == 0
    assert capsys.readouterr().out == f"{SAMPLE_CATALOG_PATH}: 43 products load, 0 records skipped\n"


def test_the_load_log_counts_skipped_records_not_field_issues(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "mixed.json"
    records = [
        product("A-1", "Good"),
        product("A-2", "Bad", rate=9, price=-1),
        product("A-3", "Bad", price=-2),
    ]
    path.write_text(json.dumps(records))
    Catalog.load(path)
    [record] = [r for r in caplog.records if r.getMessage().startswith("catalog loaded")]
    assert (record.products, record.skipped) == (1, 2)  # type: ignore[attr-defined]
    assert record.getMessage().startswith("catalog loaded, 2 records skipped (first: record 1 (sku 'A-2'):")


def test_cli_import_fails_on_an_unusable_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.json"
    path.write_text("not json")
    assert main(["import", str(path)]) == 1
    assert str(path) in capsys.readouterr().err


def test_cli_search_prints_ranked_results_with_price_after_discount(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["search", "large washer", "--catalog", str(SAMPLE_CATALOG_PATH), "--max-price", "800"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(" 1. SmartWash Pro 500 Front Load Washer | CleanTech | $764.99 | 4.7/5")
    assert "WM-2024-X500" in lines[0]
