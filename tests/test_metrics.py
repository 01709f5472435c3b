"""/__flags/metrics: names, labels and values against what really happened, in one process and workers."""

from __future__ import annotations

import json
import re
import socket
import struct
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import LOCALHOST, http_response, never_reply, post_webhook, raw_request, wait_for

SECRET = "metrics-secret-0123456789"
FLAG_HEADERS = ("x-feature-flags", "x-feature-flags-config", "x-feature-flags-omitted")

# name → (type, label names) for every family the docs list
FAMILIES: dict[str, tuple[str, set[str]]] = {
    "flagproxy_requests": ("counter", {"origin", "status_class"}),
    "flagproxy_upstream_latency_seconds": ("histogram", {"origin"}),
    "flagproxy_upstream_errors": ("counter", {"origin", "reason"}),
    "flagproxy_flag_header_bytes": ("histogram", {"origin"}),
    "flagproxy_flag_trims": ("counter", {"origin"}),
    "flagproxy_flag_entries_omitted": ("counter", {"origin"}),
    "flagproxy_header_near_limit": ("counter", {"origin"}),
    "flagproxy_header_over_budget": ("counter", {"origin"}),
    "flagproxy_alerts": ("counter", {"condition", "result"}),
    "flagproxy_store_version": ("gauge", set()),
    "flagproxy_store_flags": ("gauge", set()),
    "flagproxy_store_invalid_definitions": ("gauge", {"source"}),
    "flagproxy_store_rollbacks": ("counter", {"outcome"}),
    "flagproxy_source_version": ("gauge", {"source"}),
    "flagproxy_last_sync_timestamp_seconds": ("gauge", {"source"}),
    "flagproxy_last_sync_age_seconds": ("gauge", {"source"}),
    "flagproxy_redis_connected": ("gauge", set()),
    "flagproxy_redis_reconnects": ("counter", set()),
    "flagproxy_webhooks": ("counter", {"source", "result"}),
    "flagproxy_source_syncs": ("counter", {"source", "result"}),
    "flagproxy_observer_errors": ("counter", {"observer"}),
    "flagproxy_observer_dropped": ("counter", {"observer"}),
    "flagproxy_rejected_requests": ("counter", {"error"}),
}


class Scrape:
    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in self.families.values():
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def get(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))

    def value(self, name: str, **labels: str) -> float:
        found = self.get(name, **labels)
        assert found is not None, f"no sample {name}{labels}"
        return found


