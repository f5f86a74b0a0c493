"""`python -m bot sim realtime|twilio-api ...`: run one simulator on its own."""

from __future__ import annotations

import importlib
import sys

SIMULATORS: dict[str, tuple[str, str]] = {
    "realtime": (
        "bot.sim.realtime",
        "the OpenAI Realtime API (WebSocket and client secrets), speaking a scripted scenario",
    ),
    "twilio-api": ("bot.sim.twilio_api", "Twilio's REST API: sends SMS and updates live calls"),
}
PROG = "python -m bot sim"


def usage() -> str:
    lines = [f"usage: {PROG} SIMULATOR [OPTIONS]", "", "Run one local stand-in on 127.0.0.1.", ""]
    lines += ["simulators:"] + [f"  {name:<11} {about}" for name, (_, about) in SIMULATORS.items()]
    lines.append(f"\n`{PROG} SIMULATOR --help` shows its options and the settings it reads.")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    names = " or ".join(SIMULATORS)
    if not argv:
        print(f"{PROG}: name a simulator: {names} (see `{PROG} --help`)", file=sys.stderr)
        return 2
    if argv[0] not in SIMULATORS:
        print(f"{PROG}: unknown simulator {argv[0]!r}; choose {names}", file=sys.stderr)
        return 2
    module = importlib.import_module(SIMULATORS[argv[0]][0])
    result: int = module.main(argv[1:])
    return result


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
