"""Big changes do not stall everyone: the Split API cannot hand the proxy an unbounded body.

A 116 MB Split page once blocked the event loop for 24 s at 1.8 GB.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import respx

from proxy.config import ConfigError, load_settings
from proxy.metrics import Metrics
from proxy.sources.split import SplitApiError, SplitSettings, SplitSync
from proxy.store.memory import MemoryStore

pytestmark = pytest.mark.anyio

API = "http://split.test/api"


# --- the Split API: bounded bodies, bounded pages, counts in the log ---------------------------------


def split(name: str, cn: int) -> dict[str, Any]:
    return {
        "name": name,
        "trafficTypeName": "user",
        "killed": False,
        "defaultTreatment": "off",
        "changeNumber": cn,
        "status": "ACTIVE",
        "seed": 1,
        "trafficAllocation": 100,
        "trafficAllocationSeed": 2,
        "algo": 2,
        "conditions": [],
    }


def changes(d: list[dict[str, Any]], s: int, t: int) -> dict[str, Any]:
    return {"ff": {"d": d, "s": s, "t": t}, "rbs": {"d": [], "s": -1, "t": -1}}


def settled_route(names: list[str], till: int = 5) -> respx.Route:
    pages = {-1: changes([split(n, till) for n in names], -1, till), till: changes([], till, till)}
    return respx.get(f"{API}/splitChanges").mock(
        side_effect=lambda request: httpx.Response(200, json=pages[int(request.url.params["since"])])
    )


def split_sync(store: MemoryStore, metrics: Metrics | None = None, **settings: Any) -> SplitSync:
    config = SplitSettings(sdk_key="sdk-1", api_url=API, **settings)
    return SplitSync(config, store, client=httpx.AsyncClient(), metrics=metrics)


def stored_raw(store: MemoryStore) -> dict[str, Any]:
    return store.snapshot.raw.to_json() | {"saved_at": None}


CHUNK = 64 << 10


@respx.mock
async def test_a_streamed_body_over_max_response_bytes_is_dropped_unread(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settled_route(["kept"])
    store = MemoryStore()
    metrics = Metrics()
    sync = split_sync(store, metrics, max_response_bytes=1 << 20)
    await sync.sync_once()
    before = stored_raw(store)
    respx.reset()
    pulled: list[int] = []

    async def four_mib() -> AsyncIterator[bytes]:  # no Content-Length: only counting can stop it
        for i in range(64):
            pulled.append(i)
            yield b" " * CHUNK

    respx.get(f"{API}/splitChanges").mock(side_effect=lambda request: httpx.Response(200, content=four_mib()))

    def errors() -> float:
        labels = {"source": "split", "result": "error"}
        return metrics.registry.get_sample_value("flagproxy_source_syncs_total", labels) or 0.0

    with caplog.at_level(logging.ERROR, logger="flagproxy.split"):
        await sync.start()  # the background pull: the error is counted and logged, not raised
        try:
            deadline = time.monotonic() + 10
            while errors() < 1:  # bounded polling of the counter the pull increments
                assert time.monotonic() < deadline, "the failed pull was not counted"
                await asyncio.sleep(0.01)
        finally:
            await sync.close()
    assert len(pulled) == (1 << 20) // CHUNK + 1  # it stopped at the chunk that crossed 1 MiB
    assert stored_raw(store) == before  # the last good definitions stay
    assert any("max_response_bytes (1048576 bytes)" in r.getMessage() for r in caplog.records)


@respx.mock
async def test_a_declared_length_over_the_limit_is_refused_before_reading() -> None:
    store = MemoryStore()
    sync = split_sync(store, max_response_bytes=1000)
    big = json.dumps(changes([split(f"f{i}", 5) for i in range(50)], -1, 5)).encode()
    assert len(big) > 1000
    respx.get(f"{API}/splitChanges").mock(return_value=httpx.Response(200, content=big))
    with pytest.raises(SplitApiError, match=f"Content-Length {len(big)}"):
        await sync.sync_once()
    assert store.snapshot.raw.items("split") == {}


@respx.mock
async def test_segment_bodies_are_capped_too() -> None:
    flag = split("seg", 5)
    flag["conditions"] = [
        {
            "conditionType": "ROLLOUT",
            "label": "in segment",
            "matcherGroup": {
                "combiner": "AND",
                "matchers": [
                    {
                        "keySelector": {"trafficType": "user", "attribute": None},
                        "matcherType": "IN_SEGMENT",
                        "negate": False,
                        "userDefinedSegmentMatcherData": {"segmentName": "huge"},
                    }
                ],
            },
            "partitions": [{"treatment": "on", "size": 100}],
        }
    ]
    pages = {-1: changes([flag], -1, 5), 5: changes([], 5, 5)}
    respx.get(f"{API}/splitChanges").mock(
        side_effect=lambda request: httpx.Response(200, json=pages[int(request.url.params["since"])])
    )
    members = {
        "name": "huge",
        "added": [f"user-{i}" for i in range(5000)],
        "removed": [],
        "since": -1,
        "till": 1,
    }
    respx.get(f"{API}/segmentChanges/huge").mock(return_value=httpx.Response(200, json=members))
    store = MemoryStore()
    with pytest.raises(
        SplitApiError, match=r"segmentChanges/huge: the body exceeds \[split\] max_response_bytes"
    ):
        await split_sync(store, max_response_bytes=20_000).sync_once()
    assert store.snapshot.raw.items("split", "segments") == {}


@respx.mock
async def test_a_pull_follows_at_most_max_pages() -> None:
    route = respx.get(f"{API}/splitChanges").mock(
        side_effect=lambda request: httpx.Response(
            200, json=changes([], int(request.url.params["since"]), int(request.url.params["since"]) + 1)
        )
    )
    store = MemoryStore()
    with pytest.raises(SplitApiError, match="within 3 pages"):
        await split_sync(store, max_pages=3).sync_once()
    assert route.call_count == 3
    assert store.snapshot.raw.items("split") == {}


@pytest.mark.parametrize(
    ("field", "value"), [("max_response_bytes", 0), ("max_response_bytes", -1), ("max_pages", 0)]
)
def test_the_limits_must_be_positive(field: str, value: int) -> None:
    with pytest.raises(ConfigError, match=rf"\[split\] {field}: must be positive"):
        load_settings(env={f"FLAGPROXY_SPLIT_{field.upper()}": str(value)})


@respx.mock
async def test_a_big_pull_logs_a_count_not_every_name(caplog: pytest.LogCaptureFixture) -> None:
    names = [f"flag-{i:03d}" for i in range(300)]
    settled_route(names)
    store = MemoryStore()
    with caplog.at_level(logging.INFO, logger="flagproxy.split"):
        await split_sync(store).sync_once()
    assert len(store.snapshot.raw.items("split")) == 300
    lines = [r.getMessage() for r in caplog.records if r.name == "flagproxy.split"]
    assert "Split flags: 300 changed (store version 1)" in lines
    assert not any("flag-1" in line for line in lines)