def scrape(base_url: str, **headers: str) -> Scrape:
    response = httpx.get(f"{base_url}/__flags/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return Scrape(response.text)


def log_events(proxy: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proxy.stderr().splitlines() if line.startswith("{")]


def flag_header_bytes(request: Any) -> int:
    """Wire bytes of the flag header lines the origin received (``name: value\\r\\n``)."""
    return sum(len(n) + 2 + len(v) + 2 for n, v in request.headers if n.decode().lower() in FLAG_HEADERS)


def many_flags(count: int) -> dict[str, Any]:
    return {
        f"flag-{i:02d}": {
            "variants": {
                "a": {"weight": 50, "config": {"text": f"config-a-{i}-" + "x" * 40}},
                "b": {"weight": 50, "config": {"text": f"config-b-{i}-" + "y" * 40}},
            },
            "defaultVariant": "a",
            "priority": i,
        }
        for i in range(count)
    }


@pytest.fixture
def scenario(origin_factory, proxy_factory) -> Any:
    origin = origin_factory()
    origin.route("/app/missing", http_response(404, body=b"nope"))
    config = f"""
[webhooks]
secret = "{SECRET}"

[[origins]]
prefix = "/app"
url = "{origin.url}"

[[origins]]
prefix = "/small"
url = "{origin.url}"
header_limit_bytes = 900
header_reserve_bytes = 0

[[origins]]
prefix = "/down"
url = "http://127.0.0.1:9"
"""
    proxy = proxy_factory(config=config, flags={"flags": many_flags(12)})
    return origin, proxy


def test_counts_match_what_happened(scenario) -> None:
    origin, proxy = scenario
    base = proxy.base_url
    with httpx.Client() as client:
        for i in range(20):
            assert client.get(f"{base}/app/ok/{i}", headers={"X-User-Id": f"u{i}"}).status_code == 200
        for i in range(5):
            assert client.get(f"{base}/app/missing/{i}").status_code == 404
        for i in range(3):
            assert client.get(f"{base}/down/{i}").status_code == 502
        for i in range(4):
            assert client.get(f"{base}/small/{i}", headers={"X-User-Id": f"s{i}"}).status_code == 200
        assert client.get(f"{base}/nowhere").status_code == 404

    m = scrape(base)
    for name, (kind, labels) in FAMILIES.items():
        family = m.families.get(name)
        assert family is not None, f"family {name} missing"
        assert family.type == kind, (name, family.type)
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample.labels)

    requests = "flagproxy_requests_total"
    assert m.value(requests, origin="/app", status_class="2xx") == 20
    assert m.value(requests, origin="/app", status_class="4xx") == 5
    assert m.value(requests, origin="/app", status_class="5xx") == 0
    assert m.value(requests, origin="/down", status_class="5xx") == 3
    assert m.value(requests, origin="/small", status_class="2xx") == 4
    assert m.value(requests, origin="none", status_class="4xx") == 1
    assert m.value("flagproxy_upstream_errors_total", origin="/down", reason="connect") == 3

    # latency: one observation per response the origin gave, none for the dead origin
    assert m.value("flagproxy_upstream_latency_seconds_count", origin="/app") == 25
    assert m.value("flagproxy_upstream_latency_seconds_count", origin="/down") == 0
    assert 0 < m.value("flagproxy_upstream_latency_seconds_sum", origin="/app") < 25 * 1.0
    assert m.value("flagproxy_upstream_latency_seconds_bucket", origin="/app", le="+Inf") == 25

    # flag-header bytes: exactly what the origin received on those requests
    app_requests = [r for r in origin.requests if r.path.startswith(b"/app/")]
    assert len(app_requests) == 25
    assert m.value("flagproxy_flag_header_bytes_count", origin="/app") == 25
    assert m.value("flagproxy_flag_header_bytes_sum", origin="/app") == sum(
        map(flag_header_bytes, app_requests)
    )

    # trims: every /small request lost entries; the counter holds what X-Feature-Flags-Omitted said
    small = [r for r in origin.requests if r.path.startswith(b"/small/")]
    omitted = [int(r.value("X-Feature-Flags-Omitted") or 0) for r in small]
    assert len(small) == 4 and all(n > 0 for n in omitted)
    assert m.value("flagproxy_flag_trims_total", origin="/small") == 4
    assert m.value("flagproxy_flag_entries_omitted_total", origin="/small") == sum(omitted)
    assert m.value("flagproxy_flag_trims_total", origin="/app") == 0
    assert m.value("flagproxy_flag_header_bytes_sum", origin="/small") == sum(map(flag_header_bytes, small))

    # alerts: no Slack configured → the first trim is logged, the rest are inside the cooldown
    assert m.value("flagproxy_alerts_total", condition="trimmed", result="logged") == 1
    assert m.value("flagproxy_alerts_total", condition="trimmed", result="suppressed") == 3
    # (the pre-flight check at start warns about /small too: no request, so no request id)
    logged = [e for e in log_events(proxy) if e["logger"] == "flagproxy.alerts" and e["request_id"]]
    assert len(logged) == 1 and logged[0]["request_id"] == small[0].value("X-Request-Id")
    assert logged[0]["origin"].startswith("http://127.0.0.1:")

    # the store: what readyz says, loaded from the flags file moments ago
    ready = httpx.get(f"{base}/__flags/readyz").json()
    assert m.value("flagproxy_store_version") == ready["version"]
    assert m.value("flagproxy_store_flags") == ready["flags"] == 12
    age = m.value("flagproxy_last_sync_age_seconds", source="file")
    stamp = m.value("flagproxy_last_sync_timestamp_seconds", source="file")
    assert 0 <= age < 60 and abs((time.time() - age) - stamp) < 5


def test_webhook_outcomes_and_store_gauges(scenario) -> None:
    _, proxy = scenario
    base = proxy.base_url
    statuses = [
        post_webhook(base, {"upsert": {"new-flag": {"enabled": True}}, "version": 5}, SECRET).status_code,
        post_webhook(base, {"upsert": {"other": {"enabled": True}}, "version": 5}, SECRET).status_code,
        post_webhook(base, {"upsert": {"new-flag": {"enabled": True}}, "version": 6}, SECRET).status_code,
        post_webhook(base, {"upsert": {"x": {}}}, SECRET, signature="sha256=00").status_code,
        post_webhook(base, body=b"{not json", secret=SECRET).status_code,
        post_webhook(base, {"upsert": {"bad": {"variants": 7}}, "version": 9}, SECRET).status_code,
        post_webhook(base, body=b"x" * 2_000_000, secret=SECRET).status_code,
    ]
    assert statuses == [202, 409, 202, 401, 400, 422, 413]
    m = scrape(base)
    results = {
        dict(labels)["result"]: value
        for (name, labels), value in m.samples.items()
        if name == "flagproxy_webhooks_total" and dict(labels)["source"] == "native"
    }
    expected = {
        "applied": 1,
        "stale": 1,
        "unchanged": 1,
        "bad_signature": 1,
        "invalid_json": 1,
        "invalid_flags": 1,
        "payload_too_large": 1,
    }
    assert results == expected
    ready = httpx.get(f"{base}/__flags/readyz").json()
    assert m.value("flagproxy_store_version") == ready["version"]
    assert m.value("flagproxy_store_flags") == ready["flags"] == 13
    assert m.value("flagproxy_source_version", source="native") == 6


