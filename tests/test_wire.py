"""The decoding rules every edge shares: bounded JSON, ASCII-digit counts, strict base64."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bot.wire import (
    MAX_DIGITS,
    JsonFault,
    decode_base64,
    load_json,
    nesting_depth,
    parse_count,
    parse_digits,
)

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=30,
)


def test_a_small_document_decodes() -> None:
    assert load_json('{"event": "media", "n": [1, 2]}', max_chars=100, max_depth=4) == {
        "event": "media",
        "n": [1, 2],
    }


def test_nesting_past_the_bound_is_refused_before_decoding() -> None:
    deep = "[" * 2000 + "]" * 2000
    assert load_json(deep, max_chars=10_000, max_depth=8) == JsonFault("too_deep", "nested deeper than 8")


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    text = json.dumps({"text": '[[[[{{{{ \\" ]]]] [[[[' * 10, "n": [[1]]})
    assert nesting_depth(text) == 3
    assert load_json(text, max_chars=10_000, max_depth=3) == json.loads(text)


def test_a_document_longer_than_the_bound_is_refused() -> None:
    fault = load_json('"' + "a" * 100 + '"', max_chars=50, max_depth=4)
    assert isinstance(fault, JsonFault) and fault.kind == "too_large"


@pytest.mark.parametrize("text", ["", "{", "nope", '{"a": 1e5000000000}x', "1" * 5000])
def test_what_is_not_json_is_a_fault_value(text: str) -> None:
    fault = load_json(text, max_chars=100_000, max_depth=8)
    assert isinstance(fault, JsonFault) and fault.kind == "not_json"


WHITESPACE = st.text(alphabet=" \t\n\r\x0b\u00a0\ufeff", max_size=3)


@given(JSON_VALUES, WHITESPACE, WHITESPACE, st.sampled_from(["", "x", "}", "0", '""']))
def test_a_text_decodes_exactly_as_json_loads_decodes_it(
    value: object, before: str, after: str, extra: str
) -> None:
    """The fast path (the scanner called directly) and `json.loads` agree on every text: the
    same value, or a fault where `json.loads` raises (BOM, stray whitespace, trailing data)."""
    text = before + json.dumps(value) + after + extra
    try:
        expected: object = json.loads(text)
    except ValueError:
        expected = "not_json"
    got = load_json(text, max_chars=100_000, max_depth=100)
    assert (got.kind if isinstance(got, JsonFault) else got) == expected


@pytest.mark.parametrize(
    "text",
    ['"' + '\\"' * 30_000, "[" + '"\\' * 30_000, '"' * 60_000, "[" * 30_000 + '"' + "]" * 30_000],
    ids=["escaped-quotes-unterminated", "dangling-escapes", "only-quotes", "brackets-around-a-quote"],
)
def test_the_nesting_scan_stays_linear_on_hostile_text(text: str) -> None:
    started = time.perf_counter()
    load_json(text, max_chars=100_000, max_depth=8)
    assert time.perf_counter() - started < 0.5


@given(JSON_VALUES)
def test_the_nesting_depth_of_any_json_document_is_its_real_depth(value: object) -> None:
    def depth(v: object) -> int:
        if isinstance(v, list):
            return 1 + max(map(depth, v), default=0)
        if isinstance(v, dict):
            return 1 + max(map(depth, v.values()), default=0)
        return 0

    assert nesting_depth(json.dumps(value)) == depth(value)


@pytest.mark.parametrize(
    ("text", "value"),
    [("0", 0), ("40", 40), ("9" * MAX_DIGITS, int("9" * MAX_DIGITS))],
)
def test_ascii_digits_are_a_count(text: str, value: int) -> None:
    assert parse_digits(text) == value


@pytest.mark.parametrize(
    "text",
    ["", "²", "1²", "٣", "\uff11\uff12", "-1", "+1", " 1", "1.0", "1e3", "9" * (MAX_DIGITS + 1), "0x10"],
)
def test_anything_but_ascii_digits_is_not_a_count(text: str) -> None:
    assert parse_digits(text) is None


@pytest.mark.parametrize(
    ("value", "count"),
    [(8000, 8000), ("8000", 8000), (0, 0)],
)
def test_json_counts_are_integers_or_digit_strings(value: object, count: int) -> None:
    assert parse_count(value) == count


@pytest.mark.parametrize(
    "value",
    [True, False, None, 8000.0, float("nan"), float("inf"), -1, 10**400, [8000], {"n": 1}, "²"],
)
def test_other_json_values_are_not_counts(value: object) -> None:
    assert parse_count(value) is None


@pytest.mark.parametrize("text", ["éAAA", "AAA", "A===", "AA AA", "////\n", "\x00AAA"])
def test_non_ascii_or_malformed_base64_is_none_not_an_exception(text: str) -> None:
    assert decode_base64(text) is None


def test_strict_base64_decodes() -> None:
    assert decode_base64("AAEC") == b"\x00\x01\x02"
