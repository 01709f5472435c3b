"""Leaks: internal addresses in error bodies, credentials and forged lines in logs, the control plane
on the traffic port, and memory held for client-chosen paths."""

from __future__ import annotations

import json
import tracemalloc
from typing import Any

import httpx
from support import LOCALHOST, free_port, post_webhook, raw_exchange, raw_request, wait_for

from proxy.engine.native import compile_document
from proxy.store.base import PATH_CACHE_BYTES, Snapshot
from proxy.store.state import RawState


def test_a_502_names_no_internal_address(proxy_factory: Any) -> None:
    dead = free_port()  # nothing listens here
    proxy = proxy_factory([f"http://{LOCALHOST}:{dead}"])
    response = raw_exchange(proxy.port, raw_request("GET", "/x"))
    assert response.status == 502
    body = json.loads(response.body)
    assert body["error"] == "bad_gateway" and "unreachable" in body["detail"]
    assert LOCALHOST not in response.body.decode() and str(dead) not in response.body.decode()
    # the operator still learns where: in the log
    wait_for(lambda: f"{LOCALHOST}:{dead}" in proxy.stderr(), timeout=5, what="the connect error in the log")


def test_a_503_from_the_store_names_no_redis_address(proxy_factory: Any, origin: Any) -> None:
    dead = free_port()  # no Redis here: the proxy serves its flags file and refuses writes
    env = {"FLAGPROXY_WEBHOOKS_SECRET": "leak-test-secret-0123456789", "FLAGPROXY_ADMIN_TOKEN": "t" * 24}
    proxy = proxy_factory([origin.url], env=env, args=["--redis-url", f"redis://{LOCALHOST}:{dead}/0"])
    refused = post_webhook(proxy.base_url, {"upsert": {"x": {}}}, "leak-test-secret-0123456789")
    assert refused.status_code == 503 and refused.json()["error"] == "store_unavailable"
    audit = httpx.get(proxy.base_url + "/__flags/api/audit", headers={"Authorization": "Bearer " + "t" * 24})
    assert audit.status_code == 503
    for text in (refused.text, audit.text):
        assert str(dead) not in text and LOCALHOST not in text, text


def test_origin_credentials_never_reach_the_log(proxy_factory: Any, origin: Any) -> None:
    with_credentials = origin.url.replace("http://", "http://deploy:hunter2-origin-pw@")
    proxy = proxy_factory([with_credentials], log_level="info")
    wait_for(lambda: "flagproxy ready" in proxy.stderr(), timeout=5, what="the ready line")
    assert "hunter2-origin-pw" not in proxy.stderr()
    assert "***@" in proxy.stderr()


def test_a_newline_in_a_path_cannot_forge_a_text_log_line(proxy_factory: Any, origin: Any) -> None:
    proxy = proxy_factory([origin.url], args=["--log-format", "text", "--access-log"], log_level="info")
    forged = "/x%0a2026-12-01%2000:00:00,000%20INFO%20flagproxy.access:%20GET%20/admin%20200%200.1ms%0d%0a"
    assert raw_exchange(proxy.port, raw_request("GET", forged + "?token=s3cr3t-query")).status == 200
    wait_for(lambda: "GET /x" in proxy.stderr(), timeout=5, what="the access log line")
    lines = [
        line for line in proxy.stderr().splitlines() if "flagproxy.access" in line and "healthz" not in line
    ]
    assert len(lines) == 1, lines  # one request, one line: the forged one is escaped inside it
    assert "\\x0a2026-12-01" in lines[0]
    assert "s3cr3t-query" not in proxy.stderr()  # the access log has the path, never the query


def test_the_control_plane_can_live_on_its_own_port(proxy_factory: Any, origin: Any) -> None:
    control = free_port()
    proxy = proxy_factory([origin.url], control_port=control)
    traffic = proxy.base_url
    for path in ("/__flags/metrics", "/__flags/readyz", "/__flags/healthz", "//__flags/metrics"):
        response = httpx.get(traffic + path)
        assert response.status_code == 404, path
        assert "control_port" in response.json()["detail"]
    assert not [r for r in origin.requests if b"__flags" in r.target]  # never forwarded either
    assert httpx.get(f"http://{LOCALHOST}:{control}/__flags/metrics").status_code == 200
    assert httpx.get(f"http://{LOCALHOST}:{control}/__flags/readyz").status_code == 200
    # the control port proxies nothing
    before = len(origin.requests)
    assert httpx.get(f"http://{LOCALHOST}:{control}/api/x").status_code == 404
    assert len(origin.requests) == before
    assert httpx.get(traffic + "/ok").status_code == 200


def test_ten_thousand_long_paths_hold_a_bounded_amount_of_memory() -> None:
    flags = compile_document({"flags": {f"r{i}": {"routes": [f"/r{i}/**"]} for i in range(20)}})
    snapshot = Snapshot.build(1, flags, RawState())
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        for i in range(10_000):
            path = f"/r{i % 20}/{i:05d}/" + "p" * 30_000  # 10,000 distinct 30 KB paths
            assert snapshot.plan_for_path(path).flags[0].key == f"r{i % 20}"
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert snapshot._plans.used <= PATH_CACHE_BYTES
    assert grown < 2 * PATH_CACHE_BYTES, f"{grown / 1e6:.1f} MB held for 10,000 paths"
