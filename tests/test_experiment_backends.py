"""The experiment backends (SQLite, Redis) against one contract, a plain-Python model of it, several
writing processes, and their faults.

Redis is always the suite's private ``redis-server`` (``redis_server``, or ``fresh_redis`` for the
tests that kill it), each backend in a namespace of its own; SQLite is a file under ``tmp_path``.
Expected values are written out by hand or computed by ``Model`` below, never by the backends.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.crc import key_slot
from support import PYTHON, REPO, RedisServer, clean_env, free_port, unique_namespace

from proxy.experiments.backend import Backend, BackendError
from proxy.experiments.records import Applied, ConversionRecord, Counts, ExposureRecord
from proxy.experiments.redis_backend import RedisBackend
from proxy.experiments.sqlite import SQLiteBackend

FLAG = "checkout"
DAY = 86400.0

Make = Callable[..., Backend]


def expose(unit: str, variant: str, at: float, flag: str = FLAG) -> ExposureRecord:
    return ExposureRecord(flag=flag, unit=unit, variant=variant, at=at)


def convert(
    unit: str,
    at: float,
    goal: str = "purchase",
    window_s: float = DAY,
    value: float | None = None,
    flag: str = FLAG,
) -> ConversionRecord:
    return ConversionRecord(flag=flag, goal=goal, unit=unit, at=at, window_s=window_s, value=value)


@pytest.fixture(params=["sqlite", "redis"])
def make_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Make]:
    """``make(store="")`` → a backend; the same ``store`` name gives another backend object on the
    same data (file or Redis namespace), no name a fresh one. All are closed afterwards."""
    server: RedisServer | None = request.getfixturevalue("redis_server") if request.param == "redis" else None
    made: list[Backend] = []
    fresh = itertools.count()
    namespaces: dict[str, str] = {}

    def make(store: str = "") -> Backend:
        store = store or f"fresh-{next(fresh)}"
        backend: Backend
        if server is None:
            backend = SQLiteBackend(str(tmp_path / store / "experiments.sqlite"))
        else:
            environment = namespaces.setdefault(store, unique_namespace(f"{request.node.name}-{store}"))
            backend = RedisBackend(server.url, environment=environment)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


@pytest.fixture
def backend(make_backend: Make) -> Backend:
    return make_backend()


# --- the contract, case by case ------------------------------------------------------------------------


def test_the_first_exposure_fixes_variant_and_time_then_repeats(backend: Backend) -> None:
    assert backend.counts(FLAG) is None
    first = backend.apply([expose("u1", "treatment", 100.0), expose("u1", "treatment", 50.0)], [])
    second = backend.apply([expose("u1", "treatment", 200.0), expose("u2", "control", 300.0)], [])
    assert first.exposures == ["new", "repeat"]
    assert second.exposures == ["repeat", "new"]
    assert first.conversions == second.conversions == []
    assert backend.counts(FLAG) == Counts(started_at=100.0, users={"treatment": 1, "control": 1})
    # the unit's time is its first exposure's (100), not the earlier repeat's (50): converting at 75
    # is before it
    assert backend.apply([], [convert("u1", 75.0)]).conversions == ["before_exposure"]


def test_a_unit_exposed_to_another_variant_counts_once_and_keeps_its_first(backend: Backend) -> None:
    applied = backend.apply(
        [
            expose("u1", "a", 1.0),
            expose("u1", "b", 2.0),
            expose("u1", "c", 3.0),
            expose("u1", "b", 4.0),
            expose("u1", "a", 5.0),
            expose("u2", "b", 6.0),
        ],
        [convert("u1", 10.0)],
    )
    assert applied.exposures == ["new", "multiple", "multiple", "multiple", "repeat", "new"]
    assert applied.conversions == ["counted"]
    again = backend.apply([expose("u1", "c", 7.0), expose("u2", "a", 8.0)], [])
    assert again.exposures == ["multiple", "multiple"]
    assert backend.counts(FLAG) == Counts(
        started_at=1.0,
        users={"a": 1, "b": 1},  # u1 stays in a, u2 in b
        multiple_exposures=2,  # distinct units, not the 5 multiple exposures
        conversions={"purchase": {"a": 1}},  # u1's conversion is a's
    )


def test_a_conversion_counts_once_per_unit_flag_and_goal(backend: Backend) -> None:
    backend.apply([expose("u1", "a", 0.0), expose("u2", "b", 0.0), expose("u1", "x", 0.0, flag="other")], [])
    applied = backend.apply(
        [],
        [
            convert("u1", 1.0),
            convert("u1", 2.0),  # same goal again
            convert("u1", 3.0, goal="signup"),  # another goal
            convert("u1", 4.0, flag="other"),  # another experiment
            convert("u2", 5.0),
        ],
    )
    assert applied.conversions == ["counted", "duplicate", "counted", "counted", "counted"]
    assert backend.apply([], [convert("u1", 6.0), convert("u1", 7.0, flag="other")]).conversions == [
        "duplicate",
        "duplicate",
    ]
    assert backend.counts(FLAG) == Counts(
        started_at=0.0,
        users={"a": 1, "b": 1},
        conversions={"purchase": {"a": 1, "b": 1}, "signup": {"a": 1}},
    )
    assert backend.counts("other") == Counts(
        started_at=0.0, users={"x": 1}, conversions={"purchase": {"x": 1}}
    )


def test_the_window_is_closed_at_both_ends(backend: Backend) -> None:
    backend.apply([expose("u1", "a", 100.0)], [])
    just_before = math.nextafter(100.0, 0.0)
    just_after_end = math.nextafter(150.0, math.inf)
    applied = backend.apply(
        [],
        [
            convert("u1", just_before, goal="early", window_s=50.0),
            convert("u1", 100.0, goal="at-exposure", window_s=50.0),
            convert("u1", 150.0, goal="at-window-end", window_s=50.0),
            convert("u1", just_after_end, goal="late", window_s=50.0),
            convert("u1", 100.0, goal="zero-window", window_s=0.0),
            convert("u1", 1e12, goal="no-window", window_s=math.inf),
        ],
    )
    assert applied.conversions == [
        "before_exposure",
        "counted",
        "counted",
        "outside_window",
        "counted",
        "counted",
    ]
    counts = backend.counts(FLAG)
    assert counts is not None
    assert counts.conversions == {
        "at-exposure": {"a": 1},
        "at-window-end": {"a": 1},
        "zero-window": {"a": 1},
        "no-window": {"a": 1},
    }
    # not counted is not spent: the same goal converts later, inside the window
    assert backend.apply([], [convert("u1", 120.0, goal="early", window_s=50.0)]).conversions == ["counted"]


def test_conversions_of_units_never_exposed_only_count_as_unattributed(
    backend: Backend, make_backend: Make
) -> None:
    applied = backend.apply([], [convert("ghost", 1.0, value=9.0), convert("ghost", 2.0, value=9.0)])
    assert applied.conversions == ["unattributed", "unattributed"]
    assert backend.counts(FLAG) == Counts(unattributed=2)  # no start, no users, no values
    assert backend.flags() == [FLAG]
    # exposed later, the unit converts from then on; what was unattributed stays so
    applied = backend.apply([expose("ghost", "a", 10.0)], [convert("ghost", 11.0, value=1.5)])
    assert applied.conversions == ["counted"]
    assert backend.counts(FLAG) == Counts(
        started_at=10.0,
        users={"a": 1},
        unattributed=2,
        conversions={"purchase": {"a": 1}},
        values={"purchase": {"a": 1.5}},
    )


def test_values_of_counted_conversions_are_summed_per_goal_and_variant(backend: Backend) -> None:
    backend.apply([expose(f"u{i}", "ab"[i % 2], 0.0) for i in range(6)], [])
    applied = backend.apply(
        [],
        [
            convert("u0", 1.0, value=2.5),
            convert("u2", 1.0, value=4.0),
            convert("u4", 1.0),  # counted, no value
            convert("u0", 2.0, value=100.0),  # duplicate: its value is not added
            convert("u1", 1.0, value=-0.25),
            convert("u3", 1.0, goal="visit"),  # a goal without values
            convert("u5", DAY + 1.0, value=1000.0),  # outside the window
        ],
    )
    assert applied.conversions == [
        "counted",
        "counted",
        "counted",
        "duplicate",
        "counted",
        "counted",
        "outside_window",
    ]
    counts = backend.counts(FLAG)
    assert counts is not None
    assert counts.conversions == {"purchase": {"a": 3, "b": 1}, "visit": {"b": 1}}
    assert counts.values == {"purchase": {"a": 6.5, "b": -0.25}}


def test_a_value_that_is_not_finite_is_left_out_but_the_conversion_counts(backend: Backend) -> None:
    backend.apply([expose("u1", "a", 0.0), expose("u2", "a", 0.0), expose("u3", "a", 0.0)], [])
    applied = backend.apply(
        [],
        [
            convert("u1", 1.0, value=math.inf),
            convert("u2", 1.0, value=math.nan),
            convert("u3", 1.0, value=2.0),
        ],
    )
    assert applied.conversions == ["counted"] * 3
    counts = backend.counts(FLAG)
    assert counts is not None
    assert counts.conversions == {"purchase": {"a": 3}}
    assert counts.values == {"purchase": {"a": 2.0}}


def test_started_at_is_the_earliest_first_exposure_whatever_the_order_of_arrival(backend: Backend) -> None:
    backend.apply([expose("u1", "a", 200.0)], [])
    backend.apply([expose("u2", "b", 100.0), expose("u3", "a", 150.0)], [])
    backend.apply([expose("u4", "a", 300.0), expose("u1", "a", 10.0)], [])  # a repeat does not move it
    counts = backend.counts(FLAG)
    assert counts is not None and counts.started_at == 100.0


def test_applying_a_batch_again_changes_nothing(make_backend: Make) -> None:
    backend = make_backend("shared")
    backend.apply([expose("u0", "a", 0.0)], [])
    batch = (
        [expose("u1", "a", 10.0), expose("u2", "b", 10.0), expose("u0", "b", 11.0), expose("u1", "b", 12.0)],
        [
            convert("u1", 20.0, value=3.0),
            convert("u2", 20.0),
            convert("u0", 21.0, value=1.0),
            convert("u2", 5.0),
        ],
    )
    first = backend.apply(*batch)
    assert first.exposures == ["new", "new", "multiple", "multiple"]
    assert first.conversions == ["counted", "counted", "counted", "before_exposure"]
    expected = Counts(
        started_at=0.0,
        users={"a": 2, "b": 1},
        multiple_exposures=2,
        conversions={"purchase": {"a": 2, "b": 1}},
        values={"purchase": {"a": 4.0}},
    )
    assert backend.counts(FLAG) == expected
    second = backend.apply(*batch)
    assert second.exposures == ["repeat", "repeat", "multiple", "multiple"]
    assert second.conversions == ["duplicate", "duplicate", "duplicate", "before_exposure"]
    # retried by another writer (another process, after this one failed): the same
    third = make_backend("shared").apply(*batch)
    assert third == second
    assert backend.counts(FLAG) == expected


def test_reset_forgets_one_flag_only(backend: Backend) -> None:
    backend.apply(
        [expose("u1", "a", 1.0), expose("u1", "b", 1.0, flag="other")],
        [convert("u1", 2.0), convert("x", 2.0)],
    )
    assert backend.flags() == [FLAG, "other"]
    assert backend.reset(FLAG) is True
    assert backend.counts(FLAG) is None
    assert backend.flags() == ["other"]
    assert backend.reset(FLAG) is False
    assert backend.reset("never-seen") is False
    assert backend.counts("other") == Counts(started_at=1.0, users={"b": 1})
    # a fresh start: the unit is new again, in whatever variant it is served now
    applied = backend.apply([expose("u1", "b", 50.0)], [convert("u1", 51.0)])
    assert applied == Applied(exposures=["new"], conversions=["counted"])
    assert backend.counts(FLAG) == Counts(started_at=50.0, users={"b": 1}, conversions={"purchase": {"b": 1}})


def test_flags_are_the_flags_with_data_sorted(backend: Backend) -> None:
    assert backend.flags() == []
    assert backend.apply([], []) == Applied()
    assert backend.flags() == []
    backend.apply([expose("u", "a", 1.0, flag="zeta"), expose("u", "a", 1.0, flag="Alpha")], [])
    backend.apply([], [convert("u", 1.0, flag="mu")])  # unattributed only: data all the same
    assert backend.flags() == ["Alpha", "mu", "zeta"]


def test_two_flags_are_independent(backend: Backend) -> None:
    applied = backend.apply(
        [expose("u1", "a", 5.0, flag="one"), expose("u1", "b", 7.0, flag="two")],
        [convert("u1", 6.0, flag="one", value=1.0), convert("u1", 6.0, flag="two", value=1.0)],
    )
    assert applied.exposures == ["new", "new"]  # not "multiple": another experiment
    assert applied.conversions == ["counted", "before_exposure"]  # u1 came to "two" at 7
    assert backend.counts("one") == Counts(
        started_at=5.0, users={"a": 1}, conversions={"purchase": {"a": 1}}, values={"purchase": {"a": 1.0}}
    )
    assert backend.counts("two") == Counts(started_at=7.0, users={"b": 1})


HOSTILE = ["a|b", "3:x", "{tag}", "}{", ":", "|", "", "line\nbreak", "ünï-çødé ✓", "nul\x00byte", "0:", "%7B"]


def test_hostile_strings_round_trip_and_never_collide(backend: Backend) -> None:
    # goal "a" + variant "bc" and goal "ab" + variant "c" would share a naive "goal+variant" field;
    # unit "1" in goal "1:" and unit ":1" in goal "1" would share "goal:unit"
    flags = ["hostile|{x}", "hostile|{x}}", "", "{"]
    for flag in flags:
        exposures = [expose(f"unit{s}", f"v{s}", float(i), flag=flag) for i, s in enumerate(HOSTILE)]
        exposures += [expose("bc", "bc", 0.0, flag=flag), expose("c", "c", 0.0, flag=flag)]
        exposures += [expose("1", "x", 0.0, flag=flag), expose(":1", "x", 0.0, flag=flag)]
        conversions = [convert(f"unit{s}", 20.0, goal=s, value=1.0, flag=flag) for s in HOSTILE]
        conversions += [convert("bc", 1.0, goal="a", flag=flag), convert("c", 1.0, goal="ab", flag=flag)]
        conversions += [convert("1", 1.0, goal="1:", flag=flag), convert(":1", 1.0, goal="1", flag=flag)]
        applied = backend.apply(exposures, conversions)
        assert applied.exposures == ["new"] * len(exposures)
        assert applied.conversions == ["counted"] * len(conversions)
    assert backend.flags() == sorted(flags)
    for flag in flags:
        expected = Counts(
            started_at=0.0,
            users={**{f"v{s}": 1 for s in HOSTILE}, "bc": 1, "c": 1, "x": 2},
            conversions={
                **{s: {f"v{s}": 1} for s in HOSTILE},
                "a": {"bc": 1},
                "ab": {"c": 1},
                "1:": {"x": 1},
                "1": {"x": 1},
            },
            values={s: {f"v{s}": 1.0} for s in HOSTILE},
        )
        assert backend.counts(flag) == expected
    assert backend.reset("hostile|{x}") is True
    assert backend.flags() == sorted(["hostile|{x}}", "", "{"])
    assert backend.counts("hostile|{x}}") is not None


def test_counts_are_read_safely_from_another_thread_while_one_writes(backend: Backend) -> None:
    errors: list[BaseException] = []
    seen: list[int] = []
    done = threading.Event()

    def read() -> None:
        try:
            while not done.is_set():
                counts = backend.counts(FLAG)
                seen.append(sum(counts.users.values()) if counts else 0)
        except BaseException as exc:
            errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for batch in range(40):
            backend.apply([expose(f"u{batch}-{i}", "ab"[i % 2], float(batch)) for i in range(26)], [])
    finally:
        done.set()
        reader.join(10)
    assert errors == []
    assert seen == sorted(seen)  # each read a consistent snapshot: never fewer units than before
    assert backend.counts(FLAG) == Counts(started_at=0.0, users={"a": 520, "b": 520})


# --- the same answers as a plain-Python model, on random batches -----------------------------------------


class Model:
    """The contract written out plainly, with nothing shared with the backends but the record types."""

    def __init__(self) -> None:
        self.first: dict[tuple[str, str], tuple[str, float]] = {}  # (flag, unit) → (variant, at)
        self.multiple: set[tuple[str, str]] = set()
        self.counted: dict[tuple[str, str, str], tuple[str, float | None]] = {}  # (flag, goal, unit)
        self.unattributed: Counter[str] = Counter()

    def apply(self, exposures: Sequence[ExposureRecord], conversions: Sequence[ConversionRecord]) -> Applied:
        applied = Applied()
        for e in exposures:
            first = self.first.get((e.flag, e.unit))
            if first is None:
                self.first[(e.flag, e.unit)] = (e.variant, e.at)
                applied.exposures.append("new")
            elif first[0] == e.variant:
                applied.exposures.append("repeat")
            else:
                self.multiple.add((e.flag, e.unit))
                applied.exposures.append("multiple")
        for c in conversions:
            exposed = self.first.get((c.flag, c.unit))
            if exposed is None and not c.final:  # its exposure may still come: nothing recorded
                applied.conversions.append("not_exposed_yet")
            elif exposed is None:
                self.unattributed[c.flag] += 1
                applied.conversions.append("unattributed")
            elif c.at < exposed[1]:
                applied.conversions.append("before_exposure")
            elif c.at > exposed[1] + c.window_s:
                applied.conversions.append("outside_window")
            elif (c.flag, c.goal, c.unit) in self.counted:
                applied.conversions.append("duplicate")
            else:
                self.counted[(c.flag, c.goal, c.unit)] = (exposed[0], c.value)
                applied.conversions.append("counted")
        return applied

    def counts(self, flag: str) -> Counts | None:
        firsts = [first for (f, _), first in self.first.items() if f == flag]
        if not firsts and not self.unattributed[flag]:
            return None
        conversions: dict[str, dict[str, int]] = {}
        values: dict[str, dict[str, float]] = {}
        for (f, goal, _), (variant, value) in self.counted.items():
            if f == flag:
                conversions.setdefault(goal, {}).setdefault(variant, 0)
                conversions[goal][variant] += 1
                if value is not None:
                    values.setdefault(goal, {}).setdefault(variant, 0.0)
                    values[goal][variant] += value
        return Counts(
            started_at=min((at for _, at in firsts), default=None),
            users=dict(Counter(variant for variant, _ in firsts)),
            multiple_exposures=sum(1 for f, _ in self.multiple if f == flag),
            unattributed=self.unattributed[flag],
            conversions=conversions,
            values=values,
        )

    def flags(self) -> list[str]:
        return sorted({f for f, _ in self.first} | {f for f, n in self.unattributed.items() if n})


FLAGS = st.sampled_from(["exp", "exp|{2}:"])
UNITS = st.sampled_from(["u1", "u2", "u|3", "4:u", "ü\n", ""])
VARIANTS = st.sampled_from(["a", "b", "a|b"])
GOALS = st.sampled_from(["g", "3:g}", ""])
TIMES = st.integers(0, 40).map(lambda n: n / 2)  # exact halves: sums and comparisons exact anywhere
WINDOWS = st.sampled_from([0.0, 2.5, 10.0, math.inf])
VALUES = st.none() | st.integers(-40, 40).map(lambda n: n / 4)
EXPOSURES = st.builds(ExposureRecord, flag=FLAGS, unit=UNITS, variant=VARIANTS, at=TIMES)
CONVERSIONS = st.builds(
    ConversionRecord,
    flag=FLAGS,
    goal=GOALS,
    unit=UNITS,
    at=TIMES,
    window_s=WINDOWS,
    value=VALUES,
    final=st.booleans(),
)
BATCHES = st.lists(
    st.tuples(st.lists(EXPOSURES, max_size=8), st.lists(CONVERSIONS, max_size=8), st.booleans()),
    min_size=1,
    max_size=4,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=BATCHES)
def test_the_backends_answer_what_the_model_computes(make_backend: Make, batches: list[Any]) -> None:
    backend, model = make_backend(), Model()
    for exposures, conversions, twice in batches:
        for _ in range(2 if twice else 1):  # a retried batch
            assert backend.apply(exposures, conversions) == model.apply(exposures, conversions)
    assert backend.flags() == model.flags()
    for flag in ("exp", "exp|{2}:"):
        assert backend.counts(flag) == model.counts(flag)


def test_the_model_is_the_contract() -> None:
    """The model itself, on the issue's own examples (it is what the random test trusts)."""
    model = Model()
    applied = model.apply(
        [expose("u", "a", 5.0), expose("u", "b", 6.0), expose("u", "a", 7.0)],
        [
            convert("u", 4.0),
            convert("u", 5.0),
            convert("u", 6.0),
            convert("v", 6.0),
            convert("u", 5.0 + DAY + 1),
        ],
    )
    assert applied.exposures == ["new", "multiple", "repeat"]
    assert applied.conversions == [
        "before_exposure",
        "counted",
        "duplicate",
        "unattributed",
        "outside_window",
    ]
    assert model.counts(FLAG) == Counts(
        started_at=5.0,
        users={"a": 1},
        multiple_exposures=1,
        unattributed=1,
        conversions={"purchase": {"a": 1}},
    )


