"""Relay throughput: how many product messages per second 1, 2 and 4 relaying processes deliver.

    python3 bench/outbox.py                  # 1000 messages per run, 1/2/4 relays, SQLite and PostgreSQL
    python3 bench/outbox.py --smoke          # 100 messages, 1 and 2 relays: checks, for CI

Each message is one SMS (Twilio stand-in) and one `products.sent` webhook (receiver stand-in);
both stand-ins answer at once and run in this process. The relays are `python -m bot outbox
relay` processes on one outbox: a SQLite file (WAL, synchronous=FULL) or a local PostgreSQL
server with its durable defaults (fsync, synchronous_commit on), so every commit reaches the
disk as in production. The messages are queued before the relays start; the clock runs from
the first SMS created to the last webhook acknowledged.

Printed per run: messages per second, the relays' CPU milliseconds per message, and this
process's CPU share (the stand-ins): on a 2-core machine the relays, the database and the
stand-ins share the cores, so the table says which side saturated. Exit status 1 on a
functional failure (an SMS missing or sent twice, an event not delivered), never on timing.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import resource
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bot.outbox import Outbox  # noqa: E402
from bot.outbox.postgres import PostgresStore  # noqa: E402
from bot.outbox.sqlite import SqliteStore  # noqa: E402
from bot.outbox.store import OutboxStore  # noqa: E402
from bot.products import ProductsCollection  # noqa: E402
from bot.settings import SAMPLE_CATALOG_PATH  # noqa: E402
from bot.sim.postgres import LocalPostgres, PostgresUnavailable  # noqa: E402
from bot.sim.twilio_api import TwilioApiSimulator  # noqa: E402
from bot.sim.webhook_receiver import WebhookReceiver  # noqa: E402

SECRET = "whsec_" + base64.b64encode(b"bench secret, thirty-two bytes!!").decode()
QUEUE_CONCURRENCY = 16
STOP_TIMEOUT_S = 20.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    store: str
    relays: int
    messages: int
    seconds: float
    relay_cpu_s: float
    bench_cpu_s: float
    duplicates_sms: int
    missing_sms: int
    missing_events: int

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    @property
    def failed(self) -> bool:
        return bool(self.duplicates_sms or self.missing_sms or self.missing_events)


def collection() -> ProductsCollection:
    products = json.loads(SAMPLE_CATALOG_PATH.read_text())[:2]
    return ProductsCollection.model_validate(
        {"TextMessage": "Your washers.", "JsonData": {"jsonType": "ProductsCollection", "products": products}}
    )


def caller(n: int) -> str:
    return f"+1555{n:07d}"


async def queue(store: OutboxStore, messages: int) -> None:
    """The messages, as tools queue them (one transaction each), a few at a time."""
    details = collection()
    async with Outbox(store) as outbox:
        for start in range(0, messages, QUEUE_CONCURRENCY):
            await asyncio.gather(
                *(
                    outbox.add_product_details(
                        call_sid="CA" + f"{n:032x}", caller=caller(n), collection=details
                    )
                    for n in range(start, min(start + QUEUE_CONCURRENCY, messages))
                )
            )


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


async def run(kind: str, relays: int, messages: int, folder: Path, postgres: LocalPostgres | None) -> Result:
    if kind == "sqlite":
        path = folder / f"outbox-{relays}-{time.monotonic_ns()}.sqlite3"
        database = {"DATABASE_PATH": str(path)}
        store: OutboxStore = SqliteStore(path)
    else:
        assert postgres is not None
        url = postgres.create_database()
        database = {"DATABASE_URL": url}
        store = PostgresStore(url)
    await queue(store, messages)

    first_sms: list[float] = []
    sent: Counter[str] = Counter()

    def record(kind: str, entry: dict[str, Any]) -> None:
        if kind == "message":
            first_sms.append(first_sms[0] if first_sms else time.monotonic())
            sent[entry["to"]] += 1

    async with TwilioApiSimulator(on_record=record) as twilio, WebhookReceiver() as receiver:
        env = {
            **os.environ,
            **database,
            "PYTHONPATH": str(ROOT),
            "TWILIO_ACCOUNT_SID": twilio.account_sid,
            "TWILIO_AUTH_TOKEN": twilio.auth_token,
            "TWILIO_FROM_NUMBER": "+15550001111",
            "TWILIO_API_BASE": twilio.base_url,
            "WEBHOOK_URL": receiver.url,
            "WEBHOOK_SECRET": SECRET,
            "LOG_LEVEL": "WARNING",
        }
        bench_cpu = resource.getrusage(resource.RUSAGE_SELF)
        processes = [
            await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bot", "outbox", "relay", env=env, cwd=folder
            )
            for _ in range(relays)
        ]
        try:
            await receiver.wait_until(lambda: len(receiver.acknowledged()) >= messages, messages / 2 + 60)
            done = time.monotonic()
            relay_cpu = sum(cpu_seconds(p.pid) for p in processes)
        finally:
            for process in processes:
                process.terminate()
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in processes)), STOP_TIMEOUT_S)
        after = resource.getrusage(resource.RUSAGE_SELF)
    events = {d.headers["webhook-id"] for d in receiver.acknowledged()}
    return Result(
        store=kind,
        relays=relays,
        messages=messages,
        seconds=done - first_sms[0],
        relay_cpu_s=relay_cpu,
        bench_cpu_s=(after.ru_utime + after.ru_stime) - (bench_cpu.ru_utime + bench_cpu.ru_stime),
        duplicates_sms=sum(count - 1 for count in sent.values() if count > 1),
        missing_sms=sum(1 for n in range(messages) if sent[caller(n)] == 0),
        missing_events=messages - len(events),
    )


HEADER = (
    f"{'store':<10} {'relays':>6} {'messages':>8} {'msg/s':>7} {'relay CPU ms/msg':>17} "
    f"{'stand-ins CPU':>14} {'exactly once':>13}"
)


def format_row(r: Result) -> str:
    stand_ins = f"{100 * r.bench_cpu_s / r.seconds:.0f}%"
    verdict = (
        "yes" if not r.failed else f"NO: {r.duplicates_sms} dup, {r.missing_sms}+{r.missing_events} lost"
    )
    return (
        f"{r.store:<10} {r.relays:>6} {r.messages:>8} {r.rate:>7.0f} "
        f"{1000 * r.relay_cpu_s / r.messages:>17.1f} {stand_ins:>14} {verdict:>13}"
    )


async def run_all(args: argparse.Namespace) -> list[Result]:
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="voicebot-bench-") as tmp:
        folder = Path(tmp)
        postgres: LocalPostgres | None = None
        if "postgres" in args.stores:
            try:
                postgres = LocalPostgres(durable=True)
                postgres.start()
            except PostgresUnavailable as exc:
                print(f"PostgreSQL runs skipped: {exc}")
                postgres = None
        print(HEADER)
        try:
            for kind in args.stores:
                if kind == "postgres" and postgres is None:
                    continue
                for relays in args.relays:
                    results.append(await run(kind, relays, args.messages, folder, postgres))
                    print(format_row(results[-1]), flush=True)
        finally:
            if postgres is not None:
                postgres.remove()
    return results


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="100 messages, 1 and 2 relays (CI)")
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--relays", type=lambda s: [int(n) for n in s.split(",")], default=[1, 2, 4])
    parser.add_argument("--stores", type=lambda s: s.split(","), default=["sqlite", "postgres"])
    args = parser.parse_args(argv)
    if args.smoke:
        args.messages, args.relays = 100, [1, 2]
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"# bench/outbox.py: {args.messages} messages per run, {os.cpu_count()} cores, load average {load}")
    results = asyncio.run(run_all(args))
    return 1 if any(r.failed for r in results) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