def test_token_formats_and_switch(proxy_factory, origin) -> None:
    guarded = proxy_factory([origin.url], config='[metrics]\ntoken = "scrape-me"\n')
    url = f"{guarded.base_url}/__flags/metrics"
    refused = httpx.get(url)
    assert refused.status_code == 401 and refused.json()["error"] == "unauthorized"
    assert "scrape-me" not in refused.text
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert (
        "flagproxy_requests_total"
        in scrape(guarded.base_url, Authorization="Bearer scrape-me")
        .families["flagproxy_requests"]
        .samples[0]
        .name
    )
    openmetrics = httpx.get(
        url, headers={"Authorization": "Bearer scrape-me", "Accept": "application/openmetrics-text"}
    )
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.rstrip().endswith("# EOF")

    off = proxy_factory([origin.url], env={"FLAGPROXY_METRICS_ENABLED": "false"})
    response = httpx.get(f"{off.base_url}/__flags/metrics")
    assert response.status_code == 404 and response.json()["error"] == "not_found"


def test_redis_sync_connection_and_reconnects(fresh_redis, proxy_factory, origin) -> None:
    proxy = proxy_factory([origin.url], args=["--redis-url", fresh_redis.url])

    def up() -> Scrape | None:
        m = scrape(proxy.base_url)
        return m if m.get("flagproxy_redis_connected") == 1 else None

    m = wait_for(up, timeout=10, what="connected to Redis")
    assert m.value("flagproxy_redis_reconnects_total") == 0
    assert 0 <= m.value("flagproxy_last_sync_age_seconds", source="redis") < 5

    fresh_redis.kill()
    wait_for(lambda: scrape(proxy.base_url).get("flagproxy_redis_connected") == 0, timeout=10, what="down")
    fresh_redis.start()
    m = wait_for(up, timeout=10, what="reconnected")
    assert m.value("flagproxy_redis_reconnects_total") == 1
    assert m.value("flagproxy_last_sync_age_seconds", source="redis") < 5


def test_workers_share_one_view(redis_server, redis_namespace, proxy_factory, origin) -> None:
    """With --workers 2 every scrape, whichever worker answers it, counts every worker's requests."""
    env = {"FLAGPROXY_STORE_ENVIRONMENT": redis_namespace, "FLAGPROXY_WEBHOOKS_SECRET": SECRET}
    proxy = proxy_factory(
        [origin.url],
        env=env,
        args=["--workers", "2", "--redis-url", redis_server.url, "--access-log"],
        log_level="warning",
    )

    def get(i: int) -> int:
        with httpx.Client() as client:  # a new connection each time: the kernel spreads them
            return client.get(f"{proxy.base_url}/w/{i}", headers={"X-User-Id": f"w{i}"}).status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(get, range(120))) == {200}
    pids = Counter(
        event["pid"]
        for line in proxy.stderr().splitlines()
        if line.startswith("{")
        and (event := json.loads(line)).get("event") == "request"
        and event["path"].startswith("/w/")
    )
    assert sum(pids.values()) == 120 and len(pids) == 2, pids  # both workers took requests

    for _ in range(6):  # several scrapes, answered by either worker
        with httpx.Client() as client:
            m = Scrape(client.get(f"{proxy.base_url}/__flags/metrics").text)
        assert m.value("flagproxy_requests_total", origin="/", status_class="2xx") == 120
        assert m.value("flagproxy_flag_header_bytes_count", origin="/") == 120
        assert m.value("flagproxy_redis_connected") == 1

    assert post_webhook(proxy.base_url, {"upsert": {"wf": {"enabled": True}}}, SECRET).status_code == 202
    version = httpx.get(f"{proxy.base_url}/__flags/readyz").json()["version"]
    # the lowest version any worker serves reaches the new one once both have applied it
    wait_for(lambda: scrape(proxy.base_url).get("flagproxy_store_version") == version, what="all workers")
    m = scrape(proxy.base_url)
    assert m.value("flagproxy_webhooks_total", source="native", result="applied") == 1


