"""Renders the TwiML documents in twiml/ (readable, copyable by operators) with per-call values.

What Twilio says itself (`<Say>`: the apologies when the bot cannot go on) is in the store's
language: twiml/<language>/ holds a language's own documents (twiml/es/), twiml/ the English
ones, used for any language without its own.

setuptools installs the folder as the package `bot.twiml_documents` (editable installs map it
too); a checkout run without installing it finds the folder beside `bot/`.
"""

from __future__ import annotations

import re
from functools import cache
from importlib.resources import files
from importlib.resources.abc import Traversable
from string import Template
from xml.sax.saxutils import escape

from bot.settings import PACKAGE_DIR
from bot.stores import DEFAULT_STORE_ID


def documents_dir() -> Traversable:
    try:
        return files("bot.twiml_documents")
    except ModuleNotFoundError:
        return PACKAGE_DIR.parent / "twiml"


TWIML_DIR = documents_dir()
_COMMENT = re.compile(r"<!--.*?-->\s*", re.DOTALL)


@cache
def _template(name: str, language: str) -> Template:
    """The document in `language` (else in English) without its operator comments (Twilio needs
    none of them)."""
    document = TWIML_DIR.joinpath(language, name)
    if not document.is_file():
        document = TWIML_DIR.joinpath(name)
    return Template(_COMMENT.sub("", document.read_text(encoding="utf-8")))


def _render(name: str, language: str, **values: str) -> str:
    quoted = {key: escape(value, {'"': "&quot;"}) for key, value in values.items()}
    return _template(name, language).substitute(quoted)


def render_stream_twiml(
    *,
    stream_url: str,
    caller: str,
    called: str,
    token: str,
    store: str = DEFAULT_STORE_ID,
    language: str = "en",
) -> str:
    """`store`: the id of the store the dialled number belongs to (the token vouches for it)."""
    values = {"caller": caller, "called": called, "store": store, "token": token}
    return _render("stream.xml", language, stream_url=stream_url, **values)


def render_fallback_twiml(store_phone_number: str | None, language: str = "en") -> str:
    """The apology, and a ring to the store when there is a number to ring."""
    if store_phone_number:
        return _render("fallback_dial.xml", language, store_phone_number=store_phone_number)
    return _render("fallback.xml", language)


def render_transfer_twiml(store_phone_number: str, language: str = "en") -> str:
    return _render("transfer.xml", language, store_phone_number=store_phone_number)
