"""Split impressions and events: what ``SplitAnalytics`` posts, with splitio-client 10.7.0 as the oracle.

The fake Split is a real HTTP server on 127.0.0.1 (``support.RawOrigin``) that records every request.
It also serves splitChanges and segmentChanges, so the real SDK runs in its standalone mode against it:
the same script of evaluations and ``track()`` calls goes through the SDK (its clock patched) and
through flagproxy's sink, and the bodies and Split headers each one posted are compared. The SDK's own
strategy, observer and hasher classes are the oracle for de-duplication over longer streams.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
import respx
import splitio.client.client as sdk_client_module
import splitio.engine.impressions.strategies as sdk_strategies
from splitio import get_factory
from splitio.client.key import Key
from splitio.engine.impressions.manager import Counter as SdkCounter
from splitio.engine.impressions.manager import Hasher as SdkHasher
from splitio.engine.impressions.manager import Observer as SdkObserver
from splitio.models.impressions import Impression as SdkImpression
from support import RawOrigin, http_response, never_reply
from test_split_engine import ALL, condition, matcher, split

from proxy.config import ConfigError, load_settings
from proxy.dataplane.context import make_context
from proxy.engine import Flag, with_override
from proxy.metrics import Metrics
from proxy.sources.base import SyncContext, analytics_of
from proxy.sources.split import SplitAnalytics, SplitSettings, SplitSource, compile_split
from proxy.sources.split.impressions import (
    Impression,
    ImpressionTracker,
    impression_hash,
    unique_keys_payloads,
)
from proxy.store import MemoryStore

pytestmark = pytest.mark.anyio

SDK_KEY = "sdk-key-never-logged-3f9c2a"
HOUR = 3_600_000
H0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z, the start of an hour
SPLIT_HEADERS = (
    "content-type",
    "authorization",
    "splitsdkversion",
    "splitsdkmachineip",
    "splitsdkmachinename",
    "splitsdkimpressionsmode",
)

# --- the definitions: one flag per label the SDK can give -------------------------------------------

WHITELIST = matcher("WHITELIST", whitelistMatcherData={"whitelist": ["alice"]})
IN_BETA = matcher("IN_SEGMENT", userDefinedSegmentMatcherData={"segmentName": "beta"})
ADULT = matcher(
    "GREATER_THAN_OR_EQUAL_TO",
    attribute="age",
    unaryNumericMatcherData={"dataType": "NUMBER", "value": 18},
)
DEFINITIONS = {
    raw["name"]: raw
    for raw in [
        split(
            "exp_whitelist",
            [
                condition([WHITELIST], [("on", 100)], kind="WHITELIST", label="whitelisted"),
                condition([ALL], [("on", 50), ("off", 50)], label="default rule"),
            ],
            changeNumber=1001,
        ),
        split(
            "exp_segment",
            [
                condition([IN_BETA], [("v1", 100)], label="in segment beta"),
                condition([ALL], [("v2", 100)], label="default rule"),
            ],
            changeNumber=1002,
        ),
        split(
            "exp_killed",
            [condition([ALL], [("on", 100)], label="default rule")],
            killed=True,
            changeNumber=1003,
        ),
        split(
            "exp_alloc",
            [condition([ALL], [("on", 100)], label="default rule")],
            trafficAllocation=30,
            changeNumber=1004,
        ),
        split(
            "exp_age",
            [
                condition([ADULT], [("adult", 100)], label="age >= 18"),
                condition([ALL], [("minor", 100)], label="default rule"),
            ],
            changeNumber=1005,
        ),
        split(
            "exp_prereq",
            [condition([ALL], [("on", 100)], label="default rule")],
            prerequisites=[{"n": "exp_killed", "ts": ["on"]}],
            changeNumber=1006,
        ),
        split(
            "exp_quiet",
            [condition([ALL], [("on", 50), ("off", 50)], label="default rule")],
            impressionsDisabled=True,
            changeNumber=1007,
        ),
    ]
}
SEGMENTS = {"beta": ["carol", "u3", "u7"]}


def compiled() -> dict[str, Flag]:
    problems: dict[str, str] = {}
    flags = compile_split(DEFINITIONS, SEGMENTS, {}, problems)
    assert problems == {}
    return flags


# --- the fake Split -----------------------------------------------------------------------------------


@dataclass
class Post:
    path: str
    headers: dict[str, str]
    body: Any


class FakeSplit(RawOrigin):
    """A recording HTTP server: Split's SDK API (definitions for the SDK) and events APIs (answer 200)."""

    def __init__(self) -> None:
        super().__init__()
        self.default = http_response(200, [("Content-Type", "application/json")], b"{}")
        self.route("/api/splitChanges", self._split_changes)
        self.route("/api/segmentChanges/", self._segment_changes)

    async def _split_changes(self, request: Any, conn: Any) -> None:
        since = int(parse_qs(request.target.decode().partition("?")[2])["since"][0])
        till = max(since, 2000)
        flags = list(DEFINITIONS.values()) if since < till else []
        body = {"ff": {"d": flags, "s": since, "t": till}, "rbs": {"d": [], "s": -1, "t": -1}}
        await conn.send(http_response(200, [("Content-Type", "application/json")], json.dumps(body).encode()))

    async def _segment_changes(self, request: Any, conn: Any) -> None:
        name = request.path.decode().rsplit("/", 1)[1]
        since = int(parse_qs(request.target.decode().partition("?")[2])["since"][0])
        added = SEGMENTS.get(name, []) if since < 10 else []
        body = {"name": name, "added": added, "removed": [], "since": since, "till": max(since, 10)}
        await conn.send(http_response(200, [("Content-Type", "application/json")], json.dumps(body).encode()))

    def posts(self, prefix: str = "") -> list[Post]:
        out = []
        with self.changed:
            requests = list(self.requests)
        for request in requests:
            path = request.path.decode()
            if request.method != "POST" or not path.startswith(prefix):
                continue
            raw = request.body or b""
            if (request.value("Content-Encoding") or "").lower() == "gzip":
                raw = gzip.decompress(raw)
            headers = {n.decode("latin-1").lower(): v.decode("latin-1") for n, v in request.headers}
            out.append(Post(path[len(prefix) :], headers, json.loads(raw) if raw else None))
        return out


