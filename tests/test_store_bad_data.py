"""Bad data in Redis: garbage written straight into a private ``redis-server`` with redis-py.

- a definition that does not compile keeps its flag's last good definition; fields from a newer
  release are ignored with a warning — while the webhook and the admin API stay strict (422).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from support import (
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
