"""Header rules, in process and table-driven: one case per hop-by-hop header, each with and without a
``Connection`` token naming it, both directions."""

from __future__ import annotations

import pytest

from proxy.dataplane.header_fit import FlagHeaders
from proxy.dataplane.header_rules import BadRequest, RequestRules, response_lines

HOP_BY_HOP = [
    ("Connection", "keep-alive"),
    ("Keep-Alive", "timeout=5"),
    ("Proxy-Connection", "keep-alive"),
    ("TE", "gzip"),
    ("Trailer", "X-Checksum"),
    ("Transfer-Encoding", "chunked"),
    ("Upgrade", "h2c"),
    ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
    ("Proxy-Authenticate", "Basic"),
]
RULES = RequestRules(is_reserved=FlagHeaders().is_reserved)


def rewrite(
    headers: list[tuple[bytes, bytes]], upgrade: bytes | None = None, rules: RequestRules = RULES
) -> bytes:
    lowered = [name.lower() for name, _ in headers]
    lines = rules.rewrite(headers, lowered, "10.0.0.1", b"1.1", b"origin:80", False, b"rid-1", upgrade)
    return b"".join(lines)


def encoded(pairs: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(n.encode(), v.encode()) for n, v in pairs]


@pytest.mark.parametrize(("name", "value"), HOP_BY_HOP, ids=[n for n, _ in HOP_BY_HOP])
@pytest.mark.parametrize("named", [False, True], ids=["plain", "named-by-connection"])
def test_request_hop_by_hop_headers_never_reach_the_origin(name: str, value: str, named: bool) -> None:
    headers = [("Host", "a.example"), (name, value), ("X-Keep", "1")]
    if named:
        headers.append(("Connection", name))
    out = rewrite(encoded(headers)).lower()
    assert name.lower().encode() + b":" not in out
    assert b"x-keep: 1\r\n" in out and out.startswith(b"host: a.example\r\n")


@pytest.mark.parametrize(("name", "value"), HOP_BY_HOP, ids=[n for n, _ in HOP_BY_HOP])
@pytest.mark.parametrize("named", [False, True], ids=["plain", "named-by-connection"])
def test_response_hop_by_hop_headers_never_reach_the_client(name: str, value: str, named: bool) -> None:
    headers = [("Content-Type", "text/plain"), (name, value), ("X-Keep", "1")]
    if named:
        headers.append(("Connection", name))
    lines, _, _ = response_lines(encoded(headers), upgrade=False)
    out = b"".join(lines).lower()
    assert name.lower().encode() + b":" not in out
    assert out == b"content-type: text/plain\r\nx-keep: 1\r\n"


def test_headers_a_connection_token_names_are_dropped_both_ways() -> None:
    headers = encoded(
        [("Host", "a"), ("X-Secret-Hop", "s"), ("Connection", "x-secret-hop, close"), ("X-End", "e")]
    )
    assert b"x-secret-hop" not in rewrite(headers).lower()
    lines, _, _ = response_lines(
        encoded([("X-Secret-Hop", "s"), ("Connection", "X-Secret-Hop"), ("X-End", "e")]), upgrade=False
    )
    assert b"".join(lines) == b"X-End: e\r\n"


def test_te_trailers_survives_as_the_proxys_own_te() -> None:
    out = rewrite(encoded([("Host", "a"), ("TE", "trailers, deflate")]))
    assert out.endswith(b"TE: trailers\r\nConnection: TE\r\nX-Request-Id: rid-1\r\n")


def test_an_upgrade_keeps_upgrade_and_connection_upgrade() -> None:
    out = rewrite(
        encoded([("Host", "a"), ("Connection", "Upgrade"), ("Upgrade", "websocket")]), upgrade=b"websocket"
    )
    assert b"\r\nUpgrade: websocket\r\n" in out and b"\r\nConnection: Upgrade\r\n" in out
    lines, _, _ = response_lines(encoded([("Upgrade", "websocket"), ("Connection", "Upgrade")]), upgrade=True)
    assert b"".join(lines) == b"Upgrade: websocket\r\nConnection: Upgrade\r\n"


def test_names_keep_their_case_and_order_and_values_their_bytes() -> None:
    headers = [(b"hOsT", b"a"), (b"X-Z", b"caf\xe9"), (b"x-a", b"\xe2\x82\xac"), (b"X-Z", b"2")]
    out = rewrite(headers)
    assert out.startswith(b"hOsT: a\r\nX-Z: caf\xe9\r\nx-a: \xe2\x82\xac\r\nX-Z: 2\r\n")


@pytest.mark.parametrize("name", ["X-Feature-Flags", "x-feature-flags-config", "X-FEATURE-FLAGS-Omitted"])
def test_client_flag_headers_are_dropped(name: str) -> None:
    out = rewrite(encoded([("Host", "a"), (name, '{"evil":true}')]))
    assert b"evil" not in out


def test_forwarding_headers_from_untrusted_peers_are_replaced() -> None:
    out = rewrite(encoded([("Host", "a"), ("X-Forwarded-For", "1.2.3.4"), ("Forwarded", "for=1.2.3.4")]))
    assert b"1.2.3.4" not in out
    assert b"X-Forwarded-For: 10.0.0.1\r\n" in out and b"X-Forwarded-Host: a\r\n" in out


def test_forwarding_headers_from_trusted_peers_are_extended() -> None:
    import ipaddress

    trusting = RequestRules(
        is_reserved=FlagHeaders().is_reserved, trusted=(ipaddress.ip_network("10.0.0.0/8"),)
    )
    out = rewrite(encoded([("Host", "a"), ("X-Forwarded-For", "1.2.3.4")]), rules=trusting)
    assert b"X-Forwarded-For: 1.2.3.4, 10.0.0.1\r\n" in out


def test_expect_is_dropped_unless_forwarded() -> None:
    headers = encoded([("Host", "a"), ("Expect", "100-continue")])
    assert b"expect" not in rewrite(headers).lower()
    forwarding = RequestRules(is_reserved=FlagHeaders().is_reserved, forward_expect=True)
    assert b"Expect: 100-continue\r\n" in rewrite(headers, rules=forwarding)


def test_host_rules() -> None:
    with pytest.raises(BadRequest):
        rewrite(encoded([("Host", "a"), ("Host", "b")]))
    with pytest.raises(BadRequest):
        rewrite(encoded([("X-No-Host", "1")]))
    lines = RULES.rewrite([], [], None, b"1.0", b"origin:80", False, b"r", None)
    assert lines[0] == b"Host: origin:80\r\n"  # HTTP/1.0 without Host: the origin speaks 1.1


@pytest.mark.parametrize("value", [b"5 ", b"+5", b"0x5", b"-1", b""])
def test_response_content_length_must_be_digits(value: bytes) -> None:
    with pytest.raises(ValueError):
        response_lines([(b"Content-Length", value)], upgrade=False)


def test_response_content_length_duplicates() -> None:
    lines, length, _ = response_lines([(b"Content-Length", b"5"), (b"content-length", b"5")], upgrade=False)
    assert (b"".join(lines), length) == (b"Content-Length: 5\r\n", b"5")
    with pytest.raises(ValueError):
        response_lines([(b"Content-Length", b"5"), (b"Content-Length", b"6")], upgrade=False)


def test_the_origins_request_id_is_replaced() -> None:
    lines, _, _ = response_lines([(b"X-Request-Id", b"origin-own"), (b"X-Other", b"1")], upgrade=False)
    assert b"".join(lines) == b"X-Other: 1\r\n"
