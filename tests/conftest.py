"""Shared fixtures: async tests run on anyio's pytest plugin (it ships with starlette/httpx)."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
