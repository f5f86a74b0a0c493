"""Structured logging: one JSON object per line, call SID on every call line, no secrets.

Phone numbers never reach a log whole: `mask_phone` keeps the last four digits only.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Mapping, MutableMapping
from typing import Any

# uvicorn passes `color_message` (its message with ANSI colour codes) for its own console
# formatter; our lines carry the plain `msg` only.
_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "color_message",
}


def mask_phone(number: str | None) -> str:
    """'+15551234567' -> '***4567'; non-numbers (client:alice, anonymous) pass through masked."""
    if not number:
        return ""
    digits = [c for c in number if c.isdigit()]
    if len(digits) < 4:
        return "***"
    return "***" + "".join(digits[-4:])


_PHONE_NUMBER = re.compile(r"\+\d{7,15}\b")


def mask_phones_in(text: str) -> str:
    """Masks every phone number inside free text (an error message from Twilio, say)."""
    return _PHONE_NUMBER.sub(lambda match: mask_phone(match.group()), text)


# Seven or more digits, however written ("555 123 4567", "(555) 123-4567", "+1.555.123.4567").
_DIGIT_RUN = re.compile(r"\+?\d(?:[\s().-]{0,3}\d){6,}")


def mask_numbers_in(text: str) -> str:
    """Masks anything that could be a phone number in what people said (a transcript line):
    every run of seven digits or more, whatever separates them, keeps its last four."""
    return _DIGIT_RUN.sub(lambda match: mask_phone(match.group()), text)


class JsonFormatter(logging.Formatter):
    """Renders a record and its `extra=` fields as one JSON line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """Human-readable lines for a terminal, with the structured fields appended."""

    def format(self, record: logging.LogRecord) -> str:
        clock = time.strftime("%H:%M:%S", time.localtime(record.created))
        fields = " ".join(
            f"{k}={v}"
            for k, v in vars(record).items()
            if k not in _RESERVED and not k.startswith("_")
        )
        line = f"{clock} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if fields:
            line += f"  [{fields}]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs each request URL at INFO; the SMS lookup's URL holds the caller's full number.
    logging.getLogger("httpx").setLevel(logging.WARNING)


class CallLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A logger that stamps every line with the call's SID (and any other fixed fields)."""

    def __init__(self, logger: logging.Logger, **fields: Any) -> None:
        super().__init__(logger, fields)

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        extra: Mapping[str, Any] = kwargs.get("extra") or {}
        kwargs["extra"] = {**(self.extra or {}), **extra}
        return msg, kwargs
