"""What a call costs at OpenAI: the tokens its responses used, by kind, priced by the settings.

Each `response.done` reports its usage. Cached input tokens are a subset of the input tokens and
are billed at the cached price, so the six kinds here are disjoint: every token is counted once,
in exactly one kind. The defaults of the price settings are OpenAI's published gpt-realtime
prices at the time of writing; a deployment on another model or after a price change sets them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from bot.settings import Settings

MODALITIES = ("text", "audio")
KINDS = ("input", "cached", "output")
# "text_input", "text_cached", ... "audio_output": the keys of every token count below.
TOKEN_KINDS = tuple(f"{modality}_{kind}" for modality in MODALITIES for kind in KINDS)
TOKENS_PER_PRICE_UNIT = 1_000_000


@dataclass(frozen=True, slots=True)
class Prices:
    """US dollars per million tokens of each kind."""

    per_million: Mapping[str, float]

    @classmethod
    def from_settings(cls, settings: Settings) -> Prices:
        return cls(
            {
                "text_input": settings.price_text_input_usd_per_1m,
                "text_cached": settings.price_text_cached_usd_per_1m,
                "text_output": settings.price_text_output_usd_per_1m,
                "audio_input": settings.price_audio_input_usd_per_1m,
                "audio_cached": settings.price_audio_cached_usd_per_1m,
                "audio_output": settings.price_audio_output_usd_per_1m,
            }
        )

    def cost_usd(self, tokens: Mapping[str, int]) -> float:
        """The estimated cost of these token counts (keys from TOKEN_KINDS)."""
        dollars_per_million = sum(tokens.get(kind, 0) * self.per_million[kind] for kind in TOKEN_KINDS)
        return dollars_per_million / TOKENS_PER_PRICE_UNIT


def tokens_by_kind(usage: Mapping[str, int]) -> dict[str, int]:
    """One response's usage (the counts `response.done` reports) as disjoint kinds.

    Where the cached tokens are not split into text and audio, they are shared out in proportion
    to the text and audio input, so their sum still matches.
    """
    text_in = usage.get("input_text_tokens", 0)
    audio_in = usage.get("input_audio_tokens", 0)
    cached_text = usage.get("input_cached_text_tokens")
    cached_audio = usage.get("input_cached_audio_tokens")
    if cached_text is None or cached_audio is None:
        cached = min(usage.get("input_cached_tokens", 0), text_in + audio_in)
        cached_text = round(cached * text_in / (text_in + audio_in)) if cached else 0
        cached_audio = cached - cached_text
    cached_text, cached_audio = min(cached_text, text_in), min(cached_audio, audio_in)
    return {
        "text_input": text_in - cached_text,
        "text_cached": cached_text,
        "text_output": usage.get("output_text_tokens", 0),
        "audio_input": audio_in - cached_audio,
        "audio_cached": cached_audio,
        "audio_output": usage.get("output_audio_tokens", 0),
    }


def add_up(counts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """Token counts of several responses (a whole call), kind by kind."""
    total = dict.fromkeys(TOKEN_KINDS, 0)
    for each in counts:
        for kind in TOKEN_KINDS:
            total[kind] += each.get(kind, 0)
    return total
