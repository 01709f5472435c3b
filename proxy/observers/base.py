"""The observer contract and the dispatcher that keeps observers off the request's critical path.

An observer gets each finished ``Exchange`` once. The rule: **an observer can never slow or fail a
request.** The dispatcher enforces what it can:

- observers run after the response is complete, never before or during it;
- an exception from an observer is caught, counted and logged (once per observer per minute); the
  request and the other observers carry on;
- observers are *queued* by default: a background thread runs them, fed by a bounded queue, so one
  that blocks (I/O, a lock) delays nobody — when the queue is full, exchanges are dropped for the
  queued observers and counted;
- an observer may declare ``inline = True`` to run on the event loop right after the response: only
  for work that is O(1) and never blocks (the built-in access log, metrics and budget alerts, whose
  Slack sending is itself queued).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from proxy.dataplane.exchange import Exchange

log = logging.getLogger("flagproxy.observers")
ERROR_LOG_INTERVAL_S = 60.0


class Observer(Protocol):
    name: str
    inline: bool

    def observe(self, exchange: Exchange) -> None: ...


class Observers:
    """Hands every finished exchange to each observer under the rules above."""

    def __init__(
        self,
        observers: Sequence[Observer] = (),
        queue_size: int = 10_000,
        on_error: Callable[[str], None] | None = None,
        on_drop: Callable[[str, int], None] | None = None,
    ) -> None:
        self.inline = tuple(o for o in observers if getattr(o, "inline", False))
        self.queued = tuple(o for o in observers if not getattr(o, "inline", False))
        self.queue_size = queue_size
        self._on_error = on_error
        self._on_drop = on_drop
        self._pending: collections.deque[Exchange] = collections.deque()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._last_logged: dict[str, float] = {}
        self.dropped = 0

    def start(self) -> None:
        if self.queued and self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="flagproxy-observers", daemon=True)
            self._thread.start()

    def close(self, timeout_s: float = 2.0) -> None:
        """Run what is queued (up to ``timeout_s``), then stop the thread."""
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        self._wake.set()
        thread.join(timeout_s)
        if not thread.is_alive():
            self._thread = None

    def finish(self, exchange: Exchange) -> None:
        """The request is over: ``exchange`` is complete and goes to every observer."""
        exchange.duration_s = time.perf_counter() - exchange.started
        for observer in self.inline:
            try:
                observer.observe(exchange)
            except Exception:
                self._failed(observer)
        if self.queued:
            if len(self._pending) >= self.queue_size:
                self.dropped += 1
                if self._on_drop is not None:
                    for observer in self.queued:
                        self._on_drop(observer.name, 1)
                return
            self._pending.append(exchange)
            self._wake.set()

    def _run(self) -> None:
        pending = self._pending
        while True:
            self._wake.wait()
            self._wake.clear()
            while pending:
                exchange = pending.popleft()
                for observer in self.queued:
                    try:
                        observer.observe(exchange)
                    except Exception:
                        self._failed(observer)
            if self._stopping:
                return

    def _failed(self, observer: Observer) -> None:
        name = getattr(observer, "name", type(observer).__name__)
        if self._on_error is not None:
            self._on_error(name)
        now = time.monotonic()
        if now - self._last_logged.get(name, -ERROR_LOG_INTERVAL_S) >= ERROR_LOG_INTERVAL_S:
            self._last_logged[name] = now
            log.exception("observer %r failed (the request was not affected; logged once a minute)", name)
