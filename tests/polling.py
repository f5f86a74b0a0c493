"""Waiting on what the simulators record: they record what happened, they do not signal it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

POLL_S = 0.01


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Returns once `condition()` holds; TimeoutError when it has not within `timeout_s`."""
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 (nothing to wait on: the state is only recorded)
            await asyncio.sleep(POLL_S)
