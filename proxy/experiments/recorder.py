"""Exposures and conversions, recorded off the request path.

``exposed`` and ``converted`` run on the event loop after a request is over: O(1), never blocking,
never raising. They skip repeats already written (an in-process memory of (experiment, unit,
variant), bounded), append to a bounded queue — a full queue drops and counts — and wake the writer.
One writer thread per process takes batches off the queue and applies them through the ``Backend``
(SQLite, Redis). A batch that fails is retried, with back-off, until it is written or the recorder
closes; what arrives meanwhile waits in the queue (or is dropped and counted when it is full). So no
request ever waits for analytics, and nothing is lost without being counted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from proxy.engine import Flag
from proxy.experiments.backend import Backend, BackendError
from proxy.experiments.records import NOT_EXPOSED_YET, ConversionRecord, ExposureRecord

log = logging.getLogger("flagproxy.experiments")
DEDUPE_TTL_S = 300.0
# A conversion of a unit with no exposure written yet is asked again, final, this much later: its
# exposure may be in another worker's or instance's queue, or its request still being answered
# (an origin that tracks the conversion before it responds).
ATTRIBUTION_GRACE_S = 2.0
RETRY_MIN_S = 0.05
RETRY_MAX_S = 2.0
ERROR_LOG_INTERVAL_S = 60.0
NO_EXPERIMENT = "no_experiment"  # a conversion for a goal no experiment flag is judged on
OTHER_GOAL = "other"  # the metrics label of goals no experiment or [[goals]] names (clients pick them)

Record = ExposureRecord | ConversionRecord


@dataclass(slots=True)
class LoopCounts:
    """Counted on the event loop, only ever increasing; the writer reports the growth to the metrics."""

    deduplicated: int = 0
    dropped: int = 0
    unjudged: collections.Counter[str] = field(default_factory=collections.Counter)  # goal label → n


class RecorderMetrics(Protocol):
    """Where the recorder reports (``proxy.metrics.Metrics`` implements it)."""

    def exposures(self, result: str, count: int) -> None: ...
    def experiment_conversions(self, goal: str, result: str, count: int) -> None: ...
    def experiment_write(self, backend: str, seconds: float, ok: bool) -> None: ...


class Uncounted:
    """No metrics."""

    def exposures(self, result: str, count: int) -> None:
        pass

    def experiment_conversions(self, goal: str, result: str, count: int) -> None:
        pass

    def experiment_write(self, backend: str, seconds: float, ok: bool) -> None:
        pass


class Recorder:
    def __init__(
        self,
        backend: Backend,
        metrics: RecorderMetrics | None = None,
        queue_size: int = 100_000,
        batch_size: int = 1000,
        flush_interval_s: float = 0.2,
        dedupe_size: int = 100_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.backend = backend
        self.metrics: RecorderMetrics = metrics or Uncounted()
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.dedupe_size = dedupe_size
        self.clock = clock
        self._pending: collections.deque[Record] = collections.deque()
        # hash((flag, unit, variant)) → when that exposure was written: repeats within DEDUPE_TTL_S are
        # skipped (the store would count them as repeats anyway); older ones are written again, so
        # an experiment reset elsewhere gets its units back within that time
        self._seen: collections.OrderedDict[int, float] = collections.OrderedDict()
        self._goals: Mapping[str, tuple[tuple[str, float], ...]] = {}  # goal → (flag, window_s), ...
        self._labelled: frozenset[str] = frozenset()  # goal names that get their own metrics label
        self.active = False
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._counts = LoopCounts()
        self._reported = LoopCounts()
        self._enqueued = 0  # records appended, ever (the event loop)
        self._settled = 0  # records written or dropped, ever (the writer)
        self._deferred: collections.deque[tuple[float, ConversionRecord]] = collections.deque()  # the writer
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_error_log = -ERROR_LOG_INTERVAL_S
        self.failing = False  # the last write failed (logged once it works again)

    # --- configuration (the event loop) -----------------------------------------------------------

    def use_flags(self, flags: Mapping[str, Flag], configured_goals: frozenset[str] = frozenset()) -> None:
        """A new snapshot: which experiments judge each goal (and with which window)."""
        goals: dict[str, list[tuple[str, float]]] = {}
        for key, flag in flags.items():
            experiment = flag.experiment
            if experiment is None or flag.overridden is not None:
                continue
            for goal in experiment.goals:
                goals.setdefault(goal, []).append((key, experiment.window_s))
        self._goals = {goal: tuple(pairs) for goal, pairs in goals.items()}
        self._labelled = frozenset(goals) | configured_goals
        self.active = bool(goals)  # some experiment is running (every experiment has a goal)

    def forget(self) -> None:
        """An experiment was reset: write every exposure again (none is a repeat of the lost data)."""
        self._seen.clear()

    # --- the event loop's side: O(1), never blocks ------------------------------------------------

    def exposed(self, flag: str, variant: str, unit: str, at: float) -> None:
        """``unit`` was served ``variant`` of the experiment flag ``flag`` at ``at`` (Unix seconds)."""
        h = hash((flag, unit, variant))
        seen = self._seen
        written = seen.get(h)
        if written is not None and at - written < DEDUPE_TTL_S:
            self._counts.deduplicated += 1
            return
        if not self._append(ExposureRecord(flag, unit, variant, at)):
            return
        # marked when queued, so the writer thread does no per-record work for it; un-marked if
        # its batch is dropped
        seen[h] = at
        if written is not None:
            seen.move_to_end(h)
        elif len(seen) > self.dedupe_size:
            seen.popitem(last=False)

    def converted(self, goal: str, unit: str, at: float, value: float | None = None) -> int:
        """``unit`` reached ``goal``: one record per experiment judged on it; how many were queued."""
        judged = self._goals.get(goal)
        if not judged:
            self._counts.unjudged[self.goal_label(goal)] += 1
            return 0
        queued = 0
        for flag, window_s in judged:
            queued += self._append(ConversionRecord(flag, goal, unit, at, window_s, value, final=False))
        return queued

    def goal_label(self, goal: str) -> str:
        return goal if goal in self._labelled else OTHER_GOAL

    def _append(self, record: Record) -> int:
        if len(self._pending) >= self.queue_size:
            self._counts.dropped += 1
            return 0
        self._pending.append(record)
        self._enqueued += 1
        if len(self._pending) >= self.batch_size:
            self._wake.set()
        return 1

    async def flushed(self, timeout_s: float) -> bool:
        """Wait until everything queued before this call is written (or dropped); False on timeout."""
        target = self._enqueued
        if self._settled >= target:
            return True
        loop = asyncio.get_running_loop()
        self._loop = loop
        future: asyncio.Future[None] = loop.create_future()
        self._waiters.append((target, future))
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout_s)
            return True
        except TimeoutError:
            return False
        finally:
            self._waiters = [(t, f) for t, f in self._waiters if f is not future]

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            try:
                self._loop = asyncio.get_running_loop()
            except RuntimeError:
                self._loop = None
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="flagproxy-experiments", daemon=True)
            self._thread.start()

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued (for up to ``timeout_s``), then stop the writer and the backend."""
        thread = self._thread
        if thread is not None:
            self._stopping = True
            self._deadline = time.monotonic() + timeout_s
            self._wake.set()
            thread.join(timeout_s + 1.0)
            self._thread = None
        self._report_loop_counts()
        try:
            self.backend.close()
        except Exception:
            log.exception("closing the experiment store failed")

    # --- the writer thread ------------------------------------------------------------------------

    _deadline = 0.0

    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            # what is queued now, in batches; what arrives meanwhile waits for the next round (a full
            # batch, a flush request or the interval), so a busy writer never falls into writing
            # a transaction per handful of records
            todo = len(self._pending)
            while todo > 0:
                batch = self._take(min(todo, self.batch_size))
                todo -= len(batch)
                if not self._write(batch):
                    break  # shutting down with the store still failing
            self._retry_deferred(final_now=self._stopping)
            if self._stopping:
                left = len(self._pending)
                if left:
                    self._pending.clear()
                    self._dropped(left)
                    log.error(
                        "%d experiment records were not written before shutdown (counted as dropped)", left
                    )
            self._report_loop_counts()
            self._settle_waiters()
            if self._stopping:
                return

    def _retry_deferred(self, final_now: bool) -> None:
        """Ask again, final, about conversions whose unit had no exposure written (once due)."""
        deferred, now, limit = self._deferred, time.monotonic(), self.queue_size

        def ready() -> bool:  # due, or beyond the bound (the oldest are asked early)
            return bool(deferred) and (final_now or deferred[0][0] <= now or len(deferred) > limit)

        while ready():
            batch: list[Record] = []
            while ready() and len(batch) < self.batch_size:
                batch.append(deferred.popleft()[1])
            if not self._write(batch, settle=False):
                return

    def _take(self, n: int) -> list[Record]:
        pending = self._pending
        return [pending.popleft() for _ in range(min(n, len(pending)))]

    def _write(self, batch: list[Record], settle: bool = True) -> bool:
        """Apply one batch, retrying until it is written; False when shutdown came first."""
        exposures = [r for r in batch if isinstance(r, ExposureRecord)]
        conversions = [r for r in batch if isinstance(r, ConversionRecord)]
        delay = RETRY_MIN_S
        while True:
            started = time.perf_counter()
            try:
                applied = self.backend.apply(exposures, conversions)
            except BackendError as exc:
                self.metrics.experiment_write(self.backend.name, time.perf_counter() - started, False)
                self.failing = True
                self._log_failure(exc)
                if self._stopping and time.monotonic() >= self._deadline:
                    self._lost(exposures, len(batch), settle)
                    return False
                self._wake.wait(delay)
                self._wake.clear()
                delay = min(delay * 2, RETRY_MAX_S)
                self._settle_waiters()  # a waiter whose records are in this batch times out on its own
                continue
            except Exception:  # a bug in a backend: never let it kill the writer
                log.exception("the experiment store failed on a batch of %d records (dropped)", len(batch))
                self._lost(exposures, len(batch), settle)
                return True
            break
        self.metrics.experiment_write(self.backend.name, time.perf_counter() - started, True)
        if self.failing:
            self.failing = False
            log.warning("experiment records are being written again")
        metrics = self.metrics
        for outcome, n in collections.Counter(applied.exposures).items():
            metrics.exposures(outcome, n)
        by_goal: collections.Counter[tuple[str, str]] = collections.Counter()
        due = time.monotonic() + ATTRIBUTION_GRACE_S
        for record, outcome in zip(conversions, applied.conversions, strict=False):
            if outcome == NOT_EXPOSED_YET:
                self._defer(due, record._replace(final=True))
            else:
                by_goal[(self.goal_label(record.goal), outcome)] += 1
        for (goal, outcome), n in by_goal.items():
            metrics.experiment_conversions(goal, outcome, n)
        if settle:
            self._settled += len(batch)
        return True

    def _defer(self, due: float, record: ConversionRecord) -> None:
        self._deferred.append((due, record))  # bounded by _retry_deferred

    def _lost(self, exposures: list[ExposureRecord], n: int, settle: bool = True) -> None:
        """A batch that will never be written: counted, and its exposures no longer count as
        written (a later repeat is queued again)."""
        for record in exposures:
            self._seen.pop(hash((record.flag, record.unit, record.variant)), None)
        self._dropped(n, settle)

    def _dropped(self, n: int, settle: bool = True) -> None:
        self.metrics.exposures("dropped", n)
        if settle:
            self._settled += n

    def _log_failure(self, exc: BackendError) -> None:
        now = time.monotonic()
        if now - self._last_error_log >= ERROR_LOG_INTERVAL_S:
            self._last_error_log = now
            log.error("writing experiment records failed, retrying (logged once a minute): %s", exc)

    def _settle_waiters(self) -> None:
        loop = self._loop
        if loop is None or not self._waiters or loop.is_closed():
            return
        settled = self._settled
        with contextlib.suppress(RuntimeError):  # the loop closed in between
            loop.call_soon_threadsafe(self._release, settled)

    def _release(self, settled: int) -> None:
        for target, future in self._waiters:
            if target <= settled and not future.done():
                future.set_result(None)

    def _report_loop_counts(self) -> None:
        """Report what the event loop counted since last time (its counters only grow)."""
        counts, reported, metrics = self._counts, self._reported, self.metrics
        n = counts.deduplicated - reported.deduplicated
        if n:
            reported.deduplicated += n
            metrics.exposures("deduplicated", n)
        n = counts.dropped - reported.dropped
        if n:
            reported.dropped += n
            metrics.exposures("dropped", n)
        for goal, total in list(counts.unjudged.items()):
            n = total - reported.unjudged[goal]
            if n:
                reported.unjudged[goal] += n
                metrics.experiment_conversions(goal, NO_EXPERIMENT, n)