@pytest.fixture
def fake() -> Iterator[FakeSplit]:
    server = FakeSplit().start()
    yield server
    server.stop()


def settings(fake: FakeSplit, prefix: str = "/fp", **fields: Any) -> SplitSettings:
    base = SplitSettings(
        sdk_key=SDK_KEY,
        events_url=f"{fake.url}{prefix}/events",
        telemetry_url=f"{fake.url}{prefix}/tele",
        impressions_refresh_s=3600,
        impression_counts_refresh_s=3600,
        unique_keys_refresh_s=3600,
        events_refresh_s=3600,
        analytics_backoff_s=0.01,
        timeout_s=5,
    )
    return replace(base, **fields)


# --- one script, through the SDK and through flagproxy --------------------------------------------------


@dataclass(frozen=True)
class Expose:
    key: Any
    flag: str
    at_ms: int
    attrs: dict[str, Any] = field(default_factory=dict)
    bucketing: str | None = None


@dataclass(frozen=True)
class Track:
    key: Any
    event: Any
    at_ms: int
    value: Any = None
    properties: Any = None


def script() -> list[Expose | Track]:
    """Every flag for several keys in one hour, a second sighting of some later that hour, a first
    repeat in the next hour, invalid keys, and valid and invalid conversions. No impression is seen
    more than twice (beyond that the Python SDK's ``pt`` differs on purpose: test_pt_is_the_previous...)."""
    steps: list[Expose | Track] = []
    keys = ["alice", "bob", "carol", "dave", *[f"u{i}" for i in range(10)]]
    t = H0 + 1_000
    for flag in DEFINITIONS:
        for key in keys:
            steps.append(Expose(key, flag, t, {"age": 21 if key in ("bob", "u1") else 12}))
            t += 7
    steps.append(Expose("erin", "exp_whitelist", t, bucketing="bk-erin"))
    steps.append(Expose("erin", "exp_alloc", t + 1, bucketing="bk-erin"))
    steps.append(Expose("", "exp_whitelist", t + 2))  # invalid keys: control, no impression
    steps.append(Expose("x" * 251, "exp_whitelist", t + 3))
    t = H0 + 30 * 60_000
    for key in ("alice", "bob", "u5"):  # a second sighting in the same hour
        for flag in ("exp_whitelist", "exp_segment", "exp_quiet"):
            steps.append(Expose(key, flag, t, {"age": 12}))
            t += 11
    t = H0 + HOUR + 5_000
    for key in ("carol", "dave"):  # a first repeat in the next hour
        for flag in ("exp_whitelist", "exp_killed", "exp_quiet"):
            steps.append(Expose(key, flag, t, {"age": 12}))
            t += 13
    steps += [
        Track("alice", "checkout", H0 + 10, 42.5, {"plan": "pro", "items": 3, "gift": True, "none": None}),
        Track("bob", "signup", H0 + 11),
        Track("carol", "page.view:home_2", H0 + 12, 0, {"nested": {"x": 1}, "list": [1], 7: "dropped"}),
        Track("dave", "bad event", H0 + 13),  # invalid name
        Track("dave", "-leading", H0 + 14),
        Track("dave", "x" * 81, H0 + 15),
        Track("dave", "revenue", H0 + 16, "12"),  # not a number
        Track("dave", "flag", H0 + 17, True),  # a bool is not a number
        Track("", "signup", H0 + 18),  # blank key
        Track("erin", "big", H0 + 19, 1, {"p": "x" * 40_000}),  # over 32 KB of properties
        Track("erin", "ok", H0 + 20, -3, {f"p{i}": i for i in range(20)}),
    ]
    return steps


