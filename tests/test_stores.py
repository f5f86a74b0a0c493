"""STORES_PATH: the chain's stores by dialled number, checked at start-up, reloaded while serving."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from store_files import (
    GARDEN_SKUS,
    appliance_store,
    garden_catalog,
    new_webhook_secret,
    write_garden_catalog,
    write_stores,
)

from bot.settings import SAMPLE_CATALOG_PATH, Settings, load_settings
from bot.stores import DEFAULT_STORE_ID, Stores, StoresError
from bot.tools import phone_agent

DOWNTOWN = "+15557650002"
GARDEN = "+15557650003"
ELSEWHERE = "+15557659999"
NEW_YORK = ZoneInfo("America/New_York")
# A Wednesday.
WEDNESDAY_NOON = datetime(2025, 6, 11, 12, 0, tzinfo=NEW_YORK)
WEDNESDAY_NIGHT = datetime(2025, 6, 11, 22, 30, tzinfo=NEW_YORK)
HOURS = {"timezone": "America/New_York", "monday": "09:00-18:00", "wednesday": ["09:00-13:00", "14:00-19:00"]}


def settings_for(stores_path: Path | None, **env: str) -> Settings:
    values = {"STORE_PHONE_NUMBER": "+15557654321", "TWILIO_FROM_NUMBER": "+15550001111", **env}
    if stores_path is not None:
        values["STORES_PATH"] = str(stores_path)
    return load_settings(values, dotenv=None)


def garden_store(folder: Path, **fields: object) -> dict[str, object]:
    """The Spanish garden center, on garden.json in `folder` (written the first time)."""
    catalog = folder / "garden.json"
    if not catalog.exists():
        write_garden_catalog(folder)
    return {
        "name": "Green Thumb Garden Center",
        "numbers": [GARDEN],
        "language": "es",
        "catalog": catalog.name,
        "greeting": "Gracias por llamar a Green Thumb.",
        "transfer_number": "+15557650100",
        "sms_from": "+15550002222",
        "webhook_url": "https://garden.example.com/hooks",
        "webhook_secret": new_webhook_secret(),
        "voice": "cedar",
        **fields,
    }


def test_each_dialled_number_reaches_its_store_and_any_other_number_the_default_store(tmp_path: Path) -> None:
    path = write_stores(
        tmp_path / "stores.json",
        {"downtown": appliance_store(DOWNTOWN), "garden": garden_store(tmp_path)},
    )
    stores = Stores.load(settings_for(path))
    garden = stores.for_number(GARDEN)
    assert (garden.id, garden.name, garden.language, garden.voice) == (
        "garden", "Green Thumb Garden Center", "es", "cedar"
    )
    assert {hit.product.sku for hit in garden.catalog.search("lawn mower")[:2]} == set(GARDEN_SKUS[:2])
    assert garden.catalog.search("washing machine") == []
    assert stores.for_number(DOWNTOWN).id == "downtown"
    default = stores.for_number(ELSEWHERE)
    assert default.id == DEFAULT_STORE_ID and default is stores.default
    assert (default.transfer_number, default.sms_from) == ("+15557654321", "+15550001111")


def test_a_store_without_its_own_numbers_or_call_center_uses_the_deployments(tmp_path: Path) -> None:
    secret = new_webhook_secret()
    path = write_stores(tmp_path / "stores.json", {"downtown": appliance_store(DOWNTOWN)})
    settings = settings_for(path, WEBHOOK_URL="https://hq.example.com/hooks", WEBHOOK_SECRET=secret)
    downtown = Stores.load(settings).for_number(DOWNTOWN)
    assert (downtown.transfer_number, downtown.sms_from) == ("+15557654321", "+15550001111")
    assert downtown.voice == "marin"
    assert (downtown.webhook_url, downtown.webhook_secret) == ("https://hq.example.com/hooks", secret)
    assert downtown.language == "en"


def test_a_toml_file_says_the_same_as_json(tmp_path: Path) -> None:
    write_garden_catalog(tmp_path)
    toml = tmp_path / "stores.toml"
    toml.write_text(
        f"""
[stores.garden]
name = "Green Thumb Garden Center"
numbers = ["{GARDEN}"]
language = "es"
catalog = "garden.json"

