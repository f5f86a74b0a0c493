"""`python -m bot sim realtime|twilio-api ...`: run one simulator on its own."""

from __future__ import annotations

import importlib
import sys

SIMULATORS = {
    "realtime": "bot.sim.realtime",
    "twilio-api": "bot.sim.twilio_api",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in SIMULATORS:
        names = " | ".join(SIMULATORS)
        print(f"usage: python -m bot sim {{{names}}} [--port N] ...", file=sys.stderr)
        return 2
    module = importlib.import_module(SIMULATORS[argv[0]])
    result: int = module.main(argv[1:])
    return result


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
