"""Shared fixtures: async tests run on anyio's pytest plugin (it ships with starlette/httpx).

Tests that need a system program (PostgreSQL, Chromium) skip on a machine without it, naming
what to install. CI sets VOICEBOT_FORBID_SKIPS=1 after installing them: there a skip is a failure.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from bot.sim.postgres import INSTALL_HINT, LocalPostgres, find_bin_dir

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
