"""The command line: `python -m bot serve|demo|call|sim|catalog|outbox`.

Each command's module owns its own arguments (`main(argv) -> exit code`); this file only routes,
and turns what no command should show a user (a closed pipe, Ctrl-C, a missing optional
dependency) into a quiet exit or one line.
"""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("bot.app", "run the voice bot (uvicorn) with settings from the environment and .env"),
    "demo": ("bot.sim.demo", "one scripted call on local simulators: no accounts, no network"),
    "call": ("bot.sim.phone", "place simulated Twilio calls to a running bot"),
    "sim": ("bot.sim.__main__", "run a simulator on its own: realtime | twilio-api"),
    "catalog": ("bot.catalog", "check, import or search a product catalog"),
    "outbox": ("bot.outbox.cli", "list, retry and re-enable SMS and webhook deliveries"),
}
# A module only an optional extra installs -> that extra's name.
EXTRA_FOR_MODULE = {"openai": "sim"}
EXIT_INTERRUPTED = 130


def usage() -> str:
    lines = ["usage: python -m bot COMMAND [ARGS]", "", "commands:"]
    lines += [f"  {name:<8} {about}" for name, (_, about) in COMMANDS.items()]
    lines.append("\n`python -m bot COMMAND --help` shows a command's arguments.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        code = route(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader left early (`python -m bot --help | head -3`): stop without a traceback,
        # and point stdout at /dev/null so the interpreter's final flush fails silently too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return code


def route(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        names = ", ".join(COMMANDS)
        print(f"python -m bot: unknown command {command!r}; the commands are {names}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[command][0])
        result: int = module.main(rest)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        extra = EXTRA_FOR_MODULE.get(missing)
        if extra is None:
            raise
        print(
            f"python -m bot {command} needs the optional [{extra}] dependencies (no module "
            f"{missing!r}): pip install -e '.[{extra}]' in a checkout, or pip install 'voicebot[{extra}]'",
            file=sys.stderr,
        )
        return 2
    return result


if __name__ == "__main__":
    sys.exit(main())
