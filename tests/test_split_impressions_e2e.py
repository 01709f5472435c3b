"""Split impressions and events through a running proxy: what the origin received is what Split is
told, goals matched on proxied requests and tracked events reach Split's events API."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support import ProxyProcess, RawOrigin, http_client, wait_for
from test_split_impressions import DEFINITIONS, SDK_KEY, FakeSplit

TOKEN = "split-e2e-admin"
CONFIG = """
[[goals]]
name = "checkout"
method = "POST"
path = "/cart/checkout"
"""


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeSplit]:
    server = FakeSplit().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxied(
    fake: FakeSplit, origin_factory: Callable[..., RawOrigin], proxy_factory: Callable[..., ProxyProcess]
) -> tuple[ProxyProcess, RawOrigin]:
    origin = origin_factory()
    env = {
        "FLAGPROXY_ADMIN_TOKEN": TOKEN,
        "FLAGPROXY_SPLIT_SDK_KEY": SDK_KEY,
        "FLAGPROXY_SPLIT_API_URL": f"{fake.url}/api",
        "FLAGPROXY_SPLIT_EVENTS_URL": f"{fake.url}/events",
        "FLAGPROXY_SPLIT_TELEMETRY_URL": f"{fake.url}/telemetry",
        "FLAGPROXY_SPLIT_IMPRESSIONS_REFRESH_S": "0.2",
        "FLAGPROXY_SPLIT_EVENTS_REFRESH_S": "0.2",
        "FLAGPROXY_SPLIT_TRAFFIC_TYPE": "Account",
    }
    proxy = proxy_factory([origin.url], config=CONFIG, env=env)
    wait_for(lambda: flags_for(proxy, origin, "warm-up"), timeout=15, what="the Split flags pulled")
    return proxy, origin


_ids = iter(range(10**6))


def flags_for(proxy: ProxyProcess, origin: RawOrigin, user: str) -> dict[str, Any]:
    path = f"/page/{next(_ids)}"
    assert http_client().get(proxy.base_url + path, headers={"X-User-Id": user}).status_code == 200
    return json.loads(origin.only_request_to(path).value("X-Feature-Flags") or "{}")


def impressions_of(fake: FakeSplit, key: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for post in fake.posts("/events"):
        if post.path == "/testImpressions/bulk":
            for group in post.body:
                out.setdefault(group["f"], []).extend(i for i in group["i"] if i["k"] == key)
    return {flag: found for flag, found in out.items() if found}


def events_of(fake: FakeSplit, key: str) -> list[dict[str, Any]]:
    return [
        e
        for post in fake.posts("/events")
        if post.path == "/events/bulk"
        for e in post.body
        if e["key"] == key
    ]


def test_each_split_flag_the_origin_received_is_an_impression(
    proxied: tuple[ProxyProcess, RawOrigin], fake: FakeSplit
) -> None:
    proxy, origin = proxied
    received = flags_for(proxy, origin, "alice")
    assert received["exp_whitelist"] == "on"  # alice is whitelisted
    for _ in range(3):  # repeats within the hour are counted, not sent again
        assert flags_for(proxy, origin, "alice") == received

    expected = {
        name for name in received if name in DEFINITIONS and not DEFINITIONS[name].get("impressionsDisabled")
    }

    def all_sent() -> dict[str, list[dict[str, Any]]] | None:
        found = impressions_of(fake, "alice")
        return found if set(found) >= expected else None

    got = wait_for(all_sent, timeout=10, what="alice's impressions at the fake Split events API")
    assert "exp_quiet" not in got  # impressionsDisabled
    for flag in expected:
        assert len(got[flag]) == 1, got[flag]
        impression = got[flag][0]
        assert impression["t"] == received[flag]
        assert impression["c"] == DEFINITIONS[flag]["changeNumber"]
    assert got["exp_whitelist"][0]["r"] == "whitelisted"
    post = next(p for p in fake.posts("/events") if p.path == "/testImpressions/bulk")
    assert post.headers["authorization"] == f"Bearer {SDK_KEY}"
    assert post.headers["splitsdkimpressionsmode"] == "OPTIMIZED"


def test_goals_and_tracked_events_go_to_splits_events_api(
    proxied: tuple[ProxyProcess, RawOrigin], fake: FakeSplit
) -> None:
    proxy, _ = proxied
    response = http_client().post(f"{proxy.base_url}/cart/checkout", headers={"X-User-Id": "bob"})
    assert response.status_code == 200
    tracked = http_client().post(
        f"{proxy.base_url}/__flags/api/track",
        headers={"Authorization": f"Bearer {TOKEN}"},
        json={"key": "bob", "event": "purchase", "value": 9.5, "properties": {"sku": "starter"}},
    )
    assert tracked.status_code in (200, 202), tracked.text

    def both() -> list[dict[str, Any]] | None:
        found = events_of(fake, "bob")
        return found if len(found) >= 2 else None

    events = wait_for(both, timeout=10, what="bob's events at the fake Split events API")
    by_type = {e["eventTypeId"]: e for e in events}
    assert set(by_type) == {"checkout", "purchase"}
    assert by_type["purchase"]["value"] == 9.5 and by_type["purchase"]["properties"] == {"sku": "starter"}
    assert by_type["checkout"]["value"] is None
    assert {e["trafficTypeName"] for e in events} == {"account"}  # lowercased, as the SDK sends it
