"""What the Redis store logs about Redis going away: one line when an outage starts, one when it ends.

The sync loop retries every ``reconnect_max_s`` (0.5 s by default) while Redis is away; a line per
retry buried everything else in the log during an outage of minutes. The retries are counted instead
and the count is in the recovery line (``flagproxy_redis_connected`` shows the outage meanwhile).
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("flagproxy.store")


class Outage:
    def __init__(self, where: str, retry_max_s: float) -> None:
        self.where = where
        self.retry_max_s = retry_max_s
        self._since: float | None = None  # monotonic time the outage began; None: no outage
        self._failures = 0
        self._last_problem = ""
        self._connected_once = False

    @property
    def ongoing(self) -> bool:
        return self._since is not None

    def failed(self, problem: str, version: int, source: str, at_start: bool) -> None:
        """A sync attempt failed: the first failure of an outage is logged, the next ones counted."""
        self._last_problem = problem
        if self._since is not None:
            self._failures += 1
            return
        self._since = time.monotonic()
        self._failures = 1
        if at_start:
            log.error(
                "Redis unreachable at start (%s, %s): serving the %s; retrying every %gs at most, "
                "one line when it answers",
                self.where,
                problem,
                source,
                self.retry_max_s,
            )
        else:
            log.warning(
                "Redis unavailable (%s, %s): serving snapshot version %d; retrying every %gs at most, "
                "one line when it answers",
                self.where,
                problem,
                version,
                self.retry_max_s,
            )

    def recovered(self, version: int) -> None:
        """In sync with Redis again (or for the first time)."""
        if self._since is None:
            if not self._connected_once:
                log.info("connected to Redis (%s) at store version %d", self.where, version)
            self._connected_once = True
            return
        log.info(
            "Redis available again (%s) after %.1fs and %d failed attempt%s (last: %s): store version %d",
            self.where,
            time.monotonic() - self._since,
            self._failures,
            "" if self._failures == 1 else "s",
            self._last_problem,
            version,
        )
        self._since = None
        self._failures = 0
        self._connected_once = True
