"""Pulling Split definitions: paging until since == till, segments, spec fallback, bad APIs (respx)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import respx

from proxy.sources.split import SplitApiError, SplitSettings, SplitSync, referenced_segments
from proxy.store import MemoryStore

pytestmark = pytest.mark.anyio

API = "http://split.test/api"
SETTINGS = SplitSettings(sdk_key="sdk-123", api_url=API)


def split(name: str, cn: int, status: str = "ACTIVE", segment: str | None = None) -> dict[str, Any]:
    matcher: dict[str, Any] = {"keySelector": None, "matcherType": "ALL_KEYS", "negate": False}
    if segment:
        matcher = {
            "keySelector": {"trafficType": "user", "attribute": None},
            "matcherType": "IN_SEGMENT",
            "negate": False,
            "userDefinedSegmentMatcherData": {"segmentName": segment},
        }
    return {
        "name": name,
        "trafficTypeName": "user",
        "killed": False,
        "defaultTreatment": "off",
        "changeNumber": cn,
        "status": status,
        "seed": 1234,
        "trafficAllocation": 100,
        "trafficAllocationSeed": 99,
        "algo": 2,
        "conditions": [
            {
                "conditionType": "ROLLOUT",
                "label": "rule",
                "matcherGroup": {"combiner": "AND", "matchers": [matcher]},
                "partitions": [{"treatment": "on", "size": 100}],
            }
        ],
    }


def changes(d: list[dict[str, Any]], s: int, t: int) -> dict[str, Any]:
    return {"ff": {"d": d, "s": s, "t": t}, "rbs": {"d": [], "s": -1, "t": -1}}


def split_changes_route(pages: dict[int, Any]) -> respx.Route:
    def respond(request: httpx.Request) -> httpx.Response:
        since = int(request.url.params["since"])
        return httpx.Response(200, json=pages[since])

    return respx.get(f"{API}/splitChanges").mock(side_effect=respond)


def segment_route(name: str, pages: dict[int, Any]) -> respx.Route:
    def respond(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=pages[int(request.url.params["since"])])

    return respx.get(f"{API}/segmentChanges/{name}").mock(side_effect=respond)


async def synced(store: MemoryStore, **kwargs: Any) -> SplitSync:
    sync = SplitSync(kwargs.get("settings", SETTINGS), store, client=httpx.AsyncClient())
    await sync.sync_once()
    return sync


def stored(store: MemoryStore, kind: str = "flags") -> dict[str, Any]:
    return {k: json.loads(v) for k, v in store.snapshot.raw.items("split", kind).items()}


@respx.mock
async def test_first_pull_pages_until_since_equals_till_and_loads_segments() -> None:
    route = split_changes_route(
        {
            -1: changes([split("a", 5, segment="beta")], -1, 5),
            5: changes([split("b", 8)], 5, 8),
            8: changes([], 8, 8),
        }
    )
    segment_route(
        "beta",
        {
            -1: {"name": "beta", "added": ["u1", "u2", "u3"], "removed": [], "since": -1, "till": 3},
            3: {"name": "beta", "added": ["u4"], "removed": ["u2"], "since": 3, "till": 4},
            4: {"name": "beta", "added": [], "removed": [], "since": 4, "till": 4},
        },
    )
    store = MemoryStore()
    await synced(store)
    assert sorted(stored(store)) == ["a", "b"]
    assert store.snapshot.raw.source_versions["split"]["flags"] == 8
    assert stored(store, "segments") == {"beta": ["u1", "u3", "u4"]}
    first = route.calls[0].request
    assert first.headers["Authorization"] == "Bearer sdk-123"
    assert first.url.params["s"] == "1.3" and first.url.params["since"] == "-1"
    assert first.url.params["rbSince"] == "-1"


@respx.mock
async def test_archived_flags_are_removed_and_only_newer_changes_are_asked_for() -> None:
    split_changes_route({-1: changes([split("a", 5), split("b", 5)], -1, 5), 5: changes([], 5, 5)})
    store = MemoryStore()
    await synced(store)
    respx.reset()
    route = split_changes_route(
        {
            5: changes([split("a", 9, status="ARCHIVED"), split("c", 9)], 5, 9),
            9: changes([], 9, 9),
        }
    )
    await synced(store)
    assert sorted(stored(store)) == ["b", "c"]
    assert [c.request.url.params["since"] for c in route.calls] == ["5", "9"]


@respx.mock
async def test_falls_back_to_spec_1_1_on_http_400() -> None:
    def respond(request: httpx.Request) -> httpx.Response:
        if request.url.params["s"] == "1.3":
            return httpx.Response(400, text="unsupported spec")
        since = int(request.url.params["since"])
        body = (
            {"splits": [split("old", 7)], "since": -1, "till": 7}
            if since == -1
            else {"splits": [], "since": 7, "till": 7}
        )
        return httpx.Response(200, json=body)

    route = respx.get(f"{API}/splitChanges").mock(side_effect=respond)
    store = MemoryStore()
    await synced(store)
    assert list(stored(store)) == ["old"]
    assert "rbSince" not in route.calls[-1].request.url.params


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(500, text="boom"),
        httpx.Response(200, text="<html>not json</html>"),
        httpx.Response(200, json={"ff": {"d": "nope", "s": 1, "t": 2}}),
        httpx.Response(200, json={"ff": {"d": [], "s": "x", "t": 2}, "rbs": {"d": [], "s": -1, "t": -1}}),
        httpx.Response(200, json=[1, 2, 3]),
    ],
)
@respx.mock
async def test_failing_or_garbled_api_keeps_the_last_good_definitions(response: httpx.Response) -> None:
    split_changes_route({-1: changes([split("a", 5)], -1, 5), 5: changes([], 5, 5)})
    store = MemoryStore()
    sync = await synced(store)
    before = store.snapshot.raw.to_json() | {"saved_at": None}
    respx.reset()
    respx.get(f"{API}/splitChanges").mock(return_value=response)
    with pytest.raises(SplitApiError):
        await sync.sync_once()
    assert store.snapshot.raw.to_json() | {"saved_at": None} == before


@respx.mock
async def test_network_error_is_a_split_api_error() -> None:
    respx.get(f"{API}/splitChanges").mock(side_effect=httpx.ConnectError("refused"))
    with pytest.raises(SplitApiError, match="ConnectError"):
        await synced(MemoryStore())


def test_referenced_segments_include_rule_based_exclusions() -> None:
    texts = [
        json.dumps(split("a", 1, segment="s1")),
        json.dumps(
            {
                "name": "rb",
                "excluded": {
                    "keys": [],
                    "segments": [{"name": "s2", "type": "standard"}, {"name": "rb2", "type": "rule-based"}],
                },
                "conditions": [
                    {
                        "matcherGroup": {
                            "matchers": [
                                {
                                    "matcherType": "IN_SEGMENT",
                                    "userDefinedSegmentMatcherData": {"segmentName": "s3"},
                                }
                            ]
                        }
                    }
                ],
            }
        ),
    ]
    assert referenced_segments(texts) == {"s1", "s2", "s3"}