# --- several processes writing at once ---------------------------------------------------------------

WORKER = r"""
import json, sys, time
from proxy.experiments.records import ConversionRecord, ExposureRecord
kind, target, environment = sys.argv[1:4]
if kind == "sqlite":
    from proxy.experiments.sqlite import SQLiteBackend
    backend = SQLiteBackend(target, busy_timeout_s=30.0)
else:
    from proxy.experiments.redis_backend import RedisBackend
    backend = RedisBackend(target, environment=environment, timeout_s=10.0)
batches = json.loads(sys.stdin.readline())
print("ready", flush=True)
sys.stdin.readline()  # go: every writer starts at once
outcomes = []
for exposures, conversions in batches:
    time.sleep(0.002)  # a recorder writes a batch every so often, not back to back
    applied = backend.apply(
        [ExposureRecord(*e) for e in exposures], [ConversionRecord(*c) for c in conversions]
    )
    outcomes.append([applied.exposures, applied.conversions])
backend.close()
print(json.dumps(outcomes), flush=True)
"""

UNITS_PER_WRITER = 1500


def writer_batches(writer: int) -> list[Any]:
    """Every writer exposes every unit, each in its own variant at its own time, and converts it."""
    order = list(range(UNITS_PER_WRITER))
    if writer % 2:
        order.reverse()  # 0 and 2 race for the same units at the same time, 1 meets them half-way
    batches = []
    for start in range(0, UNITS_PER_WRITER, 25):
        units = order[start : start + 25]
        exposures = [[FLAG, f"unit-{u}", f"v{(u + writer) % 3}", 1000.0 + u + writer / 4] for u in units]
        conversions = [[FLAG, "purchase", f"unit-{u}", 5000.0, DAY, 1.0] for u in units]
        batches.append([exposures, conversions])
    return batches


