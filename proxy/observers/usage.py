"""Flag usage for the lifecycle (an inline observer: O(flags resolved), no I/O): which flags each
request evaluated and what they served (``proxy.lifecycle.usage``)."""

from __future__ import annotations

import time

from proxy.dataplane.exchange import Exchange
from proxy.lifecycle.usage import UsageCounter


class UsageObserver:
    name = "lifecycle"
    inline = True  # a few dict operations per flag; the store is written by a background task

    def __init__(self, counter: UsageCounter) -> None:
        self.counter = counter

    def observe(self, exchange: Exchange) -> None:
        resolved = exchange.resolved
        if exchange.control or not resolved:
            return
        self.counter.seen_all(resolved, time.time())
