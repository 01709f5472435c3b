"""Declared order is semantic: variants (and rule rollouts) are bucketed in the order they are written.

Every path into the store must keep it, so ``flagproxy eval`` on a document and the X-Feature-Flags an
origin receives through a real proxy serving the same document agree — for the memory store and the
Redis store, loaded from the flags file, written by webhook or admin API, read back by another
instance, restored from the disk snapshot and re-seeded into an empty Redis.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mmh3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import (
    LOCALHOST,
    REPO,
    ProxyProcess,
    RawOrigin,
    RedisServer,
    free_port,
    http_client,
    post_webhook,
    unique_namespace,
    wait_for,
)

SECRET = "order-secret"
TOKEN = "order-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CONFIG = '[context]\nheader_attributes = ["X-Country=country"]\n'
COUNTRIES = ("NZ", "US", "DE")

# The issue's example: declared red, green, blue — not alphabetical.
BANNER = {
    "flags": {
        "game-banner-color": {
            "variants": {"red": {"weight": 34}, "green": {"weight": 33}, "blue": {"weight": 33}},
            "defaultVariant": "red",
        }
    }
}


def documented_bucket(salt: str, value: str) -> int:
    """docs/flags.md's formula, written out independently of the engine."""
    return mmh3.hash(f"{salt}:{value}".encode(), 0, signed=False) % 10000


def banner_by_the_docs(user: str) -> str:
    bucket = documented_bucket("game-banner-color", user)
    return "red" if bucket < 3400 else "green" if bucket < 6700 else "blue"


# --- random native documents -------------------------------------------------------------------------

names = st.text(
    st.characters(categories=("Lu", "Ll", "Nd"), max_codepoint=0x24F) | st.sampled_from("-_ "),
    min_size=1,
    max_size=8,
)
config_values = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=6),
    lambda inner: st.dictionaries(names, inner, max_size=3) | st.lists(inner, max_size=3),
    max_leaves=6,
)


@st.composite
def weighted(draw: st.DrawFn, pool: Sequence[str]) -> dict[str, int]:
    """A non-empty rollout over some of ``pool`` in a random order, at least one weight positive."""
    chosen = draw(st.permutations(pool))[: draw(st.integers(1, len(pool)))]
    weights = {name: draw(st.integers(0, 60)) for name in chosen}
    if not any(weights.values()):
        weights[chosen[0]] = 1
    return weights


@st.composite
def multivariate_flags(draw: st.DrawFn) -> dict[str, Any]:
    variant_names = draw(st.lists(names, min_size=2, max_size=5, unique=True))
    weights = draw(weighted(variant_names))
    variants: dict[str, Any] = {}
    for name in variant_names:  # declaration order is the drawn order, weights kept with their name
        spec: dict[str, Any] = {"weight": weights.get(name, 0)}
        if draw(st.booleans()):
            spec["config"] = draw(config_values)
        variants[name] = spec
    flag: dict[str, Any] = {"variants": variants}
    if draw(st.booleans()):
        flag["defaultVariant"] = draw(st.sampled_from(variant_names))
    rules = []
    for country in draw(st.lists(st.sampled_from(COUNTRIES), max_size=2, unique=True)):
        condition = {"==": [{"var": "country"}, country]}
        if draw(st.booleans()):
            rules.append({"if": condition, "rollout": draw(weighted(variant_names))})
        else:
            rules.append({"if": condition, "variant": draw(st.sampled_from(variant_names))})
    if rules:
        flag["rules"] = rules
    if draw(st.booleans()):
        flag["salt"] = draw(names)
    return flag


@st.composite
def boolean_flags(draw: st.DrawFn) -> dict[str, Any]:
    flag: dict[str, Any] = {"percentage": draw(st.integers(0, 100))}
    if draw(st.booleans()):
        flag["rules"] = [{"if": {"==": [{"var": "country"}, "NZ"]}, "percentage": draw(st.integers(0, 100))}]
    return flag


flag_keys = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789-_"), min_size=1, max_size=16)
documents = st.dictionaries(
    flag_keys, st.one_of(multivariate_flags(), multivariate_flags(), boolean_flags()), min_size=1, max_size=6
).map(lambda flags: {"flags": flags})
callers = st.lists(
    st.tuples(
        st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789-._@"), min_size=1, max_size=20),
        st.none() | st.sampled_from(COUNTRIES),
    ),
    min_size=20,
    max_size=20,
    unique_by=lambda c: c[0],
)
Caller = tuple[str, str | None]


def reversed_variants(document: Mapping[str, Any]) -> dict[str, Any]:
    """The same flags with every variant object written in the opposite order: a real change."""
    out = {}
    for key, flag in document["flags"].items():
        flag = dict(flag)
        if "variants" in flag:
            flag["variants"] = dict(reversed(list(flag["variants"].items())))
        out[key] = flag
    return {"flags": out}


# --- the two sides -------------------------------------------------------------------------------------

_paths = itertools.count(1)


