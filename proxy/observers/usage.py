"""Flag usage for the lifecycle (an inline observer, no I/O): which flags requests evaluated and
what they served (``proxy.lifecycle.usage``).

A request resolves every flag that applies to its path (hundreds, with thousands of flags), so
counting each one on every request would cost the event loop as much as fitting the headers. The
observer counts every request up to ``SAMPLE_INTERVAL_S`` apart and skips the rest: at low traffic
everything is counted, under load at most 100 requests a second per process — over the 7 days of
the staleness window that is tens of millions of samples, so an outcome served to one request in
a few million still shows up, and "last evaluated" is exact to the interval.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from proxy.dataplane.exchange import Exchange
from proxy.lifecycle.usage import UsageCounter

SAMPLE_INTERVAL_S = 0.01


class UsageObserver:
    name = "lifecycle"
    inline = True  # one clock read per request; a few dict operations per flag on sampled ones

    def __init__(self, counter: UsageCounter, clock: Callable[[], float] = time.time) -> None:
        self.counter = counter
        self.clock = clock
        self._next = float("-inf")

    def observe(self, exchange: Exchange) -> None:
        resolved = exchange.resolved
        if exchange.control or not resolved:
            return
        now = self.clock()
        if now < self._next:
            return
        self._next = now + SAMPLE_INTERVAL_S
        self.counter.seen_all(resolved, now)