def run_writers(kind: str, target: str, environment: str, writers: int) -> list[Any]:
    processes = [
        subprocess.Popen(
            [PYTHON, "-c", WORKER, kind, target, environment],
            cwd=REPO,
            env=clean_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(writers)
    ]
    try:
        for n, process in enumerate(processes):
            assert process.stdin is not None and process.stdout is not None
            process.stdin.write(json.dumps(writer_batches(n)) + "\n")
            process.stdin.flush()
        for process in processes:
            assert process.stdout is not None and process.stdout.readline() == "ready\n"
        for process in processes:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.close()
        results = []
        for process in processes:
            assert process.stdout is not None
            results.append(json.loads(process.stdout.readline()))
            assert process.wait(30) == 0
        return results
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(5)
            for pipe in (process.stdin, process.stdout):
                if pipe is not None:
                    pipe.close()


def check_one_winner_per_unit(results: list[Any], writers: int, counts: Counts | None) -> None:
    winners: dict[int, list[int]] = {u: [] for u in range(UNITS_PER_WRITER)}
    converted: Counter[int] = Counter()
    for writer, outcomes in enumerate(results):
        batches = writer_batches(writer)
        for (exposures, conversions), (exposed, convert_outcomes) in zip(batches, outcomes, strict=True):
            for record, outcome in zip(exposures, exposed, strict=True):
                unit = int(record[1].removeprefix("unit-"))
                assert outcome in ("new", "multiple"), outcome  # never "repeat": variants all differ
                if outcome == "new":
                    winners[unit].append(writer)
            for record, outcome in zip(conversions, convert_outcomes, strict=True):
                assert outcome in ("counted", "duplicate"), outcome
                if outcome == "counted":
                    converted[int(record[2].removeprefix("unit-"))] += 1
    assert all(len(w) == 1 for w in winners.values()), {u: w for u, w in winners.items() if len(w) != 1}
    assert set(converted) == set(range(UNITS_PER_WRITER)) and set(converted.values()) == {1}
    users = Counter(f"v{(u + w[0]) % 3}" for u, w in winners.items())
    assert counts == Counts(
        started_at=min(1000.0 + u + w[0] / 4 for u, w in winners.items()),
        users=dict(users),
        multiple_exposures=UNITS_PER_WRITER,  # every unit was served the other writers' variants too
        conversions={"purchase": dict(users)},
        values={"purchase": {variant: float(n) for variant, n in users.items()}},
    )


def test_three_processes_on_one_redis_count_every_unit_once(
    redis_server: RedisServer, redis_namespace: str
) -> None:
    results = run_writers("redis", redis_server.url, redis_namespace, writers=3)
    with closing(RedisBackend(redis_server.url, environment=redis_namespace)) as backend:
        check_one_winner_per_unit(results, 3, backend.counts(FLAG))


def test_two_processes_on_one_new_sqlite_file_count_every_unit_once(tmp_path: Path) -> None:
    path = str(tmp_path / "not-yet" / "experiments.sqlite")  # both create it
    results = run_writers("sqlite", path, "", writers=2)
    with closing(SQLiteBackend(path)) as backend:
        check_one_winner_per_unit(results, 2, backend.counts(FLAG))


# --- Redis: layout and faults --------------------------------------------------------------------------


def test_redis_keys_of_a_flag_share_one_slot_and_distinct_flags_distinct_keys() -> None:
    from proxy.experiments.redis_backend import RedisKeys

    keys = RedisKeys("flagproxy", "prod")
    assert keys.of("checkout") == [
        "flagproxy:prod:exp:{checkout}:units",
        "flagproxy:prod:exp:{checkout}:multi",
        "flagproxy:prod:exp:{checkout}:conv",
        "flagproxy:prod:exp:{checkout}:counts",
    ]
    seen: set[str] = set()
    for flag in ["checkout", "a}", "a", "{a}", "", "%", "x}:units", "ü", "a%7D"]:
        of = keys.of(flag)
        assert len({key_slot(k.encode()) for k in of}) == 1, flag
        tag = of[0].split("{", 1)[1].split("}", 1)[0]
        assert tag, flag  # an empty tag would hash the whole key
        assert not seen.intersection(of), flag
        seen.update(of)


def test_redis_writes_only_the_layout_keys(redis_server: RedisServer, redis_namespace: str) -> None:
    with closing(RedisBackend(redis_server.url, environment=redis_namespace)) as backend:
        backend.apply([expose("u1", "a", 1.0), expose("u1", "b", 2.0)], [convert("u1", 3.0, value=2.0)])
        client = redis_server.client()
        base = f"flagproxy:{redis_namespace}:exp"
        assert sorted(client.scan_iter(match=f"flagproxy:{redis_namespace}:*")) == sorted(
            [f"{base}:flags", *(f"{base}:{{checkout}}:{k}" for k in ("units", "multi", "conv", "counts"))]
        )
        assert client.hgetall(f"{base}:{{checkout}}:units") == {"u1": "1.0|a"}
        assert client.smembers(f"{base}:{{checkout}}:multi") == {"u1"}
        assert client.smembers(f"{base}:{{checkout}}:conv") == {"8:purchaseu1"}
        assert client.hgetall(f"{base}:{{checkout}}:counts") == {
            "u:a": "1",
            "multiple": "1",
            "started_at": "1.0",
            "c:8:purchasea": "1",
            "v:8:purchasea": "2",
        }
        assert backend.reset(FLAG) is True
        assert list(client.scan_iter(match=f"flagproxy:{redis_namespace}:*")) == []


def test_redis_flags_are_those_with_data_not_every_name_registered(
    redis_server: RedisServer, redis_namespace: str
) -> None:
    with closing(RedisBackend(redis_server.url, environment=redis_namespace)) as backend:
        backend.apply([expose("u1", "a", 1.0)], [])
        # a writer that registered a flag and died before its script ran
        redis_server.client().sadd(f"flagproxy:{redis_namespace}:exp:flags", "died-half-way")
        assert backend.flags() == [FLAG]


def test_redis_refuses_keys_of_another_type_before_writing(
    redis_server: RedisServer, redis_namespace: str
) -> None:
    with closing(RedisBackend(redis_server.url, environment=redis_namespace)) as backend:
        client = redis_server.client()
        conv = f"flagproxy:{redis_namespace}:exp:{{checkout}}:conv"
        client.set(conv, "not a set")
        with pytest.raises(BackendError, match="WRONGTYPE"):
            backend.apply([expose("u1", "a", 1.0)], [convert("u1", 2.0)])
        assert (
            client.exists(f"flagproxy:{redis_namespace}:exp:{{checkout}}:units") == 0
        )  # nothing half-written


def test_redis_loads_the_script_again_when_redis_forgot_it(
    redis_server: RedisServer, redis_namespace: str
) -> None:
    with closing(RedisBackend(redis_server.url, environment=redis_namespace)) as backend:
        backend.apply([expose("u1", "a", 1.0)], [])
        redis_server.client().script_flush()
        assert backend.apply([expose("u2", "a", 1.0)], []).exposures == ["new"]
        assert backend.counts(FLAG) == Counts(started_at=1.0, users={"a": 2})


def test_redis_errors_name_the_backend_not_the_credentials(redis_server: RedisServer) -> None:
    url = f"redis://flagproxy:s3cret-pass@127.0.0.1:{redis_server.port}/0"  # no such user there
    with closing(RedisBackend(url, environment=unique_namespace("credentials"))) as backend:
        with pytest.raises(BackendError) as raised:
            backend.apply([expose("u1", "a", 1.0)], [])
        assert f"redis redis://127.0.0.1:{redis_server.port}/0" in str(raised.value)
        assert "s3cret" not in str(raised.value) and "s3cret" not in repr(raised.value.__cause__)


def test_redis_down_fails_promptly_and_works_again_once_back(fresh_redis: RedisServer) -> None:
    with closing(RedisBackend(fresh_redis.url, environment="faults", timeout_s=1.0)) as backend:
        assert backend.apply([expose("u1", "a", 1.0)], []).exposures == ["new"]
        fresh_redis.kill()
        for call in (
            lambda: backend.apply([expose("u2", "a", 2.0)], []),
            lambda: backend.counts(FLAG),
            backend.flags,
            lambda: backend.reset(FLAG),
        ):
            started = time.monotonic()
            with pytest.raises(BackendError, match=rf"^redis redis://127\.0\.0\.1:{fresh_redis.port}/0: "):
                call()
            assert time.monotonic() - started < 1.0  # refused at once: no retry loop, no backoff
        fresh_redis.start()  # same port, empty, without the script: the same backend object carries on
        assert backend.apply([expose("u3", "b", 3.0)], []).exposures == ["new"]
        assert backend.counts(FLAG) == Counts(started_at=3.0, users={"b": 1})


def test_redis_not_answering_times_out_and_the_retried_batch_counts_once(fresh_redis: RedisServer) -> None:
    batch = ([expose("u1", "a", 1.0), expose("u2", "b", 1.0)], [convert("u1", 2.0, value=5.0)])
    assert fresh_redis.process is not None
    pid = fresh_redis.process.pid
    with closing(RedisBackend(fresh_redis.url, environment="faults", timeout_s=0.5)) as backend:
        backend.apply([expose("u0", "a", 0.5)], [])  # connected
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(BackendError, match="redis"):
                backend.apply(*batch)
            elapsed = time.monotonic() - started
        finally:
            os.kill(pid, signal.SIGCONT)
        assert 0.4 < elapsed < 1.5, elapsed  # the timeout, once: a timeout is not retried
        # Redis may or may not have run the script it received before it froze: the retry settles it
        backend.apply(*batch)
        assert backend.counts(FLAG) == Counts(
            started_at=0.5,
            users={"a": 2, "b": 1},
            conversions={"purchase": {"a": 1}},
            values={"purchase": {"a": 5.0}},
        )


def test_redis_nothing_listening_is_a_backend_error() -> None:
    backend = RedisBackend(f"redis://127.0.0.1:{free_port()}/0", timeout_s=1.0)
    with closing(backend), pytest.raises(BackendError, match="redis"):
        backend.apply([expose("u1", "a", 1.0)], [])


# --- SQLite: the file and its faults -------------------------------------------------------------------


def test_sqlite_creates_its_directory_and_a_wal_file_with_a_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "experiments.sqlite"
    with closing(SQLiteBackend(str(path))) as backend:
        assert not path.exists()  # nothing happens before first use
        backend.apply([expose("u1", "a", 1.0)], [])
        with sqlite3.connect(path) as other:
            assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)
            assert other.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("1",)
    with closing(SQLiteBackend(str(path))) as reopened:
        assert reopened.counts(FLAG) == Counts(started_at=1.0, users={"a": 1})