def leave_with_reset(port: int, request: bytes) -> None:
    """Send ``request``, wait a moment for an answer that does not come, then vanish with an RST.

    (A FIN after a complete request is a half-close, which still gets its response.)"""
    with socket.create_connection((LOCALHOST, port), timeout=0.3) as sock:
        sock.sendall(request)
        with pytest.raises(TimeoutError):
            sock.recv(1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def test_a_client_leaving_a_slow_origin_is_499_and_frees_the_origin(proxy_factory, origin_factory) -> None:
    origin = origin_factory()
    origin.route("/slow", never_reply())  # answers nothing until its peer goes away
    proxy = proxy_factory([origin.url], args=["--access-log"])
    leave_with_reset(proxy.port, raw_request("GET", "/slow", [("X-Request-Id", "impatient-1")]))
    assert origin.requests_to("/slow")
    # the proxy stops waiting (the read timeout is 30 s) and closes its upstream connection
    assert origin.wait_until(lambda o: o.open_connections == 0, timeout=5)
    # the same after a request body was sent in full (by length, and chunked)
    bodies = [
        raw_request("POST", "/slow/post", [("Content-Length", "300000")], b"x" * 300_000),
        raw_request(
            "POST",
            "/slow/post",
            [("Transfer-Encoding", "chunked")],
            b"3e8\r\n" + b"a" * 1000 + b"\r\n3e8\r\n" + b"b" * 1000 + b"\r\n0\r\n\r\n",
        ),
    ]
    for request in bodies:
        leave_with_reset(proxy.port, request)
        assert origin.wait_until(lambda o: o.open_connections == 0, timeout=5)
    posts = origin.requests_to("/slow/post")
    assert [r.body_length for r in posts] == [300_000, 2000] and all(r.complete for r in posts)
    access = wait_for(
        lambda: [e for e in log_events(proxy) if e.get("path", "").startswith("/slow")] or None, what="access"
    )
    assert [e["status"] for e in access] == [499, 499, 499] and access[0]["request_id"] == "impatient-1"
    m = scrape(proxy.base_url)
    assert m.value("flagproxy_requests_total", origin="/", status_class="4xx") == 3
    assert m.value("flagproxy_requests_total", origin="/", status_class="2xx") == 0
    assert m.value("flagproxy_upstream_latency_seconds_count", origin="/") == 0


def test_an_operators_metrics_directory_is_used_and_emptied_first(tmp_path, proxy_factory, origin) -> None:
    directory = tmp_path / "prom"
    directory.mkdir()
    (directory / "counter_1.db").write_bytes(b"left over from an earlier run")
    proxy = proxy_factory(
        [origin.url], env={"PROMETHEUS_MULTIPROC_DIR": str(directory)}, args=["--workers", "2"]
    )
    for i in range(10):
        with httpx.Client() as client:
            assert client.get(f"{proxy.base_url}/d/{i}").status_code == 200
    assert scrape(proxy.base_url).value("flagproxy_requests_total", origin="/", status_class="2xx") == 10
    files = {p.name for p in directory.iterdir()}
    assert "counter_1.db" not in files and proxy.pid not in {int(n[:-3].rsplit("_", 1)[1]) for n in files}
    assert sum(n.startswith("counter_") for n in files) == 2  # one per worker, none from the supervisor
    proxy.stop()
    assert directory.is_dir()  # the operator's directory stays


def test_requests_refused_before_routing_are_counted(proxy_factory, origin) -> None:
    proxy = proxy_factory(
        [origin.url], args=["--access-log"], config="[server]\nmax_request_head_bytes = 4096\n"
    )
    smuggle = (
        b"POST /r HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    huge = b"GET /r HTTP/1.1\r\nHost: a\r\nX-Big: " + b"x" * 8000 + b"\r\n\r\n"
    ids = []
    for request in (smuggle, smuggle, huge):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            sock.sendall(request)
            reply = sock.recv(65536)
            assert reply.split(b" ", 2)[1] in (b"400", b"431")
            ids.append(re.search(rb"x-request-id: ([0-9a-f]+)\r\n", reply).group(1).decode())
    m = scrape(proxy.base_url)
    assert m.value("flagproxy_rejected_requests_total", error="bad_request") == 2
    assert m.value("flagproxy_rejected_requests_total", error="request_head_too_large") == 1
    events = wait_for(lambda: [e for e in log_events(proxy) if e.get("event") == "rejected"] or None)
    assert {(e["status"], e["error"]) for e in events} == {
        (400, "bad_request"),
        (431, "request_head_too_large"),
    }
    assert all(re.fullmatch(r"[0-9a-f]{16}", e["request_id"]) for e in events)
    assert ids == [e["request_id"] for e in events]  # the id the client got is the one logged
