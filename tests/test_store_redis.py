"""The Redis flag store end to end: real ``flagproxy serve`` processes on a private ``redis-server``.

Served flags are observed where they matter: the ``X-Feature-Flags`` header the origin receives.
Every wait is bounded polling of an observable (that header, the admin API, Redis itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import (
    LOCALHOST,
    ProxyProcess,
    RawOrigin,
    RedisServer,
    free_port,
    http_client,
    post_webhook,
    run_serve,
    served_flags,
    sign_body,
    unique_namespace,
    wait_for,
)

from proxy.config import StoreSettings
from proxy.sources.native.document import change_from_payload, updated_at_ms
from proxy.sources.registry import DEFAULT
from proxy.store.change import Change
from proxy.store.memory import MemoryStore
from proxy.store.redis import RedisStore
from proxy.store.state import RawState

SECRET = "webhook-secret"
TOKEN = "admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
T1 = "2025-01-01T00:00:00.000Z"
T2 = "2025-02-01T00:00:00.000Z"
T3 = "2025-03-01T00:00:00.000Z"

SEED = {
    "flags": {
        "checkout": {
            "variants": {"old": {"weight": 1}, "new": {"weight": 0}},
            "defaultVariant": "old",
        },
        "banner": {"enabled": False},
    }
}
SEED_SERVED = {"checkout": "old", "banner": False}
CHECKOUT_NEW = {"variants": {"old": {"weight": 0}, "new": {"weight": 1}}, "defaultVariant": "old"}


def proxy_env(namespace: str, **extra: str) -> dict[str, str]:
    return {
        "FLAGPROXY_WEBHOOKS_SECRET": SECRET,
        "FLAGPROXY_ADMIN_TOKEN": TOKEN,
        "FLAGPROXY_STORE_ENVIRONMENT": namespace,
        **extra,
    }


def key(namespace: str, suffix: str) -> str:
    return f"flagproxy:{namespace}:{suffix}"


def admin_flags(proxy: ProxyProcess) -> dict[str, Any]:
    response = http_client().get(f"{proxy.base_url}/__flags/api/flags", headers=AUTH, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def readyz(proxy: ProxyProcess) -> httpx.Response:
    return http_client().get(f"{proxy.base_url}/__flags/readyz", timeout=10)


def wait_ready(proxy: ProxyProcess, timeout: float = 10.0) -> dict[str, Any]:
    return wait_for(lambda: (r := readyz(proxy)).status_code == 200 and r.json(), timeout, what="readyz 200")


def stored_definitions(client: Any, namespace: str) -> dict[str, Any]:
    return {k: json.loads(v) for k, v in client.hgetall(key(namespace, "native:flags")).items()}


def make_proxy(
    origin: RawOrigin, tmp: Path, redis_url: str, env: dict[str, str], flags: dict[str, Any] = SEED
) -> ProxyProcess:
    """A proxy on ``redis_url``, not started yet (``with make_proxy(...) as proxy`` starts and stops it);
    its files stay in ``tmp`` for reading the log."""
    tmp.mkdir(parents=True, exist_ok=True)
    return ProxyProcess([origin.url], flags=flags, env=env, args=["--redis-url", redis_url], tmp_dir=tmp)


@dataclass
class Cluster:
    namespace: str
    proxies: list[ProxyProcess]


@pytest.fixture(scope="module")
def cluster(redis_server: RedisServer, origin: RawOrigin, proxy_factory: Any) -> Cluster:
    """Three proxy processes sharing one namespace on one Redis."""
    namespace = unique_namespace("cluster")
    env = proxy_env(namespace)
    proxies = [
        proxy_factory([origin.url], flags=SEED, env=env, args=["--redis-url", redis_server.url])
        for _ in range(3)
    ]
    for proxy in proxies:
        wait_ready(proxy)
    return Cluster(namespace, proxies)


@dataclass
class Single:
    namespace: str
    proxy: ProxyProcess


MAX_BODY = 4096


@pytest.fixture(scope="module")
def single(redis_server: RedisServer, origin: RawOrigin, proxy_factory: Any) -> Single:
    """One proxy on a namespace of its own, with a small webhook body limit."""
    namespace = unique_namespace("single")
    env = proxy_env(namespace, FLAGPROXY_WEBHOOKS_MAX_BODY_BYTES=str(MAX_BODY))
    proxy = proxy_factory([origin.url], flags=SEED, env=env, args=["--redis-url", redis_server.url])
    wait_ready(proxy)
    return Single(namespace, proxy)


# --- readiness and the layout -----------------------------------------------------------------------


def test_readyz_and_healthz_with_a_live_redis(cluster: Cluster, redis_server: RedisServer) -> None:
    client = redis_server.client()
    version = int(client.get(key(cluster.namespace, "version")))
    for proxy in cluster.proxies:
        ready = readyz(proxy)
        assert ready.status_code == 200
        assert ready.json()["status"] == "ready"
        assert ready.json()["version"] >= version
        health = http_client().get(f"{proxy.base_url}/__flags/healthz")
        assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert client.get(key(cluster.namespace, "inited")) == "1"


def test_first_instance_seeds_redis_from_the_flags_file(cluster: Cluster, redis_server: RedisServer) -> None:
    stored = stored_definitions(redis_server.client(), cluster.namespace)
    assert stored["checkout"] == SEED["flags"]["checkout"]
    assert stored["banner"] == SEED["flags"]["banner"]


# --- fan-out ----------------------------------------------------------------------------------------


def test_a_webhook_to_one_instance_is_served_by_all_three(cluster: Cluster, origin: RawOrigin) -> None:
    first, second, third = cluster.proxies
    for proxy in cluster.proxies:
        assert served_flags(proxy, origin)["checkout"] == "old"

    response = post_webhook(first.base_url, {"upsert": {"checkout": CHECKOUT_NEW}}, SECRET)
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "applied"
    assert response.json()["changed"] == ["checkout"]
    # read your own writes: the instance that took the webhook serves it before answering 202
    assert served_flags(first, origin)["checkout"] == "new"
    for proxy in (second, third):
        wait_for(lambda p=proxy: served_flags(p, origin)["checkout"] == "new", what="checkout=new")

    back = post_webhook(third.base_url, {"upsert": {"checkout": SEED["flags"]["checkout"]}}, SECRET)
    assert back.status_code == 202, back.text
    for proxy in cluster.proxies:
        wait_for(lambda p=proxy: served_flags(p, origin)["checkout"] == "old", what="checkout=old")


def test_concurrent_writers_stay_consistent(
    cluster: Cluster, redis_server: RedisServer, origin: RawOrigin
) -> None:
    client = redis_server.client()
    start_version = int(client.get(key(cluster.namespace, "version")))
    per_writer = 50

    def writer(index: int) -> list[tuple[int, dict[str, Any]]]:
        base = cluster.proxies[index].base_url
        out = []
        for i in range(per_writer):
            flag = f"shared-{i % 4}"  # every writer hits the same four flags
            definition = {"percentage": (i * 7 + index * 13) % 101, "note": f"writer {index} change {i}"}
            response = post_webhook(base, {"upsert": {flag: definition}}, SECRET)
            out.append((response.status_code, response.json()))
        return out

    with ThreadPoolExecutor(3) as pool:
        results = [item for batch in pool.map(writer, range(3)) for item in batch]

    assert [status for status, _ in results] == [202] * (3 * per_writer)
    applied = [body for _, body in results if body["status"] == "applied"]
    # every note is distinct: each write is a real change, unless another writer's, signed in a later
    # second, reached the flag first (then it is older, and ignored)
    others = [body for _, body in results if body["status"] != "applied"]
    assert all((b["status"], b["changed"], len(b["ignored"])) == ("unchanged", [], 1) for b in others)
    assert len(applied) + len(others) == 3 * per_writer and len(applied) >= per_writer
    final_version = int(client.get(key(cluster.namespace, "version")))
    assert final_version == start_version + len(applied)
    # each applied change got its own store version, with no gaps
    assert sorted(body["version"] for body in applied) == list(range(start_version + 1, final_version + 1))

    stored = stored_definitions(client, cluster.namespace)
    for proxy in cluster.proxies:
        wait_for(lambda p=proxy: admin_flags(p)["version"] == final_version, what="instance at final version")
        listed = admin_flags(proxy)
        assert listed["version"] == final_version
        assert {k: v["definition"] for k, v in listed["flags"].items()} == stored
    served = [served_flags(proxy, origin, user="same-user") for proxy in cluster.proxies]
    assert served[0] == served[1] == served[2]
    assert {f"shared-{i}" for i in range(4)} <= set(served[0])


def test_propagation_latency_to_all_three(
    cluster: Cluster, origin: RawOrigin, record_property: Any, capsys: Any
) -> None:
    """Not a timed assertion: measures webhook 202 → every instance serves the new value."""
    latencies = []
    stale_reads = 0  # probes that still saw the previous value

    def serves(proxy: ProxyProcess, value: bool) -> bool:
        nonlocal stale_reads
        seen = served_flags(proxy, origin, path="/latency").get("latency-probe") is value
        stale_reads += not seen
        return seen

    for i in range(50):
        value = i % 2 == 0
        target = cluster.proxies[i % 3]
        response = post_webhook(target.base_url, {"upsert": {"latency-probe": {"enabled": value}}}, SECRET)
        accepted = time.perf_counter()
        assert response.status_code == 202, response.text
        for proxy in cluster.proxies:
            wait_for(lambda p=proxy, v=value: serves(p, v), 5.0, 0.001, f"latency-probe={value}")
        latencies.append(time.perf_counter() - accepted)
    rounds = []  # what one observation of all three costs when nothing changes: the resolution
    for _ in range(20):
        began = time.perf_counter()
        for proxy in cluster.proxies:
            served_flags(proxy, origin, path="/latency")
        rounds.append(time.perf_counter() - began)
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    p50, p99 = statistics.median(latencies) * 1000, cuts[98] * 1000
    probe = statistics.median(rounds) * 1000
    record_property("propagation_p50_ms", round(p50, 2))
    record_property("propagation_p99_ms", round(p99, 2))
    record_property("probe_round_ms", round(probe, 2))
    record_property("stale_reads", stale_reads)
    with capsys.disabled():
        print(f"\npropagation 202 → all 3 instances serve, {len(latencies)} updates: "
              f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {max(latencies) * 1000:.1f} ms "
              f"(one probe round of the 3 instances alone: {probe:.1f} ms; "
              f"{stale_reads} of {150 + stale_reads} probes still saw the old value)")  # fmt: skip


# --- version ordering through Redis ---------------------------------------------------------------------


def stored_source_version(client: Any, namespace: str) -> int:
    return int(client.hget(key(namespace, "native:meta"), "flags:version") or 0)


def test_stale_source_version_is_409_and_nothing_changes(
    single: Single, redis_server: RedisServer, origin: RawOrigin
) -> None:
    client = redis_server.client()
    base = stored_source_version(client, single.namespace) + 10
    ok = post_webhook(
        single.proxy.base_url, {"upsert": {"ordered": {"enabled": True}}, "version": base}, SECRET
    )
    assert ok.status_code == 202, ok.text
    before = redis_server.dump_namespace(key(single.namespace, "*"))
    served_before = served_flags(single.proxy, origin)

    for payload in (
        {"upsert": {"ordered": {"enabled": False}}, "version": base},
        {"upsert": {"ordered": {"enabled": False}}, "version": base - 1},
        {"flags": {"ordered": {"enabled": False}}, "version": base - 5},
    ):
        response = post_webhook(single.proxy.base_url, payload, SECRET)
        assert response.status_code == 409, response.text
        body = response.json()
        assert body["error"] == "stale"
        assert str(base) in body["detail"]
        assert body["stored_version"] == base
        assert body["version"] == int(client.get(key(single.namespace, "version")))

    assert redis_server.dump_namespace(key(single.namespace, "*")) == before
    assert served_flags(single.proxy, origin) == served_before

    newer = post_webhook(
        single.proxy.base_url, {"upsert": {"ordered": {"enabled": False}}, "version": base + 1}, SECRET
    )
    assert newer.status_code == 202 and newer.json()["changed"] == ["ordered"]
    assert served_flags(single.proxy, origin)["ordered"] is False
    assert stored_source_version(client, single.namespace) == base + 1


def test_older_updated_at_is_ignored_and_the_rest_applies(
    single: Single, redis_server: RedisServer, origin: RawOrigin
) -> None:
    first = post_webhook(
        single.proxy.base_url,
        {
            "upsert": {
                "ord-a": {"enabled": True, "updatedAt": T2},
                "ord-b": {"enabled": True, "updatedAt": T2},
            }
        },
        SECRET,
    )
    assert first.status_code == 202, first.text
    second = post_webhook(
        single.proxy.base_url,
        {
            "upsert": {
                "ord-a": {"enabled": False, "updatedAt": T1},
                "ord-b": {"enabled": False, "updatedAt": T3},
                "ord-c": {"enabled": False},
            }
        },
        SECRET,
    )
    assert second.status_code == 202, second.text
    body = second.json()
    assert body["status"] == "applied"
    assert body["ignored"] == ["ord-a"]
    assert sorted(body["changed"]) == ["ord-b", "ord-c"]
    served = served_flags(single.proxy, origin)
    assert (served["ord-a"], served["ord-b"], served["ord-c"]) == (True, False, False)
    client = redis_server.client()
    assert json.loads(client.hget(key(single.namespace, "native:flags"), "ord-a")) == {
        "enabled": True,
        "updatedAt": T2,
    }
    assert client.hget(key(single.namespace, "native:flags:versions"), "ord-b") == str(
        updated_at_ms({"updatedAt": T3})
    )

    everything_older = post_webhook(
        single.proxy.base_url, {"upsert": {"ord-b": {"enabled": True, "updatedAt": T1}}}, SECRET
    )
    assert everything_older.status_code == 202
    assert everything_older.json() == {
        "status": "unchanged",
        "version": body["version"],
        "changed": [],
        "ignored": ["ord-b"],
    }


def redis_store(redis_url: str, namespace: str) -> RedisStore:
    settings = StoreSettings(redis_url=redis_url, environment=namespace)
    return RedisStore(settings, fallback=RawState, compiler=DEFAULT)


def test_tombstone_through_redis(single: Single, redis_server: RedisServer, origin: RawOrigin) -> None:
    created = post_webhook(
        single.proxy.base_url, {"upsert": {"tomb": {"enabled": True, "updatedAt": T1}}}, SECRET
    )
    assert created.status_code == 202, created.text
    assert served_flags(single.proxy, origin)["tomb"] is True

    async def delete_with_version() -> Any:
        store = redis_store(redis_server.url, single.namespace)
        try:
            return await store.apply(
                Change(
                    source="native", delete=["tomb"], item_versions={"tomb": updated_at_ms({"updatedAt": T2})}
                )
            )
        finally:
            await store.close()

    result = asyncio.run(delete_with_version())
    assert (result.status, result.changed) == ("applied", ["tomb"])
    # the proxy hears of it over pub/sub
    wait_for(lambda: "tomb" not in served_flags(single.proxy, origin), what="tomb deleted")

    late = post_webhook(
        single.proxy.base_url,
        {"upsert": {"tomb": {"enabled": True, "updatedAt": "2025-01-15T00:00:00Z"}}},
        SECRET,
    )
    assert late.status_code == 202
    assert (late.json()["status"], late.json()["ignored"]) == ("unchanged", ["tomb"])
    client = redis_server.client()
    assert not client.hexists(key(single.namespace, "native:flags"), "tomb")
    assert "tomb" not in served_flags(single.proxy, origin)

    newer = post_webhook(
        single.proxy.base_url, {"upsert": {"tomb": {"enabled": False, "updatedAt": T3}}}, SECRET
    )
    assert (newer.status_code, newer.json()["changed"]) == (202, ["tomb"])
    assert served_flags(single.proxy, origin)["tomb"] is False


def _normalised(state: RawState) -> tuple[Any, ...]:
    def drop_empty(tree: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {s: {k: v for k, v in kinds.items() if v} for s, kinds in tree.items() if any(kinds.values())}

    sources = {s: kinds for s, kinds in state.source_versions.items() if kinds}
    return (state.version, drop_empty(state.data), drop_empty(state.item_versions), sources)


def test_redis_and_memory_apply_the_same_rules(redis_server: RedisServer, redis_namespace: str) -> None:
    """One sequence of changes through the Lua script and through ``apply_change``: same answers."""

    def payload(body: dict[str, Any]) -> Change:
        return change_from_payload(body, actor="parity")

    ms = {t: updated_at_ms({"updatedAt": t}) for t in (T1, T2, T3)}
    changes = [
        payload({"upsert": {"a": {"enabled": True, "updatedAt": T2}, "b": {}}, "version": 5}),
        payload({"upsert": {"a": {"enabled": False}}, "version": 5}),  # stale
        payload({"upsert": {"a": {"enabled": False, "updatedAt": T1}, "c": {"enabled": False}}}),  # a older
        payload({"upsert": {"a": {"enabled": False, "updatedAt": T2}}}),  # same version: ignored
        payload({"upsert": {"b": {}}}),  # identical: unchanged
        Change(source="native", delete=["c"], item_versions={"c": ms[T3]}),  # tombstone
        payload({"upsert": {"c": {"enabled": True, "updatedAt": T2}}}),  # older than the tombstone
        Change(source="native", delete=["a"], item_versions={"a": ms[T1]}),  # older delete: ignored
        payload({"flags": {"a": {"enabled": True, "updatedAt": T2}, "d": {"percentage": 5}}, "version": 9}),
        payload({"flags": {"a": {"enabled": True, "updatedAt": T2}, "d": {"percentage": 5}}, "version": 10}),
        payload({"delete": ["d", "nope"]}),
        Change(source="overrides", upsert={"a": '{"kill":true}'}, actor="admin", action="kill"),
        Change(source="overrides", delete=["a"], action="restore"),
        payload({"flags": {}, "version": 11}),
    ]
    namespace = redis_namespace

    async def run() -> None:
        memory = MemoryStore()
        store = redis_store(redis_server.url, namespace)
        try:
            for index, change in enumerate(changes):
                want = await memory.apply(change)
                got = await store.apply(change)
                summary = lambda r: (  # noqa: E731
                    r.status,
                    r.version,
                    sorted(r.changed),
                    sorted(r.ignored),
                    r.stored_source_version,
                )
                assert summary(got) == summary(want), f"change #{index}"
            state, inited = await store._read_state()
            assert inited
            assert _normalised(state) == _normalised(memory._state)
            redis_audit = await store.audit(100)
            memory_audit = await memory.audit(100)
            fields = ("source", "actor", "flag", "action", "old_version", "new_version")
            assert [tuple(e[f] for f in fields) for e in redis_audit] == [
                tuple(e[f] for f in fields) for e in memory_audit
            ]
        finally:
            await store.close()

    asyncio.run(run())


# --- bad input leaves the store byte for byte as it was ------------------------------------------------

GOOD = {"upsert": {"bad-input-target": {"enabled": False}}}
NESTED_LOGIC: Any = True
for _ in range(100):
    NESTED_LOGIC = {"!": NESTED_LOGIC}


def case(name: str, status: int, error: str, field: str | None = None, **request: Any) -> Any:
    return pytest.param(request, status, error, field, id=name)


def flag_patch(definition: Any) -> dict[str, Any]:
    return {"payload": {"upsert": {"x": definition}}}


GOOD_BODY = json.dumps(GOOD).encode()
ONE_VARIANT = {"a": {"weight": 1}}
BAD_INPUT = [
    case("bad-json", 400, "invalid_json", body=b'{"upsert": {"x": '),
    case("not-utf8", 400, "invalid_json", body=b'{"upsert": "\xff\xfe"}'),
    case("empty-body", 400, "invalid_json", body=b""),
    case("no-signature", 401, "bad_signature", payload=GOOD, signature=""),
    case("wrong-secret", 401, "bad_signature", payload=GOOD, signature=sign_body("other", GOOD_BODY)),
    case(
        "signature-of-another-body",
        401,
        "bad_signature",
        body=GOOD_BODY.replace(b"false", b"true "),
        signature=sign_body(SECRET, GOOD_BODY),
    ),
    case("too-large", 413, "payload_too_large", **flag_patch({"note": "n" * MAX_BODY})),
    case("unknown-field", 422, "invalid_flags", "flags.x.enable", **flag_patch({"enable": False})),
    case(
        "rule-names-unknown-variant",
        422,
        "invalid_flags",
        "flags.x.rules[0].variant",
        **flag_patch({"variants": ONE_VARIANT, "rules": [{"if": True, "variant": "zz"}]}),
    ),
    case(
        "all-zero-weights",
        422,
        "invalid_flags",
        "flags.x.variants",
        **flag_patch({"variants": {"a": {"weight": 0}, "b": {"weight": 0}}}),
    ),
    case(
        "document-with-one-bad-flag",
        422,
        "invalid_flags",
        "flags.x.percentage",
        payload={"flags": {"ok": {}, "x": {"percentage": 101}}},
    ),
    case(
        "upsert-and-delete", 422, "invalid_flags", "delete.x", payload={"upsert": {"x": {}}, "delete": ["x"]}
    ),
    case("not-an-object", 422, "invalid_flags", "body", payload=[GOOD]),
    case("unknown-top-level-field", 422, "invalid_flags", "upsret", payload={**GOOD, "upsret": {}}),
    case("bad-version", 422, "invalid_flags", "version", payload={**GOOD, "version": "12"}),
    case(
        "bad-updated-at", 422, "invalid_flags", "flags.x.updatedAt", **flag_patch({"updatedAt": "yesterday"})
    ),
    case("deeply-nested-json", 400, "invalid_json", body=b'{"upsert": ' + b"[" * 1500 + b"]" * 1500 + b"}"),
    case(
        "deeply-nested-logic",
        422,
        "invalid_flags",
        **flag_patch({"rules": [{"if": NESTED_LOGIC, "value": True}]}),
    ),
    case("stale-version", 409, "stale", payload={**GOOD, "version": 0}),
    # JSON that parses, but a lone surrogate is no text: Lua's cjson refused it (it was a 503)
    case("unpaired-surrogate", 400, "invalid_json", body=b'{"upsert": {"x": {"note": "\\ud800"}}}'),
    # beyond 2^53 Lua compares document versions as rounded doubles (a newer one was "stale")
    case("version-beyond-2^53", 422, "invalid_flags", "version", payload={**GOOD, "version": 2**53}),
]


@pytest.mark.parametrize(("request_kwargs", "status", "error", "field"), BAD_INPUT)
def test_bad_input_leaves_the_store_unchanged(
    single: Single,
    redis_server: RedisServer,
    origin: RawOrigin,
    request_kwargs: dict[str, Any],
    status: int,
    error: str,
    field: str | None,
) -> None:
    client = redis_server.client()
    if stored_source_version(client, single.namespace) == 0:  # so that version 0 is stale
        setup = post_webhook(single.proxy.base_url, {"upsert": {"bad-input-seed": {}}, "version": 1}, SECRET)
        assert setup.status_code in (202, 409), setup.text
    version_key = key(single.namespace, "version")
    before = redis_server.dump_namespace(key(single.namespace, "*"))
    version_before = client.get(version_key)
    served_before = served_flags(single.proxy, origin)
    assert key(single.namespace, "native:flags").encode() in before

    response = post_webhook(single.proxy.base_url, secret=SECRET, **request_kwargs)

    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["error"] == error
    assert isinstance(body["detail"], str) and body["detail"]
    if field is not None:
        assert body["field"] == field
        assert field in body["detail"]
    if status == 401:
        assert response.headers["www-authenticate"] == "Bearer"
    assert redis_server.dump_namespace(key(single.namespace, "*")) == before
    assert client.get(version_key) == version_before
    assert served_flags(single.proxy, origin) == served_before
    assert readyz(single.proxy).json()["version"] == int(version_before)


def test_too_large_chunked_body_is_refused_while_streaming(single: Single, redis_server: RedisServer) -> None:
    before = redis_server.dump_namespace(key(single.namespace, "*"))
    body = json.dumps({"upsert": {"x": {"note": "n" * (MAX_BODY * 2)}}}).encode()

    def chunks() -> Iterator[bytes]:
        for at in range(0, len(body), 1000):
            yield body[at : at + 1000]

    response = http_client().post(
        f"{single.proxy.base_url}/__flags/webhooks/native",
        content=chunks(),
        headers={"X-Flagproxy-Signature": sign_body(SECRET, body)},
    )
    assert response.status_code == 413, response.text
    assert response.json()["error"] == "payload_too_large"
    assert redis_server.dump_namespace(key(single.namespace, "*")) == before


# --- Redis going away and coming back ---------------------------------------------------------------


FAST_RECONNECT = {"FLAGPROXY_STORE_RECONNECT_MAX_S": "0.3"}


def test_redis_down_traffic_flows_then_catches_up_without_restart(
    fresh_redis: RedisServer, origin: RawOrigin, tmp_path: Path, redis_namespace: str
) -> None:
    namespace = redis_namespace
    env = proxy_env(namespace, **FAST_RECONNECT)
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(make_proxy(origin, tmp_path / "a", fresh_redis.url, env))
        b = stack.enter_context(make_proxy(origin, tmp_path / "b", fresh_redis.url, env))
        wait_ready(a)
        wait_ready(b)
        changed = post_webhook(a.base_url, {"upsert": {"checkout": CHECKOUT_NEW, "live": {}}}, SECRET)
        assert changed.status_code == 202, changed.text
        expected = {"checkout": "new", "banner": False, "live": True}
        wait_for(lambda: served_flags(b, origin) == expected, what="b serves the change")
        assert served_flags(a, origin) == expected

        fresh_redis.kill()

        for i in range(25):
            for proxy in (a, b):
                response = http_client().get(
                    f"{proxy.base_url}/while-down/{i}", headers={"X-User-Id": f"user-{i}"}
                )
                assert response.status_code == 200, response.text
                seen = origin.requests_to(f"/while-down/{i}")[-1]
                assert json.loads(seen.value("X-Feature-Flags")) == expected
        for proxy in (a, b):
            assert readyz(proxy).status_code == 200
            assert http_client().get(f"{proxy.base_url}/__flags/healthz").status_code == 200
            assert admin_flags(proxy)["flags"]["live"]["definition"] == {}
        refused = post_webhook(b.base_url, {"upsert": {"live": {"enabled": False}}}, SECRET)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"] == "store_unavailable" and refused.json()["detail"]
        assert served_flags(b, origin) == expected
        audit = http_client().get(f"{a.base_url}/__flags/api/audit", headers=AUTH)
        assert (audit.status_code, audit.json()["error"]) == (503, "store_unavailable")

        fresh_redis.start()  # same port, empty

        # a write through one instance right away is served by the other, no restart anywhere
        after = post_webhook(b.base_url, {"upsert": {"live": {"enabled": False}}}, SECRET)
        assert after.status_code == 202, after.text
        expected_after = {**expected, "live": False}
        wait_for(lambda: served_flags(a, origin) == expected_after, timeout=10, what="a serves the new value")
        assert served_flags(b, origin) == expected_after
        stored = stored_definitions(fresh_redis.client(), namespace)
        assert stored == {
            "checkout": CHECKOUT_NEW,
            "banner": SEED["flags"]["banner"],
            "live": {"enabled": False},
        }


def test_redis_restarted_empty_is_reseeded_with_the_last_state(
    fresh_redis: RedisServer, origin: RawOrigin, tmp_path: Path, redis_namespace: str
) -> None:
    namespace = redis_namespace
    env = proxy_env(namespace, **FAST_RECONNECT)
    with make_proxy(origin, tmp_path / "a", fresh_redis.url, env) as proxy:
        wait_ready(proxy)
        payload = {
            "upsert": {"checkout": CHECKOUT_NEW, "kept": {"enabled": True, "updatedAt": T2}},
            "delete": ["banner"],
            "version": 7,
        }
        assert post_webhook(proxy.base_url, payload, SECRET).status_code == 202
        client = fresh_redis.client()
        names = ("native:flags", "native:flags:versions", "native:meta")
        before = {name: client.hgetall(key(namespace, name)) for name in names}
        version_before = int(client.get(key(namespace, "version")))
        served_before = served_flags(proxy, origin)
        assert served_before == {"checkout": "new", "kept": True}
        assert before["native:meta"] == {"flags:version": "7"}

        run_id = client.info("server")["run_id"]
        fresh_redis.restart()  # no persistence: it comes back empty (the proxy may re-seed it at once)
        client = fresh_redis.client()
        assert client.info("server")["run_id"] != run_id

        wait_for(lambda: client.exists(key(namespace, "inited")), timeout=10, what="the init marker")
        after = {name: client.hgetall(key(namespace, name)) for name in names}
        assert after == before  # flags, their updatedAt versions and the document version survive
        assert client.get(key(namespace, "inited")) == "1"
        assert int(client.get(key(namespace, "version"))) >= version_before
        wait_for(lambda: "re-seeded it from the last good snapshot" in proxy.stderr(), what="the re-seed log")
        assert served_flags(proxy, origin) == served_before
        assert readyz(proxy).status_code == 200

        # the ordering survived too: an old document is still stale, an old flag version still ignored
        stale = post_webhook(proxy.base_url, {"flags": {}, "version": 6}, SECRET)
        assert stale.status_code == 409, stale.text
        older = post_webhook(
            proxy.base_url, {"upsert": {"kept": {"enabled": False, "updatedAt": T1}}}, SECRET
        )
        assert older.json()["ignored"] == ["kept"]
        assert served_flags(proxy, origin) == served_before


def test_write_to_a_redis_that_lost_its_data_keeps_every_flag(
    redis_server: RedisServer, origin: RawOrigin, tmp_path: Path, redis_namespace: str
) -> None:
    """Data loss noticed by a write before any resync: the write must not become all there is."""
    namespace = redis_namespace
    env = proxy_env(namespace)  # resync every 30 s: nothing but the write notices the loss
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(make_proxy(origin, tmp_path / "a", redis_server.url, env))
        b = stack.enter_context(make_proxy(origin, tmp_path / "b", redis_server.url, env))
        wait_ready(a)
        wait_ready(b)
        assert (
            post_webhook(a.base_url, {"upsert": {"checkout": CHECKOUT_NEW}, "version": 3}, SECRET).status_code
            == 202
        )
        wait_for(lambda: served_flags(b, origin)["checkout"] == "new", what="b serves the change")
        client = redis_server.client()
        before = stored_definitions(client, namespace)

        lost = list(client.scan_iter(match=key(namespace, "*")))
        assert key(namespace, "inited") in lost
        client.delete(*lost)  # only this test's namespace, as if Redis had lost it

        response = post_webhook(b.base_url, {"upsert": {"added": {"enabled": False}}}, SECRET)
        assert response.status_code == 202, response.text
        assert stored_definitions(client, namespace) == {**before, "added": {"enabled": False}}
        assert client.hget(key(namespace, "native:meta"), "flags:version") == "3"
        expected = {"checkout": "new", "banner": False, "added": False}
        for proxy in (a, b):
            wait_for(lambda p=proxy: served_flags(p, origin) == expected, what="every flag still served")


def test_resync_picks_up_what_was_never_announced(
    redis_server: RedisServer, origin: RawOrigin, tmp_path: Path, redis_namespace: str
) -> None:
    namespace = redis_namespace
    snapshot = tmp_path / "b-snapshot.json"
    b_env = proxy_env(
        namespace, FLAGPROXY_STORE_RESYNC_INTERVAL_S="0.2", FLAGPROXY_STORE_SNAPSHOT_PATH=str(snapshot)
    )
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(make_proxy(origin, tmp_path / "a", redis_server.url, proxy_env(namespace)))
        b = stack.enter_context(make_proxy(origin, tmp_path / "b", redis_server.url, b_env))
        wait_ready(a)
        wait_ready(b)
        client = redis_server.client()

        # a change written straight into Redis, announced to nobody: only the resync can find it
        client.hset(key(namespace, "native:flags"), "direct", '{"enabled":false}')
        version = client.incr(key(namespace, "version"))
        wait_for(lambda: served_flags(b, origin).get("direct") is False, what="b resynced")
        assert admin_flags(b)["version"] == version

        # a document identical to what is stored moves only the source version: "unchanged", no
        # announcement; the resync must still learn it (it is what a re-seed writes back)
        same = {"flags": stored_definitions(client, namespace), "version": 9}
        response = post_webhook(a.base_url, same, SECRET)
        assert (response.status_code, response.json()["status"]) == (202, "unchanged")
        wait_for(
            lambda: (
                snapshot.exists()
                and json.loads(snapshot.read_text())["source_versions"] == {"native": {"flags": 9}}
            ),
            what="b's state to carry document version 9",
        )
        assert json.loads(snapshot.read_text())["version"] == version


def test_cold_start_with_redis_down_serves_the_disk_snapshot(
    fresh_redis: RedisServer, origin: RawOrigin, tmp_path: Path, redis_namespace: str
) -> None:
    namespace = redis_namespace
    snapshot = tmp_path / "state" / "snapshot.json"
    env = proxy_env(namespace, FLAGPROXY_STORE_SNAPSHOT_PATH=str(snapshot))
    with make_proxy(origin, tmp_path / "a", fresh_redis.url, env) as a:
        wait_ready(a)
        payload = {"upsert": {"checkout": CHECKOUT_NEW, "banner": {}, "from-webhook": {"enabled": False}}}
        response = post_webhook(a.base_url, payload, SECRET)
        assert response.status_code == 202, response.text
        version = response.json()["version"]
        changed = served_flags(a, origin)
        assert changed == {"checkout": "new", "banner": True, "from-webhook": False}
        wait_for(
            lambda: snapshot.exists() and json.loads(snapshot.read_text())["version"] == version,
            what="the disk snapshot at the new version",
        )
    fresh_redis.stop()
    dead = f"redis://{LOCALHOST}:{free_port()}/0"

    with make_proxy(origin, tmp_path / "b", dead, env) as b:
        assert served_flags(b, origin) == changed  # not the seeds
        wait_ready(b)
        assert served_flags(b, origin) == changed
        wait_for(lambda: "Redis unreachable at start" in b.stderr(), what="the fallback logged")
        assert "serving the disk snapshot" in b.stderr()

    missing = proxy_env(namespace, FLAGPROXY_STORE_SNAPSHOT_PATH=str(tmp_path / "none" / "snapshot.json"))
    with make_proxy(origin, tmp_path / "c", dead, missing) as c:
        wait_ready(c)
        assert served_flags(c, origin) == SEED_SERVED
        wait_for(lambda: "serving the flags file" in c.stderr(), what="the fallback logged")
        assert "serving the disk snapshot" not in c.stderr()


class SilentRedis:
    """Accepts TCP connections and never answers: a Redis that hangs."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((LOCALHOST, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"redis://{LOCALHOST}:{self.port}/0"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def __enter__(self) -> SilentRedis:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
        self.sock.close()
        self._thread.join(5)
        for conn in self.accepted:
            conn.close()