def test_sqlite_path_that_cannot_be_created_is_a_backend_error_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    for path in (blocker / "experiments.sqlite", tmp_path):  # under a file; a directory itself
        with closing(SQLiteBackend(str(path))) as backend:
            with pytest.raises(BackendError, match=f"^sqlite {path}: apply failed"):
                backend.apply([expose("u1", "a", 1.0)], [])
            with pytest.raises(BackendError, match=str(path)):
                backend.counts(FLAG)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only files all the same")
def test_sqlite_read_only_file_is_a_backend_error(tmp_path: Path) -> None:
    path = tmp_path / "experiments.sqlite"
    SQLiteBackend(str(path)).apply([expose("u1", "a", 1.0)], [])
    for name in ("experiments.sqlite", "experiments.sqlite-wal", "experiments.sqlite-shm"):
        if (tmp_path / name).exists():
            (tmp_path / name).chmod(0o444)
    tmp_path.chmod(0o555)
    with closing(SQLiteBackend(str(path))) as backend:
        with pytest.raises(BackendError, match=str(path)):
            backend.apply([expose("u2", "a", 1.0)], [])
        tmp_path.chmod(0o755)


def test_sqlite_file_that_is_not_a_database_is_a_backend_error(tmp_path: Path) -> None:
    path = tmp_path / "experiments.sqlite"
    path.write_bytes(b"this is no database, only bytes" * 100)
    backend = SQLiteBackend(str(path))
    with closing(backend), pytest.raises(BackendError, match=f"sqlite {path}: .*not a database"):
        backend.apply([expose("u1", "a", 1.0)], [])


