"""A per-client sliding-window rate limit, with the clock injected so tests never sleep."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable


class SlidingWindowLimiter:
    """At most `limit` hits per `window_s` per key; memory is bounded by the active keys."""

    def __init__(
        self, limit: int, window_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        self._hits: dict[str, deque[float]] = {}

    def hit(self, key: str) -> float | None:
        """Record a hit; None if allowed, else the whole seconds to wait before the next one."""
        wait_s = self.blocked(key)
        if wait_s is not None:
            return wait_s
        now = self._clock()
        self._hits.setdefault(key, deque()).append(now)
        if len(self._hits) > 10_000:
            self._forget_idle(now - self.window_s)
        return None

    def blocked(self, key: str) -> float | None:
        """Whether `key` is at its limit now, without counting a hit: the seconds to wait, or None."""
        hits = self._hits.get(key)
        if not hits:
            return None
        horizon = self._clock() - self.window_s
        while hits and hits[0] <= horizon:
            hits.popleft()
        if len(hits) >= self.limit:
            return float(max(1, math.ceil(hits[0] - horizon)))
        return None

    def _forget_idle(self, horizon: float) -> None:
        idle = [key for key, hits in self._hits.items() if not hits or hits[-1] <= horizon]
        for key in idle:
            del self._hits[key]
