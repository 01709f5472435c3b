"""Replaying native webhooks: captured requests, the signature's time window, delivery ids,
tombstones and versionless documents.

Two real ``flagproxy serve`` instances share one namespace on the session's private redis-server;
every refusal is checked against Redis itself (``DUMP`` of every key before and after) and against
what the origin is sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import (
    ProxyProcess,
    RawOrigin,
    RedisServer,
    http_client,
    legacy_signature,
    post_webhook,
    served_flags,
    sign_body,
    unique_namespace,
    wait_for,
)

from proxy.config import StoreSettings
from proxy.sources.registry import DEFAULT
from proxy.store.change import Change, stored_text
from proxy.store.memory import MemoryStore
from proxy.store.redis import RedisStore
from proxy.store.state import ApplyResult, RawState, apply_change

SECRET = "replay-webhook-secret"
TOKEN = "replay-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def iso(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Captured:
    """A webhook request as an eavesdropper would keep it: the exact bytes of body and headers."""

    body: bytes
    headers: dict[str, str] = field(default_factory=dict)

    def send(self, proxy: ProxyProcess) -> httpx.Response:
        return http_client().post(
            f"{proxy.base_url}/__flags/webhooks/native", content=self.body, headers=self.headers
        )


def capture(payload: Any, at: int, delivery: str | None = None) -> Captured:
    body = json.dumps(payload).encode()
    headers = {"Content-Type": "application/json", "X-Flagproxy-Signature": sign_body(SECRET, body, at)}
    if delivery is not None:
        headers["X-Flagproxy-Delivery"] = delivery
    return Captured(body, headers)


def proxy_env(namespace: str, **extra: str) -> dict[str, str]:
    return {
        "FLAGPROXY_WEBHOOKS_SECRET": SECRET,
        "FLAGPROXY_ADMIN_TOKEN": TOKEN,
        "FLAGPROXY_STORE_ENVIRONMENT": namespace,
        **extra,
    }


def wait_ready(proxy: ProxyProcess) -> None:
    wait_for(
        lambda: http_client().get(f"{proxy.base_url}/__flags/readyz").status_code == 200,
        timeout=20,
        what="readyz 200",
    )


@dataclass
class Pair:
    namespace: str
    a: ProxyProcess
    b: ProxyProcess

    @property
    def both(self) -> tuple[ProxyProcess, ProxyProcess]:
        return (self.a, self.b)


@pytest.fixture(scope="module")
def pair(redis_server: RedisServer, origin: RawOrigin, proxy_factory: Any) -> Pair:
    """Two instances on one namespace of one private Redis."""
    namespace = unique_namespace("replay")
    proxies = [
        proxy_factory([origin.url], env=proxy_env(namespace), args=["--redis-url", redis_server.url])
        for _ in range(2)
    ]
    for proxy in proxies:
        wait_ready(proxy)
    return Pair(namespace, *proxies)


def dump(redis_server: RedisServer, namespace: str) -> dict[bytes, bytes | None]:
    return redis_server.dump_namespace(f"flagproxy:{namespace}:*")


def store_version(redis_server: RedisServer, namespace: str) -> int:
    return int(redis_server.client().get(f"flagproxy:{namespace}:version") or 0)


def serves(pair: Pair, origin: RawOrigin, key: str, value: Any) -> bool:
    """Both instances send the origin ``key: value`` (``None``: no such flag)."""
    return all(served_flags(p, origin).get(key) == value for p in pair.both)


def assert_refused(
    response: httpx.Response, status: int, error: str, field_name: str | None = None
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert body["error"] == error
    assert isinstance(body["detail"], str) and body["detail"]
    if field_name is not None:
        assert body["field"] == field_name and field_name in body["detail"]
    return body


# --- a captured request replayed later ---------------------------------------------------------------


def test_a_captured_patch_replayed_after_a_later_fix_changes_nothing(
    pair: Pair, redis_server: RedisServer, origin: RawOrigin
) -> None:
    now = int(time.time())
    captured = capture({"upsert": {"kill-switch": {"enabled": True}}}, at=now - 2)
    first = captured.send(pair.a)
    assert (first.status_code, first.json()["status"]) == (202, "applied"), first.text
    fix = capture({"upsert": {"kill-switch": {"enabled": False}}}, at=now - 1)
    fixed = fix.send(pair.b)
    assert (fixed.status_code, fixed.json()["changed"]) == (202, ["kill-switch"]), fixed.text
    wait_for(lambda: serves(pair, origin, "kill-switch", False), what="the fix served by both")

    before = dump(redis_server, pair.namespace)
    version = store_version(redis_server, pair.namespace)
    for proxy in pair.both:
        replay = captured.send(proxy)
        assert replay.status_code == 202, replay.text
        assert replay.json() == {
            "status": "unchanged",
            "version": version,
            "changed": [],
            "ignored": ["kill-switch"],
        }
    assert dump(redis_server, pair.namespace) == before
    assert serves(pair, origin, "kill-switch", False)


def test_a_captured_delete_replayed_after_the_flag_came_back_changes_nothing(
    pair: Pair, redis_server: RedisServer, origin: RawOrigin
) -> None:
    now = int(time.time())
    created = capture({"upsert": {"comeback": {"enabled": True}}}, at=now - 3).send(pair.a)
    assert created.status_code == 202, created.text
    captured = capture({"delete": ["comeback"]}, at=now - 2)
    assert captured.send(pair.a).json()["changed"] == ["comeback"]
    back = capture({"upsert": {"comeback": {"enabled": False}}}, at=now - 1).send(pair.b)
    assert back.json()["changed"] == ["comeback"], back.text
    wait_for(lambda: serves(pair, origin, "comeback", False), what="the flag back on both")

    before = dump(redis_server, pair.namespace)
    replay = captured.send(pair.b)
    assert (replay.status_code, replay.json()["status"], replay.json()["ignored"]) == (
        202,
        "unchanged",
        ["comeback"],
    )
    assert dump(redis_server, pair.namespace) == before
    assert serves(pair, origin, "comeback", False)


def test_replayed_upserts_after_an_admin_delete_leave_the_flag_deleted(
    pair: Pair, redis_server: RedisServer, origin: RawOrigin
) -> None:
    now = int(time.time())
    captured = {
        "resurrect-plain": capture({"upsert": {"resurrect-plain": {}}}, at=now - 1),
        "resurrect-dated": capture({"upsert": {"resurrect-dated": {"updatedAt": iso(now - 60)}}}, at=now - 1),
        # an updatedAt a minute ahead is allowed (clock skew); the tombstone must still outrank it
        "resurrect-ahead": capture({"upsert": {"resurrect-ahead": {"updatedAt": iso(now + 60)}}}, at=now - 1),
    }
    for key, request in captured.items():
        response = request.send(pair.a)
        assert (response.status_code, response.json()["changed"]) == (202, [key]), response.text
    for key in captured:
        deleted = http_client().delete(f"{pair.b.base_url}/__flags/api/flags/{key}", headers=AUTH)
        assert (deleted.status_code, deleted.json()["changed"]) == (200, [key]), deleted.text
    wait_for(
        lambda: all(serves(pair, origin, key, None) for key in captured), what="the deletes served by both"
    )

    before = dump(redis_server, pair.namespace)
    for key, request in captured.items():
        for proxy in pair.both:
            replay = request.send(proxy)
            assert replay.status_code == 202, replay.text
            assert (replay.json()["status"], replay.json()["ignored"]) == ("unchanged", [key])
    assert dump(redis_server, pair.namespace) == before
    for key in captured:
        assert (
            http_client().get(f"{pair.a.base_url}/__flags/api/flags/{key}", headers=AUTH).status_code == 404
        )
        assert serves(pair, origin, key, None)


def test_an_admin_write_outranks_a_webhook_signed_before_it(
    pair: Pair, redis_server: RedisServer, origin: RawOrigin
) -> None:
    captured = capture({"upsert": {"admin-fixed": {"enabled": True}}}, at=int(time.time()) - 2)
    assert captured.send(pair.a).status_code == 202
    put = http_client().put(
        f"{pair.b.base_url}/__flags/api/flags/admin-fixed", json={"enabled": False}, headers=AUTH
    )
    assert (put.status_code, put.json()["changed"]) == (200, ["admin-fixed"]), put.text
    before = dump(redis_server, pair.namespace)
    replay = captured.send(pair.a)
    assert (replay.status_code, replay.json()["ignored"]) == (202, ["admin-fixed"]), replay.text
    assert dump(redis_server, pair.namespace) == before
    wait_for(lambda: serves(pair, origin, "admin-fixed", False), what="the admin's value on both")


# --- documents and updatedAt -------------------------------------------------------------------------


def test_a_versionless_document_after_a_versioned_one_is_409(
    redis_server: RedisServer, origin: RawOrigin, proxy_factory: Any
) -> None:
    namespace = unique_namespace("replay-documents")
    proxy = proxy_factory([origin.url], env=proxy_env(namespace), args=["--redis-url", redis_server.url])
    wait_ready(proxy)
    versioned = post_webhook(proxy.base_url, {"flags": {"doc-flag": {"enabled": True}}, "version": 7}, SECRET)
    assert (versioned.status_code, versioned.json()["status"]) == (202, "applied"), versioned.text

    before = dump(redis_server, namespace)
    refused = post_webhook(proxy.base_url, {"flags": {"doc-flag": {"enabled": False}}}, SECRET)
    body = assert_refused(refused, 409, "version_required")
    assert '"version"' in body["detail"] and "7" in body["detail"]
    assert body["stored_version"] == 7
    assert dump(redis_server, namespace) == before
    assert served_flags(proxy, origin)["doc-flag"] is True

    # a patch still needs no version (its flags are ordered by the signed time), a newer document applies
    patched = post_webhook(proxy.base_url, {"upsert": {"doc-other": {}}}, SECRET)
    assert (patched.status_code, patched.json()["changed"]) == (202, ["doc-other"]), patched.text
    newer = post_webhook(proxy.base_url, {"flags": {"doc-flag": {"enabled": False}}, "version": 8}, SECRET)
    assert (newer.status_code, sorted(newer.json()["changed"])) == (202, ["doc-flag", "doc-other"]), (
        newer.text
    )
    assert served_flags(proxy, origin) == {"doc-flag": False}


def future_writes(pair: Pair, definition: dict[str, Any]) -> list[Callable[[], httpx.Response]]:
    return [
        lambda: post_webhook(pair.a.base_url, {"upsert": {"future": definition}}, SECRET),
        lambda: post_webhook(pair.a.base_url, {"flags": {"future": definition}}, SECRET),
        lambda: http_client().put(
            f"{pair.b.base_url}/__flags/api/flags/future", json=definition, headers=AUTH
        ),
    ]


@pytest.mark.parametrize("way", [0, 1, 2], ids=["patch", "document", "admin-put"])
def test_an_updated_at_more_than_5_minutes_ahead_is_refused(
    pair: Pair, redis_server: RedisServer, origin: RawOrigin, way: int
) -> None:
    before = dump(redis_server, pair.namespace)
    ahead = {"enabled": False, "updatedAt": iso(time.time() + 6 * 60)}
    response = future_writes(pair, ahead)[way]()
    body = assert_refused(response, 422, "invalid_flags", "flags.future.updatedAt")
    assert "5 minutes in the future" in body["detail"]
    assert dump(redis_server, pair.namespace) == before
    assert "future" not in served_flags(pair.a, origin)


def test_an_updated_at_a_little_ahead_is_clock_skew_and_accepted(pair: Pair) -> None:
    response = post_webhook(
        pair.a.base_url, {"upsert": {"slightly-ahead": {"updatedAt": iso(time.time() + 4 * 60)}}}, SECRET
    )
    assert (response.status_code, response.json()["changed"]) == (202, ["slightly-ahead"]), response.text


# --- the signature -----------------------------------------------------------------------------------

BODY = json.dumps({"upsert": {"signed-flag": {"enabled": False}}}).encode()


def mac(secret: str, message: bytes) -> str:
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def good(now: int) -> str:
    return mac(SECRET, b"%d." % now + BODY)


REFUSED_SIGNATURES: list[Any] = [
    pytest.param(lambda now: legacy_signature(SECRET, BODY), "bad_signature", id="legacy-sha256-form"),
    pytest.param(lambda now: f"t={now},v1={mac(SECRET, BODY)}", "bad_signature", id="v1-of-the-body-alone"),
    pytest.param(lambda now: sign_body("another-secret", BODY, now), "bad_signature", id="wrong-secret"),
    pytest.param(lambda now: f"t={now - 1},v1={good(now)}", "bad_signature", id="t-changed-after-signing"),
    pytest.param(lambda now: f"v1={good(now)}", "bad_signature", id="no-t"),
    pytest.param(lambda now: f"t={now},t={now},v1={good(now)}", "bad_signature", id="two-t"),
    pytest.param(lambda now: f"t=soon,v1={good(now)}", "bad_signature", id="t-not-a-number"),
    pytest.param(lambda now: f"t={now}", "bad_signature", id="no-v1"),
    pytest.param(lambda now: f"t={now},v1={good(now)[:-2]}", "bad_signature", id="v1-truncated"),
    pytest.param(lambda now: "", "bad_signature", id="no-signature"),
    pytest.param(lambda now: "garbage", "bad_signature", id="garbage"),
    pytest.param(lambda now: "t=1,v1=0," * 20, "bad_signature", id="too-many-parts"),
    pytest.param(lambda now: sign_body(SECRET, BODY, now - 301), "signature_expired", id="t-301s-old"),
    pytest.param(lambda now: sign_body(SECRET, BODY, now + 301), "signature_expired", id="t-301s-ahead"),
]


@pytest.mark.parametrize(("signature", "error"), REFUSED_SIGNATURES)
def test_refused_signatures_are_401_and_change_nothing(
    pair: Pair, redis_server: RedisServer, origin: RawOrigin, signature: Callable[[int], str], error: str
) -> None:
    before = dump(redis_server, pair.namespace)
    served_before = served_flags(pair.a, origin)
    response = post_webhook(pair.a.base_url, body=BODY, signature=signature(int(time.time())))
    assert_refused(response, 401, error)
    assert response.headers["www-authenticate"] == "Bearer"
    assert dump(redis_server, pair.namespace) == before
    assert served_flags(pair.a, origin) == served_before


ACCEPTED_SIGNATURES: list[Any] = [
    pytest.param(lambda now: f"t={now},v1={good(now)}", id="plain"),
    pytest.param(
        lambda now: f"t={now},v1={mac('old-secret', b'%d.' % now + BODY)},v1={good(now)}", id="rotation"
    ),
    pytest.param(lambda now: f"t={now},v0=legacy-scheme,v1={good(now)}", id="other-schemes-ignored"),
    pytest.param(lambda now: f"t={now},v1={good(now).upper()}", id="upper-case-hex"),
    pytest.param(lambda now: f"t={now - 290},v1={mac(SECRET, b'%d.' % (now - 290) + BODY)}", id="t-290s-old"),
    pytest.param(
        lambda now: f"t={now + 290},v1={mac(SECRET, b'%d.' % (now + 290) + BODY)}", id="t-290s-ahead"
    ),
]


@pytest.mark.parametrize("signature", ACCEPTED_SIGNATURES)
def test_accepted_signature_forms(pair: Pair, signature: Callable[[int], str]) -> None:
    response = post_webhook(pair.a.base_url, body=BODY, signature=signature(int(time.time())))
    assert response.status_code == 202, response.text
    assert response.json()["status"] in ("applied", "unchanged")


def test_legacy_signatures_only_when_enabled(
    redis_server: RedisServer, origin: RawOrigin, proxy_factory: Any
) -> None:
    namespace = unique_namespace("replay-legacy")
    env = proxy_env(namespace, FLAGPROXY_WEBHOOKS_LEGACY_SIGNATURES="true")
    proxy = proxy_factory([origin.url], env=env, args=["--redis-url", redis_server.url])
    wait_ready(proxy)
    old_form = post_webhook(proxy.base_url, body=BODY, signature=legacy_signature(SECRET, BODY))
    assert (old_form.status_code, old_form.json()["changed"]) == (202, ["signed-flag"]), old_form.text
    new_form = post_webhook(proxy.base_url, {"upsert": {"signed-flag": {}}}, SECRET)
    assert (new_form.status_code, new_form.json()["changed"]) == (202, ["signed-flag"]), new_form.text
    before = dump(redis_server, namespace)
    wrong = post_webhook(proxy.base_url, body=BODY, signature=legacy_signature("another-secret", BODY))
    assert_refused(wrong, 401, "bad_signature")
    assert dump(redis_server, namespace) == before


# --- delivery ids ------------------------------------------------------------------------------------


def test_a_delivery_id_applies_once_across_both_instances(
    pair: Pair, redis_server: RedisServer, origin: RawOrigin
) -> None:
    delivery = f"evt_{uuid.uuid4().hex}"
    first = post_webhook(
        pair.a.base_url, {"upsert": {"delivered": {"enabled": True}}}, SECRET, delivery=delivery
    )
    assert (first.status_code, first.json()["changed"]) == (202, ["delivered"]), first.text
    wait_for(lambda: serves(pair, origin, "delivered", True), what="the delivery served by both")

    before = dump(redis_server, pair.namespace)
    version = store_version(redis_server, pair.namespace)
    # the sender's retry, re-signed, reaches the other instance
    payload = {"upsert": {"delivered": {"enabled": True}}}
    again = post_webhook(pair.b.base_url, payload, SECRET, delivery=delivery)
    assert (again.status_code, again.json()) == (
        200,
        {"status": "duplicate", "version": version, "changed": []},
    )
    assert dump(redis_server, pair.namespace) == before
    assert serves(pair, origin, "delivered", True)
    body_hash = hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:32]
    ttl = redis_server.client().ttl(f"flagproxy:{pair.namespace}:delivery:native:{delivery}:{body_hash}")
    assert 0 < ttl <= 300


def test_a_replay_under_someone_elses_delivery_id_suppresses_nothing(
    pair: Pair, redis_server: RedisServer, origin: RawOrigin
) -> None:
    # the id is not signed: an attacker replays a captured request under the id the sender uses next
    captured = {"upsert": {"suppressed": {"enabled": False}}}
    assert post_webhook(pair.a.base_url, captured, SECRET).status_code == 202
    next_id = f"evt_{uuid.uuid4().hex}"
    replayed = post_webhook(pair.a.base_url, captured, SECRET, delivery=next_id)
    assert replayed.status_code in (200, 202), replayed.text
    # the sender's real delivery under that id, with its own body, still applies, on either instance
    real = post_webhook(
        pair.b.base_url, {"upsert": {"suppressed": {"enabled": True}}}, SECRET, delivery=next_id
    )
    assert (real.status_code, real.json()["status"]) == (202, "applied"), real.text
    wait_for(lambda: serves(pair, origin, "suppressed", True), what="the real delivery served")


def test_concurrent_deliveries_of_one_id_apply_once(pair: Pair, redis_server: RedisServer) -> None:
    delivery = f"evt_{uuid.uuid4().hex}"

    def send(index: int) -> httpx.Response:  # one delivery retried 8 times at once, through both
        proxy = pair.both[index % 2]
        return post_webhook(
            proxy.base_url, {"upsert": {"race": {"enabled": False}}}, SECRET, delivery=delivery
        )

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(send, range(8)))
    outcomes = sorted((r.status_code, r.json()["status"]) for r in responses)
    assert outcomes == [(200, "duplicate")] * 7 + [(202, "applied")]
    audit = redis_server.client().lrange(f"flagproxy:{pair.namespace}:audit", 0, -1)
    assert len([e for e in audit if '"flag":"race"' in e]) == 1  # written once


def test_a_refused_delivery_is_not_remembered(pair: Pair, redis_server: RedisServer) -> None:
    delivery = f"evt_{uuid.uuid4().hex}"
    before = dump(redis_server, pair.namespace)
    invalid = post_webhook(
        pair.a.base_url, {"upsert": {"retried": {"percentage": 101}}}, SECRET, delivery=delivery
    )
    assert_refused(invalid, 422, "invalid_flags", "flags.retried.percentage")
    assert dump(redis_server, pair.namespace) == before
    retried = post_webhook(pair.b.base_url, {"upsert": {"retried": {}}}, SECRET, delivery=delivery)
    assert (retried.status_code, retried.json()["changed"]) == (202, ["retried"]), retried.text


def test_a_delivery_id_is_kept_while_a_signature_from_ahead_is_valid(
    pair: Pair, redis_server: RedisServer
) -> None:
    delivery = f"evt_{uuid.uuid4().hex}"
    ahead = capture({"upsert": {"from-ahead": {}}}, at=int(time.time()) + 100, delivery=delivery)
    assert ahead.send(pair.a).status_code == 202
    keys = redis_server.client().keys(f"flagproxy:{pair.namespace}:delivery:native:{delivery}:*")
    assert len(keys) == 1  # the id, bound to the body's hash
    ttl = redis_server.client().ttl(keys[0])
    assert 395 <= ttl <= 400  # valid for 300 s after t, which is 100 s ahead
    assert ahead.send(pair.b).json()["status"] == "duplicate"


@pytest.mark.parametrize("delivery", ["x" * 129, "two words", ""], ids=["too-long", "space", "empty"])
def test_a_malformed_delivery_id_is_400_and_changes_nothing(
    pair: Pair, redis_server: RedisServer, delivery: str
) -> None:
    before = dump(redis_server, pair.namespace)
    response = post_webhook(pair.a.base_url, {"upsert": {"bad-delivery": {}}}, SECRET, delivery=delivery)
    body = assert_refused(response, 400, "bad_delivery_id")
    assert "X-Flagproxy-Delivery" in body["detail"]
    assert dump(redis_server, pair.namespace) == before


def test_memory_store_remembers_deliveries() -> None:
    async def run() -> list[ApplyResult]:
        store = MemoryStore()
        change = Change(source="native", upsert={"m": "{}"}, stamp=1_000, delivery="d-1", delivery_ttl_s=300)
        stale = Change(
            source="native", upsert={"n": "{}"}, source_version=0, delivery="d-2", delivery_ttl_s=300
        )
        versioned = Change(source="native", upsert={"v": "{}"}, source_version=1)
        return [
            await store.apply(versioned),
            await store.apply(change),
            await store.apply(change),
            await store.apply(stale),
            await store.apply(
                Change(source="native", upsert={"n": "{}"}, delivery="d-2", delivery_ttl_s=300)
            ),
        ]

    results = [(r.status, r.version, r.changed) for r in asyncio.run(run())]
    assert results == [
        ("applied", 1, ["v"]),
        ("applied", 2, ["m"]),
        ("duplicate", 2, []),
        ("stale", 2, []),
        ("applied", 3, ["n"]),
    ]


# --- properties: replays, and the two stores agreeing ------------------------------------------------

KEYS = ("a", "b", "c")
BASE_MS = 1_700_000_000_000
texts = st.builds(
    lambda on, note: stored_text({"enabled": on, "note": note}), st.booleans(), st.sampled_from("xy")
)
# an updatedAt, as ms after the signing time of the change before (an updatedAt is when the flag was
# changed: after anything signed earlier), up to a little past the change's own signing time
own_versions = st.none() | st.integers(1, 40_000)


@st.composite
def native_changes(draw: st.DrawFn) -> list[tuple[str, dict[str, Any]]]:
    """Webhook patches and documents and admin writes, as (kind, Change arguments), in order."""
    out: list[tuple[str, dict[str, Any]]] = []
    for _ in range(draw(st.integers(1, 10))):
        kind = draw(st.sampled_from(["patch", "patch", "document", "admin-put", "admin-delete"]))
        if kind == "admin-put":
            out.append((kind, {"upsert": {draw(st.sampled_from(KEYS)): draw(texts)}, "supersede": True}))
        elif kind == "admin-delete":
            out.append((kind, {"delete": [draw(st.sampled_from(KEYS))], "supersede": True}))
        else:
            chosen = draw(st.lists(st.sampled_from(KEYS), unique=True, max_size=3))
            upserted = chosen if kind == "document" else chosen[: draw(st.integers(0, len(chosen)))]
            versions = {k: v for k in upserted if (v := draw(own_versions)) is not None}
            out.append(
                (
                    kind,
                    {
                        "upsert": {k: draw(texts) for k in upserted},
                        "delete": [] if kind == "document" else [k for k in chosen if k not in upserted],
                        "replace": kind == "document",
                        "item_versions": versions,
                    },
                )
            )
    return out


def stamped(changes: list[tuple[str, dict[str, Any]]], gaps: list[int]) -> list[tuple[str, Change]]:
    """Each change signed a whole number of seconds after the one before; its updatedAt offsets
    counted from the signing time of the one before."""
    at, out = BASE_MS, []
    for (kind, arguments), gap in zip(changes, gaps, strict=False):
        versions = {k: at + offset for k, offset in arguments.get("item_versions", {}).items()}
        at += gap * 1000
        out.append((kind, Change(source="native", stamp=at, **{**arguments, "item_versions": versions})))
    return out


def state_of(state: RawState) -> tuple[Any, Any]:
    return state.data.get("native", {}).get("flags", {}), state.item_versions.get("native", {}).get(
        "flags", {}
    )


@settings(max_examples=300, deadline=None)
@given(changes=native_changes(), gaps=st.lists(st.integers(1, 20), min_size=10, max_size=10), data=st.data())
def test_replaying_any_earlier_webhook_changes_nothing(
    changes: list[tuple[str, dict[str, Any]]], gaps: list[int], data: st.DataObject
) -> None:
    """Whatever was written in order, signed in later seconds, with each updatedAt later than the
    write before was signed: replays of the webhooks among them, in any order, leave every flag and
    version as it was (an admin write is no webhook: not replayed)."""
    sequence = stamped(changes, gaps)
    state = RawState()
    for _, change in sequence:
        apply_change(state, change)
    before = json.dumps(state_of(state), sort_keys=True)
    webhooks = [change for kind, change in sequence if not kind.startswith("admin")]
    for change in data.draw(st.lists(st.sampled_from(webhooks), max_size=6)) if webhooks else []:
        result = apply_change(state, change)
        assert (result.status, result.changed) == ("unchanged", [])
    assert json.dumps(state_of(state), sort_keys=True) == before


def summary(result: ApplyResult) -> tuple[Any, ...]:
    return (
        result.status,
        result.version,
        sorted(result.changed),
        sorted(result.ignored),
        result.stored_source_version,
    )


def comparable(state: RawState) -> tuple[Any, ...]:
    def non_empty(tree: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {s: {k: v for k, v in kinds.items() if v} for s, kinds in tree.items() if any(kinds.values())}

    sources = {s: kinds for s, kinds in state.source_versions.items() if kinds}
    return (state.version, non_empty(state.data), non_empty(state.item_versions), sources)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    changes=native_changes(),
    gaps=st.lists(st.integers(0, 2), min_size=10, max_size=10),
    source_versions=st.lists(st.none() | st.integers(0, 4), min_size=10, max_size=10),
    deliveries=st.lists(st.none() | st.sampled_from(["d1", "d2"]), min_size=10, max_size=10),
    replays=st.lists(st.integers(0, 9), max_size=4),
)
def test_redis_and_memory_agree_on_stamps_tombstones_documents_and_deliveries(
    redis_server: RedisServer,
    changes: list[tuple[str, dict[str, Any]]],
    gaps: list[int],
    source_versions: list[int | None],
    deliveries: list[str | None],
    replays: list[int],
) -> None:
    """Random changes (same-second stamps, source versions, delivery ids, replays) through the Lua
    script and ``apply_change``: the same answers and the same state."""
    sequence = [
        Change(
            source=change.source,
            upsert=change.upsert,
            delete=change.delete,
            replace=change.replace,
            item_versions=change.item_versions,
            stamp=change.stamp,
            supersede=change.supersede,
            source_version=version,
            delivery=delivery or "",
            delivery_ttl_s=300 if delivery else 0,
        )
        for (_, change), version, delivery in zip(
            stamped(changes, gaps), source_versions, deliveries, strict=False
        )
    ]
    sequence += [sequence[i] for i in replays if i < len(sequence)]
    namespace = unique_namespace("replay-parity")

    async def run() -> None:
        memory = MemoryStore()
        settings = StoreSettings(redis_url=redis_server.url, environment=namespace)
        redis = RedisStore(settings, fallback=RawState, compiler=DEFAULT)
        try:
            for index, change in enumerate(sequence):
                want, got = await memory.apply(change), await redis.apply(change)
                assert summary(got) == summary(want), f"change #{index}: {change}"
            state, _ = await redis._read_state()
            assert comparable(state) == comparable(memory._state)
        finally:
            await redis.close()

    asyncio.run(run())
