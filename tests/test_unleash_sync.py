"""Pulling Unleash features against a fake Unleash server on 127.0.0.1 (tests/unleash_api.py):
headers, ETag / 304, store ordering by revision, and failing, garbled or slow APIs."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from unleash_api import CLIENT_TOKEN, FakeUnleash, feature

from proxy.metrics import Metrics
from proxy.sources.registry import DEFAULT, Registry
from proxy.sources.unleash import UnleashSettings
from proxy.sources.unleash.sync import UnleashApiError, UnleashSync, revision
from proxy.store import MemoryStore

pytestmark = pytest.mark.anyio


@pytest.fixture
def api() -> Iterator[FakeUnleash]:
    fake = FakeUnleash().start()
    yield fake
    fake.stop()


def settings(api: FakeUnleash, **extra: Any) -> UnleashSettings:
    return UnleashSettings(
        api_url=api.url, client_token=CLIENT_TOKEN, app_name="shop", instance_id="i-1", **extra
    )


def stored(store: MemoryStore, kind: str = "flags") -> dict[str, Any]:
    return {k: json.loads(v) for k, v in store.snapshot.raw.items("unleash", kind).items()}


def syncs(metrics: Metrics, result: str) -> float:
    value = metrics.registry.get_sample_value(
        "flagproxy_source_syncs_total", {"source": "unleash", "result": result}
    )
    return value or 0.0


async def test_pull_sends_the_sdk_headers_and_stores_features_and_segments(api: FakeUnleash) -> None:
    segment = {
        "id": 3,
        "name": "beta",
        "constraints": [{"contextName": "plan", "operator": "IN", "values": ["pro"]}],
    }
    api.publish([feature("a"), feature("b", enabled=False)], [segment])
    store = MemoryStore(compiler=DEFAULT.ordered(["unleash", "native"]))
    sync = UnleashSync(settings(api), store)
    await sync.sync_once()
    assert stored(store) == {"a": feature("a"), "b": feature("b", enabled=False)}
    assert stored(store, "segments") == {"3": segment}
    assert store.snapshot.raw.source_versions["unleash"] == {"segments": api.revision, "flags": api.revision}
    assert store.snapshot.flags["a"].evaluate({"key": "u"}).value is True
    assert store.snapshot.flags["b"].evaluate({"key": "u"}).value is False
    headers = api.requests[-1]
    assert headers["authorization"] == CLIENT_TOKEN
    assert headers["unleash-appname"] == "shop" and headers["unleash-instanceid"] == "i-1"
    assert headers["unleash-connection-id"] == sync.connection_id and len(sync.connection_id) == 36
    assert headers["unleash-sdk"].startswith("flagproxy:")
    assert headers["unleash-client-spec"] == "6.1.0"
    assert "if-none-match" not in headers
    await sync.close()


async def test_etag_makes_an_unchanged_pull_a_304(api: FakeUnleash) -> None:
    api.publish([feature("a")])
    store, metrics = MemoryStore(), Metrics()
    sync = UnleashSync(settings(api), store, metrics=metrics)
    await sync.sync_once()
    version = store.snapshot.version
    await sync.sync_once()
    assert api.requests[-1]["if-none-match"] == api.etag()
    assert store.snapshot.version == version  # nothing written
    assert syncs(metrics, "ok") == 2
    api.publish([feature("a", enabled=False), feature("c")])
    await sync.sync_once()
    assert stored(store) == {"a": feature("a", enabled=False), "c": feature("c")}  # a replace: b-less
    await sync.close()


async def test_an_older_revision_never_replaces_a_newer_one(api: FakeUnleash) -> None:
    """Two instances on one store: the one whose pull is older (a lower revision) changes nothing."""
    api.publish([feature("old")])
    old_body = api.body()
    api.publish([feature("new")])
    store = MemoryStore()
    await UnleashSync(settings(api), store).sync_once()
    with api.lock:  # the server now answers the older revision (a lagging replica)
        api.features, api.revision = old_body["features"], old_body["meta"]["revisionId"]
    await UnleashSync(settings(api), store).sync_once()
    assert list(stored(store)) == ["new"]


@pytest.mark.parametrize(
    ("mode", "message"),
    [("error", "HTTP 500"), ("garbage", "garbled"), ("slow", "ReadTimeout")],
)
async def test_a_failing_garbled_or_slow_api_keeps_the_last_good_features(
    api: FakeUnleash, mode: str, message: str
) -> None:
    api.publish([feature("a")])
    store = MemoryStore()
    api.slow_s = 1.0
    sync = UnleashSync(settings(api, timeout_s=0.3), store)
    await sync.sync_once()
    version = store.snapshot.version
    api.publish([feature("a", enabled=False)])
    api.mode = mode
    with pytest.raises(UnleashApiError, match=message):
        await sync.sync_once()
    assert store.snapshot.version == version and stored(store) == {"a": feature("a")}
    await sync.close()


async def test_a_wrong_token_is_an_error_not_an_empty_state(api: FakeUnleash) -> None:
    api.publish([feature("a")])
    store = MemoryStore()
    sync = UnleashSync(UnleashSettings(api_url=api.url, client_token="wrong"), store)
    with pytest.raises(UnleashApiError, match="HTTP 401"):
        await sync.sync_once()
    assert stored(store) == {}
    await sync.close()


async def test_an_outage_is_counted_every_try_and_logged_once(
    api: FakeUnleash, caplog: pytest.LogCaptureFixture
) -> None:
    api.publish([feature("a")])
    api.mode = "error"
    metrics = Metrics()
    sync = UnleashSync(settings(api, interval_s=0.05), MemoryStore(), metrics=metrics)
    with caplog.at_level(logging.INFO, logger="flagproxy.unleash"):
        await sync.start()
        for _ in range(200):
            if syncs(metrics, "error") >= 4:
                break
            await asyncio.sleep(0.02)
        api.mode = "ok"
        for _ in range(200):
            if syncs(metrics, "ok") >= 1:
                break
            await asyncio.sleep(0.02)
        await sync.close()
    assert syncs(metrics, "error") >= 4 and syncs(metrics, "ok") >= 1
    failing = [r for r in caplog.records if "failing" in r.getMessage()]
    recovered = [r for r in caplog.records if "recovered" in r.getMessage()]
    assert len(failing) == 1 and len(recovered) == 1


async def test_a_burst_of_triggers_coalesces_into_one_pull(api: FakeUnleash) -> None:
    api.publish([feature("a")])
    api.mode, api.slow_s = "slow", 0.3
    sync = UnleashSync(settings(api, interval_s=3600), MemoryStore())
    await sync.start()  # the start-up pull, slow
    await asyncio.sleep(0.1)
    for _ in range(20):
        sync.trigger()
    await asyncio.sleep(1.2)
    await sync.close()
    assert len(api.requests) == 2  # the start-up pull, then one for the whole burst


def test_revision_from_meta_or_etag() -> None:
    assert revision({"meta": {"revisionId": 42}}, '"abc:7"') == 42
    assert revision({}, '"76d8bb0e:123"') == 123
    assert revision({}, 'W/"76d8bb0e:9"') == 9
    assert revision({"meta": {"revisionId": "5"}}, "") is None
    assert revision([], "nonsense") is None


async def test_requests_without_app_name_or_environment_get_the_settings(api: FakeUnleash) -> None:
    """[unleash] app_name / environment stand in for requests that carry none (the SDK's static context)."""
    from proxy.config import load_settings
    from proxy.sources.base import SyncContext
    from proxy.sources.unleash import UnleashSource

    def constrained(name: str, field: str, value: str) -> dict[str, Any]:
        constraint = {"contextName": field, "operator": "IN", "values": [value]}
        return {
            "name": name,
            "enabled": True,
            "strategies": [{"name": "default", "constraints": [constraint]}],
        }

    api.publish(
        [constrained("shop-only", "appName", "shop"), constrained("prod-only", "environment", "prod")]
    )
    source = UnleashSource()
    store = MemoryStore(compiler=Registry([source]))
    section = UnleashSettings(api_url=api.url, client_token=CLIENT_TOKEN, app_name="shop", environment="prod")
    sync = source.sync(SyncContext(load_settings(env={}), section, store, Metrics()))
    assert sync is not None
    await sync.sync_once()  # type: ignore[attr-defined]
    flags = store.snapshot.flags
    assert flags["shop-only"].evaluate({"key": "u"}).value is True
    assert flags["prod-only"].evaluate({"key": "u"}).value is True
    assert (
        flags["shop-only"].evaluate({"key": "u", "appName": "other"}).value is False
    )  # the request's own wins
    await sync.close()
