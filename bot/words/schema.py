"""What one language's words are: the fields each bot/words/<language>.py fills in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Language = Literal["en", "es", "auto"]
LANGUAGES: tuple[Language, ...] = ("en", "es", "auto")


@dataclass(frozen=True, slots=True)
class AgentWords:
    """What a Realtime session is told. `{store}` is the store's name."""

    phone: str
    browser: str
    store_intro: str
    store_notes: str
    greet: str
    greet_with: str
    speak_only_this: str
    speak_callers_language: str


@dataclass(frozen=True, slots=True)
class ToolWords:
    """The tools' descriptions, as the model reads them."""

    search: str
    search_skus_for_phone: str
    search_skus_for_browser: str
    query_phone: str
    query_browser: str
    max_price: str
    brand: str
    min_rating: str
    send: str
    note: str
    language: str
    transfer: str
    reason: str
    end_call: str
    show: str


@dataclass(frozen=True, slots=True)
class ResultWords:
    """What tool results say: sentences the model speaks (or rephrases) to the caller."""

    best_match: str
    best_matches: str
    last_joiner: str
    mention: str
    by_brand: str
    rated: str
    no_such_brand: str
    under_price: str
    from_brand: str
    rated_at_least: str
    limits_joiner: str
    nothing_matches: str
    nothing_matches_limits: str
    closest_without_limits: str
    not_stored: str
    texting_off: str
    hidden_number: str
    text_on_its_way: str
    text_sent: str
    text_failed: str
    refusals: dict[int, str]
    refusal_default: str
    offer_person: str
    offer_describe: str
    transferring: str
    nobody_available: str
    store_closed: str
    offer_text_or_help: str
    offer_help: str
    shown: str
    shown_some_unknown: str


@dataclass(frozen=True, slots=True)
class LineWords:
    """What a call asks the model to say at set moments; `right_now` frames each one."""

    right_now: str
    transfer: str
    goodbye: str
    resume: str
    transfer_cancelled_note: str
    transfer_failed_note: str
    transfer_failed: str
    end_cancelled_note: str
    still_there: str
    idle_goodbye: str
    one_moment: str
    one_moment_words: str


@dataclass(frozen=True, slots=True)
class SmsWords:
    """The caller's text. `percent_off` takes `{price}` and `{discount}`."""

    details: str
    shown: str
    photo: str
    view_3d: str
    view_ar: str
    video: str
    specs: str
    percent_off: str


@dataclass(frozen=True, slots=True)
class HoursWords:
    """Opening hours as the model is told them; `days` from Monday."""

    days: tuple[str, str, str, str, str, str, str]
    closed_day: str
    span: str
    schedule: str
    open_now: str
    closed_now: str
    closed_until_unknown: str
    after_hours_transfer: str
    no_transfer_after_hours: str


@dataclass(frozen=True, slots=True)
class Words:
    """One language's words. `code` is ISO 639-1, for the transcription hint."""

    code: str
    name: str
    agent: AgentWords
    tools: ToolWords
    results: ResultWords
    lines: LineWords
    sms: SmsWords
    hours: HoursWords
