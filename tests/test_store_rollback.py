"""After Redis loses its data, the highest version wins and nothing steps back silently.

End to end: two ``flagproxy serve`` processes on a private ``redis-server`` that is restarted EMPTY;
the stale instance reconnects first and re-seeds its older state, the up-to-date one must write its
newer state back (a kill switch turned off must stay off). In process: ``RedisStore`` instances on
the same private Redis, driven step by step, for the invariants (hypothesis) and the two-history
cases.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from support import (
    ProxyProcess,
    RawOrigin,
    RedisServer,
    http_client,
    post_webhook,
    unique_namespace,
    wait_for,
)

from proxy.config import StoreSettings
from proxy.sources.registry import DEFAULT
from proxy.store.base import Snapshot
from proxy.store.change import Change
from proxy.store.redis import RedisStore
from proxy.store.state import RawState

SECRET = "rollback-secret"
TOKEN = "rollback-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SEED = {"flags": {"payments": {"enabled": True}, "banner": {"enabled": False}}}


def env(namespace: str, snapshot: Path) -> dict[str, str]:
    return {
        "FLAGPROXY_WEBHOOKS_SECRET": SECRET,
        "FLAGPROXY_ADMIN_TOKEN": TOKEN,
        "FLAGPROXY_STORE_ENVIRONMENT": namespace,
        "FLAGPROXY_STORE_SNAPSHOT_PATH": str(snapshot),
        "FLAGPROXY_STORE_RECONNECT_MAX_S": "0.3",
    }


def served(proxy: ProxyProcess, origin: RawOrigin, path: str) -> dict[str, Any]:
    """What the origin received in X-Feature-Flags for one request to ``path`` through ``proxy``."""
    response = http_client().get(f"{proxy.base_url}{path}", headers={"X-User-Id": "u1"})
    assert response.status_code == 200, response.text
    header = origin.only_request_to(path).value("X-Feature-Flags")
    return json.loads(header) if header else {}


def ready_version(proxy: ProxyProcess) -> int | None:
    response = http_client().get(f"{proxy.base_url}/__flags/readyz")
    return response.json()["version"] if response.status_code == 200 else None


def admin(proxy: ProxyProcess, action: str, key: str) -> dict[str, Any]:
    response = http_client().post(f"{proxy.base_url}/__flags/api/flags/{key}/{action}", headers=AUTH)
    assert response.status_code == 200, response.text
    return response.json()


def rollbacks(proxy: ProxyProcess, outcome: str) -> float:
    text = http_client().get(f"{proxy.base_url}/__flags/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "flagproxy_store_rollbacks_total" and sample.labels == {"outcome": outcome}:
                return sample.value
    return 0.0


@contextlib.contextmanager
def frozen(proxy: ProxyProcess) -> Iterator[None]:
    """The process stopped (SIGSTOP) — it misses everything — until the block ends."""
    os.kill(proxy.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proxy.pid, signal.SIGCONT)


def test_a_stale_instance_reseeding_first_does_not_bring_a_kill_switch_back(
    fresh_redis: RedisServer, origin: RawOrigin, tmp_path: Path
) -> None:
    namespace = unique_namespace("rollback")
    version_key = f"flagproxy:{namespace}:version"
    client = fresh_redis.client()
    probes = iter(range(10_000))

    def flags_of(proxy: ProxyProcess) -> dict[str, Any]:
        return served(proxy, origin, f"/rollback/{next(probes)}")

    def proxy(name: str) -> ProxyProcess:
        (tmp_path / name).mkdir(exist_ok=True)
        return ProxyProcess(
            [origin.url],
            flags=SEED,
            env=env(namespace, tmp_path / f"{name}-snapshot.json"),
            args=["--redis-url", fresh_redis.url],
            tmp_dir=tmp_path / name,
        )

    with contextlib.ExitStack() as stack:
        a = stack.enter_context(proxy("a"))
        b = stack.enter_context(proxy("b"))
        wait_for(lambda: ready_version(a) == ready_version(b) == 1, what="both ready at version 1")

        assert admin(a, "kill", "payments")["version"] == 2  # the kill switch goes on
        wait_for(lambda: ready_version(b) == 2, what="b at version 2")
        assert flags_of(b) == {"payments": False, "banner": False}
        snapshot_b = tmp_path / "b-snapshot.json"
        wait_for(
            lambda: snapshot_b.exists() and json.loads(snapshot_b.read_text())["version"] == 2,
            what="b's disk snapshot at version 2",
        )
        b.stop()  # b stays behind at version 2, kill switch on

        changes = [{"upsert": {"banner": {"enabled": True}}}, {"upsert": {"copy": {"enabled": True}}}]
        for version, change in enumerate(changes, start=3):
            response = post_webhook(a.base_url, change, SECRET)
            assert (response.status_code, response.json()["version"]) == (202, version), response.text
        assert admin(a, "restore", "payments")["version"] == 5  # and off again, at version 5
        latest = {"payments": True, "banner": True, "copy": True}
        assert flags_of(a) == latest

        with frozen(a):  # a is away while Redis comes back empty and b reconnects first
            fresh_redis.restart()
            client = fresh_redis.client()
            b = stack.enter_context(proxy("b"))
            wait_for(lambda: client.get(version_key) == "2", what="b re-seeded its version 2")
            assert flags_of(b) == {"payments": False, "banner": False}  # b is stale, nothing to do there

        wait_for(lambda: client.get(version_key) == "5", timeout=10, what="a writes its version 5 back")
        for instance in (a, b):
            wait_for(lambda p=instance: ready_version(p) == 5, what="every instance at version 5")
            assert flags_of(instance) == latest  # the kill switch stays off
        assert client.hgetall(f"flagproxy:{namespace}:overrides:flags") == {}
        assert "older than version 5" in a.stderr()
        assert rollbacks(a, "restored") == 1.0

        # versions go on from there: 3..5 are not reused for other content
        response = post_webhook(b.base_url, {"upsert": {"after": {"enabled": False}}}, SECRET)
        assert (response.status_code, response.json()["version"]) == (202, 6), response.text
        wait_for(lambda: ready_version(a) == 6, what="a at version 6")
        assert flags_of(a) == flags_of(b) == {**latest, "after": False}


# --- in process: RedisStore instances on one private Redis ------------------------------------------


def seed_state() -> RawState:
    return RawState(version=1, data={"native": {"flags": {"seed": '{"enabled":true}'}}})


class Instance:
    """One ``RedisStore``, never started: it only hears of Redis when told to read or write."""

    def __init__(self, redis_url: str, namespace: str) -> None:
        self.store = RedisStore(
            StoreSettings(redis_url=redis_url, environment=namespace), fallback=seed_state, compiler=DEFAULT
        )
        self.installed: list[Snapshot] = []
        self.store.on_change(self.installed.append)

    def rollbacks(self, outcome: str) -> float:
        found = self.store.metrics.registry.get_sample_value(
            "flagproxy_store_rollbacks_total", {"outcome": outcome}
        )
        return found or 0.0

    @property
    def keys(self) -> set[str]:
        return set(self.store.snapshot.raw.items("native"))


async def write(instance: Instance, key: str) -> int:
    result = await instance.store.apply(Change(source="native", upsert={key: '{"enabled":true}'}))
    assert result.status == "applied", result
    return result.version


def lose(redis: Any, namespace: str) -> None:
    """This namespace's keys gone, as when Redis restarts empty."""
    lost = list(redis.scan_iter(match=f"flagproxy:{namespace}:*"))
    if lost:
        redis.delete(*lost)


