"""Renders the TwiML documents in twiml/ (readable, copyable by operators) with per-call values.

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
def _template(name: str) -> Template:
    """The document without its operator comments (Twilio needs none of them)."""
    return Template(_COMMENT.sub("", TWIML_DIR.joinpath(name).read_text(encoding="utf-8")))


def _render(name: str, **values: str) -> str:
    quoted = {key: escape(value, {'"': "&quot;"}) for key, value in values.items()}
    return _template(name).substitute(quoted)


def render_stream_twiml(
    *, stream_url: str, caller: str, called: str, token: str, store: str = DEFAULT_STORE_ID
) -> str:
    """`store`: the id of the store the dialled number belongs to (the token vouches for it)."""
    return _render(
        "stream.xml", stream_url=stream_url, caller=caller, called=called, store=store, token=token
    )


def render_fallback_twiml(store_phone_number: str | None) -> str:
    """The apology, and a ring to the store when there is a number to ring."""
    if store_phone_number:
        return _render("fallback_dial.xml", store_phone_number=store_phone_number)
    return _render("fallback.xml")


def render_transfer_twiml(store_phone_number: str) -> str:
    return _render("transfer.xml", store_phone_number=store_phone_number)
