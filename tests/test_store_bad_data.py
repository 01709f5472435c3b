"""Bad data in Redis: garbage written straight into a private ``redis-server`` with redis-py.

- a definition that does not compile keeps its flag's last good definition; fields from a newer
  release are ignored with a warning — while the webhook and the admin API stay strict (422);
- a non-integer version (or another value only flagproxy writes) never leaves an instance
  ``503 loading``: it serves its fallback, says so, and picks Redis up once it is readable;
- a write Redis received but did not answer in time is ``504 store_timeout``, not "nothing applied".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from support import (
    LOCALHOST,
    ProxyProcess,
    RawOrigin,
    RedisServer,
    http_client,
    post_webhook,
    served_flags,
    unique_namespace,
    wait_for,
)

from proxy.sources.registry import DEFAULT
from proxy.store.change import Change
from proxy.store.memory import MemoryStore

SECRET = "bad-data-secret"
TOKEN = "bad-data-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SEED = {
    "flags": {
        "checkout": {"variants": {"old": {"weight": 1}, "new": {"weight": 0}}, "defaultVariant": "old"},
        "banner": {"enabled": False},
    }
}
CHECKOUT_NEW = {"variants": {"old": {"weight": 0}, "new": {"weight": 1}}, "defaultVariant": "old"}


def env(namespace: str, **extra: str) -> dict[str, str]:
    return {
        "FLAGPROXY_WEBHOOKS_SECRET": SECRET,
        "FLAGPROXY_ADMIN_TOKEN": TOKEN,
        "FLAGPROXY_STORE_ENVIRONMENT": namespace,
        "FLAGPROXY_STORE_RECONNECT_MAX_S": "0.2",
        **extra,
    }


def key(namespace: str, suffix: str) -> str:
    return f"flagproxy:{namespace}:{suffix}"


def readyz(proxy: ProxyProcess) -> tuple[int, dict[str, Any]]:
    response = http_client().get(f"{proxy.base_url}/__flags/readyz")
    return response.status_code, response.json()


def at_version(proxy: ProxyProcess, version: int) -> bool:
    status, body = readyz(proxy)
    return status == 200 and body["version"] == version


def metric(proxy: ProxyProcess, name: str, **labels: str) -> float | None:
    text = http_client().get(f"{proxy.base_url}/__flags/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


def make_proxy(origin: RawOrigin, tmp: Path, redis_url: str, environment: dict[str, str]) -> ProxyProcess:
    tmp.mkdir(parents=True, exist_ok=True)
    return ProxyProcess(
        [origin.url], flags=SEED, env=environment, args=["--redis-url", redis_url], tmp_dir=tmp
    )


# --- (a) a definition that does not compile ------------------------------------------------------------


def test_a_stored_definition_that_does_not_compile_keeps_its_last_good_one(
    redis_server: RedisServer, origin: RawOrigin, tmp_path: Path
) -> None:
    namespace = unique_namespace("last-good")
    client = redis_server.client()
    flags_key = key(namespace, "native:flags")
    environment = env(namespace, FLAGPROXY_STORE_RESYNC_INTERVAL_S="0.1")
    with make_proxy(origin, tmp_path / "p", redis_server.url, environment) as proxy:
        wait_for(lambda: at_version(proxy, 1), what="ready at version 1")
        changed = post_webhook(proxy.base_url, {"upsert": {"checkout": CHECKOUT_NEW}}, SECRET)
        assert (changed.status_code, changed.json()["version"]) == (202, 2), changed.text
        assert served_flags(proxy, origin) == {"checkout": "new", "banner": False}

        # invalid JSON, written by something that is not flagproxy (the resync finds it)
        client.hset(flags_key, "checkout", '{"variants": {"old": ')
        assert client.incr(key(namespace, "version")) == 3
        wait_for(lambda: at_version(proxy, 3), what="the proxy read version 3")
        assert served_flags(proxy, origin) == {"checkout": "new", "banner": False}
        wait_for(lambda: "still serving its last good definition" in proxy.stderr(), what="the ERROR line")
        assert metric(proxy, "flagproxy_store_invalid_definitions", source="native") == 1.0
        described = http_client().get(f"{proxy.base_url}/__flags/api/flags/checkout", headers=AUTH)
        assert described.status_code == 200, described.text
        assert described.json()["definition"] is None
        assert described.json()["invalid"].startswith("invalid JSON")

        # a field from a newer release: forward compatible, the rest of the definition is served
        client.hset(flags_key, "banner", '{"enabled": true, "fromTheFuture": {"x": 1}}')
        assert client.incr(key(namespace, "version")) == 4
        wait_for(lambda: at_version(proxy, 4), what="the proxy read version 4")
        assert served_flags(proxy, origin) == {"checkout": "new", "banner": True}
        assert "fields this release does not know" in proxy.stderr()
        assert "fromTheFuture" in proxy.stderr()

        # ...but at the door an unknown field is a typo: 422 naming it, and Redis is left as it was
        before = redis_server.dump_namespace(key(namespace, "*"))
        typo = post_webhook(proxy.base_url, {"upsert": {"banner": {"enabeld": False}}}, SECRET)
        assert typo.status_code == 422, typo.text
        assert typo.json() == {
            "error": "invalid_flags",
            "detail": "flags.banner.enabeld: unknown field",
            "field": "flags.banner.enabeld",
        }
        put = http_client().put(
            f"{proxy.base_url}/__flags/api/flags/banner",
            json={"enabled": True, "fromTheFuture": 1},
            headers=AUTH,
        )
        assert (put.status_code, put.json()["error"]) == (422, "invalid_flags"), put.text
        assert redis_server.dump_namespace(key(namespace, "*")) == before

        # a good definition again replaces the kept one
        client.hset(flags_key, "checkout", json.dumps(SEED["flags"]["checkout"]))
        assert client.incr(key(namespace, "version")) == 5
        wait_for(lambda: at_version(proxy, 5), what="the proxy read version 5")
        assert served_flags(proxy, origin) == {"checkout": "old", "banner": True}
        assert metric(proxy, "flagproxy_store_invalid_definitions", source="native") == 0.0


GOOD = {True: '{"enabled":true}', False: '{"enabled":false}'}
NEWER = {True: '{"enabled":true,"owner":"team-a"}', False: '{"enabled":false,"segments":["beta"]}'}
TEXTS = st.one_of(
    st.tuples(st.just("good"), st.booleans()),
    st.tuples(st.just("newer"), st.booleans()),  # fields this release does not know
    st.tuples(st.just("bad"), st.sampled_from(["{", "[1]", '{"enabled":"yes"}', '"x"', "[" * 5000])),
    st.tuples(st.just("delete"), st.just(None)),
)


@settings(max_examples=150, deadline=None)
@given(writes=st.lists(TEXTS, min_size=1, max_size=12))
def test_a_flag_serves_the_last_definition_that_compiled(writes: list[tuple[str, Any]]) -> None:
    """Whatever the store holds, a flag serves its last definition that compiled; a bad one never
    takes it away, a delete does, and the other flags are never affected."""
    store = MemoryStore(compiler=DEFAULT)
    apply = store.apply

    async def run() -> None:
        await apply(Change(source="native", upsert={"other": GOOD[True]}))
        expected: bool | None = None
        for kind, value in writes:
            if kind == "delete":
                await apply(Change(source="native", delete=["k"]))
                expected = None
            else:
                text = {"good": GOOD, "newer": NEWER}[kind][value] if kind != "bad" else value
                await apply(Change(source="native", upsert={"k": text}))
                if kind != "bad":
                    expected = value
            flags = store.snapshot.flags
            served = flags["k"].evaluate({"key": "u1"}).value if "k" in flags else None
            assert served == expected
            assert flags["other"].evaluate({"key": "u1"}).value is True
            invalid = store.snapshot.invalid.get("native", {})
            assert ("k" in invalid) == (kind == "bad")

    asyncio.run(run())


def test_a_garbled_kill_keeps_the_flag_killed() -> None:
    """Overrides too: a kill whose stored text no longer parses must not switch the kill off."""
    store = MemoryStore(compiler=DEFAULT)

    def value() -> Any:
        return store.snapshot.flags["pay"].evaluate({"key": "u1"}).value

    async def run() -> None:
        await store.apply(Change(source="native", upsert={"pay": GOOD[True]}))
        await store.apply(Change(source="overrides", upsert={"pay": '{"kill":true}'}))
        assert value() is False
        for garbage in ('{"kill":', "[true]"):
            await store.apply(Change(source="overrides", upsert={"pay": garbage}))
            assert value() is False
            assert "pay" in store.snapshot.invalid["overrides"]
        await store.apply(Change(source="overrides", delete=["pay"]))  # restore
        assert value() is True
        assert store.snapshot.invalid == {}

    asyncio.run(run())


# --- (b) values only flagproxy writes, holding garbage ---------------------------------------------------


FLAGS_IN_REDIS = {"checkout": json.dumps(CHECKOUT_NEW), "extra": "{}"}
# key suffix → (garbage, what puts it right)
GARBAGE: dict[str, tuple[str, Any, Any]] = {
    "a non-integer store version": ("version", "seven", "7"),
    "a non-integer flag version": ("native:flags:versions", {"checkout": "2025-01-01"}, None),
    "a non-integer document version": ("native:meta", {"flags:version": "v9"}, None),
    "a flags key of the wrong type": ("native:flags", "not a hash", FLAGS_IN_REDIS),
}


def put(client: Any, name: str, value: Any) -> None:
    client.delete(name)
    if isinstance(value, str):
        client.set(name, value)
    elif value is not None:
        client.hset(name, mapping=value)


@pytest.mark.parametrize("case", list(GARBAGE))
def test_garbage_in_redis_serves_the_fallback_and_is_picked_up_once_repaired(
    case: str, redis_server: RedisServer, origin: RawOrigin, tmp_path: Path
) -> None:
    namespace = unique_namespace(case)
    client = redis_server.client()
    # a Redis written by flagproxy (a store at version 7), then one value spoiled
    client.set(key(namespace, "inited"), "1")
    client.set(key(namespace, "version"), "7")
    client.hset(key(namespace, "native:flags"), mapping=FLAGS_IN_REDIS)
    suffix, garbage, repair = GARBAGE[case]
    put(client, key(namespace, suffix), garbage)
    before = redis_server.dump_namespace(key(namespace, "*"))

    with make_proxy(origin, tmp_path / "p", redis_server.url, env(namespace)) as proxy:
        # ready, on the flags file (no disk snapshot here), not "503 loading" forever
        wait_for(lambda: readyz(proxy) == (200, {"status": "ready", "version": 1, "flags": 2}), what="ready")
        assert served_flags(proxy, origin) == {"checkout": "old", "banner": False}
        wait_for(lambda: "Redis holds data this instance cannot use" in proxy.stderr(), what="the ERROR line")
        assert f"flagproxy:{namespace}:{suffix}" in proxy.stderr() or "WRONGTYPE" in proxy.stderr()

        # a write on top of garbage is refused before anything is written
        refused = post_webhook(proxy.base_url, {"upsert": {"checkout": CHECKOUT_NEW}}, SECRET)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"] == "store_unavailable" and refused.json()["detail"]
        assert redis_server.dump_namespace(key(namespace, "*")) == before

        # repaired: the proxy was retrying all along and now serves what Redis holds
        put(client, key(namespace, suffix), repair)
        wait_for(lambda: at_version(proxy, 7), timeout=10, what="the proxy read version 7")
        assert served_flags(proxy, origin) == {"checkout": "new", "extra": True}


# --- (c) a write Redis took but did not answer in time -------------------------------------------------


class DebugRedis(RedisServer):
    """A private Redis that accepts ``DEBUG SLEEP`` from localhost (off by default since Redis 7)."""

    def command(self) -> list[str]:
        return [*super().command(), "--enable-debug-command", "local"]


@pytest.fixture
def debug_redis(tmp_path: Path) -> Iterator[DebugRedis]:
    server = DebugRedis(dir=tmp_path / "redis").start()
    yield server
    server.close()


@contextlib.contextmanager
def redis_asleep(server: RedisServer, seconds: int) -> Iterator[None]:
    """Redis blocked in ``DEBUG SLEEP`` (it reads nothing, answers nothing); the block returns once it
    answers again."""
    address = (LOCALHOST, server.port)
    with socket.create_connection(address, timeout=seconds + 5) as sleeper:
        sleeper.sendall(b"DEBUG SLEEP %d\r\n" % seconds)
        with socket.create_connection(address, timeout=0.3) as probe:
            probe.sendall(b"PING\r\n")
            with pytest.raises(TimeoutError):
                probe.recv(16)  # no answer: it is asleep
        yield
        assert sleeper.recv(16) == b"+OK\r\n"  # awake again


@contextlib.contextmanager
def writes_paused(server: RedisServer, seconds: float) -> Iterator[None]:
    """Redis answering reads (PING too) but holding every write for ``seconds`` (``CLIENT PAUSE
    WRITE``): a write sent now is applied once the pause ends."""
    client = server.client()
    client.execute_command("CLIENT", "PAUSE", int(seconds * 1000), "WRITE")
    try:
        yield
    finally:
        client.execute_command("CLIENT", "UNPAUSE")


def test_a_write_redis_did_not_answer_in_time_is_504_store_timeout(
    debug_redis: DebugRedis, origin: RawOrigin, tmp_path: Path
) -> None:
    namespace = unique_namespace("timeout")
    client = debug_redis.client()
    environment = env(namespace, FLAGPROXY_STORE_REDIS_TIMEOUT_S="0.5")
    with make_proxy(origin, tmp_path / "p", debug_redis.url, environment) as proxy:
        wait_for(lambda: at_version(proxy, 1), what="ready at version 1")
        warm = post_webhook(proxy.base_url, {"upsert": {"banner": {"enabled": True}}}, SECRET)
        assert warm.status_code == 202, warm.text

        # asleep before the write is sent: the proxy knows nothing was written (503), nothing is
        with redis_asleep(debug_redis, 2):
            never = post_webhook(proxy.base_url, {"upsert": {"never": {"enabled": True}}}, SECRET)
            assert never.status_code == 503, never.text
            assert never.json()["error"] == "store_unavailable"
        with writes_paused(debug_redis, 3):
            late = post_webhook(proxy.base_url, {"upsert": {"late": {"enabled": True}}}, SECRET)
            assert late.status_code == 504, late.text
            body = late.json()
            assert body["error"] == "store_timeout"
            assert "may or may not have been applied" in body["detail"]

        assert client.hget(key(namespace, "native:flags"), "never") is None  # 503: never written
        # 504: whichever way it went (a paused write whose client left is dropped by Redis), the proxy
        # ends up serving what Redis holds
        stored = client.hget(key(namespace, "native:flags"), "late")
        expected = None if stored is None else json.loads(stored)["enabled"]
        wait_for(lambda: served_flags(proxy, origin).get("late") == expected, what="what Redis holds, served")


# key suffix → garbage that reading tolerates but a write would trip over half-way
HALF_WAY: dict[str, tuple[str, str, int]] = {
    "an audit log that is not a list": ("audit", "not a list", 7),
    "a store version INCR cannot raise": ("version", "99999999999999999999", 99999999999999999999),
}


@pytest.mark.parametrize("case", list(HALF_WAY))
def test_a_write_that_would_fail_half_way_is_refused_before_anything_is_written(
    case: str, redis_server: RedisServer, origin: RawOrigin, tmp_path: Path
) -> None:
    namespace = unique_namespace("half-" + case)
    client = redis_server.client()
    client.set(key(namespace, "inited"), "1")
    client.set(key(namespace, "version"), "7")
    client.hset(key(namespace, "native:flags"), mapping=FLAGS_IN_REDIS)
    suffix, garbage, version = HALF_WAY[case]
    client.set(key(namespace, suffix), garbage)
    before = redis_server.dump_namespace(key(namespace, "*"))

    with make_proxy(origin, tmp_path / "p", redis_server.url, env(namespace)) as proxy:
        wait_for(lambda: at_version(proxy, version), what=f"ready on Redis at version {version}")
        refused = post_webhook(proxy.base_url, {"upsert": {"checkout": {"enabled": False}}}, SECRET)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"] == "store_unavailable"
        assert redis_server.dump_namespace(key(namespace, "*")) == before  # not half a change
        assert served_flags(proxy, origin) == {"checkout": "new", "extra": True}
