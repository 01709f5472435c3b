"""The client flags API's pure parts: reasons and values, ETags, tokens, rate limits, what a change
touches."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from proxy.config import ClientKeySettings, Settings
from proxy.control.clients.compact import CompactFlags, accepts_gzip
from proxy.control.clients.keys import KeyRing, presented_key
from proxy.control.clients.rate_limit import RateLimiter
from proxy.control.clients.responses import etag_matches, gzip_etag, strong_etag
from proxy.control.clients.service import ClientAPI
from proxy.control.clients.stream_hub import touched
from proxy.control.clients.values import STANDARD_REASONS, Encoded, evaluation
from proxy.engine import Flag, Served, compile_document, encode_json, with_override
from proxy.lifecycle.usage import UsageCounter, fingerprints
from proxy.metrics import Metrics
from proxy.sources.split.evaluator import compile_split
from proxy.store.base import Snapshot
from proxy.store.state import OVERRIDES, RawState

KEY = "unit-key-0123456789abcd"


def split_flag(**fields: Any) -> Any:
    raw = {
        "name": "s",
        "status": "ACTIVE",
        "killed": False,
        "defaultTreatment": "off",
        "trafficAllocation": 100,
        "trafficAllocationSeed": 1,
        "seed": 2,
        "changeNumber": 7,
        "algo": 2,
        "configurations": {"on": '{"color": "blue"}'},
        "conditions": [
            {
                "conditionType": "WHITELIST",
                "matcherGroup": {
                    "combiner": "AND",
                    "matchers": [
                        {
                            "matcherType": "WHITELIST",
                            "negate": False,
                            "whitelistMatcherData": {"whitelist": ["vip"]},
                        }
                    ],
                },
                "partitions": [{"treatment": "on", "size": 100}],
                "label": "whitelisted",
            },
            {
                "conditionType": "ROLLOUT",
                "matcherGroup": {
                    "combiner": "AND",
                    "matchers": [{"matcherType": "ALL_KEYS", "negate": False}],
                },
                "partitions": [{"treatment": "off", "size": 100}],
                "label": "default rule",
            },
        ],
        **fields,
    }
    return compile_split({"s": raw})["s"]


def test_split_labels_map_to_standard_reasons_and_treatment_configs_are_values() -> None:
    flag = split_flag()
    _, vip = evaluation(flag, {"key": "vip"})
    assert (vip["value"], vip["variant"], vip["reason"]) == ({"color": "blue"}, "on", "TARGETING_MATCH")
    assert vip["metadata"] == {"flagReason": "whitelisted", "changeNumber": 7}
    _, other = evaluation(flag, {"key": "someone"})
    assert (other["value"], other["variant"], other["reason"]) == ("off", "off", "DEFAULT")
    _, killed = evaluation(split_flag(killed=True), {"key": "vip"})
    assert killed["reason"] == "DISABLED"
    _, no_key = evaluation(flag, {})
    assert no_key["reason"] == "ERROR"


def test_native_reasons_kill_and_promotion() -> None:
    flags = compile_document(
        {
            "flags": {
                "plain": {},
                "ruled": {"rules": [{"if": {"==": [{"var": "c"}, "x"]}, "value": False}]},
                "ab": {"variants": {"a": {"weight": 1}, "b": {"weight": 1}}},
            }
        }
    )
    assert evaluation(flags["plain"], {"key": "u"})[1]["reason"] == "STATIC"
    assert evaluation(flags["ruled"], {"key": "u"})[1]["reason"] == "STATIC"  # no rule matched
    assert evaluation(flags["ruled"], {"key": "u", "c": "x"})[1]["reason"] == "TARGETING_MATCH"
    assert evaluation(with_override(flags["ab"], {"kill": True}), {"key": "u"})[1]["reason"] == "DISABLED"
    promoted = evaluation(with_override(flags["ab"], {"promote": "b"}), {"key": "u"})[1]
    assert (promoted["reason"], promoted["variant"]) == ("STATIC", "b")
    for flag in flags.values():
        assert evaluation(flag, {"key": "u"})[1]["reason"] in STANDARD_REASONS


@pytest.mark.parametrize(
    ("header", "matches"),
    [
        ('"abc"', True),
        ('W/"abc"', True),
        ('"x", "abc"', True),
        ('"x","y"', False),
        ("*", True),
        ("", False),
        ('"abc-gzip"', True),  # the gzip representation of the same body
        ('"ab"', False),
    ],
)
def test_if_none_match(header: str, matches: bool) -> None:
    assert etag_matches(header, '"abc"') is matches
    assert etag_matches(header, gzip_etag('"abc"')) is matches


def test_strong_etag_is_the_body_hash() -> None:
    assert strong_etag(b"a") == strong_etag(b"a") != strong_etag(b"b")
    assert strong_etag(b"a").startswith('"') and not strong_etag(b"a").startswith("W/")


def test_keys_are_found_by_either_header_and_tokens_round_trip() -> None:
    ring = KeyRing([ClientKeySettings(name="a.b", key=KEY), ClientKeySettings(name="c", key=KEY + "x")])
    assert ring.find(presented_key("Bearer " + KEY, "")) is ring.by_name["a.b"]
    assert ring.find(presented_key("", KEY + "x")) is ring.by_name["c"]
    assert ring.find(presented_key("Basic " + KEY, "")) is None
    assert ring.find("") is None and ring.find(KEY[:-1]) is None
    token = ring.mint(ring.by_name["a.b"], 2_000_000_000)
    assert KEY not in token
    assert ring.redeem(token, now=1_999_999_999) is ring.by_name["a.b"]  # a name with dots
    assert ring.redeem(token, now=2_000_000_001) is None  # expired
    assert ring.redeem(token.replace("a.b.", "c.", 1), now=0) is None


def test_rate_limiter_buckets_and_whole_second_retry_after() -> None:
    limiter = RateLimiter(per_s=2, burst=2)
    assert [limiter.retry_after("k", now=0.0) for _ in range(3)] == [0, 0, 1]
    assert limiter.retry_after("other", now=0.0) == 0
    assert limiter.retry_after("k", now=0.5) == 0
    assert RateLimiter(per_s=0.1).retry_after("k", 0.0) == 0
    assert RateLimiter(per_s=0.1).retry_after("k", 0.0) == 0
    slow = RateLimiter(per_s=0.1)
    slow.retry_after("k", 0.0)
    assert slow.retry_after("k", 0.0) == 10
    assert RateLimiter(per_s=0).retry_after("k") == 0


@pytest.mark.parametrize(
    ("header", "gzip"),
    [
        ("gzip", True),
        ("br, gzip;q=0.5", True),
        ("gzip;q=0", False),
        ("identity", False),
        ("", False),
        ("*", True),
        ("*;q=0, gzip", True),  # gzip's own entry decides, whatever the order
        ("gzip;q=0, *", False),
        ("*;q=0", False),
        ("GZIP; Q=1.0", True),
        ("gzip;q=zero", False),
    ],
)
def test_accept_encoding(header: str, gzip: bool) -> None:
    assert accepts_gzip(header) is gzip


def snapshot(version: int, document: dict[str, Any], overrides: dict[str, str] | None = None) -> Snapshot:
    raw = RawState()
    if overrides:
        raw.data[OVERRIDES] = {"flags": overrides}
    return Snapshot.build(version, compile_document(document), raw)


def test_touched_flags() -> None:
    doc: dict[str, Any] = {"flags": {"a": {}, "b": {}}}
    before = snapshot(1, doc)
    same = Snapshot.build(2, dict(before.flags), RawState())
    assert touched(before, same) == set()
    added = Snapshot.build(2, {**before.flags, **compile_document({"flags": {"c": {}}})}, RawState())
    assert touched(before, added) == {"c"}
    killed = Snapshot.build(
        2,
        {**before.flags, "a": with_override(before.flags["a"], {"kill": True})},
        _overrides({"a": '{"kill":true}'}),
    )
    assert touched(before, killed) == {"a"}
    rebuilt = Snapshot.build(
        3,
        {**killed.flags, "a": with_override(before.flags["a"], {"kill": True})},
        _overrides({"a": '{"kill":true}'}),
    )
    assert touched(killed, rebuilt) == set()  # the same kill, compiled again


def _overrides(items: dict[str, str]) -> RawState:
    raw = RawState()
    raw.data[OVERRIDES] = {"flags": items}
    return raw


def test_answers_are_encoded_once_and_odd_explanations_are_still_answered() -> None:
    on = Served.make("on", {"x": 1}, True)
    calls = {"n": 0}

    def explain(ctx: Any) -> tuple[Served, dict[str, Any]]:
        calls["n"] += 1
        return on, {"reason": "odd", "changeNumber": {"not": "hashable"}, "bucket": calls["n"]}

    flag = Flag("f", encode_json("f"), lambda ctx: on, explain, (on,), on, reason_of=lambda why: "STATIC")
    encoded = Encoded()
    served, item, reason, own = encoded.item(flag, {"key": "u"})
    assert served is on and reason == "STATIC" and own == {"flagReason": "odd"}
    assert json.loads(item) == {
        "key": "f",
        "value": {"x": 1},
        "variant": "on",
        "reason": "STATIC",
        "metadata": {"flagReason": "odd"},
    }
    plain = compile_document({"flags": {"ab": {"variants": {"a": {"weight": 1}, "b": {"weight": 1}}}}})["ab"]
    first = {encoded.item(plain, {"key": f"u{i}"})[1] for i in range(50)}
    assert len(first) == 2 and len(encoded.items) == 2  # two answers, whatever the buckets


class _Store:
    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def on_change(self, listener: Any) -> None:
        pass


@pytest.mark.anyio
async def test_answers_count_as_usage_for_the_lifecycle() -> None:
    document = {"flags": {"seen": {}, "also": {"variants": {"a": {"weight": 1}}}}}
    snap = Snapshot.build(1, compile_document(document), RawState())
    counter = UsageCounter()
    counter.use(fingerprints(snap), 0.0)
    settings = Settings(client_keys=(ClientKeySettings(name="k", key=KEY),))
    store: Any = _Store(snap)
    api = ClientAPI(settings, store, Metrics(), usage=counter)
    sent: list[Any] = []

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "headers": [(b"x-api-key", KEY.encode())], "query_string": b"key=u1"}
    await CompactFlags(api)(scope, receive, send)
    assert sent[0]["status"] == 200
    # (key, fingerprint, since, last evaluated, outcomes served)
    deltas = {delta[0]: delta for delta in counter.drain()}
    assert deltas["seen"][3] > 0 and list(deltas["seen"][4]) == ["true"]
    assert deltas["also"][3] > 0 and list(deltas["also"][4]) == ["a"]


@pytest.mark.anyio
async def test_split_flags_served_to_a_unit_go_to_the_sources_analytics() -> None:
    exposed: list[tuple[str, Any, Any]] = []

    class Sink:
        def exposed(self, flag: Any, served: Any, context: Any, at_ms: int) -> None:
            exposed.append((flag.key, served.value, context.get("key")))

    flags = {"s": split_flag(), **compile_document({"flags": {"plain": {}}})}
    snap = Snapshot.build(1, flags, RawState())
    settings = Settings(client_keys=(ClientKeySettings(name="k", key=KEY),))
    store: Any = _Store(snap)
    api = ClientAPI(settings, store, Metrics(), analytics={"split": Sink()})  # type: ignore[dict-item]
    sent: list[Any] = []

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    for query in (b"key=vip", b""):  # without a unit nothing is exposed
        scope = {"type": "http", "headers": [(b"x-api-key", KEY.encode())], "query_string": query}
        await CompactFlags(api)(scope, receive, send)
    assert exposed == [("s", "on", "vip")]


def test_a_preflight_with_cors_off_is_told_so() -> None:
    """No ``cors_origins``: a browser's preflight gets a 403 naming the setting, not a bare 405."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from proxy.control.clients.cors import ClientCors

    async def ok(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    inner = Starlette(routes=[Route("/x", ok, methods=["POST"])])
    preflight = {"Origin": "http://app.test", "Access-Control-Request-Method": "POST"}

    async def ask(origins: list[str], method: str, headers: dict[str, str]) -> httpx.Response:
        transport = httpx.ASGITransport(app=ClientCors(inner, origins))
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy.test") as client:
            return await client.request(method, "/x", headers=headers)

    response = asyncio.run(ask([], "OPTIONS", preflight))
    assert response.status_code == 403
    assert response.json()["detail"] == "CORS is off: [client_api] cors_origins is empty"
    plain = asyncio.run(ask([], "POST", {"Origin": "http://app.test"}))
    assert plain.text == "ok" and "access-control-allow-origin" not in plain.headers
    stranger = asyncio.run(ask(["http://other.test"], "OPTIONS", preflight))
    assert stranger.json()["detail"] == "this origin is not in [client_api] cors_origins"
