"""Log lines: one JSON object (or one text line) per record, no terminal colours, no secrets."""

from __future__ import annotations

import json
import logging

from bot.logs import JsonFormatter, TextFormatter, mask_phone, mask_phones_in


def uvicorn_startup_record() -> logging.LogRecord:
    """What uvicorn logs at start-up: the plain message plus an ANSI-coloured copy."""
    return logging.makeLogRecord(
        {
            "name": "uvicorn.error",
            "levelno": logging.INFO,
            "levelname": "INFO",
            "msg": "Started server process [%d]",
            "args": (4242,),
            "color_message": "Started server process [\x1b[36m%d\x1b[0m]",
        }
    )


def test_a_json_line_drops_uvicorns_coloured_copy_of_the_message() -> None:
    line = JsonFormatter().format(uvicorn_startup_record())
    entry = json.loads(line)
    assert entry["msg"] == "Started server process [4242]"
    assert "color_message" not in entry
    assert "\x1b" not in line and "\\u001b" not in line


def test_a_text_line_drops_uvicorns_coloured_copy_of_the_message() -> None:
    line = TextFormatter().format(uvicorn_startup_record())
    assert line.endswith("uvicorn.error: Started server process [4242]")
    assert "\x1b" not in line


def test_structured_fields_still_reach_the_json_line() -> None:
    record = logging.makeLogRecord({"msg": "incoming call", "call_sid": "CA1", "caller": "***4567"})
    entry = json.loads(JsonFormatter().format(record))
    assert entry["call_sid"] == "CA1" and entry["caller"] == "***4567"


def test_phone_numbers_keep_only_their_last_four_digits() -> None:
    assert mask_phone("+15551234567") == "***4567"
    masked = mask_phones_in("The 'To' number +15551234567 is not valid")
    assert masked == "The 'To' number ***4567 is not valid"