def eval_cli(document: Mapping[str, Any], calls: Sequence[tuple[Caller, str]]) -> list[dict[str, Any]]:
    """``flagproxy eval --keys-file`` on ``document``: one flags object per (caller, path)."""
    with tempfile.TemporaryDirectory() as tmp:
        flags = Path(tmp) / "flags.json"
        flags.write_text(json.dumps(document), encoding="utf-8")
        lines = []
        for (user, country), path in calls:
            attributes: dict[str, Any] = {"path": path, "method": "GET"}
            if country is not None:
                attributes["country"] = country
            lines.append(json.dumps({"key": user, "attributes": attributes}))
        result = subprocess.run(
            [sys.executable, "-m", "proxy", "eval", "--flags", str(flags), "--keys-file", "-"],
            input="\n".join(lines) + "\n",
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    return [json.loads(line)["flags"] for line in result.stdout.splitlines()]


def through_proxy(proxy: ProxyProcess, origin: RawOrigin, calls: Sequence[tuple[Caller, str]]) -> list[Any]:
    seen = []
    for (user, country), path in calls:
        headers = {"X-User-Id": user}
        if country is not None:
            headers["X-Country"] = country
        response = http_client().get(f"{proxy.base_url}{path}", headers=headers)
        assert response.status_code == 200, response.text
        header = origin.only_request_to(path).value("X-Feature-Flags")
        seen.append(json.loads(header) if header else {})
    return seen


def assert_agree(
    document: Mapping[str, Any], proxies: Mapping[str, ProxyProcess], origin: RawOrigin, who: Sequence[Caller]
) -> None:
    for name, proxy in proxies.items():
        calls = [(caller, f"/order/{next(_paths)}") for caller in who]
        expected = eval_cli(document, calls)
        assert through_proxy(proxy, origin, calls) == expected, f"{name} differs from flagproxy eval"


def version(proxy: ProxyProcess) -> int:
    return int(http_client().get(f"{proxy.base_url}/__flags/readyz").json()["version"])


# --- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def writable(redis_server: RedisServer, origin: RawOrigin, proxy_factory: Any) -> dict[str, ProxyProcess]:
    """A memory-store proxy and two proxies sharing one Redis namespace (writes go to ``redis``)."""
    env = {"FLAGPROXY_WEBHOOKS_SECRET": SECRET, "FLAGPROXY_ADMIN_TOKEN": TOKEN}
    redis_env = {**env, "FLAGPROXY_STORE_ENVIRONMENT": unique_namespace("order")}
    redis_args = ["--redis-url", redis_server.url]
    proxies = {
        "memory": proxy_factory([origin.url], config=CONFIG, env=env),
        "redis": proxy_factory([origin.url], config=CONFIG, env=redis_env, args=redis_args),
        "redis-peer": proxy_factory([origin.url], config=CONFIG, env=redis_env, args=redis_args),
    }
    for proxy in proxies.values():
        wait_for(lambda p=proxy: http_client().get(f"{p.base_url}/__flags/readyz").status_code == 200)
    return proxies


@contextlib.contextmanager
def started_from_file(
    document: Mapping[str, Any], origin: RawOrigin, redis_server: RedisServer
) -> Iterator[dict[str, ProxyProcess]]:
    """A memory-store proxy and a Redis proxy (fresh namespace, seeded from the file) on ``document``."""
    redis_env = {"FLAGPROXY_STORE_ENVIRONMENT": unique_namespace("order-file")}
    with contextlib.ExitStack() as stack:
        memory = stack.enter_context(ProxyProcess([origin.url], config=CONFIG, flags=document))
        redis = stack.enter_context(
            ProxyProcess(
                [origin.url],
                config=CONFIG,
                flags=document,
                env=redis_env,
                args=["--redis-url", redis_server.url],
            )
        )
        wait_for(lambda: http_client().get(f"{redis.base_url}/__flags/readyz").status_code == 200)
        yield {"memory": memory, "redis": redis}


def write_everywhere(proxies: Mapping[str, ProxyProcess], write: Any) -> None:
    """Apply ``write(proxy)`` to the memory proxy and the Redis writer; wait until the peer has it."""
    for name in ("memory", "redis"):
        write(proxies[name])
    target = version(proxies["redis"])
    wait_for(lambda: version(proxies["redis-peer"]) >= target, what="the peer instance to catch up")


# --- tests ----------------------------------------------------------------------------------------------


def test_the_issue_example_gives_the_documented_variant_both_ways(
    origin: RawOrigin, redis_server: RedisServer
) -> None:
    users = ["bar-user-0", *(f"bar-user-{i}" for i in range(1, 40))]
    who: list[Caller] = [(user, None) for user in users]
    calls = [(caller, f"/order/{next(_paths)}") for caller in who]
    expected = [{"game-banner-color": banner_by_the_docs(user)} for user in users]
    assert expected[0] == {"game-banner-color": "blue"}  # as the issue reports flagproxy eval
    assert eval_cli(BANNER, calls) == expected
    with started_from_file(BANNER, origin, redis_server) as proxies:
        for proxy in proxies.values():
            again = [(caller, f"/order/{next(_paths)}") for caller in who]
            assert through_proxy(proxy, origin, again) == expected


@pytest.mark.slow  # make test-slow
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=documents, who=callers)
def test_eval_equals_the_proxy_after_loading_the_flags_file(
    origin: RawOrigin, redis_server: RedisServer, document: dict[str, Any], who: list[Caller]
) -> None:
    with started_from_file(document, origin, redis_server) as proxies:
        assert_agree(document, proxies, origin, who)


