"""Fault injection, bounded and on 127.0.0.1: Redis killed under load, origin killed and back, slow origin.

``FLAGPROXY_FAULT_LOAD_S`` (default 6) sets how long the Redis-outage load runs; the reliability
issue's 20 s version is ``FLAGPROXY_FAULT_LOAD_S=20 .venv/bin/pytest tests/test_faults.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections import Counter
from typing import Any

import aiohttp
import httpx
from support import PYTHON, REPO, clean_env, free_port, never_reply, post_webhook, wait_for

SECRET = "faults-secret-0123456789"
LOAD_S = float(os.environ.get("FLAGPROXY_FAULT_LOAD_S", "6"))


async def load(url: str, seconds: float, concurrency: int, user_prefix: str = "load") -> tuple[Counter, set]:
    """Requests for ``seconds`` from ``concurrency`` workers; (status counts, X-Feature-Flags values seen)."""
    statuses: Counter[int] = Counter()
    flags_seen: set[str] = set()
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def worker(n: int) -> None:
            i = 0
            while time.monotonic() < deadline:
                i += 1
                async with session.get(
                    f"{url}/{n}/{i}", headers={"X-User-Id": f"{user_prefix}-{n}"}
                ) as response:
                    body = await response.read()
                    statuses[response.status] += 1
                    if response.status == 200:
                        flags_seen.add(json.loads(body)["headers"].get("x-feature-flags", ""))

        await asyncio.gather(*(worker(n) for n in range(concurrency)))
    return statuses, flags_seen


def start_demo_origin(port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [PYTHON, "-m", "proxy", "demo-origin", "--port", str(port), "--log-level", "warning"],
        cwd=REPO,
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: _accepting(port), timeout=15, what=f"demo origin on {port}")
    return process


def _accepting(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


def test_redis_killed_under_load_no_5xx_then_resync_within_2s(fresh_redis, proxy_factory, tmp_path) -> None:
    origin_port = free_port()
    origin = start_demo_origin(origin_port)
    try:
        env = {"FLAGPROXY_WEBHOOKS_SECRET": SECRET, "FLAGPROXY_STORE_ENVIRONMENT": "faults"}
        args = ["--redis-url", fresh_redis.url]
        flags = {"flags": {"f": {"enabled": True}}}
        a = proxy_factory([f"http://127.0.0.1:{origin_port}"], flags=flags, env=env, args=args)
        b = proxy_factory([f"http://127.0.0.1:{origin_port}"], flags=flags, env=env, args=args)
        assert post_webhook(a.base_url, {"upsert": {"f": {"enabled": False}}}, SECRET).status_code == 202

        async def outage() -> tuple[Counter, set]:
            running = asyncio.create_task(load(f"{a.base_url}/outage", LOAD_S, 64))
            await asyncio.sleep(LOAD_S / 4)  # let the load settle before the fault
            await asyncio.to_thread(fresh_redis.kill)
            return await running

        statuses, seen = asyncio.run(outage())
        assert statuses and set(statuses) == {200}, statuses  # the store never causes a 5xx
        assert seen == {'{"f":false}'}  # the last values, throughout the outage

        fresh_redis.restart()  # comes back EMPTY
        restarted = time.monotonic()

        def written() -> bool:
            response = post_webhook(b.base_url, {"upsert": {"f": {"enabled": True}}}, SECRET)
            return response.status_code == 202

        wait_for(written, timeout=5, interval=0.05, what="a write through B after the restart")

        def a_serves_it() -> bool:
            body = httpx.get(f"{a.base_url}/after", headers={"X-User-Id": "u"}).json()
            return body["headers"].get("x-feature-flags") == '{"f":true}'

        wait_for(a_serves_it, timeout=5, interval=0.02, what="A serving the change")
        resync = time.monotonic() - restarted
        print(f"\nRedis outage, c=64 for {LOAD_S:g}s: {dict(statuses)}; resync {resync:.2f}s after restart")
        assert resync < 2.0, "A did not resync within 2 s of Redis coming back"
    finally:
        origin.terminate()
        origin.wait(5)


def test_origin_killed_is_502_and_back_is_200_with_a_healthy_pool(proxy_factory) -> None:
    port = free_port()
    origin = start_demo_origin(port)
    proxy = proxy_factory([f"http://127.0.0.1:{port}"], env={"FLAGPROXY_UPSTREAM_POOL_LIMIT": "8"})
    statuses, _ = asyncio.run(load(f"{proxy.base_url}/before", 1.0, 16))
    assert set(statuses) == {200}
    origin.kill()
    origin.wait(5)
    down = [httpx.get(f"{proxy.base_url}/down/{i}") for i in range(20)]
    assert {r.status_code for r in down} == {502}
    assert all(r.json()["error"] == "bad_gateway" for r in down)
    origin = start_demo_origin(port)
    try:
        wait_for(lambda: httpx.get(f"{proxy.base_url}/back").status_code == 200, timeout=5, what="200s again")
        statuses, _ = asyncio.run(load(f"{proxy.base_url}/after", 2.0, 16))
        assert set(statuses) == {200} and sum(statuses.values()) > 100
    finally:
        origin.terminate()
        origin.wait(5)


def test_slow_origin_is_504_at_the_timeout_and_other_routes_are_unaffected(
    proxy_factory, origin_factory
) -> None:
    slow = origin_factory()
    slow.route("/slow", never_reply())
    fast_port = free_port()
    fast = start_demo_origin(fast_port)
    try:
        proxy = proxy_factory(
            [f"/slow={slow.url}", f"http://127.0.0.1:{fast_port}"],
            env={"FLAGPROXY_UPSTREAM_READ_TIMEOUT_S": "1.0"},
        )

        async def both() -> tuple[list[Any], Counter, float]:
            async with aiohttp.ClientSession() as session:

                async def slow_call(i: int) -> tuple[int, float]:
                    started = time.monotonic()
                    async with session.get(f"{proxy.base_url}/slow/{i}") as response:
                        await response.read()
                        return response.status, time.monotonic() - started

                slow_calls = [asyncio.create_task(slow_call(i)) for i in range(20)]
                started = time.monotonic()
                statuses, _ = await load(f"{proxy.base_url}/fast", 0.8, 8)
                fast_elapsed = time.monotonic() - started
                return await asyncio.gather(*slow_calls), statuses, fast_elapsed

        slow_results, fast_statuses, fast_elapsed = asyncio.run(both())
        assert {status for status, _ in slow_results} == {504}
        assert all(0.9 <= elapsed < 3.0 for _, elapsed in slow_results)
        assert set(fast_statuses) == {200} and sum(fast_statuses.values()) > 50
        assert fast_elapsed < 1.5  # the fast route kept flowing while 20 requests hung on the slow one
    finally:
        fast.terminate()
        fast.wait(5)
