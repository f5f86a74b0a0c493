"""`python -m bot demo`: one whole call on local simulators, with no accounts and no network.

Starts the bot and three stand-ins on free 127.0.0.1 ports (the Realtime API, Twilio's REST
API, a call center's webhook receiver), then a simulated phone dials the bot the way Twilio
does and plays recorded caller audio. Prints a live transcript, the SMS the caller received and
the webhooks the call center received, and writes what the caller heard to a WAV file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bot.cli import CommandParser
from bot.logs import configure_logging, mask_phone
from bot.settings import PACKAGE_DIR
from bot.sim.phone import PhoneCall
from bot.sim.realtime import RealtimeSimulator, Scenario
from bot.sim.stack import CALLER, SimStack
from bot.sim.twilio_api import TwilioApiSimulator
from bot.sim.webhook_receiver import WebhookReceiver, signature_is_valid
from bot.wav import read_wav

AUDIO_DIR = PACKAGE_DIR / "sim" / "audio"
SCENARIO_PATH = PACKAGE_DIR / "sim" / "scenarios" / "washers.json"
CALLER_UTTERANCES = ("caller_washers.wav", "caller_text_me.wav", "caller_person.wav")
QUIET_LOGS = {"LOG_LEVEL": "WARNING", "LOG_FORMAT": "text"}
REPLY_TIMEOUT_S = 20.0
QUIET_MS = 1200
DELIVERY_TIMEOUT_S = 15.0
TOOL_LINE_MAX_CHARS = 120
TWIML_LINE_MAX_CHARS = 110
EVENT_LINE_MAX_CHARS = 300
_XML_DECLARATION = re.compile(r"<\?xml[^>]*\?>\s*")
CLI_DESCRIPTION = (
    "One whole call on local simulators, with no accounts and no network: the bot, a Realtime "
    "API, Twilio's REST API and a call center's webhook receiver on 127.0.0.1, and a simulated "
    "phone that dials the bot with recorded caller audio. Prints a live transcript, the SMS the "
    "caller received and the webhooks the call center received, and writes what the caller "
    "heard to a WAV file."
)


class Printer:
    """Timestamped lines, seconds since the demo started."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self, who: str, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.2f}s] {who:<11} {text}", flush=True)


async def follow_transcript(realtime: RealtimeSimulator, say: Printer) -> None:
    """Prints the conversation as the simulated model hears and speaks it."""
    seen_lines = seen_tools = 0
    while True:
        if realtime.sessions:
            session = realtime.sessions[-1]
            for role, text in session.transcript[seen_lines:]:
                say("caller" if role == "user" else "bot", text)
            seen_lines = len(session.transcript)
            for _, output in session.tool_outputs[seen_tools:]:
                say("tool", _tool_line(output))
            seen_tools = len(session.tool_outputs)
        await asyncio.sleep(0.05)


def _tool_line(output: str) -> str:
    try:
        result: dict[str, Any] = json.loads(output)
    except ValueError:
        return shorten(output, TOOL_LINE_MAX_CHARS)
    shown = {k: v for k, v in result.items() if k in ("found", "sent", "sms", "transferring", "error")}
    return "result " + json.dumps(shown)


async def converse(call: PhoneCall, say: Printer) -> None:
    await call.wait_for_audio(REPLY_TIMEOUT_S)
    await call.wait_until_quiet(QUIET_MS, REPLY_TIMEOUT_S * 2)
    for name in CALLER_UTTERANCES:
        if not call.connected:
            return
        say("phone", f"caller speaks ({name})")
        await call.say(read_wav(AUDIO_DIR / name).data)
        with contextlib.suppress(Exception):
            await call.wait_for_audio(REPLY_TIMEOUT_S)
            await call.wait_until_quiet(QUIET_MS, REPLY_TIMEOUT_S * 2)


async def run_demo(heard_path: Path, say: Printer) -> int:
    stack = SimStack(Scenario.from_json(SCENARIO_PATH), env=QUIET_LOGS, on_twilio_record=narrate(say))
    async with stack:
        say("demo", f"bot on {stack.app_url}; Realtime, Twilio REST and webhook simulators up")
        say("phone", f"{mask_phone(CALLER)} dials the store")
        follower = asyncio.create_task(follow_transcript(stack.realtime, say))
        try:
            async with stack.dial(CALLER) as call:
                await converse(call, say)
                with contextlib.suppress(TimeoutError):
                    await call.wait_closed(5.0)
                say("phone", f"call ended: {call.outcome}")
                call.write_heard_wav(heard_path)
        finally:
            follower.cancel()
        await wait_for_deliveries(stack.twilio_api, stack.receiver)
        report(stack, heard_path)
    return 0 if stack.twilio_api.messages and stack.receiver.acknowledged() else 1