def test_sqlite_file_of_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "experiments.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID")
        db.execute("INSERT INTO meta VALUES ('schema_version', '2')")
    backend = SQLiteBackend(str(path))
    with closing(backend), pytest.raises(BackendError, match="schema version 2"):
        backend.apply([expose("u1", "a", 1.0)], [])


def test_sqlite_locked_past_the_busy_timeout_fails_then_works(tmp_path: Path) -> None:
    path = tmp_path / "experiments.sqlite"
    with (
        closing(SQLiteBackend(str(path), busy_timeout_s=0.3)) as backend,
        closing(sqlite3.connect(path, isolation_level=None)) as other,
    ):
        backend.apply([expose("u1", "a", 1.0)], [])
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        started = time.monotonic()
        with pytest.raises(BackendError, match="locked"):
            backend.apply([expose("u2", "a", 2.0)], [])
        assert 0.25 < time.monotonic() - started < 2.0
        assert backend.counts(FLAG) == Counts(started_at=1.0, users={"a": 1})  # readers are not blocked
        other.execute("COMMIT")
        assert backend.apply([expose("u2", "a", 2.0)], []).exposures == ["new"]


def test_sqlite_full_disk_rolls_the_whole_batch_back(tmp_path: Path) -> None:
    with closing(SQLiteBackend(str(tmp_path / "experiments.sqlite"))) as backend:
        backend.apply([expose("u0", "a", 1.0)], [])
        assert backend._writer is not None  # white box: a file that cannot grow, as on a full disk
        (pages,) = backend._writer.execute("PRAGMA page_count").fetchone()
        backend._writer.execute(f"PRAGMA max_page_count = {pages}")
        big = [expose(f"unit-{i}-{'x' * 200}", "b", 2.0) for i in range(2000)]
        with pytest.raises(BackendError, match="full"):
            backend.apply([expose("u1", "a", 0.5), *big], [convert("u0", 3.0)])
        assert backend.counts(FLAG) == Counts(started_at=1.0, users={"a": 1})  # nothing of it
        backend._writer.execute("PRAGMA max_page_count = 1073741823")
        assert backend.apply([expose("u1", "a", 0.5)], [convert("u0", 3.0)]) == Applied(["new"], ["counted"])