def test_readyz_is_503_until_the_first_load(origin: RawOrigin, tmp_path: Path, redis_namespace: str) -> None:
    env = proxy_env(redis_namespace, FLAGPROXY_STORE_REDIS_TIMEOUT_S="3")
    with SilentRedis() as silent, make_proxy(origin, tmp_path / "p", silent.url, env) as proxy:
        first = readyz(proxy)
        assert first.status_code == 503, first.text
        assert first.json() == {"status": "loading", "version": 1}
        assert http_client().get(f"{proxy.base_url}/__flags/healthz").status_code == 200
        assert served_flags(proxy, origin) == SEED_SERVED  # traffic is not held up meanwhile
        assert silent.accepted, "the proxy never connected to the silent Redis"

        started = time.monotonic()
        ready = wait_ready(proxy, timeout=10)
        assert ready == {"status": "ready", "version": 1, "flags": 2}
        assert time.monotonic() - started < 4.5  # the 3 s timeout, not an eternity
        assert http_client().get(f"{proxy.base_url}/__flags/healthz").status_code == 200
        assert "Redis unreachable at start" in proxy.stderr()
        assert "serving the flags file" in proxy.stderr()


def test_a_start_that_cannot_listen_exits_even_right_after_connecting_to_redis(
    redis_server: RedisServer, redis_namespace: str
) -> None:
    """The port is taken: uvicorn shuts the app down right after startup, while the Redis sync has
    just connected. The process must exit (systemd restarts it), not hang in its shutdown; the race
    is narrow, so it is tried a few times."""
    with socket.socket() as taken:
        taken.bind((LOCALHOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"FLAGPROXY_STORE_ENVIRONMENT": redis_namespace}
        for _ in range(5):
            done = run_serve(
                ["--port", str(port), "--origin", "http://127.0.0.1:9", "--redis-url", redis_server.url],
                env=env,
                timeout=30,
            )
            assert done.returncode != 0 and "address already in use" in done.stderr, done.stderr