def test_two_histories_the_higher_version_wins_loudly(redis_server: RedisServer) -> None:
    """A stale instance re-seeded and took writes while the up-to-date one was away."""
    namespace = unique_namespace("forks")
    redis = redis_server.client()

    async def run() -> None:
        a, b = Instance(redis_server.url, namespace), Instance(redis_server.url, namespace)
        try:
            await a.store.resync()
            await b.store.resync()
            assert await write(a, "a1") == 2
            assert await write(a, "a2") == 3  # b never heard of 2 and 3
            lose(redis, namespace)
            assert await write(b, "b1") == 2  # b re-seeds its version 1, then writes on top
            assert await write(b, "b2") == 3  # a tie with a's 3: two histories
            await a.store.resync()
            # a does not take another content under a number it served: its state goes back as 4
            assert (a.store.snapshot.version, a.keys) == (4, {"seed", "a1", "a2"})
            assert a.rollbacks("restored") == 1
            await b.store.resync()
            assert (b.store.snapshot.version, b.keys) == (4, {"seed", "a1", "a2"})
            assert b.rollbacks("adopted") == 1  # b's b1 and b2 are gone, and b says so

            assert await write(b, "b3") == 5
            assert await write(b, "b4") == 6
            lose(redis, namespace)
            await b.store.resync()  # b re-seeds its 6
            assert await write(b, "b5") == 7
            assert await write(b, "b6") == 8
            await a.store.resync()  # a (at 4) finds 8, a history that forked from 6 ≥ 4: nothing lost
            assert (a.store.snapshot.version, a.rollbacks("adopted")) == (8, 0)
            assert a.keys == {"seed", "a1", "a2", "b3", "b4", "b5", "b6"}
        finally:
            await a.store.close()
            await b.store.close()

    asyncio.run(run())


STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, 2)),
        st.tuples(st.just("sync"), st.integers(0, 2)),
        st.tuples(st.just("lose"), st.just(0)),
    ),
    min_size=1,
    max_size=14,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=STEPS)
def test_versions_never_step_back_nor_name_two_contents(redis_server: RedisServer, steps: Any) -> None:
    """Any interleaving of writes, full reads and data loss over three instances.

    Each write adds a key of its own, so a state's keys are the writes it holds, and "loses a
    change" is "a key disappears". For every instance: its version never goes down, one version
    never names two contents, a write gets a version above any it served, and whenever it installs
    a state without a key it served, it counted an ``adopted`` rollback. Across instances one
    (generation, version) names one content. After a read, Redis is at least as new as the reader.
    """
    namespace = unique_namespace("steps")
    redis = redis_server.client()

    async def run() -> None:
        instances = [Instance(redis_server.url, namespace) for _ in range(3)]
        named: dict[tuple[str, int], frozenset[str]] = {}
        try:
            await instances[0].store.resync()
            for n, (action, i) in enumerate(steps):
                instance = instances[i]
                before = len(instance.installed)
                adopted = instance.rollbacks("adopted")
                served = max((s.version for s in instance.installed), default=0)
                if action == "write":
                    assert await write(instance, f"w{n}") > served
                elif action == "sync":
                    await instance.store.resync()
                else:
                    lose(redis, namespace)
                if action != "lose":
                    stored = redis.get(f"flagproxy:{namespace}:version")
                    assert int(stored) >= instance.store.snapshot.version
                chain = instance.installed[max(0, before - 1) :]
                for old, snapshot in itertools.pairwise(chain):
                    assert snapshot.version >= old.version
                    if not set(old.raw.items("native")) <= set(snapshot.raw.items("native")):
                        assert instance.rollbacks("adopted") > adopted, (old.version, snapshot.version)
            for instance in instances:
                by_version: dict[int, frozenset[str]] = {}
                for snapshot in instance.installed:
                    content = frozenset(snapshot.raw.items("native"))
                    assert by_version.setdefault(snapshot.version, content) == content
                    key = (snapshot.raw.generation.id, snapshot.version)
                    assert named.setdefault(key, content) == content
        finally:
            for instance in instances:
                await instance.store.close()
            lose(redis, namespace)

    asyncio.run(run())
