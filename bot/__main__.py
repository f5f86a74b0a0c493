"""The command line: `python -m bot serve|demo|call|sim|catalog|outbox`.

Each command's module owns its own arguments (`main(argv) -> exit code`); this file only routes.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("bot.app", "run the voice bot (uvicorn) with settings from the environment and .env"),
    "demo": ("bot.sim.demo", "one scripted call on local simulators: no accounts, no network"),
    "call": ("bot.sim.phone", "place simulated Twilio calls to a running bot"),
    "sim": ("bot.sim.__main__", "run a simulator on its own: realtime | twilio-api"),
    "catalog": ("bot.catalog", "import or search a product catalog"),
    "outbox": ("bot.delivery", "list pending and failed SMS and webhook deliveries"),
}


def usage() -> str:
    lines = ["usage: python -m bot COMMAND [ARGS]", "", "commands:"]
    lines += [f"  {name:<8} {about}" for name, (_, about) in COMMANDS.items()]
    lines.append("\n`python -m bot COMMAND --help` shows a command's arguments.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    result: int = module.main(rest)
    return result


if __name__ == "__main__":
    sys.exit(main())
