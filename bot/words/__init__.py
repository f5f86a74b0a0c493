"""Every word the bot says, texts or tells the model, one module per language, apart from the logic.

`Words` (bot/words/schema.py) groups them by who reads them: the agent's instructions and tool
descriptions (the model), the lines a call asks the model to say at set moments (transfer,
goodbye, idle caller, a slow tool), what tool results tell the model to say, the SMS text, and
how opening hours are put. `bot/words/en.py` and `bot/words/es.py` each build one `Words`;
`words_for` picks one.

A store's language is `en`, `es` or `auto`. `auto` speaks the caller's language: English words
for the model, told to answer in whatever language the caller uses, with no transcription hint
(the transcription model detects it) and the text in the language the model reports.
"""

from __future__ import annotations

from bot.words import en, es
from bot.words.schema import (
    LANGUAGES,
    AgentWords,
    HoursWords,
    Language,
    LineWords,
    ResultWords,
    SmsWords,
    ToolWords,
    Words,
)

BY_CODE: dict[str, Words] = {words.code: words for words in (en.WORDS, es.WORDS)}


def words_for(language: Language | str) -> Words:
    """The words a store in `language` uses (`auto` uses English ones, told to follow the caller)."""
    return BY_CODE.get(language, en.WORDS)


__all__ = [
    "BY_CODE",
    "LANGUAGES",
    "AgentWords",
    "HoursWords",
    "Language",
    "LineWords",
    "ResultWords",
    "SmsWords",
    "ToolWords",
    "Words",
    "en",
    "es",
    "words_for",
]
