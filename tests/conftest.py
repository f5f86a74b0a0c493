"""Shared fixtures: async tests run on anyio's pytest plugin (it ships with starlette/httpx).

The outbox's fixtures (stand-ins started once per module, a rig on each store) need a module's
event loop: their test modules declare a module-scoped `anyio_backend`.

Tests that need a system program (PostgreSQL, Chromium) skip on a machine without it, naming
what to install. CI sets VOICEBOT_FORBID_SKIPS=1 after installing them: there a skip is a failure.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from outbox_rig import STORES, FakeClock, Rig, empty_postgres, opened, store_factory

from bot.sim.postgres import INSTALL_HINT, LocalPostgres, find_bin_dir
from bot.sim.twilio_api import TwilioApiSimulator
from bot.sim.webhook_receiver import WebhookReceiver

FORBID_SKIPS_ENV = "VOICEBOT_FORBID_SKIPS"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if report.skipped and os.environ.get(FORBID_SKIPS_ENV) == "1" and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped, but {FORBID_SKIPS_ENV}=1 forbids skips here: {report.longrepr}"


@pytest.fixture(scope="session")
def postgres() -> Iterator[LocalPostgres]:
    """A real PostgreSQL server for the session (Debian's binaries, a temporary folder, loopback)."""
    if find_bin_dir() is None:
        pytest.skip(f"no PostgreSQL server here: {INSTALL_HINT}")
    server = LocalPostgres()
    server.start()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture(scope="module")
async def shared_sim() -> AsyncIterator[TwilioApiSimulator]:
    async with TwilioApiSimulator("AC" + "0" * 32, "token") as sim:
        yield sim


@pytest.fixture(scope="module")
async def shared_receiver() -> AsyncIterator[WebhookReceiver]:
    async with WebhookReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def postgres_url(request: pytest.FixtureRequest) -> str:
    """A database of the session's PostgreSQL server for this module (started only if needed)."""
    server: LocalPostgres = request.getfixturevalue("postgres")
    return server.create_database()


@pytest.fixture(params=STORES)
async def rig(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    shared_sim: TwilioApiSimulator,
    shared_receiver: WebhookReceiver,
) -> AsyncIterator[Rig]:
    """The rig on each store in turn, with the stand-ins reset and the outbox empty."""
    clock = FakeClock()
    shared_sim.reset()
    shared_receiver.script.clear()
    shared_receiver.received.clear()
    shared_receiver.peak = 0
    stores = store_factory(request.param, tmp_path, lambda: request.getfixturevalue("postgres_url"))
    async with opened(stores, clock) as outbox, httpx.AsyncClient() as http:
        if request.param == "postgres":
            await empty_postgres(request.getfixturevalue("postgres_url"))
        yield Rig(clock, shared_sim, shared_receiver, outbox, http, tmp_path, stores)
