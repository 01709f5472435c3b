"""Split end to end: audit-log webhook → pull from a (local, fake) Split API → every instance serves it.

The fake Split API is a real HTTP server on 127.0.0.1 answering splitChanges / segmentChanges from
a change log the test edits, like Split's SDK API does.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from support import served_flags, settled_count, wait_for

TOKEN = "split-hook-token-0123456789"


def split_flag(name: str, cn: int, *, killed: bool = False, segment: str | None = None) -> dict[str, Any]:
    conditions = []
    if segment:
        conditions.append(
            {
                "conditionType": "ROLLOUT",
                "label": f"in segment {segment}",
                "matcherGroup": {
                    "combiner": "AND",
                    "matchers": [
                        {
                            "keySelector": {"trafficType": "user", "attribute": None},
                            "matcherType": "IN_SEGMENT",
                            "negate": False,
                            "userDefinedSegmentMatcherData": {"segmentName": segment},
                        }
                    ],
                },
                "partitions": [{"treatment": "beta", "size": 100}],
            }
        )
    conditions.append(
        {
            "conditionType": "ROLLOUT",
            "label": "default rule",
            "matcherGroup": {
                "combiner": "AND",
                "matchers": [
                    {
                        "keySelector": {"trafficType": "user", "attribute": None},
                        "matcherType": "ALL_KEYS",
                        "negate": False,
                    }
                ],
            },
            "partitions": [{"treatment": "on", "size": 100}, {"treatment": "off", "size": 0}],
        }
    )
    return {
        "name": name,
        "trafficTypeName": "user",
        "killed": killed,
        "defaultTreatment": "off",
        "changeNumber": cn,
        "status": "ACTIVE",
        "seed": 1357,
        "trafficAllocation": 100,
        "trafficAllocationSeed": 2468,
        "algo": 2,
        "conditions": conditions,
        "configurations": {"on": '{"color": "green"}'},
    }


class FakeSplitApi:
    """splitChanges / segmentChanges from an append-only change log, with request counting."""

    def __init__(self) -> None:
        self.flags: list[dict[str, Any]] = []  # every version ever published
        self.segments: dict[str, list[tuple[int, list[str], list[str]]]] = {}
        self.requests: list[str] = []
        self.lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                with api.lock:
                    api.requests.append(self.path)
                    if self.headers.get("Authorization") != "Bearer sdk-key-e2e":
                        return self.reply(401, {"error": "bad key"})
                    if url.path.endswith("/splitChanges"):
                        return self.reply(200, api.split_changes(int(query["since"])))
                    if "/segmentChanges/" in url.path:
                        name = url.path.rsplit("/", 1)[1]
                        return self.reply(200, api.segment_changes(name, int(query["since"])))
                return self.reply(404, {})

            def reply(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def split_changes(self, since: int) -> dict[str, Any]:
        newer = [f for f in self.flags if f["changeNumber"] > since]
        latest: dict[str, dict[str, Any]] = {}
        for flag in newer:
            latest[flag["name"]] = flag
        till = max([since, *(f["changeNumber"] for f in newer)])
        return {"ff": {"d": list(latest.values()), "s": since, "t": till}, "rbs": {"d": [], "s": -1, "t": -1}}

    def segment_changes(self, name: str, since: int) -> dict[str, Any]:
        added: set[str] = set()
        removed: set[str] = set()
        till = since
        for cn, add, rem in self.segments.get(name, []):
            if cn > since:
                added = (added | set(add)) - set(rem)
                removed = (removed | set(rem)) - set(add)
                till = max(till, cn)
        return {
            "name": name,
            "added": sorted(added),
            "removed": sorted(removed),
            "since": since,
            "till": till,
        }

    def publish(self, flag: dict[str, Any]) -> None:
        with self.lock:
            self.flags.append(flag)

    def publish_segment(self, name: str, cn: int, added: list[str], removed: list[str] = ()) -> None:
        with self.lock:
            self.segments.setdefault(name, []).append((cn, list(added), list(removed)))


@pytest.fixture(scope="module")
def split_api() -> Iterator[FakeSplitApi]:
    api = FakeSplitApi()
    api.thread.start()
    yield api
    api.server.shutdown()


@pytest.fixture(scope="module")
def instances(split_api, redis_server, proxy_factory, origin):
    split_api.publish(split_flag("checkout", 100, segment="beta"))
    split_api.publish_segment("beta", 10, ["vip-1"])
    env = {
        "FLAGPROXY_STORE_ENVIRONMENT": "split-e2e",
        "FLAGPROXY_SPLIT_SDK_KEY": "sdk-key-e2e",
        "FLAGPROXY_SPLIT_API_URL": split_api.url,
        "FLAGPROXY_SPLIT_WEBHOOK_TOKEN": TOKEN,
        "FLAGPROXY_SPLIT_ENVIRONMENTS": "Production",
        "FLAGPROXY_SPLIT_INTERVAL_S": "3600",  # only the start-up pull and webhooks
    }
    args = ["--redis-url", redis_server.url]
    return [proxy_factory([origin.url], env=env, args=args) for _ in range(3)]


def webhook(proxy, payload: Any, token: str = TOKEN) -> httpx.Response:
    return httpx.post(f"{proxy.base_url}/__flags/webhooks/split", params={"token": token}, json=payload)


def audit_event(name: str, cn: int, environment: str = "Production") -> dict[str, Any]:
    return {
        "name": name,
        "type": "split",
        "changeNumber": cn,
        "time": cn,
        "definition": "",
        "description": "changed",
        "environmentName": environment,
        "editor": "ops@example.com",
        "schemaVersion": 1,
    }


def test_startup_pull_serves_split_treatments_with_config(instances, origin) -> None:
    for proxy in instances:
        flags = wait_for(
            lambda p=proxy: (
                served_flags(p, origin, user="someone").get("checkout")
                and served_flags(p, origin, user="someone")
            ),
            what="initial Split pull",
        )
        assert flags["checkout"] == "on"
    assert served_flags(instances[0], origin, user="vip-1")["checkout"] == "beta"


def test_kill_via_webhook_reaches_every_instance(instances, origin, split_api) -> None:
    split_api.publish(split_flag("checkout", 200, killed=True, segment="beta"))
    response = webhook(instances[0], audit_event("checkout", 200))
    assert response.status_code == 200 and response.json()["status"] == "accepted"
    for proxy in instances:
        wait_for(
            lambda p=proxy: served_flags(p, origin, user="someone").get("checkout") == "off",
            what="kill served",
        )
    split_api.publish(split_flag("checkout", 300, segment="beta"))
    assert webhook(instances[2], audit_event("checkout", 300)).status_code == 200
    for proxy in instances:
        wait_for(
            lambda p=proxy: served_flags(p, origin, user="someone").get("checkout") == "on",
            what="restore served",
        )


def test_segment_change_via_webhook(instances, origin, split_api) -> None:
    split_api.publish_segment("beta", 20, ["new-vip"], ["vip-1"])
    split_api.publish(split_flag("checkout", 400, segment="beta"))  # Split announces the flag change
    assert webhook(instances[1], audit_event("checkout", 400)).status_code == 200
    for proxy in instances:
        wait_for(
            lambda p=proxy: served_flags(p, origin, user="new-vip").get("checkout") == "beta",
            what="segment member served",
        )
    assert served_flags(instances[0], origin, user="vip-1")["checkout"] == "on"


def test_webhook_rejections_leave_everything_as_it_was(instances, split_api) -> None:
    before = settled_count(split_api.requests, "the Split API")
    proxy = instances[0]
    assert webhook(proxy, audit_event("checkout", 1), token="wrong").status_code == 401
    missing = httpx.post(f"{proxy.base_url}/__flags/webhooks/split", json=audit_event("checkout", 1))
    assert missing.status_code == 401 and missing.json()["error"] == "bad_token"
    bad = httpx.post(f"{proxy.base_url}/__flags/webhooks/split", params={"token": TOKEN}, content=b"{nope")
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_json"
    other = webhook(proxy, audit_event("checkout", 1, environment="Staging"))
    assert other.status_code == 200 and other.json()["status"] == "ignored"
    assert len(split_api.requests) == before  # none of these pulled
