"""`python -m bot outbox`: what an operator needs to see and fix in the outbox, on either store."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import httpx

from bot.catalog import CatalogError
from bot.cli import CommandParser
from bot.logs import configure_logging, mask_phone
from bot.outbox.messages import iso_utc
from bot.outbox.outbox import Outbox, open_store
from bot.outbox.relay import running_outbox
from bot.outbox.rows import OPEN_STATES, DisabledEndpoint, OutboxRow
from bot.outbox.sqlite import SqliteStore
from bot.outbox.store import OutboxStore
from bot.settings import Settings, SettingsError, load_settings
from bot.stores import DEFAULT_STORE_ID, Stores, StoresError
from bot.tools import OutboxUnavailable

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
DESCRIPTION = (
    "List deliveries not yet sent (pending, in flight, failed) and disabled webhook URLs, or fix "
    "them. Works on the configured outbox (DATABASE_URL, else DATABASE_PATH) or the one --db names."
)


def format_rows(rows: Sequence[OutboxRow]) -> str:
    """An operator's table: one line per delivery, phone numbers masked."""
    header = ("id", "kind", "store", "channel", "to", "state", "tries", "next attempt (UTC)", "last error")
    lines = [header]
    for row in rows:
        if row.state == "sending" and row.lease_expires_at is not None:
            when = f"held by {row.lease_owner} until {iso_utc(row.lease_expires_at)}"
        else:
            when = iso_utc(row.next_attempt_at) if row.next_attempt_at is not None else "-"
        lines.append(
            (
                row.message_id,
                row.kind,
                row.store_id or DEFAULT_STORE_ID,
                row.channel,
                mask_phone(row.recipient) if row.recipient else "-",
                row.state,
                str(row.attempts),
                when,
                (f"[{row.error_code}] " if row.error_code else "") + (row.last_error or ""),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line[:-1], widths, strict=True)) + "  " + line[-1]
        for line in lines
    )


def format_disabled(endpoint: DisabledEndpoint) -> str:
    return (
        f"webhooks to {endpoint.url} are OFF: {endpoint.reason}. "
        "Re-enable: python -m bot outbox enable-webhooks"
    )


async def list_rows(outbox: Outbox, everything: bool) -> int:
    for endpoint in await outbox.disabled_endpoints():
        print(format_disabled(endpoint))
    rows = await outbox.list_rows(None if everything else OPEN_STATES)
    if not rows:
        print(f"nothing pending or failed in {outbox.store.target}")
        return 0
    print(format_rows(rows))
    return 0


async def retry(outbox: Outbox, message_id: str) -> int:
    requeued = await outbox.requeue(message_id)
    if not requeued:
        known = [row for row in await outbox.list_rows() if row.message_id == message_id]
        if not known:
            print(f"no message {message_id} in {outbox.store.target}", file=sys.stderr)
        else:
            states = ", ".join(f"{row.channel} {row.state}" for row in known)
            print(f"nothing to retry: {message_id} has no failed delivery ({states})", file=sys.stderr)
        return 1
    for row in requeued:
        error = (f"[{row.error_code}] " if row.error_code else "") + (row.last_error or "")
        print(f"re-queued {message_id} {row.channel} (was {row.state}: {error or 'no reason recorded'})")
    if any(row.channel == "sms" for row in requeued):
        print("the SMS is looked up at Twilio before it is sent again, so the caller never gets it twice")
    return 0


async def enable_webhooks(outbox: Outbox, url: str | None) -> int:
    enabled = await outbox.enable_endpoints(url)
    if not enabled:
        print("no webhook endpoint is disabled" + (f" at {url}" if url else ""))
        return 0
    for each in enabled:
        print(f"webhooks to {each} re-enabled: held events go out within seconds")
    return 0


def relay_only(settings: Settings) -> int:
    """Relay deliveries without serving calls, until SIGINT or SIGTERM.

    The stores are loaded (and watched) as `serve` does: the relay signs each store's webhooks
    with that store's secret.
    """

    async def relay(stores: Stores) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        watcher = asyncio.create_task(stores.watch(), name="stores-watch")
        try:
            async with (
                httpx.AsyncClient(follow_redirects=False) as http,
                running_outbox(settings, http, stores=stores),
            ):
                await stop.wait()
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    configure_logging(settings.log_level, settings.log_format)
    try:
        stores = Stores.load(settings)
    except CatalogError as exc:
        print(f"CATALOG_PATH: {exc}", file=sys.stderr)
        return 2
    except StoresError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        import uvloop  # the loop serve runs on (uvicorn picks it); not on every platform
    except ImportError:
        asyncio.run(relay(stores))
    else:
        uvloop.run(relay(stores))
    return 0


def store_for(database: str | None, settings: Settings | None) -> OutboxStore:
    """The store `--db` names (a path or a postgresql:// URL), else the configured one."""
    if database is None:
        assert settings is not None, "settings are loaded when --db is not given"
        return open_store(settings)
    if database.startswith(POSTGRES_SCHEMES):
        from bot.outbox.postgres import PostgresStore  # asyncpg only where PostgreSQL is used

        return PostgresStore(database)
    return SqliteStore(Path(database))


async def run_command(store: OutboxStore, args: argparse.Namespace) -> int:
    async with Outbox(store) as outbox:
        if args.command == "retry":
            return await retry(outbox, args.message_id)
        if args.command == "enable-webhooks":
            return await enable_webhooks(outbox, args.url)
        return await list_rows(outbox, args.all)


def main(argv: list[str]) -> int:
    parser = CommandParser(prog="python -m bot outbox", description=DESCRIPTION)
    parser.add_argument("--all", action="store_true", help="list sent rows too")
    parser.add_argument(
        "--db",
        metavar="PATH_OR_URL",
        help="a SQLite file or a postgresql:// URL (default: DATABASE_URL, else DATABASE_PATH)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", help="what to do (default: list)")
    retry_parser = commands.add_parser(
        "retry",
        help="re-queue a message's failed deliveries once the cause is fixed",
        description="Re-queue a message's failed or dead-lettered deliveries. An SMS is looked up "
        "at Twilio before it is sent again, so the caller never gets it twice.",
    )
    retry_parser.add_argument("message_id", metavar="ID", help="a message id (msg_...) from the list")
    enable_parser = commands.add_parser(
        "enable-webhooks",
        help="re-enable webhooks after a 410 Gone answer",
        description="Turn webhooks back on for a URL the call center answered 410 Gone: the events "
        "held meanwhile go out within seconds, from every process.",
    )
    enable_parser.add_argument("url", metavar="URL", nargs="?", help="the URL (default: every disabled one)")
    commands.add_parser(
        "relay",
        help="relay deliveries without serving calls (until Ctrl-C)",
        description="Relay the outbox's SMS and webhooks without serving calls, with the settings "
        "serve reads, until SIGINT or SIGTERM.",
    )
    args = parser.parse_args(argv)
    settings: Settings | None = None
    if args.db is None or args.command == "relay":
        try:
            settings = load_settings()
        except SettingsError as exc:
            print(exc, file=sys.stderr)
            return 2
    if args.command == "relay":
        assert settings is not None
        return relay_only(settings)
    store = store_for(args.db, settings)
    if isinstance(store, SqliteStore) and not store.path.exists():
        print(f"no outbox at {store.path}: nothing has been queued yet")
        return 0
    try:
        return asyncio.run(run_command(store, args))
    except OutboxUnavailable as exc:
        print(exc, file=sys.stderr)
        return 2
