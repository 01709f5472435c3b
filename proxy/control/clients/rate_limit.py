"""``[client_api] rate_limit_per_s``: a token bucket per client key, per worker process."""

from __future__ import annotations

import math
import time


class RateLimiter:
    def __init__(self, per_s: float, burst: int = 0) -> None:
        self.per_s = per_s
        self.burst = float(burst or max(1, math.ceil(per_s)))
        self._buckets: dict[str, tuple[float, float]] = {}  # key name → (tokens, at)

    def retry_after(self, name: str, now: float | None = None) -> int:
        """0 when ``name`` may go ahead (a token is taken), else whole seconds until it may."""
        if self.per_s <= 0:
            return 0
        now = time.monotonic() if now is None else now
        tokens, at = self._buckets.get(name, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.per_s)
        if tokens >= 1.0:
            self._buckets[name] = (tokens - 1.0, now)
            return 0
        self._buckets[name] = (tokens, now)
        return max(1, math.ceil((1.0 - tokens) / self.per_s))
