"""The README as a user follows it: its commands run as written and its reference tables are true.

The simulator walkthrough runs in bash exactly as printed, in a fresh environment holding only
PATH and what the README exports, from a folder where its relative paths resolve. Only its
three port numbers are swapped for free ones, so the test cannot collide with anything else
listening on this machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from store_files import garden_catalog, new_webhook_secret

from bot.catalog import check_file
from bot.products import Product
from bot.settings import MAKE_WEBHOOK_SECRET, SAMPLE_CATALOG_PATH, Settings, load_settings
from bot.stores import StoreConfig, Stores

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")
WALKTHROUGH_PORTS = ("8001", "8002", "5052")
WALKTHROUGH_TIMEOUT_S = 240
# Log fields whose values differ from call to call: the README's line must have them, any value.
PER_CALL_FIELDS = {"ts", "call_sid", "stream_sid", "message_id", "sid", "response_id", "duration_s"}


def section(heading: str) -> str:
    """The README's text from `heading` to the next heading of the same or a higher level."""
    level = heading.split(" ", 1)[0]
    start = README.index(f"\n{heading}\n")
    following = re.compile(rf"^#{{1,{len(level)}}} ", re.M)
    found = following.search(README, start + len(heading) + 2)
    return README[start : found.start() if found else len(README)]


def code_blocks(text: str, language: str = r"\w*") -> list[str]:
    """The fenced blocks in `text` (only those marked `language`, when given)."""
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