@pytest.mark.slow  # make test-slow
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=documents, who=callers)
def test_eval_equals_the_proxy_after_webhook_and_admin_writes(
    writable: dict[str, ProxyProcess], origin: RawOrigin, document: dict[str, Any], who: list[Caller]
) -> None:
    # a whole document by webhook, every variant object written backwards
    backwards = reversed_variants(document)
    write_everywhere(writable, lambda p: post_webhook(p.base_url, backwards, SECRET).raise_for_status())
    assert_agree(backwards, writable, origin, who)

    # each flag again by the admin API, in declared order: a re-ordering is a real change
    def put_each(proxy: ProxyProcess) -> None:
        for key, flag in document["flags"].items():
            response = http_client().put(f"{proxy.base_url}/__flags/api/flags/{key}", json=flag, headers=AUTH)
            assert response.status_code == 200, response.text

    before = version(writable["redis"])
    write_everywhere(writable, put_each)
    if backwards != document:
        assert version(writable["redis"]) > before
    assert_agree(document, writable, origin, who)


def test_reordering_variants_bumps_the_version_and_moves_buckets(writable: dict[str, ProxyProcess]) -> None:
    proxy = writable["redis"]
    first = post_webhook(proxy.base_url, BANNER, SECRET)
    assert first.status_code == 202, first.text
    again = post_webhook(proxy.base_url, BANNER, SECRET)
    assert again.json()["status"] == "unchanged"
    response = post_webhook(proxy.base_url, reversed_variants(BANNER), SECRET)
    assert (response.status_code, response.json()["status"]) == (202, "applied")
    assert response.json()["changed"] == ["game-banner-color"]
    assert response.json()["version"] == again.json()["version"] + 1
    stored = http_client().get(f"{proxy.base_url}/__flags/api/flags/game-banner-color", headers=AUTH).json()
    assert list(stored["definition"]["variants"]) == ["blue", "green", "red"]
    # an upstream tool that sorts keys re-buckets users: every instance says so
    for peer in ("redis", "redis-peer"):
        wait_for(
            lambda p=peer: "'game-banner-color': the same variants in a new order" in writable[p].stderr(),
            what=f"{peer} to warn of the re-ordering",
        )


def test_declared_order_survives_the_disk_snapshot_and_a_reseed(
    fresh_redis: RedisServer, origin: RawOrigin, tmp_path: Path
) -> None:
    namespace = unique_namespace("order-disk")
    snapshot = tmp_path / "snapshot.json"
    env = {
        "FLAGPROXY_WEBHOOKS_SECRET": SECRET,
        "FLAGPROXY_STORE_ENVIRONMENT": namespace,
        "FLAGPROXY_STORE_SNAPSHOT_PATH": str(snapshot),
        "FLAGPROXY_STORE_RECONNECT_MAX_S": "0.2",
    }
    who: list[Caller] = [(f"disk-user-{i}", None) for i in range(40)]
    stored_key = f"flagproxy:{namespace}:native:flags"
    for name in ("a", "b"):
        (tmp_path / name).mkdir()

    def stored_variants() -> list[str]:
        text = fresh_redis.client().hget(stored_key, "game-banner-color")
        return list(json.loads(text)["variants"]) if text else []

    with ProxyProcess(
        [origin.url], config=CONFIG, env=env, args=["--redis-url", fresh_redis.url], tmp_dir=tmp_path / "a"
    ) as proxy:
        wait_for(lambda: http_client().get(f"{proxy.base_url}/__flags/readyz").status_code == 200)
        written = post_webhook(proxy.base_url, BANNER, SECRET)
        assert written.status_code == 202, written.text
        wait_for(
            lambda: (
                snapshot.exists() and json.loads(snapshot.read_text())["version"] == written.json()["version"]
            ),
            what="the disk snapshot",
        )
        on_disk = json.loads(snapshot.read_text())["data"]["native"]["flags"]["game-banner-color"]
        assert list(json.loads(on_disk)["variants"]) == ["red", "green", "blue"]
        assert stored_variants() == ["red", "green", "blue"]

        fresh_redis.restart()  # empty again: the proxy re-seeds it from its last state
        wait_for(lambda: stored_variants() == ["red", "green", "blue"], timeout=10, what="the re-seed")
        assert_agree(BANNER, {"re-seeded": proxy}, origin, who)
    fresh_redis.stop()

    dead = f"redis://{LOCALHOST}:{free_port()}/0"
    with ProxyProcess(
        [origin.url], config=CONFIG, env=env, args=["--redis-url", dead], tmp_dir=tmp_path / "b"
    ) as cold:
        assert_agree(BANNER, {"disk snapshot": cold}, origin, who)
