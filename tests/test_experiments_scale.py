"""Experiments across processes: several instances on one Redis, ``--workers 2`` on one SQLite file,
and Redis killed while exposures are being recorded. Each unit must be counted once, in the variant
the origin received, and nothing may be lost without being counted."""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from support import (
    ProxyProcess,
    RawOrigin,
    RedisServer,
    http_client,
    unique_namespace,
    wait_for,
)

TOKEN = "scale-admin-token"
FLAGS = {
    "flags": {
        "layout": {
            "variants": {"control": {"weight": 1}, "grid": {"weight": 1}, "list": {"weight": 1}},
            "experiment": {"goals": ["checkout"]},
        }
    }
}
ENV = {"FLAGPROXY_ADMIN_TOKEN": TOKEN, "FLAGPROXY_EXPERIMENTS_FLUSH_INTERVAL_S": "0.05"}


def results(proxy: ProxyProcess) -> dict[str, Any]:
    response = http_client().get(
        f"{proxy.base_url}/__flags/api/experiments/layout", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def users_by_variant(body: dict[str, Any]) -> dict[str, int]:
    return {row["variant"]: row["users"] for row in body["goals"]["checkout"]["variants"] if row["users"]}


def received(origin: RawOrigin, prefix: str) -> dict[str, str]:
    """user → the variant the origin received, for every request under ``prefix``."""
    out: dict[str, str] = {}
    with origin.changed:
        requests = list(origin.requests)
    for request in requests:
        if request.path.decode().startswith(prefix):
            user = request.value("X-User-Id")
            flags = json.loads(request.value("X-Feature-Flags") or "{}")
            assert user is not None and "layout" in flags
            assert out.setdefault(user, flags["layout"]) == flags["layout"]
    return out


def metric(proxy: ProxyProcess, name: str) -> float:
    text = (
        http_client()
        .get(f"{proxy.base_url}/__flags/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        .text
    )
    return sum(
        float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    )


def test_three_instances_on_one_redis_count_each_unit_once(
    origin_factory: Callable[..., RawOrigin],
    proxy_factory: Callable[..., ProxyProcess],
    redis_server: RedisServer,
) -> None:
    origin = origin_factory()
    env = {**ENV, "FLAGPROXY_STORE_ENVIRONMENT": unique_namespace("exp-3")}
    proxies = [
        proxy_factory([origin.url], flags=FLAGS, env=env, args=["--redis-url", redis_server.url])
        for _ in range(3)
    ]
    users = [f"shared-{i}" for i in range(150)]
    for i, user in enumerate(users):
        for j, proxy in enumerate(proxies):  # every unit through every instance
            response = http_client().get(f"{proxy.base_url}/three/{i}/{j}", headers={"X-User-Id": user})
            assert response.status_code == 200
    expected = dict(Counter(received(origin, "/three/").values()))
    assert sum(expected.values()) == len(users)

    def counted() -> dict[str, Any] | None:
        body = results(proxies[0])
        return body if body["users"] == len(users) else None

    body = wait_for(counted, timeout=10, what="every instance's exposures in Redis")
    assert users_by_variant(body) == expected
    assert body["multiple_exposures"] == 0
    for proxy in proxies[1:]:  # every instance reads the same counts
        assert users_by_variant(results(proxy)) == expected


@pytest.mark.slow  # two workers and thousands of requests: make test-slow
def test_two_workers_on_one_sqlite_file_count_each_unit_once(
    origin_factory: Callable[..., RawOrigin], proxy_factory: Callable[..., ProxyProcess]
) -> None:
    origin = origin_factory()
    proxy = proxy_factory([origin.url], flags=FLAGS, env=ENV, args=["--workers", "2"])
    users = [f"worker-{i}" for i in range(120)]
    for round_ in range(2):
        for i, user in enumerate(users):
            with (
                httpx.Client() as fresh
            ):  # a new connection each time: the kernel spreads them over both workers
                response = fresh.get(f"{proxy.base_url}/workers/{round_}/{i}", headers={"X-User-Id": user})
            assert response.status_code == 200
    expected = dict(Counter(received(origin, "/workers/").values()))

    def counted() -> dict[str, Any] | None:
        body = results(proxy)
        return body if body["users"] == len(users) else None

    body = wait_for(counted, timeout=10, what="both workers' exposures in the SQLite file")
    assert users_by_variant(body) == expected
    assert body["multiple_exposures"] == 0


def test_redis_killed_while_recording_fails_no_request_and_loses_nothing_uncounted(
    origin_factory: Callable[..., RawOrigin],
    proxy_factory: Callable[..., ProxyProcess],
    fresh_redis: RedisServer,
) -> None:
    origin = origin_factory()
    env = {**ENV, "FLAGPROXY_STORE_ENVIRONMENT": "exp-fault", "FLAGPROXY_STORE_REDIS_TIMEOUT_S": "0.5"}
    proxy = proxy_factory([origin.url], flags=FLAGS, env=env, args=["--redis-url", fresh_redis.url])
    assert http_client().get(f"{proxy.base_url}/before", headers={"X-User-Id": "before"}).status_code == 200
    assert results(proxy)["users"] == 1  # written (a read waits for this process's queue)

    async def traffic(prefix: str, count: int) -> Counter[int]:
        statuses: Counter[int] = Counter()
        async with httpx.AsyncClient(base_url=proxy.base_url, timeout=10) as client:

            async def one(i: int) -> None:
                response = await client.get(
                    f"{prefix}/{i}", headers={"X-User-Id": f"{prefix.strip('/')}-{i}"}
                )
                statuses[response.status_code] += 1

            for start in range(0, count, 20):
                await asyncio.gather(*(one(i) for i in range(start, min(count, start + 20))))
        return statuses

    fresh_redis.kill()
    statuses = asyncio.run(traffic("/outage", 300))
    assert statuses == Counter({200: 300})  # analytics never fail a request
    assert metric(proxy, "flagproxy_experiment_write_errors_total") >= 1

    fresh_redis.restart()  # back, empty: what was queued meanwhile is written now

    def caught_up() -> dict[str, Any] | None:
        try:
            body = results(proxy)
        except AssertionError:  # 503 while the store reconnects
            return None
        dropped = metric(proxy, "flagproxy_exposures_dropped_total")
        return body if body["users"] + dropped >= 300 else None

    body = wait_for(
        caught_up, timeout=20, interval=0.1, what="the queued exposures written after the restart"
    )
    dropped = metric(proxy, "flagproxy_exposures_dropped_total")
    outage = received(origin, "/outage/")
    assert len(outage) == 300
    assert body["users"] == 300 - dropped
    if not dropped:
        assert users_by_variant(body) == dict(Counter(outage.values()))
