"""Client-steered trimming: a client sizes its own headers to choose which flags the origin loses.
Flags marked ``"required": true`` are never trimmed (the request is refused with 431 when they cannot
fit), and ``X-Feature-Flags-Omitted-Keys`` names what was left out when room allows."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import raw_exchange, raw_request

from proxy.dataplane.header_fit import FlagHeaders, RequiredFlagsDoNotFit, line_size
from proxy.engine.native import compile_document
from proxy.engine.plan import TrimPlan
from proxy.origin import verify_flags

SECRET = "required-flags-signing-secret-0123"
FLAGS = {
    "flags": {
        "kill-switch": {"enabled": False, "required": True},
        "price": {
            "required": True,
            "variants": {"low": {"weight": 1, "config": {"usd": 1.99}}},
        },
        "big": {"priority": -5, "variants": {"on": {"weight": 1, "config": {"blob": "b" * 300}}}},
        **{f"extra-{i:02d}": {"priority": i} for i in range(20)},
    }
}
LIMIT = 1500
HEADERS = FlagHeaders()


def test_required_must_be_a_boolean() -> None:
    with pytest.raises(ValueError, match=r"required: expected true or false"):
        compile_document({"flags": {"a": {"required": "yes"}}})


@pytest.fixture(scope="module")
def proxy(proxy_factory: Any, origin: Any) -> Any:
    config = f'[header]\nlimit_bytes = {LIMIT}\nreserve_bytes = 0\nsignature_secret = "{SECRET}"\n'
    return proxy_factory([origin.url], config=config, flags=FLAGS)


def send(proxy: Any, origin: Any, path: str, pad: int) -> tuple[Any, Any]:
    response = raw_exchange(proxy.port, raw_request("GET", path, [("X-Pad", "p" * pad)]))
    seen = origin.requests_to(path)
    return response, seen[-1] if seen else None


def test_padding_trims_the_others_but_never_a_required_flag(proxy: Any, origin: Any) -> None:
    _, whole = send(proxy, origin, "/req/whole", 0)
    assert whole.value("X-Feature-Flags-Omitted") is None
    spare = LIMIT - len(whole.head)
    # a little too much padding: the lowest-priority config goes, which leaves room to name it
    response, seen = send(proxy, origin, "/req/a", spare + 20)
    assert response.status == 200 and len(seen.head) <= LIMIT
    values = json.loads(seen.value("X-Feature-Flags"))
    assert set(values) == set(FLAGS["flags"])
    configs = json.loads(seen.value("X-Feature-Flags-Config"))
    assert "big" not in configs and configs["price"] == {"usd": 1.99}
    assert seen.value("X-Feature-Flags-Omitted") == "1"
    assert json.loads(seen.value("X-Feature-Flags-Omitted-Keys")) == ["big"]
    # the signature covers the omitted keys: an origin verifies them with proxy.origin
    headers = [(n.decode(), v.decode()) for n, v in seen.headers]
    assert verify_flags(headers, SECRET, method="GET", path="/req/a") == values
    forged = [(n, '["extra-00"]' if n.lower().endswith("omitted-keys") else v) for n, v in headers]
    with pytest.raises(ValueError, match="does not match"):
        verify_flags(forged, SECRET, method="GET", path="/req/a")

    # much more padding: values go too, lowest priority first, the required ones stay whole
    response, seen = send(proxy, origin, "/req/b", spare + 400)
    assert response.status == 200 and len(seen.head) <= LIMIT
    values = json.loads(seen.value("X-Feature-Flags"))
    assert values["kill-switch"] is False and values["price"] == "low"
    assert json.loads(seen.value("X-Feature-Flags-Config"))["price"] == {"usd": 1.99}
    left_out = set(FLAGS["flags"]) - set(values)
    assert "extra-19" in values and "extra-00" in left_out  # priority decides
    assert int(seen.value("X-Feature-Flags-Omitted")) == len(left_out) + ("big" in values)
    keys = seen.value("X-Feature-Flags-Omitted-Keys")
    if keys is not None:
        assert set(json.loads(keys)) == left_out | ({"big"} if "big" in values else set())


def test_a_request_with_no_room_for_the_required_flags_is_refused_431(proxy: Any, origin: Any) -> None:
    response, seen = send(proxy, origin, "/req/c", LIMIT - 200)
    assert response.status == 431
    body = json.loads(response.body)
    assert body["error"] == "required_flags_do_not_fit"
    assert "kill-switch" in body["detail"] and "price" in body["detail"]
    assert seen is None  # nothing reached the origin


def test_keys_are_left_out_when_their_line_does_not_fit_but_the_count_stays() -> None:
    flags = compile_document({"flags": {f"flag-number-{i:03d}": {} for i in range(40)}})
    resolved = [(f, f.evaluate({"key": "u"})) for f in flags.values()]
    fitted = HEADERS.fit(resolved, 400)
    assert fitted.omitted > 0
    assert HEADERS.omitted_keys_header(fitted, 10) is None
    name, value = HEADERS.omitted_keys_header(fitted, 10_000) or (b"", b"")
    assert name == b"x-feature-flags-omitted-keys" and len(json.loads(value)) == fitted.omitted
    exact = line_size(name, len(value))
    assert HEADERS.omitted_keys_header(fitted, exact) is not None
    assert HEADERS.omitted_keys_header(fitted, exact - 1) is None


# --- the lazy fit agrees with the reference, required flags included --------------------------------


def random_document(rng: random.Random, count: int) -> dict[str, Any]:
    flags: dict[str, Any] = {}
    for i in range(count):
        definition: dict[str, Any] = {"priority": rng.randint(-3, 3), "required": rng.random() < 0.2}
        if rng.random() < 0.5:
            definition["variants"] = {
                f"v{j}": {"weight": 1, "config": {"x": "c" * rng.randint(0, 40)}}
                for j in range(rng.randint(1, 3))
            }
        flags[f"f{i:03d}-{'k' * rng.randint(0, 20)}"] = definition
    return {"flags": flags}


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32), count=st.integers(0, 40), available=st.integers(0, 3000))
def test_fit_plan_equals_fit_with_required_flags(seed: int, count: int, available: int) -> None:
    compiled = compile_document(random_document(random.Random(seed), count))
    ordered = tuple(compiled[k] for k in sorted(compiled))
    context = {"key": f"user-{seed}", "path": "/"}
    resolved = [(f, f.evaluate(context)) for f in ordered]
    try:
        expected = HEADERS.fit(resolved, available)
    except RequiredFlagsDoNotFit:
        with pytest.raises(RequiredFlagsDoNotFit):
            HEADERS.fit_plan(TrimPlan.of(ordered), context, available)
        return
    got, _ = HEADERS.fit_plan(TrimPlan.of(ordered), context, available)
    assert got.headers == expected.headers
    assert got.size == expected.size
    assert sorted(got.omitted_values) == sorted(expected.omitted_values)
    # the invariants: required entries are all there, whole; the headers fit
    values = json.loads(dict(got.headers).get(b"x-feature-flags", b"{}"))
    configs = json.loads(dict(got.headers).get(b"x-feature-flags-config", b"{}"))
    for flag, served in resolved:
        if flag.required:
            assert values[flag.key] == served.value
            if served.has_config:
                assert configs[flag.key] == served.config
    if not got.over_budget:
        assert got.size <= available


def test_the_refusal_threshold_is_the_required_line_plus_the_count_line() -> None:
    flags = compile_document({"flags": {"r": {"required": True}, "other": {}}})
    resolved = [(f, f.evaluate({"key": "u"})) for f in (flags["other"], flags["r"])]
    required_line = len(b'x-feature-flags: {"r":true}\r\n')
    count_line = len(b"x-feature-flags-omitted: 1\r\n")
    for available in range(0, 120):
        try:
            fitted = HEADERS.fit(resolved, available)
        except RequiredFlagsDoNotFit:
            assert available < required_line + count_line, available
            continue
        assert available >= required_line + count_line, available
        assert fitted.size <= available
        assert json.loads(dict(fitted.headers)[b"x-feature-flags"])["r"] is True
