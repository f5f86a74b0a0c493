"""What a call costs: token counts by kind, priced by the settings (OpenAI's gpt-realtime prices)."""

from __future__ import annotations

import pytest

from bot.pricing import TOKEN_KINDS, Prices, add_up, tokens_by_kind
from bot.settings import load_settings

DEFAULT_PRICES = Prices.from_settings(load_settings({}, dotenv=None))


def test_the_default_prices_are_openais_published_gpt_realtime_prices() -> None:
    assert DEFAULT_PRICES.per_million == {
        "text_input": 4.0,
        "text_cached": 0.4,
        "text_output": 16.0,
        "audio_input": 32.0,
        "audio_cached": 0.4,
        "audio_output": 64.0,
    }


def test_cached_tokens_are_taken_out_of_the_input_they_belong_to() -> None:
    usage = {
        "input_text_tokens": 500,
        "input_audio_tokens": 200,
        "input_cached_tokens": 448,
        "input_cached_text_tokens": 400,
        "input_cached_audio_tokens": 48,
        "output_text_tokens": 30,
        "output_audio_tokens": 82,
    }
    assert tokens_by_kind(usage) == {
        "text_input": 100,
        "text_cached": 400,
        "text_output": 30,
        "audio_input": 152,
        "audio_cached": 48,
        "audio_output": 82,
    }


def test_cached_tokens_without_a_split_are_shared_in_proportion_and_still_add_up() -> None:
    usage = {"input_text_tokens": 500, "input_audio_tokens": 200, "input_cached_tokens": 448}
    tokens = tokens_by_kind(usage)
    assert (tokens["text_cached"], tokens["audio_cached"]) == (320, 128)
    assert sum(tokens[k] for k in ("text_input", "text_cached", "audio_input", "audio_cached")) == 700


def test_a_response_without_usage_costs_nothing() -> None:
    assert tokens_by_kind({}) == dict.fromkeys(TOKEN_KINDS, 0)
    assert DEFAULT_PRICES.cost_usd(tokens_by_kind({})) == 0


def test_one_minute_of_each_audio_direction_costs_what_the_price_list_says() -> None:
    # 600 audio tokens is about a minute of speech (10 per second) on either side.
    tokens = {"audio_input": 600, "audio_output": 600}
    assert DEFAULT_PRICES.cost_usd(tokens) == pytest.approx(600 * 32 / 1e6 + 600 * 64 / 1e6)


def test_a_calls_tokens_are_the_sum_of_its_responses() -> None:
    first = tokens_by_kind({"input_text_tokens": 10, "output_audio_tokens": 5})
    second = tokens_by_kind({"input_text_tokens": 7, "output_text_tokens": 2})
    expected = {**dict.fromkeys(TOKEN_KINDS, 0), "text_input": 17, "audio_output": 5, "text_output": 2}
    assert add_up([first, second]) == expected


def test_prices_come_from_the_settings() -> None:
    env = {"PRICE_AUDIO_OUTPUT_USD_PER_1M": "20", "PRICE_TEXT_INPUT_USD_PER_1M": "0.6"}
    settings = load_settings(env, dotenv=None)
    prices = Prices.from_settings(settings)
    assert prices.cost_usd({"audio_output": 1_000_000, "text_input": 1_000_000}) == pytest.approx(20.6)