[stores.garden.hours]
timezone = "America/New_York"
wednesday = ["09:00-13:00", "14:00-19:00"]
"""
    )
    garden = Stores.load(settings_for(toml)).for_number(GARDEN)
    assert garden.language == "es" and len(garden.catalog) == len(garden_catalog())
    assert garden.hours is not None and garden.is_open(WEDNESDAY_NOON)


def test_stores_on_one_catalog_file_share_one_loaded_catalog(tmp_path: Path) -> None:
    path = write_stores(
        tmp_path / "stores.json",
        {
            "downtown": appliance_store(DOWNTOWN),
            "uptown": appliance_store("+15557650004", name="Appliance World Uptown"),
            "mall": {"name": "Appliance World Mall", "numbers": ["+15557650005"]},
        },
    )
    stores = Stores.load(settings_for(path, CATALOG_PATH=str(SAMPLE_CATALOG_PATH)))
    catalogs = {id(store.catalog) for store in stores.all()}
    assert len(catalogs) == 1, "the default store, two stores naming the file, one inheriting it"


def test_every_bad_store_is_one_line_naming_the_store_and_what_is_wrong(tmp_path: Path) -> None:
    path = write_stores(
        tmp_path / "stores.json",
        {
            "downtown": appliance_store(DOWNTOWN),
            "bad-number": appliance_store("5551234"),
            "typo": {**appliance_store("+15557650006"), "langauge": "es"},
            "no-catalog": appliance_store("+15557650007", catalog="missing.json"),
            "half-call-center": appliance_store("+15557650008", webhook_url="https://x.example.com/h"),
            "bad-hours": appliance_store(
                "+15557650009", hours={"timezone": "Mars/Olympus", "monday": "18:00-09:00"}
            ),
            "twin": appliance_store(DOWNTOWN),
            "Not An Id": appliance_store("+15557650010"),
        },
    )
    with pytest.raises(StoresError) as raised:
        Stores.load(settings_for(path))
    lines = str(raised.value).splitlines()
    assert all(line.startswith(f"STORES_PATH {path}: store ") for line in lines)
    by_store = {line.split("'")[1]: line for line in lines}
    assert set(by_store) == {
        "bad-number", "typo", "no-catalog", "half-call-center", "bad-hours", "twin", "Not An Id"
    }  # fmt: skip
    assert "numbers.0: must be an E.164 number" in by_store["bad-number"]
    assert "langauge: not a store setting" in by_store["typo"]
    assert "catalog: cannot read" in by_store["no-catalog"] and "missing.json" in by_store["no-catalog"]
    assert "webhook_url and its secret" in by_store["half-call-center"]
    assert "Mars/Olympus" in by_store["bad-hours"] and "ends before it starts" in by_store["bad-hours"]
    assert f"number {DOWNTOWN} is also store 'downtown'" in by_store["twin"]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "not valid JSON"),
        ('{"shops": {}}', 'expected {"stores"'),
        ('{"stores": {}}', "the file lists no store"),
    ],
)
def test_a_file_that_is_not_a_stores_file_says_so(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "stores.json"
    path.write_text(content)
    with pytest.raises(StoresError, match=problem):
        Stores.load(settings_for(path))


def test_a_webhook_secret_can_come_from_the_environment(tmp_path: Path) -> None:
    secret = new_webhook_secret()
    store = appliance_store(
        DOWNTOWN, webhook_url="https://a.example.com/h", webhook_secret_env="DOWNTOWN_SECRET"
    )
    path = write_stores(tmp_path / "stores.json", {"downtown": store})
    downtown = Stores.load(settings_for(path), environ={"DOWNTOWN_SECRET": secret}).for_number(DOWNTOWN)
    assert downtown.webhook_secret == secret
    with pytest.raises(StoresError, match="DOWNTOWN_SECRET is not set"):
        Stores.load(settings_for(path), environ={})


def test_without_stores_path_there_is_only_the_default_store_in_store_language() -> None:
    stores = Stores.load(settings_for(None, STORE_LANGUAGE="es"))
    assert [store.id for store in stores.all()] == [DEFAULT_STORE_ID]
    assert stores.for_number(DOWNTOWN).language == "es"


# --- opening hours ------------------------------------------------------------------------


def test_opening_hours_are_read_in_the_stores_time_zone(tmp_path: Path) -> None:
    path = write_stores(tmp_path / "stores.json", {"downtown": appliance_store(DOWNTOWN, hours=HOURS)})
    downtown = Stores.load(settings_for(path)).for_number(DOWNTOWN)
    assert downtown.is_open(WEDNESDAY_NOON)
    assert not downtown.is_open(WEDNESDAY_NOON.replace(hour=13, minute=30)), "the lunch break"
    assert not downtown.is_open(WEDNESDAY_NIGHT)
    assert downtown.is_open(WEDNESDAY_NOON.astimezone(ZoneInfo("Asia/Tokyo"))), "the same moment elsewhere"


def test_the_agent_is_told_the_hours_and_whether_the_store_is_open_now(tmp_path: Path) -> None:
    path = write_stores(tmp_path / "stores.json", {"downtown": appliance_store(DOWNTOWN, hours=HOURS)})
    downtown = Stores.load(settings_for(path)).for_number(DOWNTOWN)
    open_now = phone_agent(downtown, WEDNESDAY_NOON).instructions
    assert "Monday 09:00 to 18:00; Tuesday closed; Wednesday 09:00 to 13:00, 14:00 to 19:00" in open_now
    assert "The store is open now, until 13:00 today." in open_now
    closed = phone_agent(downtown, WEDNESDAY_NIGHT).instructions
    assert "The store is closed now; it opens again on Monday at 09:00." in closed
    assert "The store is Appliance World Downtown." in closed


def test_outside_hours_a_transfer_goes_to_the_after_hours_line_or_nowhere(tmp_path: Path) -> None:
    night_line = "+15557650199"
    path = write_stores(
        tmp_path / "stores.json",
        {
            "downtown": appliance_store(DOWNTOWN, hours=HOURS, after_hours_transfer=night_line),
            "garden": garden_store(tmp_path, hours=HOURS),
        },
    )
    stores = Stores.load(settings_for(path))
    downtown, garden = stores.get("downtown"), stores.get("garden")
    assert downtown is not None and garden is not None
    assert downtown.transfer_to(WEDNESDAY_NOON) == "+15557654321"
    assert downtown.transfer_to(WEDNESDAY_NIGHT) == night_line
    assert garden.transfer_to(WEDNESDAY_NOON) == "+15557650100"
    assert garden.transfer_to(WEDNESDAY_NIGHT) is None


def test_a_spanish_store_is_told_its_hours_in_spanish(tmp_path: Path) -> None:
    path = write_stores(tmp_path / "stores.json", {"garden": garden_store(tmp_path, hours=HOURS)})
    agent = phone_agent(Stores.load(settings_for(path)).for_number(GARDEN), WEDNESDAY_NIGHT)
    assert "Horario: lunes de 09:00 a 18:00; martes cerrado" in agent.instructions
    assert "vuelve a abrir el lunes a las 09:00" in agent.instructions
    assert agent.transcription_language == "es" and agent.voice == "cedar"


# --- while serving ------------------------------------------------------------------------


def test_an_edit_is_picked_up_and_a_store_already_handed_out_keeps_its_values(tmp_path: Path) -> None:
    path = write_stores(tmp_path / "stores.json", {"downtown": appliance_store(DOWNTOWN)}, mtime_s=1_000)
    stores = Stores.load(settings_for(path))
    on_a_call = stores.for_number(DOWNTOWN)
    edited = {
        "downtown": appliance_store(DOWNTOWN, greeting="Welcome to the new Downtown!"),
        "garden": garden_store(tmp_path),
    }
    write_stores(path, edited, mtime_s=2_000)
    assert stores.reload_if_changed() is True
    assert stores.for_number(DOWNTOWN).greeting == "Welcome to the new Downtown!"
    assert stores.for_number(GARDEN).id == "garden"
    assert on_a_call.greeting is None
    assert stores.reload_if_changed() is False, "nothing changed since"


def test_a_bad_edit_keeps_the_last_good_stores_and_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_stores(tmp_path / "stores.json", {"downtown": appliance_store(DOWNTOWN)}, mtime_s=1_000)
    stores = Stores.load(settings_for(path))
    write_stores(path, {"downtown": appliance_store("not a number")}, mtime_s=2_000)
    with caplog.at_level(logging.ERROR, logger="bot.stores"):
        assert stores.reload_if_changed() is False
        assert stores.reload_if_changed() is False
    assert stores.for_number(DOWNTOWN).id == "downtown"
    [line] = [r.getMessage() for r in caplog.records]
    assert "still serving the last good stores" in line and "store 'downtown': numbers.0" in line


def test_an_edit_reuses_loaded_catalogs_and_loads_a_new_one_once(tmp_path: Path) -> None:
    path = write_stores(tmp_path / "stores.json", {"downtown": appliance_store(DOWNTOWN)}, mtime_s=1_000)
    stores = Stores.load(settings_for(path))
    appliances = stores.for_number(DOWNTOWN).catalog
    edited = {
        "downtown": appliance_store(DOWNTOWN),
        "garden": garden_store(tmp_path),
        "garden-2": garden_store(tmp_path, numbers=["+15557650011"]),
    }
    write_stores(path, edited, mtime_s=2_000)
    assert stores.reload_if_changed()
    assert stores.for_number(DOWNTOWN).catalog is appliances
    assert stores.for_number(GARDEN).catalog is stores.for_number("+15557650011").catalog


@pytest.mark.anyio
async def test_watch_reloads_the_stores_file_and_each_catalog_on_its_own(tmp_path: Path) -> None:
    path = write_stores(tmp_path / "stores.json", {"garden": garden_store(tmp_path)}, mtime_s=1_000)
    stores = Stores.load(settings_for(path))
    garden_file = tmp_path / "garden.json"
    watcher = asyncio.create_task(stores.watch(interval_s=0.01))
    try:
        garden_file.write_text(json.dumps(garden_catalog()[:2]))
        os.utime(garden_file, (2_000, 2_000))
        write_stores(path, {"garden": garden_store(tmp_path, greeting="Hola de nuevo.")}, mtime_s=2_000)
        for _ in range(500):
            store = stores.for_number(GARDEN)
            if store.greeting == "Hola de nuevo." and len(store.catalog) == 2:
                break
            await asyncio.sleep(0.01)
    finally:
        watcher.cancel()
    store = stores.for_number(GARDEN)
    assert store.greeting == "Hola de nuevo." and len(store.catalog) == 2
    assert len(stores.default.catalog) == 43, "the other catalog is untouched"