class Sdk:
    """splitio-client 10.7.0 in standalone mode against the fake Split, its clock set per call."""

    def __init__(self, fake: FakeSplit, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = H0
        monkeypatch.setattr(sdk_client_module, "utctime_ms", lambda: self.now)
        monkeypatch.setattr(sdk_strategies, "utctime_ms", lambda: self.now)
        self.factory = get_factory(
            SDK_KEY,
            config={"streamingEnabled": False, "impressionsMode": mode},
            sdk_api_base_url=f"{fake.url}/api",
            events_api_base_url=f"{fake.url}/sdk/events",
            telemetry_api_base_url=f"{fake.url}/sdk/tele",
            auth_api_base_url=f"{fake.url}/sdk/auth",
        )
        self.factory.block_until_ready(10)
        # the SDK says it is ready before it starts its recorders; a destroy before that sends nothing
        recorders = self.factory._sync_manager._synchronizer._periodic_data_recording_tasks
        deadline = time.monotonic() + 10
        while not all(task.is_running() for task in recorders):
            assert time.monotonic() < deadline, "the SDK's recorders did not start"
            time.sleep(0.005)
        self.client = self.factory.client()

    def run(self, steps: list[Expose | Track], traffic_type: str) -> list[str | None]:
        treatments: list[str | None] = []
        for step in steps:
            self.now = step.at_ms
            if isinstance(step, Expose):
                key = Key(step.key, step.bucketing) if step.bucketing else step.key
                treatments.append(self.client.get_treatment(key, step.flag, step.attrs))
            else:
                self.client.track(step.key, traffic_type, step.event, step.value, step.properties)
        return treatments

    def destroy(self) -> None:
        done = threading.Event()
        self.factory.destroy(done)
        assert done.wait(20)


async def flagproxy_run(
    sink: SplitAnalytics, flags: dict[str, Flag], steps: list[Expose | Track]
) -> list[str | None]:
    await sink.start()
    treatments: list[str | None] = []
    for step in steps:
        if isinstance(step, Expose):
            context = make_context(step.key, step.attrs, step.bucketing)
            served = flags[step.flag].evaluate(context)
            treatments.append(str(served.value))
            sink.exposed(flags[step.flag], served, context, step.at_ms)
        else:
            sink.converted(step.key, step.event, step.value, step.at_ms, step.properties)
    await sink.close()
    return treatments


def view(posts: list[Post]) -> dict[str, Any]:
    """What reached Split, order-insensitive where the SDK's own order is a set's."""
    by_path: dict[str, list[Post]] = {}
    for post in posts:
        by_path.setdefault(post.path, []).append(post)
    bulk = [group for post in by_path.get("/events/testImpressions/bulk", []) for group in post.body]
    counts = sorted(
        (c["f"], c["m"], c["rc"])
        for post in by_path.get("/events/testImpressions/count", [])
        for c in post.body["pf"]
    )
    keys: dict[str, set[str]] = {}
    for post in by_path.get("/tele/v1/keys/ss", []):
        for entry in post.body["keys"]:
            keys.setdefault(entry["f"], set()).update(entry["ks"])
    events = [e for post in by_path.get("/events/events/bulk", []) for e in post.body]
    headers = {
        path: [{h: p.headers.get(h) for h in SPLIT_HEADERS} for p in group]
        for path, group in by_path.items()
        if path in ("/events/testImpressions/bulk", "/events/testImpressions/count", "/events/events/bulk")
        or path == "/tele/v1/keys/ss"
    }
    return {"bulk": bulk, "counts": counts, "keys": keys, "events": events, "headers": headers}


@pytest.mark.parametrize("mode", ["optimized", "debug", "none"])
async def test_posts_what_the_sdk_posts(fake: FakeSplit, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    steps = script()
    sdk = Sdk(fake, mode, monkeypatch)
    try:
        expected_treatments = sdk.run(steps, "Account")
    finally:
        sdk.destroy()
    sink = SplitAnalytics(settings(fake, impressions_mode=mode, traffic_type="Account"), Metrics())
    treatments = await flagproxy_run(sink, compiled(), steps)
    assert treatments == expected_treatments

    oracle, ours = view(fake.posts("/sdk")), view(fake.posts("/fp"))
    assert ours == oracle

    # the script covered what it means to (hand-written expectations about the inputs)
    labels = {i["r"] for group in ours["bulk"] for i in group["i"]}
    if mode == "none":
        assert ours["bulk"] == [] and ours["counts"] and "exp_whitelist" in ours["keys"]
    else:
        assert {"whitelisted", "default rule", "in segment beta", "killed", "not in split"} <= labels
        assert {"prerequisites not met", "age >= 18"} <= labels
        assert "exp_quiet" not in {group["f"] for group in ours["bulk"]}  # impressionsDisabled
        assert set(ours["keys"]) == {"exp_quiet"}
        items = [dict(i, f=group["f"]) for group in ours["bulk"] for i in group["i"]]
        assert {(i["k"], i["b"]) for i in items if i["k"] == "erin"} == {("erin", "bk-erin")}
        assert all(i["b"] is None for i in items if i["k"] != "erin")
        assert {i["c"] for i in items if i["f"] == "exp_age"} == {1005}
        crossing = [i for i in items if i["k"] == "carol" and i["f"] == "exp_killed"]
        assert [i["pt"] for i in crossing] == [None, H0 + 1_000 + 2 * 14 * 7 + 2 * 7]
    assert "" not in {i["k"] for group in ours["bulk"] for i in group["i"]}
    assert [e["eventTypeId"] for e in ours["events"]] == ["checkout", "signup", "page.view:home_2", "ok"]
    assert {e["trafficTypeName"] for e in ours["events"]} == {"account"}
    assert all(h["authorization"] == f"Bearer {SDK_KEY}" for hs in ours["headers"].values() for h in hs)
    results = sample(sink.metrics, "flagproxy_split_events_total")
    assert (results.get("sent"), results.get("invalid")) == (4, 7)


def sample(metrics: Metrics, name: str, label: str = "result") -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = metrics.render()[0].decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.value:
                out[s.labels[label]] = out.get(s.labels[label], 0) + s.value
    return out


async def test_pt_is_the_first_sighting_as_in_the_python_sdk(
    fake: FakeSplit, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Python SDK's LRU keeps the first time an impression was seen, so after an hour every
    repeat goes out with that first time as ``pt``: flagproxy sends exactly what it sends."""
    times = [H0 + 5, H0 + 10, H0 + HOUR + 5, H0 + HOUR + 10, H0 + HOUR + 20]
    steps: list[Expose | Track] = [Expose("alice", "exp_whitelist", t) for t in times]
    sdk = Sdk(fake, "optimized", monkeypatch)
    try:
        sdk.run(steps, "user")
    finally:
        sdk.destroy()
    await flagproxy_run(SplitAnalytics(settings(fake)), compiled(), steps)
    oracle, ours = view(fake.posts("/sdk")), view(fake.posts("/fp"))

    def sent(v: dict[str, Any]) -> list[tuple[int, int | None]]:
        return [(i["m"], i["pt"]) for group in v["bulk"] for i in group["i"]]

    assert sent(oracle) == [
        (H0 + 5, None),
        (H0 + HOUR + 5, H0 + 5),
        (H0 + HOUR + 10, H0 + 5),
        (H0 + HOUR + 20, H0 + 5),
    ]
    assert sent(ours) == sent(oracle)
    assert ours["counts"] == oracle["counts"] == [("exp_whitelist", H0, 1), ("exp_whitelist", H0 + HOUR, 3)]


# --- the SDK's classes as the oracle of hashing and de-duplication --------------------------------------


def sdk_impression(i: Impression) -> SdkImpression:
    return SdkImpression(
        i.key, i.feature, i.treatment, i.label, i.change_number, i.bucketing_key, i.time, None
    )


def test_hash_is_the_sdks() -> None:
    cases = [
        Impression("alice", "f", "on", "default rule", 123, None, H0),
        Impression("ñandú 🐦", "flag-ü", "off", "in segment ß", 1_767_225_600_123, "b", H0),
        Impression("k", "f", "", None, None, None, H0),  # empty fields hash as UNKNOWN / 0
        Impression("k", "f", "on", "", 0, None, H0),
        Impression("k:x", "f", "on:y", "l", -1, None, H0),
    ]
    hasher = SdkHasher()
    for case in cases:
        assert impression_hash(case) == hasher.process(sdk_impression(case)), case
    assert len({impression_hash(c) for c in cases}) == len(cases)


@pytest.mark.parametrize("seed", range(5))
def test_dedup_decisions_and_counts_match_the_sdk_within_an_hour(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A random stream over few keys and a small LRU (evictions happen): the same impressions are
    new, sent and counted as with the SDK's optimized strategy (``pt`` aside, see above)."""
    rng = random.Random(seed)
    size = 8
    sdk = sdk_strategies.StrategyOptimizedMode()
    sdk._observer = SdkObserver(size)
    sdk_counter = SdkCounter()
    ours = ImpressionTracker("optimized", size)
    now = [H0]
    monkeypatch.setattr(sdk_strategies, "utctime_ms", lambda: now[0])
    for n in range(600):
        now[0] = H0 + n * 1000  # all within one hour
        imp = Impression(
            f"k{rng.randrange(12)}",
            rng.choice(["f1", "f2"]),
            rng.choice(["on", "off"]),
            "default rule",
            7,
            None,
            now[0],
        )
        to_send, _, counted, _ = sdk.process_impressions([(sdk_impression(imp), None)])
        sdk_counter.track(counted)
        queued = ours.track(imp, disabled=False)
        assert (queued is not None) == bool(to_send), n
        assert (imp.previous_time is None) == (not counted), n
    expected = sorted((c.feature, c.timeframe, c.count) for c in sdk_counter.pop_all())
    assert sorted((f, m, n) for (f, m), n in ours.pop_counts().items()) == expected


# --- queues, retries, failures, shutdown --------------------------------------------------------------


def exposures(
    flags: dict[str, Flag], n: int, flag: str = "exp_whitelist", at_ms: int = H0, prefix: str = "user"
) -> list[tuple[Any, ...]]:
    out = []
    for i in range(n):
        context = make_context(f"{prefix}-{i}", {})
        out.append((flags[flag], flags[flag].evaluate(context), context, at_ms + i))
    return out


async def test_close_sends_what_is_queued(fake: FakeSplit) -> None:
    flags = compiled()
    sink = SplitAnalytics(settings(fake), Metrics())
    await sink.start()
    for args in exposures(flags, 7):
        sink.exposed(*args)
    sink.converted("user-1", "purchase", 9.5, H0, None)
    assert fake.posts("/fp") == []  # nothing is sent before it is due
    await sink.close()
    posted = view(fake.posts("/fp"))
    assert sorted(i["k"] for group in posted["bulk"] for i in group["i"]) == sorted(
        f"user-{i}" for i in range(7)
    )
    assert [e["key"] for e in posted["events"]] == ["user-1"]
    assert sample(sink.metrics, "flagproxy_split_impressions_total") == {"sent": 7}
    sink.exposed(*exposures(flags, 1)[0])  # after close: dropped, counted, no error
    assert sample(sink.metrics, "flagproxy_split_impressions_total") == {"sent": 7, "dropped": 1}


async def test_sends_on_its_intervals_and_in_bulks(fake: FakeSplit) -> None:
    flags = compiled()
    sink = SplitAnalytics(
        settings(fake, impressions_refresh_s=0.05, events_refresh_s=0.05, impressions_bulk_size=3), Metrics()
    )
    await sink.start()
    try:
        for args in exposures(flags, 8):
            sink.exposed(*args)
        sink.converted("user-1", "purchase", None, H0, None)
        await until(lambda: len(view(fake.posts("/fp"))["events"]) == 1)
        await until(lambda: sum(len(g["i"]) for g in view(fake.posts("/fp"))["bulk"]) == 8)
    finally:
        await sink.close()
    sizes = [
        sum(len(g["i"]) for g in p.body)
        for p in fake.posts("/fp")
        if p.path.endswith("/bulk") and "Impr" in p.path
    ]
    assert sizes == [3, 3, 2]


async def test_a_full_bulk_is_sent_at_once(fake: FakeSplit) -> None:
    sink = SplitAnalytics(settings(fake, impressions_bulk_size=4, impressions_queue_size=10), Metrics())
    await sink.start()
    try:
        started = time.monotonic()
        for args in exposures(compiled(), 4):
            sink.exposed(*args)
        await until(lambda: len(fake.posts("/fp")) == 1)
        assert time.monotonic() - started < 0.7  # not at the next one-second round, nor the interval
    finally:
        await sink.close()


async def until(probe: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_a_full_queue_drops_and_counts(fake: FakeSplit) -> None:
    flags = compiled()
    sink = SplitAnalytics(settings(fake, impressions_queue_size=3, events_queue_size=2), Metrics())
    for args in exposures(flags, 5):  # not started: nothing takes from the queue
        sink.exposed(*args)
    for i in range(4):
        sink.converted(f"user-{i}", "purchase", None, H0, None)
    await sink.close()  # never started: close() still sends what is queued
    posted = view(fake.posts("/fp"))
    assert sorted(i["k"] for g in posted["bulk"] for i in g["i"]) == ["user-0", "user-1", "user-2"]
    assert [e["key"] for e in posted["events"]] == ["user-0", "user-1"]
    assert sample(sink.metrics, "flagproxy_split_impressions_total") == {"sent": 3, "dropped": 2}
    assert sample(sink.metrics, "flagproxy_split_events_total") == {"sent": 2, "dropped": 2}


def failing(times: int, status: int = 500) -> Any:
    """A handler answering ``status`` to the first ``times`` requests, then 200."""
    seen = [0]

    async def handler(request: Any, conn: Any) -> None:
        seen[0] += 1
        code = status if seen[0] <= times else 200
        await conn.send(http_response(code, [("Content-Type", "application/json")], b"{}"))

    return handler


async def test_server_errors_are_retried_then_counted(fake: FakeSplit) -> None:
    flags = compiled()
    fake.route("/fp/events/testImpressions/bulk", failing(1))  # one 500, then accepted
    fake.route("/fp/events/events/bulk", failing(100))  # always 500
    sink = SplitAnalytics(
        settings(fake, analytics_retries=2, impressions_refresh_s=0.05, events_refresh_s=0.05)
    )
    await sink.start()
    try:
        for args in exposures(flags, 2):
            sink.exposed(*args)
        sink.converted("user-1", "purchase", None, H0, None)
        await until(lambda: len([p for p in fake.posts("/fp") if p.path == "/events/events/bulk"]) == 3)
        await until(lambda: sample(sink.metrics, "flagproxy_split_events_total").get("failed") == 1)
    finally:
        await sink.close()
    bulk = [p.body for p in fake.posts("/fp") if p.path == "/events/testImpressions/bulk"]
    assert len(bulk) == 2 and bulk[0] == bulk[1]  # the same body again
    assert sample(sink.metrics, "flagproxy_split_impressions_total") == {"sent": 2}
    assert sample(sink.metrics, "flagproxy_split_events_total") == {"failed": 1}
    posts = sample(sink.metrics, "flagproxy_split_posts_total", "endpoint")
    assert posts == {"impressions": 2, "events": 3}


async def test_client_errors_are_not_retried(fake: FakeSplit) -> None:
    fake.route("/fp/events/events/bulk", failing(100, status=401))
    sink = SplitAnalytics(settings(fake, analytics_retries=3, events_refresh_s=0.05))
    await sink.start()
    try:
        sink.converted("user-1", "purchase", None, H0, None)
        await until(lambda: sample(sink.metrics, "flagproxy_split_events_total") == {"failed": 1})
        assert len(fake.posts("/fp")) == 1
    finally:
        await sink.close()


async def test_closing_stops_at_the_first_failure(fake: FakeSplit) -> None:
    """At shutdown a Split that does not answer costs one timeout, not one per batch."""
    fake.route("/fp/events/testImpressions/bulk", never_reply())
    sink = SplitAnalytics(settings(fake, timeout_s=0.2, impressions_bulk_size=1, analytics_retries=2))
    await sink.start()
    for args in exposures(compiled(), 4):
        sink.exposed(*args)
    started = time.monotonic()
    await sink.close()
    assert time.monotonic() - started < 0.6
    assert len(fake.posts("/fp")) == 1
    assert sample(sink.metrics, "flagproxy_split_impressions_total") == {"failed": 4}


async def test_timeouts_are_retried_then_counted_and_close_does_not_hang(fake: FakeSplit) -> None:
    flags = compiled()
    fake.route("/fp/events/testImpressions/bulk", never_reply())
    sink = SplitAnalytics(settings(fake, timeout_s=0.2, analytics_retries=1, impressions_refresh_s=0.05))
    await sink.start()
    try:
        for args in exposures(flags, 3):
            sink.exposed(*args)
        await until(lambda: sample(sink.metrics, "flagproxy_split_impressions_total").get("failed") == 3)
        assert len(fake.posts("/fp")) == 2
        for args in exposures(flags, 2, at_ms=H0 + 100, prefix="other"):
            sink.exposed(*args)
    finally:
        started = time.monotonic()
        await sink.close()
    assert time.monotonic() - started < 2  # one attempt per batch when closing
    assert sample(sink.metrics, "flagproxy_split_impressions_total") == {"failed": 5}


async def test_calls_never_raise_and_the_sdk_key_is_never_logged(
    fake: FakeSplit, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    flags = compiled()
    fake.route("/fp/events/", failing(1000, status=503))
    fake.route("/fp/tele/", never_reply())
    sink = SplitAnalytics(settings(fake, impressions_mode="none", analytics_retries=1, timeout_s=0.2))
    await sink.start()
    flag = flags["exp_whitelist"]
    sink.exposed(flag, flag.default, None, H0)  # type: ignore[arg-type]  # garbage in: processed and counted
    sink.exposed(None, None, {"key": "x"}, H0)  # type: ignore[arg-type]
    sink.converted(None, None, float("nan"), H0, "not a mapping")  # type: ignore[arg-type]
    sink.converted("user-1", "purchase", float("inf"), H0, None)
    for args in exposures(flags, 3):
        sink.exposed(*args)
    sink.converted("user-1", "purchase", 1, H0, None)
    await sink.close()
    text = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert "Split" in text  # failures were logged ...
    assert SDK_KEY not in text  # ... never with the key
    assert sample(sink.metrics, "flagproxy_split_events_total") == {"invalid": 2, "failed": 1}
    assert sample(sink.metrics, "flagproxy_split_impressions_total") == {"failed": 2, "counted": 3}


# --- exact requests (respx) ---------------------------------------------------------------------------


@respx.mock
async def test_exact_requests() -> None:
    bulk = respx.post("https://events.example/api/testImpressions/bulk").mock(
        return_value=httpx.Response(200)
    )
    count = respx.post("https://events.example/api/testImpressions/count").mock(
        return_value=httpx.Response(200)
    )
    events = respx.post("https://events.example/api/events/bulk").mock(return_value=httpx.Response(200))
    flags = compiled()
    sink = SplitAnalytics(
        SplitSettings(sdk_key=SDK_KEY, events_url="https://events.example/api/", impressions_mode="debug"),
        client=httpx.AsyncClient(),
    )
    await sink.start()
    context = make_context("alice", {})
    for at in (H0 + 1, H0 + 2):
        sink.exposed(flags["exp_whitelist"], flags["exp_whitelist"].evaluate(context), context, at)
    sink.converted("alice", "purchase", 3, H0 + 3, {"plan": "pro"})
    await sink.close()
    assert not count.called  # debug mode counts nothing (no flag here has impressions disabled)
    request = bulk.calls.last.request
    assert request.headers["authorization"] == f"Bearer {SDK_KEY}"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["splitsdkversion"] == "python-10.7.0"
    assert request.headers["splitsdkimpressionsmode"] == "DEBUG"
    assert request.content == (
        b'[{"f":"exp_whitelist","i":['
        b'{"k":"alice","t":"on","m":1767225600001,"c":1001,"r":"whitelisted","b":null,"pt":null},'
        b'{"k":"alice","t":"on","m":1767225600002,"c":1001,"r":"whitelisted","b":null,"pt":1767225600001}]}]'
    )
    request = events.calls.last.request
    assert "splitsdkimpressionsmode" not in request.headers
    assert json.loads(request.content) == [
        {
            "key": "alice",
            "trafficTypeName": "user",
            "eventTypeId": "purchase",
            "value": 3,
            "timestamp": H0 + 3,
            "properties": {"plan": "pro"},
        }
    ]


@respx.mock
async def test_overrides_and_control_labels() -> None:
    """A flagproxy kill is an impression labelled killed (with the definition's change number); an
    evaluation error is the SDK's failed result: control, label exception, no change number."""
    bulk = respx.post("https://e.example/api/testImpressions/bulk").mock(return_value=httpx.Response(200))
    broken = split(
        "exp_broken",
        [
            condition(
                [matcher("IN_RULE_BASED_SEGMENT", userDefinedSegmentMatcherData={"segmentName": "gone"})]
            )
        ],
        changeNumber=77,
        impressionsDisabled=True,
    )
    flags = compile_split({**DEFINITIONS, "exp_broken": broken}, SEGMENTS, {}, {})
    killed = with_override(flags["exp_age"], {"kill": True})
    sink = SplitAnalytics(
        SplitSettings(sdk_key=SDK_KEY, events_url="https://e.example/api", impressions_mode="debug"),
        client=httpx.AsyncClient(),
    )
    await sink.start()
    context = make_context("bob", {"age": 30})
    for flag in (killed, flags["exp_broken"]):
        sink.exposed(flag, flag.evaluate(context), context, H0)
    await sink.close()
    items = {g["f"]: g["i"][0] for g in json.loads(bulk.calls.last.request.content)}
    trc = {flag: (item["t"], item["r"], item["c"]) for flag, item in items.items()}
    assert trc == {"exp_age": ("off", "killed", 1005), "exp_broken": ("control", "exception", None)}


# --- the source hook and the settings ----------------------------------------------------------------


def test_the_source_makes_a_sink_only_with_an_sdk_key() -> None:
    metrics = Metrics()
    loaded = load_settings(env={})

    def context(section: SplitSettings) -> SyncContext:
        return SyncContext(settings=loaded, section=section, store=MemoryStore(), metrics=metrics)

    source = SplitSource()
    assert analytics_of(source, context(SplitSettings())) is None
    sink = analytics_of(source, context(SplitSettings(sdk_key="k", impressions_mode="none")))
    assert isinstance(sink, SplitAnalytics) and sink.metrics is metrics


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"FLAGPROXY_SPLIT_IMPRESSIONS_MODE": "OPTIMIZED"}, "impressions_mode"),
        ({"FLAGPROXY_SPLIT_IMPRESSIONS_MODE": "all"}, "impressions_mode"),
        ({"FLAGPROXY_SPLIT_EVENTS_URL": "ftp://events"}, "events_url"),
        ({"FLAGPROXY_SPLIT_TELEMETRY_URL": "telemetry.split.io"}, "telemetry_url"),
        ({"FLAGPROXY_SPLIT_TRAFFIC_TYPE": "  "}, "traffic_type"),
        ({"FLAGPROXY_SPLIT_IMPRESSIONS_QUEUE_SIZE": "0"}, "impressions_queue_size"),
        ({"FLAGPROXY_SPLIT_EVENTS_BULK_SIZE": "-1"}, "events_bulk_size"),
        ({"FLAGPROXY_SPLIT_IMPRESSIONS_DEDUP_KEYS": "0"}, "impressions_dedup_keys"),
        ({"FLAGPROXY_SPLIT_EVENTS_REFRESH_S": "0"}, "events_refresh_s"),
        ({"FLAGPROXY_SPLIT_IMPRESSIONS_REFRESH_S": "-1"}, "impressions_refresh_s"),
        ({"FLAGPROXY_SPLIT_ANALYTICS_RETRIES": "-1"}, "analytics_retries"),
    ],
)
def test_bad_settings_name_the_field(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env=env)
    assert f"[split] {needle}" in str(info.value)


def test_settings_defaults_are_the_sdks() -> None:
    from splitio.api.client import EVENTS_URL, TELEMETRY_URL
    from splitio.client.config import DEFAULT_CONFIG, _sanitize_impressions_mode
    from splitio.engine.impressions.strategies import _IMPRESSION_OBSERVER_CACHE_SIZE
    from splitio.tasks.impressions_sync import ImpressionsCountSyncTask
    from splitio.tasks.unique_keys_sync import _UNIQUE_KEYS_SYNC_PERIOD

    d = SplitSettings()
    assert (d.events_url, d.telemetry_url, d.impressions_mode) == (EVENTS_URL, TELEMETRY_URL, "optimized")
    assert d.traffic_type == "user"  # the issue's default (the SDK has none: track() takes one)
    for mode in ("optimized", "debug", "none"):
        sdk_mode, sdk_refresh = _sanitize_impressions_mode("memory", mode, None)
        assert (sdk_mode.name, replace(d, impressions_mode=mode).impressions_interval_s) == (
            mode.upper(),
            sdk_refresh,
        )
    assert d.impressions_queue_size == DEFAULT_CONFIG["impressionsQueueSize"]
    assert d.impressions_bulk_size == DEFAULT_CONFIG["impressionsBulkSize"]
    assert d.events_queue_size == DEFAULT_CONFIG["eventsQueueSize"]
    assert d.events_bulk_size == DEFAULT_CONFIG["eventsBulkSize"]
    assert d.events_refresh_s == DEFAULT_CONFIG["eventsPushRate"]
    assert d.impression_counts_refresh_s == ImpressionsCountSyncTask._PERIOD
    assert d.unique_keys_refresh_s == _UNIQUE_KEYS_SYNC_PERIOD
    assert d.impressions_dedup_keys == _IMPRESSION_OBSERVER_CACHE_SIZE
    assert (
        load_settings(env={"FLAGPROXY_SPLIT_IMPRESSIONS_REFRESH_S": "2.5"})
        .section("split")
        .impressions_interval_s
        == 2.5
    )


def test_unique_keys_bodies_hold_at_most_a_bulk() -> None:
    unique = {"a": ["k1", "k2", "k3", "k4", "k5"], "b": ["k6"], "c": ["k7", "k8"]}
    assert unique_keys_payloads(unique, bulk=3) == [
        {"keys": [{"f": "a", "ks": ["k1", "k2", "k3"]}]},
        {"keys": [{"f": "a", "ks": ["k4", "k5"]}, {"f": "b", "ks": ["k6"]}]},
        {"keys": [{"f": "c", "ks": ["k7", "k8"]}]},
    ]
    assert unique_keys_payloads({}) == []
