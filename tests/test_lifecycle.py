"""Flag lifecycle: stale detection (pure, with an injectable clock), the usage ledger and counters,
change notices and the daily digest (in process, against a real local HTTP server as Slack)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from support import RawOrigin

from proxy.alerts import Alerter
from proxy.config import AlertSettings, ConfigError, LifecycleSettings, Settings, load_settings
from proxy.engine import FlagError
from proxy.engine.native import compile_flag
from proxy.lifecycle.notify import Notifiers
from proxy.lifecycle.service import Lifecycle, summarize
from proxy.lifecycle.stale import DAY_S, REASONS, Policy, Usage, stale_flags
from proxy.lifecycle.usage import UsageCounter
from proxy.sources.native.document import seed_state
from proxy.sources.registry import DEFAULT
from proxy.store import MemoryStore
from proxy.store.change import Change, stored_text
from proxy.store.ledger import MemoryLedger, merge_usage

NOW = datetime(2026, 6, 15, 9, 30, tzinfo=UTC).timestamp()


def ago(days: float) -> float:
    return NOW - days * DAY_S


def iso_ago(days: float) -> str:
    return datetime.fromtimestamp(ago(days), UTC).isoformat().replace("+00:00", "Z")


def stale(
    definitions: dict[str, dict[str, Any]],
    first_seen: dict[str, float] | None = None,
    usage: dict[str, Usage] | None = None,
    now: float = NOW,
    policy: Policy | None = None,
) -> dict[str, list[str]]:
    found = stale_flags(definitions, first_seen or {}, usage or {}, now, policy)
    return {s["flag"]: s["reasons"] for s in found}


FRESH = Usage(changed_at=ago(1), last_evaluated=ago(0.01), values=frozenset({"a", "b"}))


# --- the pure rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "age_days", "expected"),
    [
        ("release", 41, True),
        ("release", 39, False),
        ("experiment", 40, True),
        ("operational", 8, True),
        ("operational", 6, False),
        ("kill-switch", 3000, False),
        ("permission", 3000, False),
    ],
)
def test_lifetime_per_type(kind: str, age_days: float, expected: bool) -> None:
    found = stale({"f": {"type": kind, "createdAt": iso_ago(age_days)}}, usage={"f": FRESH})
    assert ("lifetime" in found.get("f", [])) is expected


def test_without_created_at_the_lifetime_starts_when_the_store_first_saw_the_flag() -> None:
    assert stale({"f": {"type": "release"}}, {"f": ago(41)}, {"f": FRESH}) == {"f": ["lifetime"]}
    assert stale({"f": {"type": "release"}}, {"f": ago(39)}, {"f": FRESH}) == {}
    # createdAt wins over first seen
    assert stale({"f": {"type": "release", "createdAt": iso_ago(1)}}, {"f": ago(41)}, {"f": FRESH}) == {}


def test_untyped_flags_have_no_lifetime_unless_a_default_type_is_set() -> None:
    flags = {"f": {"createdAt": iso_ago(100)}}
    assert stale(flags, usage={"f": FRESH}) == {}
    assert stale(flags, usage={"f": FRESH}, policy=Policy(default_type="release")) == {"f": ["lifetime"]}


def test_lifetimes_are_configurable() -> None:
    policy = Policy(lifetimes_days={"release": 10.0}, stale_after_days=7)
    assert stale({"f": {"type": "release", "createdAt": iso_ago(11)}}, usage={"f": FRESH}, policy=policy)


def test_expired() -> None:
    assert stale({"f": {"expiresAt": iso_ago(0.5)}}, usage={"f": FRESH}) == {"f": ["expired"]}
    assert stale({"f": {"expiresAt": iso_ago(-0.5)}}, usage={"f": FRESH}) == {}


def test_single_variant_for_a_week_without_a_change() -> None:
    one = Usage(changed_at=ago(8), last_evaluated=ago(0.01), values=frozenset({"on"}))
    assert stale({"f": {}}, usage={"f": one}) == {"f": ["single_variant"]}
    recent = dataclasses.replace(one, changed_at=ago(6))
    assert stale({"f": {}}, usage={"f": recent}) == {}
    two = dataclasses.replace(one, values=frozenset({"on", "off"}))
    assert stale({"f": {}}, usage={"f": two}) == {}


def test_unused_for_a_week() -> None:
    # never evaluated: counted from when the store first saw it
    assert stale({"f": {}}, {"f": ago(8)}) == {"f": ["unused"]}
    assert stale({"f": {}}, {"f": ago(6)}) == {}
    # evaluated, long ago; a change since does not reset "last evaluated"
    old = Usage(changed_at=ago(1), last_evaluated=ago(8), values=frozenset())
    assert stale({"f": {}}, {"f": ago(30)}, {"f": old}) == {"f": ["unused"]}
    assert stale({"f": {}}, {"f": ago(30)}, {"f": dataclasses.replace(old, last_evaluated=ago(6))}) == {}


def test_the_report_names_owner_type_reasons_and_since() -> None:
    definitions = {
        "old": {"type": "operational", "owner": "team-a", "createdAt": iso_ago(30), "expiresAt": iso_ago(2)},
        "fine": {"type": "release", "owner": "team-b"},
    }
    found = stale_flags(definitions, {"old": ago(30), "fine": ago(1)}, {"old": FRESH, "fine": FRESH}, NOW)
    assert found == [
        {
            "flag": "old",
            "owner": "team-a",
            "type": "operational",
            "reasons": ["lifetime", "expired"],
            "since": datetime.fromtimestamp(ago(23), UTC)
            .isoformat(timespec="seconds")
            .replace("+00:00", "Z"),
        }
    ]


def test_once_stale_a_flag_stays_stale_as_time_passes() -> None:
    """Property-ish: with nothing else moving, later clocks find a superset of the reasons."""
    rng = random.Random(7)
    kinds = [None, "release", "experiment", "operational", "kill-switch", "permission"]
    for _ in range(500):
        definition: dict[str, Any] = {}
        kind = rng.choice(kinds)
        if kind:
            definition["type"] = kind
        if rng.random() < 0.5:
            definition["createdAt"] = iso_ago(rng.uniform(0, 60))
        if rng.random() < 0.3:
            definition["expiresAt"] = iso_ago(rng.uniform(-10, 10))
        usage = {}
        if rng.random() < 0.7:
            last = ago(rng.uniform(0, 10)) if rng.random() < 0.8 else None
            values = frozenset(rng.sample(["a", "b", "c"], rng.randint(0, 2)))
            usage["f"] = Usage(changed_at=ago(rng.uniform(0, 20)), last_evaluated=last, values=values)
        first = {"f": ago(rng.uniform(0, 60))}
        earlier = stale({"f": definition}, first, usage).get("f", [])
        later = stale({"f": definition}, first, usage, now=NOW + rng.uniform(0, 30) * DAY_S).get("f", [])
        assert set(earlier) <= set(later), (definition, usage, earlier, later)
        assert all(r in REASONS for r in later)


# --- the native format --------------------------------------------------------------------------------


def test_native_lifecycle_fields_are_validated() -> None:
    compile_flag("f", {"type": "kill-switch", "owner": "ops", "createdAt": "2026-01-01T00:00:00Z"})
    with pytest.raises(FlagError) as bad_type:
        compile_flag("f", {"type": "temporary"})
    assert bad_type.value.path == "flags.f.type"
    with pytest.raises(FlagError) as bad_owner:
        compile_flag("f", {"owner": 7})
    assert bad_owner.value.path == "flags.f.owner"
    with pytest.raises(FlagError) as bad_time:
        compile_flag("f", {"createdAt": "yesterday"})
    assert bad_time.value.path == "flags.f.createdAt"


# --- the ledger and the counters ---------------------------------------------------------------------------


def test_usage_merges_across_instances_and_resets_on_a_change() -> None:
    record = merge_usage(None, ("f", "fp1", 100.0, 150.0, ["on"]))
    record = merge_usage(record, ("f", "fp1", 120.0, 140.0, ["on"]))  # another instance, earlier use
    assert record == {"fp": "fp1", "changed": 100.0, "last": 150.0, "values": ["on"]}
    record = merge_usage(record, ("f", "fp1", 100.0, 160.0, ["off", "x"]))
    assert record["values"] == ["on", "off"] and record["last"] == 160.0  # two at most
    changed = merge_usage(record, ("f", "fp2", 200.0, 0.0, []))
    assert changed == {"fp": "fp2", "changed": 200.0, "last": 160.0, "values": []}
    # a slow instance still counting the old definition does not bring it back
    assert merge_usage(changed, ("f", "fp1", 100.0, 210.0, ["on"]))["fp"] == "fp2"


def test_counter_counts_outcomes_per_definition() -> None:
    counter = UsageCounter()
    counter.use({"f": "fp1", "g": "fp1"}, 10.0)
    counter.seen("f", True, 11.0)
    counter.seen("f", True, 12.0)
    counter.seen("unknown", "x", 12.0)
    assert counter.drain() == [("f", "fp1", 10.0, 12.0, ["true"]), ("g", "fp1", 10.0, 0.0, [])]
    assert counter.drain() == []
    counter.use({"f": "fp2"}, 20.0)  # g is gone, f changed
    counter.seen("f", "b", 21.0)
    counter.seen("f", "a", 22.0)
    counter.seen("f", "c", 23.0)
    assert counter.drain() == [("f", "fp2", 20.0, 23.0, ["a", "b"])]


async def test_digest_claims_are_once_per_day_per_flag() -> None:
    ledger = MemoryLedger()
    assert await ledger.claim_digest("2026-06-15", ["a", "b"]) == ["a", "b"]
    assert await ledger.claim_digest("2026-06-15", ["a", "b", "c"]) == ["c"]
    assert await ledger.claim_digest("2026-06-16", ["a"]) == ["a"]
    assert await ledger.first_seen({"a": 1.0}) == {"a": 1.0}
    assert await ledger.first_seen({"a": 2.0, "b": 2.0}) == {"a": 1.0, "b": 2.0}


# --- the service: digest and change notices ------------------------------------------------------------

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

FLAGS = {
    "flags": {
        "old-release": {"type": "release", "owner": "checkout-team", "createdAt": "2026-01-01T00:00:00Z"},
        "kill": {"type": "kill-switch", "owner": "ops", "createdAt": "2020-01-01T00:00:00Z"},
        "fresh": {"type": "release", "percentage": 50},
    }
}


class Clock:
    def __init__(self, at: float) -> None:
        self.at = at

    def __call__(self) -> float:
        return self.at


class Recorded:
    def __init__(self) -> None:
        self.posts: list[tuple[str, str]] = []

    def post(self, condition: str, text: str) -> bool:
        self.posts.append((condition, text))
        return True


def lifecycle_for(
    clock: Clock, alerts: AlertSettings | None = None, digest_hour: int = 9
) -> tuple[Lifecycle, MemoryStore, Alerter]:
    settings = Settings(
        alerts=alerts or AlertSettings(), lifecycle=LifecycleSettings(digest_hour=digest_hour)
    )
    store = MemoryStore(seed_state(FLAGS), compiler=DEFAULT.ordered(settings.store.sources))
    alerter = Alerter(settings.alerts)
    return Lifecycle(settings, store, Notifiers(alerter), clock=clock), store, alerter


async def test_digest_is_sent_once_per_day_per_flag(origin_factory: Callable[..., RawOrigin]) -> None:
    slack = origin_factory()
    clock = Clock(datetime(2026, 6, 15, 8, 0, tzinfo=UTC).timestamp())
    lifecycle, _, alerter = lifecycle_for(clock, AlertSettings(slack_webhook_url=f"{slack.url}/hook"))
    await alerter.start()
    try:
        await lifecycle.flush()  # first seen at 08:00 on June 15th
        assert await lifecycle.digest_tick() == []  # not the digest hour
        clock.at += 3600  # 09:00
        assert await lifecycle.digest_tick() == ["old-release"]
        clock.at += 600
        assert await lifecycle.digest_tick() == []  # named today already
        clock.at += DAY_S  # June 16th, 09:10
        assert await lifecycle.digest_tick() == ["old-release"]
        clock.at += 8 * DAY_S  # a week later nothing was evaluated: every flag is unused
        assert await lifecycle.digest_tick() == ["fresh", "kill", "old-release"]
        assert await lifecycle.digest_tick() == []
        assert await asyncio.to_thread(slack.wait_until, lambda o: len(o.requests_to("/hook")) == 3)
    finally:
        await alerter.close()
    texts = [json.loads(r.body or b"{}")["text"] for r in slack.requests_to("/hook")]
    assert "`old-release` (checkout-team): older than its type's lifetime" in texts[0]
    assert "fresh" not in texts[0] and "kill" not in texts[0]
    assert "`kill` (ops): not evaluated (stale since " in texts[2]  # when it became stale, not a use
    assert lifecycle.digests_sent == 3


async def test_digest_off_by_default() -> None:
    clock = Clock(datetime(2026, 6, 15, 9, 0, tzinfo=UTC).timestamp() + 30 * DAY_S)
    lifecycle, _, _ = lifecycle_for(clock, digest_hour=-1)
    for _hour in range(24):
        clock.at += 3600
        assert await lifecycle.digest_tick() == []


async def test_evaluations_keep_a_flag_from_being_unused_and_two_outcomes_from_single_variant() -> None:
    clock = Clock(NOW)
    lifecycle, _, _ = lifecycle_for(clock)
    await lifecycle.flush()
    clock.at += 8 * DAY_S
    lifecycle.counter.seen("fresh", True, clock.at)
    lifecycle.counter.seen("fresh", False, clock.at)
    lifecycle.counter.seen("kill", True, clock.at)
    found = {s["flag"]: s["reasons"] for s in await lifecycle.report()}
    # kill served one outcome (to all its callers) in the 8 days since it was first seen
    assert found == {"kill": ["single_variant"], "old-release": ["lifetime", "unused"]}
    clock.at += 8 * DAY_S
    lifecycle.counter.seen("fresh", True, clock.at)
    lifecycle.counter.seen("kill", True, clock.at)
    found = {s["flag"]: s["reasons"] for s in await lifecycle.report()}
    assert "fresh" not in found  # served both outcomes since its last change
    assert found["kill"] == ["single_variant"]  # one outcome to everyone for 16 days, no change
    assert lifecycle.marker("kill") == ["single_variant"] and lifecycle.marker("fresh") is None


async def test_a_change_resets_single_variant(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock(NOW)
    lifecycle, store, _ = lifecycle_for(clock)
    lifecycle.counter.seen("kill", True, clock.at)
    await lifecycle.flush()
    clock.at += 8 * DAY_S
    lifecycle.counter.seen("kill", True, clock.at)
    assert {s["flag"] for s in await lifecycle.report()} >= {"kill"}
    kill = Change(
        source="overrides", upsert={"kill": stored_text({"kill": True})}, actor="admin", action="kill"
    )
    await store.apply(kill)
    lifecycle.counter.seen("kill", False, clock.at)
    assert "kill" not in {s["flag"] for s in await lifecycle.report()}


async def test_every_change_is_logged_and_posted_once(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock(NOW)
    lifecycle, store, _ = lifecycle_for(clock)
    recorded = Recorded()
    lifecycle.notifiers.register("test", lambda rest: recorded)
    lifecycle.settings = dataclasses.replace(
        lifecycle.settings, alerts=AlertSettings(change_channel="test:x")
    )
    caplog.set_level(logging.INFO, logger="flagproxy.lifecycle")
    upsert = {"fresh": stored_text({"type": "release", "percentage": 60}), "new": stored_text({})}
    await store.apply(Change(source="native", upsert=upsert, actor="webhook:native"))
    await store.apply(Change(source="native", upsert=upsert, actor="webhook:native"))  # unchanged: silent
    await store.apply(Change(source="native", delete=["new"], actor="split"))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("change:")]
    version = store.snapshot.version
    assert lines == [
        f"change: actor=webhook:native flag=fresh summary=changed percentage version={version - 1}",
        f"change: actor=webhook:native flag=new summary=created version={version - 1}",
        f"change: actor=split flag=new summary=deleted version={version}",
    ]
    assert [c for c, _ in recorded.posts] == ["change", "change"]
    assert (
        recorded.posts[0][1]
        == "flagproxy: webhook:native: `fresh` changed percentage; `new` created (version 2)"
    )


def test_summaries_of_overrides() -> None:
    before = MemoryStore().snapshot
    promote = Change(source="overrides", upsert={"f": stored_text({"promote": "b"})}, action="promote")
    assert summarize(promote, "f", before) == "promoted b"
    assert summarize(Change(source="overrides", delete=["f"], action="restore"), "f", before) == "restored"


async def test_no_change_channel_no_notice(origin_factory: Callable[..., RawOrigin]) -> None:
    slack = origin_factory()
    _lifecycle, store, alerter = lifecycle_for(
        Clock(NOW), AlertSettings(slack_webhook_url=f"{slack.url}/hook")
    )
    await alerter.start()
    await store.apply(Change(source="native", upsert={"x": stored_text({})}, actor="admin"))
    await alerter.close()
    assert slack.requests_to("/hook") == []


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"FLAGPROXY_LIFECYCLE_DIGEST_HOUR": "24"}, "[lifecycle] digest_hour"),
        ({"FLAGPROXY_LIFECYCLE_DEFAULT_TYPE": "temporary"}, "[lifecycle] default_type"),
        ({"FLAGPROXY_LIFECYCLE_RELEASE_DAYS": "-1"}, "[lifecycle] release_days"),
        ({"FLAGPROXY_LIFECYCLE_STALE_AFTER_DAYS": "0"}, "[lifecycle] stale_after_days"),
        ({"FLAGPROXY_ALERTS_CHANGE_CHANNEL": "#flags"}, "[alerts] change_channel"),
        ({"FLAGPROXY_LIFECYCLE_DIGEST_CHANNEL": "ftp://x"}, "[lifecycle] digest_channel"),
    ],
)
def test_bad_lifecycle_settings_name_the_field(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env=env)
    assert needle in str(caught.value)


def test_lifecycle_settings_load() -> None:
    settings = load_settings(
        env={"FLAGPROXY_LIFECYCLE_DIGEST_HOUR": "9", "FLAGPROXY_ALERTS_CHANGE_CHANNEL": "telegram:-100123"}
    )
    assert settings.lifecycle.digest_hour == 9 and settings.alerts.change_channel == "telegram:-100123"
    assert settings.lifecycle.lifetimes()["operational"] == 7.0


def test_the_observer_samples_requests_at_most_every_interval() -> None:
    from proxy.dataplane.exchange import Exchange
    from proxy.observers.usage import SAMPLE_INTERVAL_S, UsageObserver

    flag = compile_flag("f", {"variants": {"a": {"weight": 1}, "b": {"weight": 1}}})
    a, b = flag.served
    clock = Clock(100.0)
    counter = UsageCounter()
    counter.use({"f": "fp"}, 0.0)
    observer = UsageObserver(counter, clock=clock)

    def request(served: Any) -> None:
        exchange = Exchange.__new__(Exchange)
        exchange.control, exchange.resolved = False, ((flag, served),)
        observer.observe(exchange)

    request(a)
    clock.at += SAMPLE_INTERVAL_S / 2
    request(b)  # skipped: too soon after the last sampled request
    assert counter.drain() == [("f", "fp", 0.0, 100.0, ["a"])]
    clock.at += SAMPLE_INTERVAL_S
    request(b)
    assert counter.drain() == [("f", "fp", 0.0, clock.at, ["a", "b"])]
