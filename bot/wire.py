"""Decoding rules for what a peer sends us (Twilio, the Realtime API), shared by every edge.

A phone line is reachable by anyone and any network misbehaves, so each rule refuses exactly what
the protocol does not allow, cheaply, and says so with a value rather than an exception:
- JSON is bounded in size and nesting before the decoder sees it: CPython's decoder recurses,
  and four kilobytes of `[[[[` raise RecursionError. The check is two `str.count` calls; only a
  message with more brackets than the nesting limit gets the exact (still linear) scan.
- Numbers written as strings are ASCII digits and nothing else: `str.isdigit` also accepts "²"
  and "٣", which `int` then refuses or reads as a digit nobody sent.
- Base64 is strict and ASCII: `binascii` raises ValueError, not binascii.Error, on "éAAA".
"""

from __future__ import annotations

import binascii
import json
import json.scanner
import re
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Literal

# A millisecond timestamp of 15 digits spans 30,000 years; no protocol field we read needs more.
MAX_DIGITS = 15
MAX_NUMBER = 10**MAX_DIGITS - 1

_STRINGS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")
_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}

JsonFaultKind = Literal["too_large", "too_deep", "not_json"]

# The scanner under `json.loads` (the C one where CPython has it), called directly: a Media
# Streams frame parses in 3 us instead of 5.4, without the decoder's two whitespace regexes.
# A document it takes whole is exactly what `json.loads` returns for the same text.
# (typeshed types the scanner's context, a decoder, as a scanner.)
_scan_once = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class JsonFault:
    """Why a text frame is not a usable JSON document; never a value `json.loads` returns."""

    kind: JsonFaultKind
    detail: str


def load_json(text: str, *, max_chars: int, max_depth: int) -> Any:
    """The decoded document, or a JsonFault when it is too large, too deep or not JSON."""
    if len(text) > max_chars:
        return JsonFault("too_large", f"{len(text)} chars")
    if text.count("[") + text.count("{") > max_depth and nesting_depth(text) > max_depth:
        return JsonFault("too_deep", f"nested deeper than {max_depth}")
    try:
        value, end = _scan_once(text, 0)
    except (StopIteration, ValueError):
        end = -1
    if end == len(text):
        return value
    # Whitespace around the document, or not JSON at all: `json.loads` decides, and says why.
    try:
        return json.loads(text)
    except ValueError as exc:
        return JsonFault("not_json", f"{len(text)} chars: {str(exc)[:60]}")


def nesting_depth(text: str) -> int:
    """How deep arrays and objects nest, brackets inside strings aside (linear in the text)."""
    brackets = _BRACKETS.findall(_STRINGS.sub("", text))
    return max(accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0)


def parse_digits(text: str) -> int | None:
    """A non-negative integer written in ASCII digits (at most MAX_DIGITS), else None."""
    if 0 < len(text) <= MAX_DIGITS and text.isascii() and text.isdigit():
        return int(text)
    return None


def parse_count(value: object) -> int | None:
    """A JSON number or digit string that is a whole count in 0..MAX_NUMBER, else None.

    Refuses booleans, floats (NaN, Infinity, 8000.5) and integers past the bound."""
    if type(value) is int:
        return value if 0 <= value <= MAX_NUMBER else None
    if type(value) is str:
        return parse_digits(value)
    return None


def decode_base64(text: str) -> bytes | None:
    """Strict base64 (no stray characters, right padding), else None."""
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except ValueError:
        return None
