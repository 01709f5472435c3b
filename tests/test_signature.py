"""Signed flag headers: the proxy signs, `proxy.origin.verify_flags` (stdlib only) checks."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from support import raw_exchange, raw_request

from proxy.origin import FlagSignatureError, sign, verify_flags

SECRET = "origin-shared-secret-0123456789"
FLAGS = {"flags": {"on": {"enabled": True}, "exp": {"variants": {"a": {"weight": 1, "config": {"x": 1}}}}}}


def signed_headers(**changes: str) -> dict[str, str]:
    now = int(time.time())
    headers = {"X-Feature-Flags": '{"on":true}', "X-Feature-Flags-Config": '{"exp":{"x":1}}'}
    headers |= changes
    headers["X-Feature-Flags-Signature"] = sign(
        SECRET, now, "GET", "/a?b=1", headers["X-Feature-Flags"], headers["X-Feature-Flags-Config"]
    )
    return headers


def test_verify_accepts_what_sign_produced() -> None:
    assert verify_flags(signed_headers(), SECRET, method="GET", path="/a?b=1") == {"on": True}
    as_pairs = list(signed_headers().items())
    assert verify_flags(as_pairs, SECRET) == {"on": True}


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda h: h.update({"X-Feature-Flags": '{"on":false}'}), "does not match"),
        (lambda h: h.update({"X-Feature-Flags-Config": "{}"}), "does not match"),
        (lambda h: h.update({"X-Feature-Flags-Omitted": "3"}), "does not match"),
        (lambda h: h.pop("X-Feature-Flags-Signature"), "no X-Feature-Flags-Signature"),
        (lambda h: h.update({"X-Feature-Flags-Signature": "garbage"}), "malformed"),
    ],
)
def test_tampered_or_missing_signatures_are_rejected(mutate, reason: str) -> None:
    headers = signed_headers()
    mutate(headers)
    with pytest.raises(FlagSignatureError, match=reason):
        verify_flags(headers, SECRET)


def test_wrong_secret_request_or_age_is_rejected() -> None:
    headers = signed_headers()
    with pytest.raises(FlagSignatureError):
        verify_flags(headers, "another-secret")
    with pytest.raises(FlagSignatureError, match="method"):
        verify_flags(headers, SECRET, method="POST")
    with pytest.raises(FlagSignatureError, match="path"):
        verify_flags(headers, SECRET, path="/other")
    with pytest.raises(FlagSignatureError, match="old"):
        verify_flags(headers, SECRET, max_age_s=60, now=time.time() + 120)


@pytest.fixture(scope="module")
def proxy(proxy_factory, origin):
    return proxy_factory([origin.url], flags=FLAGS, env={"FLAGPROXY_HEADER_SIGNATURE_SECRET": SECRET})


def test_the_proxy_signs_what_the_origin_receives(proxy, origin) -> None:
    httpx.get(f"{proxy.base_url}/signed/x?q=1", headers={"X-User-Id": "u1"})
    seen = origin.only_request_to("/signed/x")
    headers = [(n.decode(), v.decode()) for n, v in seen.headers]
    flags = verify_flags(headers, SECRET, method="GET", path="/signed/x?q=1")
    assert flags == json.loads(seen.value("X-Feature-Flags")) == {"exp": "a", "on": True}


def test_a_client_cannot_bring_its_own_signature(proxy, origin) -> None:
    forged = sign(SECRET[::-1], int(time.time()), "GET", "/forged", '{"on":false}')
    request = raw_request(
        "GET",
        "/forged",
        [("X-User-Id", "u2"), ("X-Feature-Flags", '{"on":false}'), ("X-Feature-Flags-Signature", forged)],
    )
    assert raw_exchange(proxy.port, request).status == 200
    seen = origin.only_request_to("/forged")
    assert seen.values("X-Feature-Flags-Signature") != [forged]
    assert verify_flags([(n.decode(), v.decode()) for n, v in seen.headers], SECRET)["on"] is True


def test_the_signature_counts_against_the_budget(proxy_factory, origin) -> None:
    env = {"FLAGPROXY_HEADER_SIGNATURE_SECRET": SECRET, "FLAGPROXY_HEADER_RESERVE_BYTES": "0"}
    big = {"flags": {f"f{i:03d}": {"variants": {"v": {"weight": 1, "config": "x" * 200}}} for i in range(60)}}
    tight = proxy_factory([origin.url], flags=big, env=env | {"FLAGPROXY_HEADER_LIMIT_BYTES": "4000"})
    httpx.get(f"{tight.base_url}/signed/budget", headers={"X-User-Id": "u3"})
    seen = origin.only_request_to("/signed/budget")
    assert len(seen.head) <= 4000
    assert int(seen.value("X-Feature-Flags-Omitted")) > 0
    verify_flags([(n.decode(), v.decode()) for n, v in seen.headers], SECRET, path="/signed/budget")


def test_a_custom_header_name_derives_and_reserves_every_flag_header(proxy_factory, origin) -> None:
    """[header] name = X-Flags: config, omitted and signature derive from it; forged signatures under
    the custom and the default names are dropped, and the origin gets exactly one, the proxy's."""
    env = {"FLAGPROXY_HEADER_SIGNATURE_SECRET": SECRET, "FLAGPROXY_HEADER_NAME": "X-Flags"}
    custom = proxy_factory([origin.url], flags=FLAGS, env=env)
    forged = sign(SECRET[::-1], int(time.time()), "GET", "/custom", '{"on":false}')
    spoofed = [
        ("X-User-Id", "u4"),
        ("X-Flags", '{"on":false}'),
        ("x-flags-signature", forged),
        ("X-FLAGS-CONFIG", '{"exp":{"x":2}}'),
        ("X-Feature-Flags", '{"on":false}'),
        ("X-Feature-Flags-Signature", forged),
        ("x-feature-flags-signature", forged),
    ]
    assert raw_exchange(custom.port, raw_request("GET", "/custom", spoofed)).status == 200
    seen = origin.only_request_to("/custom")
    names = [n.decode().lower() for n, _ in seen.headers]
    signatures = [n for n in names if n.endswith("-signature")]
    assert signatures == ["x-flags-signature"]
    assert names.count("x-flags") == 1 and names.count("x-flags-config") == 1
    assert not any(n.startswith("x-feature-flags") for n in names)
    headers = [(n.decode(), v.decode()) for n, v in seen.headers]
    assert seen.values("X-Flags-Signature") != [forged]
    flags = verify_flags(headers, SECRET, method="GET", path="/custom", names="X-Flags")
    assert flags == {"exp": "a", "on": True}
    with pytest.raises(FlagSignatureError, match="no X-Feature-Flags-Signature"):
        verify_flags(headers, SECRET)  # the default names are not what this proxy sends
