"""The recorder: off the request path, bounded, retried, and never silent about what it loses.

The backend here is a test double that records the batches it is handed (and can block or fail on
demand); the backends themselves are tested in test_experiment_backends.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Sequence

import pytest

from proxy.engine import compile_flag
from proxy.experiments.backend import BackendError
from proxy.experiments.recorder import DEDUPE_TTL_S, Recorder
from proxy.experiments.records import Applied, ConversionRecord, Counts, ExposureRecord


class Batches:
    """A backend that keeps every batch; ``gate`` blocks writes, ``failures`` fail the next n."""

    name = "test"

    def __init__(self) -> None:
        self.exposures: list[ExposureRecord] = []
        self.conversions: list[ConversionRecord] = []
        self.calls = 0
        self.failures = 0
        self.crash = False
        self.gate = threading.Event()
        self.gate.set()
        self.applied = threading.Condition()
        self.closed = False

    def apply(self, exposures: Sequence[ExposureRecord], conversions: Sequence[ConversionRecord]) -> Applied:
        self.gate.wait(10)
        with self.applied:
            self.calls += 1
            self.applied.notify_all()  # also for a waiter on ``calls``
            if self.crash:
                raise RuntimeError("a bug")
            if self.failures:
                self.failures -= 1
                raise BackendError("test backend: down")
            self.exposures += exposures
            self.conversions += conversions
            self.applied.notify_all()
            return Applied(["new"] * len(exposures), ["counted"] * len(conversions))

    def wait_for(self, exposures: int = 0, conversions: int = 0) -> None:
        with self.applied:
            ok = self.applied.wait_for(
                lambda: len(self.exposures) >= exposures and len(self.conversions) >= conversions, 10
            )
        assert ok, (len(self.exposures), len(self.conversions))

    def counts(self, flag: str) -> Counts | None:
        return None

    def flags(self) -> list[str]:
        return []

    def reset(self, flag: str) -> bool:
        return False

    def close(self) -> None:
        self.closed = True


class Tally:
    def __init__(self) -> None:
        self.exposure = Counter[str]()
        self.conversion = Counter[tuple[str, str]]()
        self.writes = Counter[bool]()

    def exposures(self, result: str, count: int) -> None:
        self.exposure[result] += count

    def experiment_conversions(self, goal: str, result: str, count: int) -> None:
        self.conversion[(goal, result)] += count

    def experiment_write(self, backend: str, seconds: float, ok: bool) -> None:
        self.writes[ok] += 1


def recorder(backend: Batches, **kwargs: float) -> tuple[Recorder, Tally]:
    tally = Tally()
    options = {"flush_interval_s": 0.01, **kwargs}
    rec = Recorder(backend, tally, **options)  # type: ignore[arg-type]
    price = compile_flag(
        "price",
        {
            "variants": {"control": {"weight": 1}, "cheap": {"weight": 1}},
            "experiment": {"goals": ["buy", "trade"], "window_hours": 2},
        },
    )
    signal = compile_flag("signal", {"percentage": 50, "experiment": {"goals": ["trade"]}})
    plain = compile_flag("plain", {})
    rec.use_flags({"price": price, "signal": signal, "plain": plain}, frozenset({"signup"}))
    return rec, tally


def test_repeats_are_written_once_and_counted_as_deduplicated() -> None:
    backend = Batches()
    rec, tally = recorder(backend)
    rec.start()
    now = time.time()
    for i in range(100):
        rec.exposed("price", "cheap", "u1", now + i)
    rec.exposed("price", "control", "u1", now)  # another variant: the store decides (multiple)
    backend.wait_for(exposures=2)
    for _ in range(10):  # now known as written: skipped on the event loop's side
        rec.exposed("price", "cheap", "u1", now + 200)
    rec.close()
    assert [(e.unit, e.variant) for e in backend.exposures] == [("u1", "cheap"), ("u1", "control")]
    assert tally.exposure["deduplicated"] == 109
    assert tally.exposure["new"] == 2
    assert backend.closed


def test_an_exposure_older_than_the_dedupe_time_is_written_again() -> None:
    backend = Batches()
    rec, _ = recorder(backend)
    rec.start()
    now = time.time()
    rec.exposed("price", "cheap", "u1", now)
    backend.wait_for(exposures=1)
    rec.exposed("price", "cheap", "u1", now + DEDUPE_TTL_S + 1)
    backend.wait_for(exposures=2)
    rec.forget()  # a reset: everything is written again
    rec.exposed("price", "cheap", "u1", now + DEDUPE_TTL_S + 2)
    backend.wait_for(exposures=3)
    rec.close()


def test_conversions_fan_out_to_every_experiment_judged_on_the_goal() -> None:
    backend = Batches()
    rec, tally = recorder(backend)
    rec.start()
    assert rec.converted("trade", "u1", 10.0, 2.5) == 2
    assert rec.converted("buy", "u1", 11.0) == 1
    assert rec.converted("signup", "u1", 12.0) == 0  # a configured goal no experiment lists
    assert rec.converted("client-made-up", "u1", 12.0) == 0
    backend.wait_for(conversions=3)
    rec.close()
    got = sorted((c.flag, c.goal, c.window_s, c.value) for c in backend.conversions)
    assert got == [
        ("price", "buy", 7200, None),
        ("price", "trade", 7200, 2.5),
        ("signal", "trade", 72 * 3600, 2.5),
    ]
    assert tally.conversion[("signup", "no_experiment")] == 1
    assert tally.conversion[("other", "no_experiment")] == 1  # a client's goal names never become labels
    assert tally.conversion[("trade", "counted")] == 2


def test_a_killed_or_promoted_experiment_is_judged_no_more() -> None:
    from proxy.engine import with_override

    backend = Batches()
    rec, _ = recorder(backend)
    price = compile_flag("price", {"variants": {"a": {"weight": 1}}, "experiment": {"goals": ["buy"]}})
    rec.use_flags({"price": with_override(price, {"kill": True})})
    assert rec.converted("buy", "u1", 1.0) == 0


def test_a_full_queue_drops_and_counts_and_the_caller_never_waits() -> None:
    backend = Batches()
    backend.gate.clear()  # the store hangs
    rec, tally = recorder(backend, queue_size=10, batch_size=5)
    rec.start()
    started = time.perf_counter()
    for i in range(40):
        rec.exposed("price", "cheap", f"u{i}", 1.0)
    elapsed = time.perf_counter() - started
    backend.gate.set()
    rec.close()
    assert elapsed < 0.5  # 40 appends; a blocked write would take 10 s
    written = {e.unit for e in backend.exposures}
    assert tally.exposure["dropped"] == 40 - len(written)
    assert 10 <= len(written) <= 15  # the queue, plus at most the batch the writer held


def test_a_failing_store_is_retried_until_it_works_and_nothing_is_counted_twice() -> None:
    backend = Batches()
    backend.failures = 3
    rec, tally = recorder(backend)
    rec.start()
    for i in range(5):
        rec.exposed("signal", "true", f"u{i}", 1.0)
    backend.wait_for(exposures=5)
    rec.close()
    assert sorted(e.unit for e in backend.exposures) == [f"u{i}" for i in range(5)]
    assert tally.writes[False] == 3
    assert tally.exposure["dropped"] == 0


def test_closing_while_the_store_is_down_gives_up_in_time_and_counts_what_is_lost() -> None:
    backend = Batches()
    backend.failures = 10**9
    rec, tally = recorder(backend)
    rec.start()
    for i in range(7):
        rec.exposed("price", "cheap", f"u{i}", 1.0)
    rec.converted("buy", "u1", 2.0)
    started = time.monotonic()
    rec.close(timeout_s=0.5)
    assert time.monotonic() - started < 3
    assert tally.exposure["dropped"] == 8
    assert backend.exposures == []


def test_a_backend_bug_drops_the_batch_and_the_writer_lives_on() -> None:
    backend = Batches()
    backend.crash = True
    rec, tally = recorder(backend)
    rec.start()
    rec.exposed("price", "cheap", "u1", 1.0)
    with backend.applied:
        assert backend.applied.wait_for(lambda: backend.calls >= 1, 10)
    backend.crash = False
    rec.exposed("price", "cheap", "u2", 1.0)
    backend.wait_for(exposures=1)
    rec.close()
    assert [e.unit for e in backend.exposures] == ["u2"]
    assert tally.exposure["dropped"] == 1


@pytest.mark.anyio
async def test_flushed_waits_for_what_was_queued_before_it() -> None:
    backend = Batches()
    rec, _ = recorder(backend, flush_interval_s=5.0)  # only a flush request wakes the writer early
    rec.start()
    rec.converted("buy", "u1", 1.0)
    assert await rec.flushed(5.0)
    assert len(backend.conversions) == 1
    backend.gate.clear()
    rec.converted("buy", "u2", 1.0)
    assert not await rec.flushed(0.2)  # the store hangs: the caller gets False, not a hang
    backend.gate.set()
    assert await rec.flushed(5.0)
    await asyncio.to_thread(rec.close)
    assert [c.unit for c in backend.conversions] == ["u1", "u2"]


def test_a_conversion_before_its_exposure_is_written_is_asked_again_final(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The store answers not_exposed_yet to a first, non-final ask; the recorder asks again, final,
    after the grace time, and counts only the final answer."""
    import proxy.experiments.recorder as recorder_module

    monkeypatch.setattr(recorder_module, "ATTRIBUTION_GRACE_S", 0.05)

    class NotYet(Batches):
        def apply(
            self, exposures: Sequence[ExposureRecord], conversions: Sequence[ConversionRecord]
        ) -> Applied:
            with self.applied:
                self.calls += 1
                self.conversions += conversions
                self.applied.notify_all()
                return Applied([], ["counted" if c.final else "not_exposed_yet" for c in conversions])

    backend = NotYet()
    rec, tally = recorder(backend)
    rec.start()
    assert rec.converted("buy", "u1", 5.0) == 1
    backend.wait_for(conversions=2)
    rec.close()
    assert [c.final for c in backend.conversions] == [False, True]
    assert all(c.unit == "u1" and c.at == 5.0 for c in backend.conversions)
    assert tally.conversion[("buy", "counted")] == 1
    assert ("buy", "not_exposed_yet") not in tally.conversion


def test_shutdown_asks_the_waiting_conversions_at_once() -> None:
    class NotYet(Batches):
        def apply(
            self, exposures: Sequence[ExposureRecord], conversions: Sequence[ConversionRecord]
        ) -> Applied:
            with self.applied:
                self.conversions += conversions
                self.applied.notify_all()
                return Applied([], ["unattributed" if c.final else "not_exposed_yet" for c in conversions])

    backend = NotYet()
    rec, tally = recorder(backend)
    rec.start()
    rec.converted("buy", "u9", 5.0)
    backend.wait_for(conversions=1)
    started = time.monotonic()
    rec.close()
    assert time.monotonic() - started < 1.5  # not the 2 s grace
    assert [c.final for c in backend.conversions] == [False, True]
    assert tally.conversion[("buy", "unattributed")] == 1
