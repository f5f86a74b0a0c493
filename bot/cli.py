"""What every `python -m bot` command's parser shares: a mistake is one line, never a traceback."""

from __future__ import annotations

import argparse
from typing import NoReturn

MAX_PORT = 65535


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit status 2).

    argparse prints the whole usage above the error; on a terminal that buries the one line
    that says what was wrong, so the line names the command and points at `--help` instead.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 0 to 65535 (0: let the system pick a free one)."""
    if not text.isdigit() or int(text) > MAX_PORT:
        raise argparse.ArgumentTypeError(f"not a port number (0 to {MAX_PORT}): {text!r}")
    return int(text)


def positive_int(text: str) -> int:
    """An argparse type: a count of at least 1 (calls, worker processes)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return int(text)
