"""The flag lifecycle through real proxies: GET /api/stale, ``flagproxy flags stale``, the stale
marker on /api/flags, first-seen times and usage shared through Redis (kept across a restart),
change notices and the daily digest reaching a fake Slack (a real local HTTP server)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from support import PYTHON, REPO, ProxyProcess, RawOrigin, RedisServer, clean_env, http_client, wait_for

pytestmark = pytest.mark.timeout(120)

TOKEN = "lifecycle-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FLAGS = {
    "flags": {
        "old-release": {"type": "release", "owner": "checkout-team", "createdAt": "2025-01-01T00:00:00Z"},
        "expired": {"owner": "growth", "expiresAt": "2025-06-01T00:00:00Z", "percentage": 50},
        "current": {"type": "release", "percentage": 50},
        "forever": {"type": "kill-switch", "createdAt": "2020-01-01T00:00:00Z"},
    }
}


def get_stale(proxy: ProxyProcess) -> dict[str, Any]:
    """GET /api/stale, once the instance is in sync with its store (503 until then with Redis)."""
    url = f"{proxy.base_url}/__flags/api/stale"
    response = wait_for(
        lambda: (r := http_client().get(url, headers=AUTH)).status_code != 503 and r, 10, what="stale"
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def cli(proxy: ProxyProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "proxy", "flags", "--url", proxy.base_url, "--token", TOKEN, *args],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_stale_api_cli_and_marker(proxy_factory: Callable[..., ProxyProcess], origin: RawOrigin) -> None:
    proxy = proxy_factory([origin.url], flags=FLAGS, env={"FLAGPROXY_ADMIN_TOKEN": TOKEN})
    body = get_stale(proxy)
    assert body["stale"] == [
        {
            "flag": "expired",
            "owner": "growth",
            "type": None,
            "reasons": ["expired"],
            "since": "2025-06-01T00:00:00Z",
        },
        {
            "flag": "old-release",
            "owner": "checkout-team",
            "type": "release",
            "reasons": ["lifetime"],
            "since": "2025-02-10T00:00:00Z",
        },
    ]
    checked = datetime.fromisoformat(body["checked_at"].replace("Z", "+00:00"))
    assert abs((datetime.now(UTC) - checked).total_seconds()) < 60
    assert http_client().get(f"{proxy.base_url}/__flags/api/stale").status_code == 401

    table = cli(proxy, "stale")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["FLAG", "OWNER", "TYPE", "REASONS", "SINCE"]
    assert lines[1].split() == ["expired", "growth", "-", "expired", "2025-06-01T00:00:00Z"]
    assert lines[2].split() == ["old-release", "checkout-team", "release", "lifetime", "2025-02-10T00:00:00Z"]
    assert lines[3].startswith("2 potentially stale")
    as_json = cli(proxy, "stale", "--json")
    assert json.loads(as_json.stdout)["stale"] == body["stale"]

    # the console's marker: each flag entry says whether (and why) it is potentially stale
    flags = http_client().get(f"{proxy.base_url}/__flags/api/flags", headers=AUTH).json()["flags"]
    assert flags["old-release"]["stale"] == ["lifetime"]
    assert "stale" not in flags["current"] and "stale" not in flags["forever"]

    # an unknown type is refused, naming the field
    bad = http_client().put(f"{proxy.base_url}/__flags/api/flags/x", json={"type": "temporary"}, headers=AUTH)
    assert bad.status_code == 422 and "flags.x.type" in bad.text


def test_change_notices_reach_slack_and_the_log(
    proxy_factory: Callable[..., ProxyProcess], origin_factory: Callable[..., RawOrigin], origin: RawOrigin
) -> None:
    slack = origin_factory()
    proxy = proxy_factory(
        [origin.url],
        flags=FLAGS,
        log_level="info",
        env={"FLAGPROXY_ADMIN_TOKEN": TOKEN, "FLAGPROXY_ALERTS_CHANGE_CHANNEL": f"{slack.url}/changes"},
    )
    client = http_client()
    base = f"{proxy.base_url}/__flags/api/flags"
    assert client.put(f"{base}/current", json={"type": "release", "percentage": 80}, headers=AUTH).is_success
    assert client.put(f"{base}/current", json={"type": "release", "percentage": 80}, headers=AUTH).is_success
    assert client.post(f"{base}/forever/kill", headers=AUTH).is_success
    assert client.delete(f"{base}/expired", headers=AUTH).is_success
    assert slack.wait_until(lambda o: len(o.requests_to("/changes")) >= 3, timeout=10)
    texts = [json.loads(r.body or b"{}")["text"] for r in slack.requests_to("/changes")]
    assert [t.split(" (version")[0] for t in texts] == [
        "flagproxy: admin: `current` changed percentage",
        "flagproxy: admin: `forever` killed",
        "flagproxy: admin: `expired` deleted",
    ]  # the unchanged second PUT posted nothing
    log = proxy.stderr()
    assert "change: actor=admin flag=current summary=changed percentage" in log
    assert "change: actor=admin flag=forever summary=killed" in log
    assert "change: actor=admin flag=expired summary=deleted" in log


def redis_env(server: RedisServer, namespace: str, **extra: str) -> dict[str, str]:
    return {
        "FLAGPROXY_ADMIN_TOKEN": TOKEN,
        "FLAGPROXY_STORE_REDIS_URL": server.url,
        "FLAGPROXY_STORE_ENVIRONMENT": namespace,
        "FLAGPROXY_LIFECYCLE_FLUSH_INTERVAL_S": "0.2",
        **extra,
    }


def test_first_seen_and_usage_are_shared_and_survive_a_restart(
    proxy_factory: Callable[..., ProxyProcess],
    origin: RawOrigin,
    redis_server: RedisServer,
    redis_namespace: str,
) -> None:
    env = redis_env(redis_server, redis_namespace)
    first = proxy_factory([origin.url], flags=FLAGS, env=env)
    second = proxy_factory([origin.url], flags=FLAGS, env=env)
    redis = redis_server.client()
    seen_key = f"flagproxy:{redis_namespace}:lifecycle:first_seen"
    seen = wait_for(lambda: (h := redis.hgetall(seen_key)) and len(h) == 4 and h, what="first-seen times")
    assert set(seen) == set(FLAGS["flags"])

    # usage from both instances lands in one record per flag
    for proxy, user in ((first, "u-1"), (second, "u-2"), (first, "u-3"), (second, "u-4")):
        assert http_client().get(f"{proxy.base_url}/usage", headers={"X-User-Id": user}).status_code == 200
    usage_key = f"flagproxy:{redis_namespace}:lifecycle:usage"

    def usage() -> dict[str, Any]:
        return {k: json.loads(v) for k, v in redis.hgetall(usage_key).items()}

    wait_for(lambda: all(usage().get(k, {}).get("last", 0) > 0 for k in FLAGS["flags"]), what="usage flushed")
    assert usage()["forever"]["values"] == ["true"]  # on for everyone
    assert usage()["old-release"]["values"] == ["true"]

    first.stop()
    second.stop()
    again = proxy_factory([origin.url], flags=FLAGS, env=env)
    assert wait_for(lambda: get_stale(again))  # the lifecycle is running
    assert redis.hgetall(seen_key) == seen  # first-seen times kept across the restart
    assert redis.hgetall(usage_key)


def test_digest_once_a_day_across_instances_and_restarts(
    proxy_factory: Callable[..., ProxyProcess],
    origin_factory: Callable[..., RawOrigin],
    origin: RawOrigin,
    redis_server: RedisServer,
    redis_namespace: str,
) -> None:
    slack = origin_factory()
    hour = datetime.now(UTC).hour
    if datetime.now(UTC).minute >= 59:
        pytest.skip("too close to the hour: the digest hour would pass during the test")
    env = redis_env(
        redis_server,
        redis_namespace,
        FLAGPROXY_LIFECYCLE_DIGEST_HOUR=str(hour),
        FLAGPROXY_LIFECYCLE_DIGEST_CHANNEL=f"{slack.url}/digest",
    )
    first = proxy_factory([origin.url], flags=FLAGS, env=env)
    second = proxy_factory([origin.url], flags=FLAGS, env=env)
    assert slack.wait_until(lambda o: len(o.requests_to("/digest")) >= 1, timeout=10)
    first.stop()
    third = proxy_factory([origin.url], flags=FLAGS, env=env)  # a restart the same day
    assert wait_for(lambda: get_stale(third))
    assert not slack.wait_until(lambda o: len(o.requests_to("/digest")) >= 2, timeout=2)
    [digest] = slack.requests_to("/digest")
    text = json.loads(digest.body or b"{}")["text"]
    assert text.startswith("*flagproxy: 2 potentially stale flags*")
    assert "`expired` (growth): past its expiresAt" in text
    assert "`old-release` (checkout-team): older than its type's lifetime" in text
    today = datetime.now(UTC).date().isoformat()
    claims = redis_server.client().hgetall(f"flagproxy:{redis_namespace}:lifecycle:digest:{today}")
    assert set(claims) == {"expired", "old-release"}
    second.stop()


def test_one_notice_per_change_across_instances(
    proxy_factory: Callable[..., ProxyProcess],
    origin_factory: Callable[..., RawOrigin],
    origin: RawOrigin,
    redis_server: RedisServer,
    redis_namespace: str,
) -> None:
    slack = origin_factory()
    env = redis_env(redis_server, redis_namespace, FLAGPROXY_ALERTS_CHANGE_CHANNEL=f"{slack.url}/changes")
    writer = proxy_factory([origin.url], flags=FLAGS, env=env, log_level="info")
    reader = proxy_factory([origin.url], flags=FLAGS, env=env, log_level="info")
    response = http_client().put(
        f"{writer.base_url}/__flags/api/flags/current", json={"percentage": 10}, headers=AUTH
    )
    assert response.is_success, response.text
    version = response.json()["version"]
    wait_for(
        lambda: (
            get_stale(reader)
            and http_client()
            .get(f"{reader.base_url}/__flags/api/flags/current", headers=AUTH)
            .json()["version"]
            == version
        ),
        what="the reader serving the change",
    )
    assert slack.wait_until(lambda o: len(o.requests_to("/changes")) >= 1, timeout=10)
    assert not slack.wait_until(lambda o: len(o.requests_to("/changes")) >= 2, timeout=1.5)
    [notice] = slack.requests_to("/changes")
    assert json.loads(notice.body or b"{}")["text"] == (
        f"flagproxy: admin: `current` changed percentage, type (version {version})"
    )
    assert "change: actor=admin flag=current" in writer.stderr()
    assert "change: actor=admin" not in reader.stderr()


def test_redis_down_stale_is_503_and_requests_still_flow(
    proxy_factory: Callable[..., ProxyProcess], origin: RawOrigin, fresh_redis: RedisServer
) -> None:
    proxy = proxy_factory([origin.url], flags=FLAGS, env=redis_env(fresh_redis, "down"))
    assert get_stale(proxy)["stale"]
    wait_for(lambda: len(fresh_redis.client().hgetall("flagproxy:down:lifecycle:first_seen")) == 4)
    fresh_redis.stop()
    response = http_client().get(f"{proxy.base_url}/__flags/api/stale", headers=AUTH)
    assert response.status_code == 503 and response.json()["error"] == "store_unavailable"
    for i in range(20):  # counting goes on in memory; nothing waits on the store
        assert (
            http_client().get(f"{proxy.base_url}/down/{i}", headers={"X-User-Id": f"u{i}"}).status_code == 200
        )
    fresh_redis.restart()
    assert wait_for(
        lambda: http_client().get(f"{proxy.base_url}/__flags/api/stale", headers=AUTH).is_success, 10
    )
    usage = fresh_redis.client().hgetall("flagproxy:down:lifecycle:usage")
    assert (
        wait_for(lambda: fresh_redis.client().hgetall("flagproxy:down:lifecycle:usage"), 10, what="usage")
        or usage
    )


def test_a_vendor_sync_posts_a_change_notice(
    proxy_factory: Callable[..., ProxyProcess], origin_factory: Callable[..., RawOrigin], origin: RawOrigin
) -> None:
    from test_split_e2e import FakeSplitApi, split_flag  # the fake Split API of the Split tests

    split_api = FakeSplitApi()
    split_api.thread.start()
    try:
        split_api.publish(split_flag("split-checkout", 100))
        slack = origin_factory()
        proxy = proxy_factory(
            [origin.url],
            log_level="info",
            env={
                "FLAGPROXY_SPLIT_SDK_KEY": "sdk-key-e2e",
                "FLAGPROXY_SPLIT_API_URL": split_api.url,
                "FLAGPROXY_SPLIT_ENVIRONMENTS": "Production",
                "FLAGPROXY_SPLIT_INTERVAL_S": "3600",
                "FLAGPROXY_ALERTS_CHANGE_CHANNEL": f"{slack.url}/changes",
            },
        )
        assert slack.wait_until(lambda o: len(o.requests_to("/changes")) >= 1, timeout=10)
        texts = [json.loads(r.body or b"{}")["text"] for r in slack.requests_to("/changes")]
        assert any(t.startswith("flagproxy: split: `split-checkout` created") for t in texts), texts
        assert "change: actor=split flag=split-checkout summary=created" in proxy.stderr()
    finally:
        split_api.server.shutdown()