def narrate(say: Printer) -> Callable[[str, dict[str, Any]], None]:
    def on_record(kind: str, entry: dict[str, Any]) -> None:
        if kind == "message":
            say("sms", f"Twilio accepted an SMS to {mask_phone(entry.get('to'))}")
        elif kind == "call_update":
            say("twilio", f"call updated through the REST API: {_call_update(entry)}")
        else:
            say("twilio", f"refused a request with the wrong credentials: {entry.get('path')}")

    return on_record


def _call_update(entry: dict[str, Any]) -> str:
    if entry.get("Twiml"):
        twiml = _XML_DECLARATION.sub("", str(entry["Twiml"]))
        return "new TwiML " + shorten(twiml, TWIML_LINE_MAX_CHARS)
    return f"Status={entry.get('Status')}"


async def wait_for_deliveries(twilio_api: TwilioApiSimulator, receiver: WebhookReceiver) -> None:
    """The outbox relays after the call; give it a moment to deliver everything."""
    deadline = time.monotonic() + DELIVERY_TIMEOUT_S
    while time.monotonic() < deadline:
        kinds = {delivery.event.get("type") for delivery in receiver.acknowledged()}
        if twilio_api.messages and {"products.sent", "call.completed"} <= kinds:
            return
        await asyncio.sleep(0.1)


def report(stack: SimStack, heard_path: Path) -> None:
    twilio_api, receiver = stack.twilio_api, stack.receiver
    print("\n=== SMS received by the caller ===")
    for message in twilio_api.messages:
        print(f"--- to {mask_phone(message['to'])} from {message['from']} ---\n{message['body']}")
    if not twilio_api.messages:
        print("(none)")
    print("\n=== Webhooks received by the call center ===")
    for delivery in receiver.acknowledged():
        event = delivery.event
        verified = "valid" if signature_is_valid(delivery, stack.webhook_secret) else "INVALID"
        print(f"{event['type']}  webhook-id={delivery.headers['webhook-id']}  signature {verified}")
        data = event.get("data", {})
        if event["type"] == "products.sent":
            products = data["collection"]["JsonData"]["products"]
            print(f"  ProductsCollection with {len(products)} products: {[p['name'] for p in products]}")
            print(f"  SMS status: {data.get('sms', {}).get('status')}")
        elif event["type"] == "call.completed":
            lines = len(data.get("transcript", []))
            duration_s = float(data.get("duration_s", 0))
            print(f"  outcome {data.get('outcome')}, {duration_s:.1f} s, {lines} transcript lines")
        else:
            print("  " + shorten(json.dumps(data), EVENT_LINE_MAX_CHARS))
    if not receiver.acknowledged():
        print("(none)")
    for call in stack.calls.values():
        latencies = [f"{lat:.2f}s" for lat in call.first_audio_latencies() if lat is not None]
        print(f"\nreply latency after each caller turn (caller's end of speech to first audio): {latencies}")
        print(f"bot audio heard: {call.heard_ms() / 1000:.1f}s; what the caller heard: {heard_path}")


def shorten(text: str, width: int) -> str:
    """`text` on one line, cut at a word boundary with an ellipsis when longer than `width`."""
    return textwrap.shorten(text, width, placeholder=" …")


def main(argv: list[str]) -> int:
    parser = CommandParser(prog="python -m bot demo", description=CLI_DESCRIPTION)
    parser.add_argument(
        "--heard", type=Path, default=Path("demo-heard.wav"),
        help="where to write what the caller heard, a mu-law 8 kHz WAV (default demo-heard.wav)",
    )
    args = parser.parse_args(argv)
    if not args.heard.parent.is_dir():
        parser.error(f"--heard {args.heard}: the folder {args.heard.parent} does not exist")
    configure_logging("WARNING", "text")
    return asyncio.run(run_demo(args.heard, Printer()))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
