"""What `python -m bot demo` prints: whole words, and a script whose words match what it sends."""

from __future__ import annotations

from bot.catalog import Catalog
from bot.settings import SAMPLE_CATALOG_PATH
from bot.sim.demo import _call_update, shorten
from bot.sim.realtime import Scenario

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}


def test_a_long_line_is_cut_between_words_with_an_ellipsis() -> None:
    text = "Best matches: the Aurora Essential 800 Compact Washer, $525.59, capacity and quiet motor"
    cut = shorten(text, 40)
    assert len(cut) <= 40
    assert cut.endswith(" …")
    assert text.startswith(cut.removesuffix(" …"))
    assert text[len(cut.removesuffix(" …"))] == " "


def test_a_short_line_is_left_whole() -> None:
    assert shorten("Status=completed", 40) == "Status=completed"


def test_a_twiml_update_is_shown_without_its_xml_declaration_and_cut_at_a_word() -> None:
    twiml = (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Response>\n  <Say>Connecting you to a person.</Say>\n'
        '  <Dial timeout="25">+15557654321</Dial>\n  <Say>Sorry, nobody could take your call. '
        "Please call again later. Goodbye.</Say>\n</Response>"
    )
    line = _call_update({"Twiml": twiml})
    assert line.startswith("new TwiML <Response> <Say>Connecting you to a person.</Say>")
    assert line.endswith(" …")
    assert "<?xml" not in line


def test_the_washers_scenario_names_exactly_the_products_it_texts() -> None:
    scenario = Scenario.from_json("washers")
    catalog = Catalog.load(SAMPLE_CATALOG_PATH)
    texted = 0
    for offer, confirm in zip(scenario.turns, scenario.turns[1:], strict=False):
        for call in confirm.tool_calls:
            if call.name != "send_product_details":
                continue
            products, unknown = catalog.get(call.arguments["skus"])
            assert unknown == []
            assert f"the {NUMBER_WORDS[len(products)]} " in offer.say
            for product in products:
                short_name = " ".join(product.name.split()[:3])  # "Aurora Plus 600"
                assert short_name in confirm.say
            assert "both" not in confirm.say and "all" not in confirm.say.split()
            texted += 1
    assert texted == 1