@dataclass(frozen=True)
class Walkthrough:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Walkthrough]:
    if shutil.which("curl") is None or shutil.which("bash") is None:
        pytest.skip("the README's simulator walkthrough needs bash and curl: install them")
    script = code_blocks(section("## Simulators on their own"), "sh")[0]
    for port in WALKTHROUGH_PORTS:
        script = re.sub(rf"\b{port}\b", free_port(), script)
    folder = tmp_path_factory.mktemp("walkthrough")
    (folder / "bot").symlink_to(REPO / "bot", target_is_directory=True)
    tools = folder / "tools"
    tools.mkdir()
    (tools / "python3").symlink_to(sys.executable)
    system_dirs = {str(Path(shutil.which(name) or "/usr/bin/x").parent) for name in ("bash", "curl")}
    (folder / "walkthrough.sh").write_text(script)
    shell = subprocess.Popen(
        ["bash", "-e", "walkthrough.sh"],
        cwd=folder,
        env={"PATH": os.pathsep.join([str(tools), *sorted(system_dirs)]), "HOME": str(folder)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = shell.communicate(timeout=WALKTHROUGH_TIMEOUT_S)
    finally:
        # A failed step leaves the background simulators and bot running: stop the whole group.
        try:
            os.killpg(shell.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        shell.wait(timeout=30)
    yield Walkthrough(shell.returncode, stdout, stderr)


def test_the_simulator_walkthrough_runs_as_written_and_its_calls_complete(walkthrough: Walkthrough) -> None:
    assert walkthrough.returncode == 0, walkthrough.stdout + walkthrough.stderr
    assert "2/2 calls completed" in walkthrough.stdout
    health = json.loads(next(line for line in walkthrough.stdout.splitlines() if line.startswith("{")))
    features = health["features"]
    assert features == {**dict.fromkeys(features, True), "webhook": False, "transfer": False}
    # Both callers were texted: the Twilio simulator accepted the account the bot was given.
    assert len(re.findall(r"^SMS SM\w+ to \*\*\*0001 from \+15550001111:", walkthrough.stdout, re.M)) == 2
    assert "Traceback" not in walkthrough.stderr


def bot_log_lines(stderr: str) -> list[dict[str, Any]]:
    lines = []
    for raw in stderr.splitlines():
        if raw.startswith("{"):
            entry = json.loads(raw)
            if str(entry.get("logger", "")).startswith("bot."):
                lines.append(entry)
    return lines


def matches(shown: dict[str, Any], logged: dict[str, Any]) -> bool:
    return all(
        key in logged and (key in PER_CALL_FIELDS or logged[key] == value) for key, value in shown.items()
    )


def test_the_first_call_log_lines_in_the_guide_are_what_the_bot_logs_in_that_order(
    walkthrough: Walkthrough,
) -> None:
    [block] = code_blocks(section("### 6. The first call, in the logs"))
    shown = [json.loads(line) for line in block.splitlines()]
    logged = bot_log_lines(walkthrough.stderr)
    call_sid = next(entry["call_sid"] for entry in logged if entry["msg"] == "incoming call")
    one_call = [entry for entry in logged if entry.get("call_sid", call_sid) == call_sid]
    remaining = iter(one_call)
    for line in shown:
        assert any(matches(line, entry) for entry in remaining), f"not logged (in this order): {line}"


def test_the_bot_logs_each_event_once_without_terminal_colours(walkthrough: Walkthrough) -> None:
    logged = bot_log_lines(walkthrough.stderr)
    assert [entry["msg"] for entry in logged].count("catalog loaded") == 1
    tool_runs = [(e["call_sid"], e["tool"]) for e in logged if e["msg"] == "tool ran"]
    assert sorted(set(tool_runs)) == sorted(tool_runs) and len(tool_runs) == 4
    assert "color_message" not in walkthrough.stderr and "\\u001b" not in walkthrough.stderr


# --- reference sections ------------------------------------------------------------------------


def test_every_setting_in_the_configuration_table_is_one_the_bot_reads_and_vice_versa() -> None:
    documented = set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)`", section("## Configuration"), re.M))
    assert documented == {field.alias for field in Settings.model_fields.values()}


def test_every_setting_the_guides_set_is_documented() -> None:
    table = set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)`", section("## Configuration"), re.M))
    guides = section("## Simulators on their own") + section("## Connect a real phone number")
    assigned = set(re.findall(r"^(?:export )?([A-Z][A-Z0-9_]+)=", "\n".join(code_blocks(guides)), re.M))
    assert assigned and assigned <= table


def test_the_catalog_format_table_lists_every_product_field_and_which_are_required() -> None:
    rows = re.findall(r"^\| (`[^|]+`) \| [^|]+ \| (yes|no[^|]*) \|", section("## Catalog format"), re.M)
    documented = {
        name: required == "yes" for names, required in rows for name in re.findall(r"`(\w+)`", names)
    }
    fields = {name: field.is_required() for name, field in Product.model_fields.items()}
    assert documented == fields


def test_the_catalog_example_is_a_product_that_checks_clean(tmp_path: Path) -> None:
    [example] = code_blocks(section("## Catalog format"), "json")
    product = Product.model_validate(json.loads(example))
    assert (product.price_after_discount, product.discount) == (764.99, 15)
    catalog = tmp_path / "catalog.json"
    catalog.write_text(f"[{example}]")
    assert check_file(catalog) == 0


def test_the_guides_webhook_secret_recipe_is_the_one_the_bot_suggests() -> None:
    assert MAKE_WEBHOOK_SECRET in section("### 3. Settings for a first call")


@pytest.mark.parametrize("name", ["fallback.xml", "fallback_dial.xml"])
def test_the_fallback_documents_for_a_twiml_bin_are_twiml(name: str) -> None:
    text = (REPO / "twiml" / name).read_text(encoding="utf-8")
    root = ET.fromstring(text)
    assert root.tag == "Response"
    assert [verb.tag for verb in root][-1] == "Hangup"
    placeholders = re.findall(r"\$\{\w+\}", text)
    assert placeholders == ([] if name == "fallback.xml" else ["${store_phone_number}"])
    console = section("### 4. Configure the number in the Twilio console")
    for placeholder in placeholders:
        assert f"`{placeholder}` replaced by the store's number" in console


def test_the_stores_example_loads_as_the_stores_it_describes(tmp_path: Path) -> None:
    [example] = code_blocks(section("## Stores"), "json")
    (tmp_path / "catalogs").mkdir()
    shutil.copy(SAMPLE_CATALOG_PATH, tmp_path / "catalogs" / "appliances.json")
    (tmp_path / "catalogs" / "garden.json").write_text(json.dumps(garden_catalog()))
    (tmp_path / "stores.json").write_text(example)
    settings = load_settings({"STORES_PATH": str(tmp_path / "stores.json")}, dotenv=None)
    stores = Stores.load(settings, environ={"DOWNTOWN_WEBHOOK_SECRET": new_webhook_secret()})
    downtown, jardin = stores.for_number("+15557650002"), stores.for_number("+15557650004")
    assert (downtown.id, jardin.id, jardin.language) == ("downtown", "jardin", "es")
    friday_night = datetime(2025, 6, 13, 20, 30, tzinfo=ZoneInfo("America/New_York"))
    assert downtown.is_open(friday_night)
    assert downtown.transfer_to(friday_night.replace(hour=22)) == "+15557650299", "the after-hours line"
    documented = set(re.findall(r"^\| `(\w+)`", section("## Stores"), re.M)) | {"webhook_secret_env"}
    assert documented == set(StoreConfig.model_fields)
