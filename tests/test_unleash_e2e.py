"""Unleash end to end: a fake Unleash server (real HTTP on 127.0.0.1) → webhook → three proxies on one
Redis serve the change; a webhook with a wrong Authorization is refused (401) and changes nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from support import served_flags, settled_count, wait_for
from unleash_api import CLIENT_TOKEN, FakeUnleash, feature

TOKEN = "unleash-hook-token-0123456789"


def checkout(rollout: str, variants: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    strategy = {"name": "flexibleRollout", "parameters": {"rollout": rollout, "stickiness": "userId"}}
    return {"name": "checkout", "enabled": True, "strategies": [strategy], "variants": variants or []}


@pytest.fixture(scope="module")
def unleash_api() -> Iterator[FakeUnleash]:
    api = FakeUnleash().start()
    api.publish([checkout("100"), feature("beta", enabled=False)])
    yield api
    api.stop()


@pytest.fixture(scope="module")
def instances(unleash_api, redis_server, proxy_factory, origin):
    env = {
        "FLAGPROXY_STORE_ENVIRONMENT": "unleash-e2e",
        "FLAGPROXY_STORE_SOURCES": "unleash,native",
        "FLAGPROXY_UNLEASH_API_URL": unleash_api.url,
        "FLAGPROXY_UNLEASH_CLIENT_TOKEN": CLIENT_TOKEN,
        "FLAGPROXY_UNLEASH_WEBHOOK_TOKEN": TOKEN,
        "FLAGPROXY_UNLEASH_INTERVAL_S": "3600",  # only the start-up pull and webhooks
        "FLAGPROXY_CONTEXT_COOKIE_ATTRIBUTES": "sid=sessionId",
        "FLAGPROXY_CONTEXT_CLIENT_ADDRESS_ATTRIBUTE": "remoteAddress",
    }
    args = ["--redis-url", redis_server.url]
    return [proxy_factory([origin.url], env=env, args=args) for _ in range(3)]


def webhook(proxy, token: str | None = TOKEN) -> httpx.Response:
    headers = {} if token is None else {"Authorization": token}
    event = {"event": {"type": "feature-updated", "featureName": "checkout", "createdBy": "ops"}}
    return httpx.post(f"{proxy.base_url}/__flags/webhooks/unleash", json=event, headers=headers)


def test_startup_pull_serves_unleash_features(instances, origin) -> None:
    for proxy in instances:
        flags = wait_for(
            lambda p=proxy: (
                "checkout" in served_flags(p, origin, user="ann") and served_flags(p, origin, user="ann")
            ),
            what="initial Unleash pull",
        )
        assert flags["checkout"] is True and flags["beta"] is False


def test_a_change_via_webhook_reaches_every_instance(instances, origin, unleash_api) -> None:
    payload = {"type": "json", "value": '{"color": "green"}'}
    unleash_api.publish(
        [checkout("100", [{"name": "green", "weight": 1000, "payload": payload}]), feature("beta")]
    )
    started = time.monotonic()
    response = webhook(instances[0])
    assert response.status_code == 202 and response.json() == {"status": "accepted"}
    assert time.monotonic() - started < 1.0  # answered before any pull
    for proxy in instances:
        wait_for(
            lambda p=proxy: served_flags(p, origin, user="ann") == {"checkout": "green", "beta": True},
            what="the webhook's change served",
        )
    unleash_api.publish([checkout("0"), feature("beta")])
    assert webhook(instances[2]).status_code == 202
    for proxy in instances:
        wait_for(
            lambda p=proxy: served_flags(p, origin, user="ann").get("checkout") is False,
            what="rollout 0 served",
        )


def test_bad_webhook_auth_is_401_and_changes_nothing(instances, origin, unleash_api) -> None:
    before = settled_count(unleash_api.requests, "the Unleash API")
    served = served_flags(instances[0], origin, user="ann")
    unleash_api.publish([checkout("100"), feature("beta", enabled=False)])  # would change what is served
    for token in ("wrong", None, TOKEN + "x", "Bearer " + TOKEN):
        response = webhook(instances[0], token)
        assert response.status_code == 401 and response.json()["error"] == "bad_token"
    time.sleep(0.3)
    assert len(unleash_api.requests) == before  # none of these pulled
    assert served_flags(instances[1], origin, user="ann") == served


def test_session_cookie_and_client_address_reach_the_strategies(instances, origin, unleash_api) -> None:
    by_ip = {
        "name": "by-ip",
        "enabled": True,
        "strategies": [{"name": "remoteAddress", "parameters": {"IPs": "127.0.0.1"}}],
    }
    by_session = {
        "name": "by-session",
        "enabled": True,
        "strategies": [
            {"name": "gradualRolloutSessionId", "parameters": {"percentage": "100", "groupId": "g"}}
        ],
    }
    unleash_api.publish([by_ip, by_session])
    assert webhook(instances[1]).status_code == 202
    proxy = instances[2]
    wait_for(lambda: "by-ip" in served_flags(proxy, origin, user="ann"), what="the new features served")
    assert served_flags(proxy, origin, user="ann") == {"by-ip": True, "by-session": False}
    assert served_flags(proxy, origin, user="ann", headers={"Cookie": "sid=s-1"})["by-session"] is True
