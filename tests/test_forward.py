"""End-to-end tests of the data plane: the real ``flagproxy serve`` between a raw client and a raw origin.

Every test talks to real sockets on 127.0.0.1; the origin records requests byte for byte
(``support.RawOrigin``) and answers with scripted raw responses.
"""

from __future__ import annotations

import concurrent.futures
import functools
import gzip
import hashlib
import json
import socket
import struct
import time
from collections.abc import Callable

import httpx
import pytest
from support import (
    LOCALHOST,
    ProxyProcess,
    RawOrigin,
    RssSampler,
    body_report,
    chunked_response,
    close_without_reply,
    free_port,
    http_response,
    never_reply,
    pattern_chunks,
    pattern_digest,
    raw_exchange,
    raw_request,
    read_response,
    run_serve,
    stall_after_first_chunk,
    streamed,
    trickle,
)

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
BIG = 128 * MiB  # larger than every buffer on the way (the proxy's, kernel socket buffers)
RSS_LIMIT = 64 * MiB

# --- flags the proxies are seeded with, and what they must produce, derived by hand ---------------

FLAGS = {
    "flags": {
        "new-checkout": {"enabled": True},
        "legacy-banner": {"enabled": False},
        "zero-rollout": {"enabled": True, "percentage": 0},
        "search-algo": {
            "variants": {"bm25": {"weight": 100}, "vector": {"weight": 0}},
            "defaultVariant": "vector",
        },
        "theme": {
            "variants": {
                "dark": {"weight": 100, "config": {"accent": "#111", "density": 2}},
                "light": {"weight": 0, "config": {"accent": "#fff"}},
            },
            "defaultVariant": "light",
            "routes": ["/cfg/**"],
        },
    }
}
# Everywhere: two booleans as defined, a 0 % rollout is off, the only weighted variant wins.
EXPECTED_FLAGS = {"new-checkout": True, "legacy-banner": False, "zero-rollout": False, "search-algo": "bm25"}
# Under /cfg/ the routed variant flag applies too, and its variant carries a config.
EXPECTED_FLAGS_CFG = {**EXPECTED_FLAGS, "theme": "dark"}
EXPECTED_CONFIG_CFG = {"theme": {"accent": "#111", "density": 2}}

# What the proxy adds to every forwarded request (lower case), whatever the client sent.
PROXY_ADDED = {
    "host",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "via",
    "x-request-id",
    "x-feature-flags",
}


@functools.cache
def digest_of_pattern(total: int) -> str:
    return pattern_digest(total)


def assert_json_error(response, status: int, error: str) -> dict:
    assert response.status == status, response.head
    assert response.value("content-type") == "application/json"
    body = response.json()
    assert set(body) == {"error", "detail"}
    assert body["error"] == error
    assert isinstance(body["detail"], str) and body["detail"]
    assert b"Traceback" not in response.body and b'File "' not in response.body
    return body


# --- proxies ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def proxy(proxy_factory: Callable[..., ProxyProcess], origin: RawOrigin) -> ProxyProcess:
    """Defaults: no trusted proxies, host preserved, seeded flags."""
    return proxy_factory([origin.url], flags=FLAGS)


@pytest.fixture(scope="module")
def trusted_proxies(proxy_factory, origin) -> dict[str, ProxyProcess]:
    """The same trust list once from the TOML file (plus rewrite_host) and once from the environment."""
    config = '[proxy]\ntrusted_proxies = ["127.0.0.1/32", "127.0.0.2/32"]\nrewrite_host = true\n'
    env = {"FLAGPROXY_PROXY_TRUSTED_PROXIES": "127.0.0.1/32,127.0.0.2/32"}
    return {
        "file": proxy_factory([origin.url], config=config, flags=FLAGS),
        "env": proxy_factory([origin.url], env=env, flags=FLAGS),
    }


@pytest.fixture(scope="module")
def dead_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def timeout_proxy(proxy_factory, origin, dead_port) -> ProxyProcess:
    return proxy_factory(
        [f"/down=http://{LOCALHOST}:{dead_port}", origin.url],
        env={"FLAGPROXY_UPSTREAM_READ_TIMEOUT_S": "0.5"},
        flags=FLAGS,
    )


# --- 1. hop-by-hop headers --------------------------------------------------------------------------


def test_request_hop_by_hop_headers_are_not_forwarded(proxy: ProxyProcess, origin: RawOrigin) -> None:
    request = raw_request(
        "GET",
        "/hop/request",
        [
            ("Connection", "keep-alive, X-Foo"),
            ("X-Foo", "named-by-connection"),
            ("Keep-Alive", "timeout=5, max=100"),
            ("Proxy-Connection", "keep-alive"),
            ("TE", "gzip, deflate"),
            ("Trailer", "X-Checksum"),
            ("Upgrade", "websocket"),
            ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
            ("X-Keep", "kept"),
            ("Authorization", "Bearer end-to-end"),
        ],
    )
    assert raw_exchange(proxy.port, request).status == 200

    seen = origin.only_request_to("/hop/request")
    assert set(seen.names) == PROXY_ADDED | {"x-keep", "authorization"}, seen.head
    assert seen.value("X-Keep") == "kept"
    assert seen.value("Authorization") == "Bearer end-to-end"
    assert b"named-by-connection" not in seen.head


def test_te_trailers_survives_with_its_own_connection_token(proxy, origin) -> None:
    sent = [("TE", "trailers"), ("Connection", "TE, X-Gone"), ("X-Gone", "1")]
    request = raw_request("GET", "/hop/te", sent)
    assert raw_exchange(proxy.port, request).status == 200

    seen = origin.only_request_to("/hop/te")
    assert seen.value("TE") == "trailers"
    # The proxy's own Connection header, listing only TE: nothing the client named comes through.
    assert seen.value("Connection") == "TE"
    assert "x-gone" not in seen.names


def test_client_connection_close_does_not_close_the_upstream_connection(proxy, origin) -> None:
    assert raw_exchange(proxy.port, raw_request("GET", "/hop/close-warmup")).status == 200
    before = origin.total_connections
    for i in range(3):
        response = raw_exchange(proxy.port, raw_request("GET", f"/hop/close/{i}", [("Connection", "close")]))
        assert response.status == 200
        assert response.value("connection") == "close"  # the proxy's own answer to the client
        seen = origin.only_request_to(f"/hop/close/{i}")
        assert seen.value("Connection") is None
    assert origin.total_connections == before, "the pooled upstream connection was not reused"


def test_chunked_request_is_reframed_not_passed_through(proxy, origin) -> None:
    body = b"5;ext=ignored\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\n\r\n"
    request = raw_request("POST", "/hop/chunked", [("Transfer-Encoding", "chunked")], body)
    assert raw_exchange(proxy.port, request).status == 200

    seen = origin.only_request_to("/hop/chunked")
    assert seen.body == b"hello world"
    assert seen.values("Transfer-Encoding") == ["chunked"]  # the proxy's framing, exactly once
    assert seen.value("Content-Length") is None
    assert b"ext=ignored" not in seen.head


def test_a_second_host_header_is_rejected(proxy, origin) -> None:
    request = raw_request("GET", "/hop/two-hosts", [("Host", "other.example")])
    assert_json_error(raw_exchange(proxy.port, request), 400, "bad_request")
    assert origin.requests_to("/hop/two-hosts") == []


def test_http11_without_host_is_rejected_http10_gets_the_origin_host(proxy, origin) -> None:
    response = raw_exchange(proxy.port, raw_request("GET", "/hop/nohost", host=None))
    assert response.status == 400
    assert b"Host" in response.body
    assert origin.requests_to("/hop/nohost") == []
    reply = raw_exchange(proxy.port, b"GET /hop/nohost10 HTTP/1.0\r\n\r\n")
    assert reply.status == 200
    seen = origin.only_request_to("/hop/nohost10")
    assert seen.values("Host") == [f"127.0.0.1:{origin.port}"]


def test_a_host_trailer_field_cannot_replace_the_host(proxy, origin) -> None:
    body = b"3\r\nabc\r\n0\r\nHost: evil.example\r\n\r\n"
    request = raw_request("POST", "/hop/host-trailer", [("Transfer-Encoding", "chunked")], body)
    response = raw_exchange(proxy.port, request)
    assert response.status == 200  # trailer fields are not part of the header section
    seen = origin.only_request_to("/hop/host-trailer")
    assert seen.values("Host") == ["test.example"]
    assert b"evil" not in seen.head


def test_trailer_fields_are_not_merged_into_the_header_section(proxy, origin) -> None:
    body = b"3\r\nabc\r\n0\r\nX-Trailer: t\r\nX-User-Id: someone-else\r\n\r\n"
    request = raw_request("POST", "/hop/trailer", [("Transfer-Encoding", "chunked")], body)
    assert raw_exchange(proxy.port, request).status == 200
    seen = origin.only_request_to("/hop/trailer")
    assert seen.body == b"abc"
    assert "x-trailer" not in seen.names and "x-user-id" not in seen.names


def test_non_ascii_header_values_are_not_re_encoded(proxy, origin) -> None:
    request = b"GET /hop/bytes HTTP/1.1\r\nHost: test.example\r\nX-Utf8: caf\xc3\xa9 \xe2\x82\xac\r\n\r\n"
    assert raw_exchange(proxy.port, request).status == 200
    seen = origin.only_request_to("/hop/bytes")
    assert b"\r\nX-Utf8: caf\xc3\xa9 \xe2\x82\xac\r\n" in seen.head  # name, case and bytes as sent


def test_header_values_that_are_not_utf8_pass_byte_exact(proxy, origin) -> None:
    # obs-text (RFC 9110 §5.5): the proxy relays the bytes; it never decodes or re-encodes them.
    request = b"GET /hop/obs-text HTTP/1.1\r\nHost: test.example\r\nX-Obs-Text: caf\xe9\r\n\r\n"
    assert raw_exchange(proxy.port, request).status == 200
    assert b"\r\nX-Obs-Text: caf\xe9\r\n" in origin.only_request_to("/hop/obs-text").head


def test_non_ascii_response_header_values_pass_byte_exact(proxy, origin) -> None:
    raw = b"HTTP/1.1 200 OK\r\nX-R: caf\xc3\xa9 \xe9\r\nContent-Length: 0\r\n\r\n"
    origin.route("/hop/response-bytes", raw)
    response = raw_exchange(proxy.port, raw_request("GET", "/hop/response-bytes"))
    assert response.status == 200
    assert b"\r\nX-R: caf\xc3\xa9 \xe9\r\n" in response.head


def test_expect_100_continue_is_honoured_end_to_end(proxy, origin) -> None:
    with socket.create_connection((LOCALHOST, proxy.port), timeout=10) as sock:
        sock.sendall(raw_request("PUT", "/hop/expect", [("Content-Length", "5"), ("Expect", "100-continue")]))
        interim = read_response(sock)
        assert interim.status == 100
        sock.sendall(b"hello")
        final = read_response(sock)
    assert final.status == 200
    seen = origin.only_request_to("/hop/expect")
    assert seen.body == b"hello"


def test_response_hop_by_hop_headers_are_not_returned(proxy, origin) -> None:
    origin.route(
        "/hop/response",
        http_response(
            200,
            [
                ("Connection", "X-Bar, keep-alive"),
                ("X-Bar", "1"),
                ("Keep-Alive", "timeout=5"),
                ("Proxy-Authenticate", 'Basic realm="origin"'),
                ("Proxy-Connection", "keep-alive"),
                ("Trailer", "X-Checksum"),
                ("Upgrade", "h2c"),
                ("X-Kept", "yes"),
                ("Content-Type", "text/plain"),
                ("Cache-Control", "no-store"),
            ],
            b"body",
        ),
    )
    # With a caller key the proxy adds no sticky anonymous cookie: only the origin's headers come back.
    response = raw_exchange(proxy.port, raw_request("GET", "/hop/response", [("X-User-Id", "u1")]))

    assert response.status == 200
    assert response.body == b"body"
    assert set(response.names) == {
        "x-kept",
        "content-type",
        "cache-control",
        "content-length",
        "x-request-id",
    }, response.head
    assert response.value("x-kept") == "yes"
    assert response.value("cache-control") == "no-store"


def test_chunked_response_is_reframed_for_the_client(proxy, origin) -> None:
    origin.route(
        "/hop/chunked-response",
        chunked_response(200, [("Trailer", "X-Sum"), ("X-Kept", "1")], [b"abc", b"def" * 1000]),
    )
    response = raw_exchange(proxy.port, raw_request("GET", "/hop/chunked-response"))
    assert response.status == 200
    assert response.body == b"abc" + b"def" * 1000
    assert response.values("transfer-encoding") == ["chunked"]
    assert "trailer" not in response.names
    assert response.value("x-kept") == "1"


# --- 2. X-Forwarded-* and Via -------------------------------------------------------------------------

SPOOFED_FORWARDING = [
    ("Host", "app.example:8443"),
    ("X-Forwarded-For", "6.6.6.6"),
    ("X-Forwarded-For", "7.7.7.7"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "evil.example"),
    ("Forwarded", "for=6.6.6.6;proto=https"),
    ("Via", "1.0 edge-cache"),
]

# 127.0.0.1 is the address uvicorn's own proxy_headers trusts by default (it must stay off); 127.0.0.2
# is any other loopback peer.
SOURCES = ["127.0.0.1", "127.0.0.2"]


@pytest.mark.parametrize("source", SOURCES)
def test_forwarding_headers_from_an_untrusted_peer_are_replaced(proxy, origin, source: str) -> None:
    path = f"/fwd/untrusted/{source}"
    request = raw_request("GET", path, SPOOFED_FORWARDING, host=None)
    assert raw_exchange(proxy.port, request, source).status == 200

    seen = origin.only_request_to(path)
    assert seen.values("X-Forwarded-For") == [source]
    assert seen.values("X-Forwarded-Proto") == ["http"]
    assert seen.values("X-Forwarded-Host") == ["app.example:8443"]
    assert seen.values("Forwarded") == []
    assert seen.values("Via") == ["1.0 edge-cache, 1.1 flagproxy"]
    assert seen.values("Host") == ["app.example:8443"]  # preserved by default


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("configured_by", ["file", "env"])
def test_forwarding_headers_from_a_trusted_peer_are_extended(
    trusted_proxies, origin, configured_by: str, source: str
) -> None:
    proxy = trusted_proxies[configured_by]
    path = f"/fwd/trusted/{configured_by}/{source}"
    request = raw_request("GET", path, SPOOFED_FORWARDING, host=None)
    assert raw_exchange(proxy.port, request, source).status == 200

    seen = origin.only_request_to(path)
    assert seen.values("X-Forwarded-For") == [f"6.6.6.6, 7.7.7.7, {source}"]
    assert seen.values("X-Forwarded-Proto") == ["https"]
    assert seen.values("X-Forwarded-Host") == ["evil.example"]
    assert seen.values("Forwarded") == ["for=6.6.6.6;proto=https"]
    assert seen.values("Via") == ["1.0 edge-cache, 1.1 flagproxy"]
    if configured_by == "file":  # this one also has rewrite_host = true
        assert seen.values("Host") == [f"{LOCALHOST}:{origin.port}"]
    else:
        assert seen.values("Host") == ["app.example:8443"]


def test_via_is_added_when_the_client_sent_none(proxy, origin) -> None:
    assert raw_exchange(proxy.port, raw_request("GET", "/fwd/via")).status == 200
    seen = origin.only_request_to("/fwd/via")
    assert seen.values("Via") == ["1.1 flagproxy"]
    assert seen.values("Host") == ["test.example"]


# --- 3./4. the flag headers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "flags", "config"),
    [("/flags/plain", EXPECTED_FLAGS, None), ("/cfg/spoofed", EXPECTED_FLAGS_CFG, EXPECTED_CONFIG_CFG)],
)
def test_spoofed_flag_headers_are_replaced_by_the_proxys_own(proxy, origin, path, flags, config) -> None:
    spoofed = [
        ("X-Feature-Flags", '{"legacy-banner":true,"new-checkout":false}'),
        ("x-feature-flags-config", '{"theme":{"accent":"#bad"}}'),
        ("X-FEATURE-FLAGS-Anything", "1"),
        ("X-Feature-Flags", '{"injected":true}'),
    ]
    assert raw_exchange(proxy.port, raw_request("GET", path, spoofed)).status == 200

    seen = origin.only_request_to(path)
    assert len(seen.values("X-Feature-Flags")) == 1
    assert json.loads(seen.value("X-Feature-Flags")) == flags
    assert [n for n in seen.names if n.startswith("x-feature-flags-")] == (
        ["x-feature-flags-config"] if config else []
    )
    if config:
        assert json.loads(seen.value("X-Feature-Flags-Config")) == config
    assert b"#bad" not in seen.head and b"injected" not in seen.head


def compact(value: str) -> str:
    """Re-encode JSON compactly, keeping member order: equal to the input iff the input was compact."""
    return json.dumps(json.loads(value), separators=(",", ":"), ensure_ascii=True)


def test_flag_header_is_compact_json_with_config_only_when_a_variant_has_one(proxy, origin) -> None:
    assert raw_exchange(proxy.port, raw_request("GET", "/cfg/page")).status == 200
    assert raw_exchange(proxy.port, raw_request("GET", "/flags/page")).status == 200

    with_config = origin.only_request_to("/cfg/page")
    raw_flags = with_config.value("X-Feature-Flags")
    assert raw_flags == compact(raw_flags)
    assert json.loads(raw_flags) == EXPECTED_FLAGS_CFG
    assert '"new-checkout":true' in raw_flags and '"legacy-banner":false' in raw_flags
    assert '"theme":"dark"' in raw_flags and '"search-algo":"bm25"' in raw_flags
    raw_config = with_config.value("X-Feature-Flags-Config")
    assert raw_config == compact(raw_config)
    assert json.loads(raw_config) == EXPECTED_CONFIG_CFG

    without_config = origin.only_request_to("/flags/page")
    assert json.loads(without_config.value("X-Feature-Flags")) == EXPECTED_FLAGS
    assert without_config.value("X-Feature-Flags-Config") is None


# --- 5. streaming, memory ---------------------------------------------------------------------------


def report_rss(label: str, sampler: RssSampler) -> None:
    print(
        f"\n[rss] {label}: baseline {sampler.baseline / MiB:.1f} MiB, peak {sampler.peak / MiB:.1f} MiB, "
        f"growth {sampler.growth / MiB:.1f} MiB"
    )


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_large_upload_streams_through_complete(proxy, origin, framing: str) -> None:
    path = f"/stream/upload/{framing}"
    origin.route(path, body_report())
    headers = {"Content-Type": "application/octet-stream"}
    if framing == "content-length":
        headers["Content-Length"] = str(BIG)
    with RssSampler(proxy) as rss, httpx.Client(timeout=30) as client:
        response = client.post(proxy.base_url + path, content=pattern_chunks(BIG), headers=headers)
    report_rss(f"upload {BIG // MiB} MiB ({framing})", rss)

    assert response.status_code == 200
    assert response.json() == {"length": BIG, "sha256": digest_of_pattern(BIG)}
    seen = origin.only_request_to(path)
    assert seen.complete
    if framing == "content-length":
        assert seen.values("Content-Length") == [str(BIG)]
        assert not seen.chunked
    else:
        assert seen.chunked
    assert rss.growth < RSS_LIMIT


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_large_download_streams_through_complete(proxy, origin, chunked: bool) -> None:
    path = f"/stream/download/{'chunked' if chunked else 'length'}"
    origin.route(path, streamed(BIG, chunked=chunked))
    digest = hashlib.sha256()
    received = 0
    with (
        RssSampler(proxy) as rss,
        httpx.Client(timeout=30) as client,
        client.stream("GET", proxy.base_url + path) as response,
    ):
        assert response.status_code == 200
        framing = response.headers.get("content-length"), response.headers.get("transfer-encoding")
        for chunk in response.iter_raw():
            digest.update(chunk)
            received += len(chunk)
    report_rss(f"download {BIG // MiB} MiB ({'chunked' if chunked else 'content-length'})", rss)

    assert framing == ((None, "chunked") if chunked else (str(BIG), None))
    assert received == BIG
    assert digest.hexdigest() == digest_of_pattern(BIG)
    assert rss.growth < RSS_LIMIT


# --- 6. origin failures -----------------------------------------------------------------------------


def test_origin_down_is_502_with_a_json_body(timeout_proxy) -> None:
    response = raw_exchange(timeout_proxy.port, raw_request("GET", "/down/anything"))
    body = assert_json_error(response, 502, "bad_gateway")
    assert "unreachable" in body["detail"]


def test_origin_that_never_answers_is_504_at_the_read_timeout(timeout_proxy, origin) -> None:
    origin.route("/fail/silent", never_reply())
    started = time.monotonic()
    response = raw_exchange(timeout_proxy.port, raw_request("GET", "/fail/silent"))
    elapsed = time.monotonic() - started
    assert_json_error(response, 504, "gateway_timeout")
    assert 0.45 <= elapsed < 3.0, f"504 after {elapsed:.2f}s with read_timeout_s = 0.5"


def test_origin_closing_without_an_answer_is_502(timeout_proxy, origin) -> None:
    origin.route("/fail/hangup", close_without_reply())
    response = raw_exchange(timeout_proxy.port, raw_request("GET", "/fail/hangup"))
    assert_json_error(response, 502, "bad_gateway")


def test_origin_answering_garbage_is_502(timeout_proxy, origin) -> None:
    origin.route("/fail/garbage", b"this is not HTTP\r\n\r\n")
    response = raw_exchange(timeout_proxy.port, raw_request("GET", "/fail/garbage"))
    assert_json_error(response, 502, "bad_gateway")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_origin_response_cut_short_is_not_completed_for_the_client(proxy, origin, chunked: bool) -> None:
    path = f"/fail/truncated/{'chunked' if chunked else 'length'}"

    async def handler(request, conn) -> None:
        framing = ("Transfer-Encoding", "chunked") if chunked else ("Content-Length", "100000")
        await conn.send(http_response(200, [framing], content_length=False))
        await conn.send(b"%x\r\n%s\r\n" % (50000, b"p" * 50000) if chunked else b"p" * 50000)
        conn.close_after = True

    origin.route(path, handler)
    with pytest.raises(ConnectionError):
        raw_exchange(proxy.port, raw_request("GET", path))


def test_compressed_responses_pass_through_untouched(proxy, origin) -> None:
    compressed = gzip.compress(b"flag " * 1000)
    headers = [("Content-Encoding", "gzip"), ("Vary", "Accept-Encoding")]
    origin.route("/gzip", http_response(200, headers, compressed))
    response = raw_exchange(proxy.port, raw_request("GET", "/gzip", [("Accept-Encoding", "gzip")]))
    assert response.status == 200
    assert response.value("content-encoding") == "gzip"
    assert response.value("content-length") == str(len(compressed))
    assert response.body == compressed


# --- 7. aborted clients release upstream connections --------------------------------------------------

POOL_LIMIT = 4


def abort_mid_response(port: int, path: str, reset: bool) -> int:
    """GET a body that does not end, read the first bytes of it, then vanish (with an RST if ``reset``)."""
    with socket.create_connection((LOCALHOST, port), timeout=10) as sock:
        sock.sendall(raw_request("GET", path))
        data = b""
        while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < 100:
            chunk = sock.recv(65536)
            assert chunk, f"proxy closed the connection early: {data[:200]!r}"
            data += chunk
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return int(data.split(b" ", 2)[1])


def test_aborted_clients_release_their_upstream_connections(origin_factory, proxy_factory) -> None:
    origin = origin_factory()
    origin.route("/pool/trickle", trickle(b"t" * 4096, interval_s=0.005))
    origin.route("/pool/stall", stall_after_first_chunk())
    origin.route("/pool/upload", body_report())
    proxy = proxy_factory(
        [origin.url],
        env={"FLAGPROXY_UPSTREAM_POOL_LIMIT": str(POOL_LIMIT), "FLAGPROXY_UPSTREAM_POOL_TIMEOUT_S": "5"},
        flags=FLAGS,
    )

    # 240 clients leave in the middle of the response body, 16 at a time against a pool of 4: half
    # while the origin keeps sending, half while it is silent (the proxy is waiting on the origin).
    calls = [(proxy.port, "/pool/trickle" if i % 2 else "/pool/stall", i % 4 < 2) for i in range(240)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda call: abort_mid_response(*call), calls))
    assert statuses == [200] * 240

    # 100 clients leave in the middle of their request body, in waves that fill the whole pool.
    aborted = 0
    for wave in range(25):
        heads_before = origin.heads_received
        socks = []
        for i in range(POOL_LIMIT):
            sock = socket.create_connection((LOCALHOST, proxy.port), timeout=10)
            chunked = (wave + i) % 2 == 0
            framing = ("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(10 * MiB))
            sock.sendall(raw_request("POST", "/pool/upload", [framing]))
            sock.sendall(b"10000\r\n" + b"u" * 0x10000 if chunked else b"u" * 0x10000)
            socks.append(sock)
        seen = origin.wait_until(lambda o, n=heads_before: o.heads_received >= n + POOL_LIMIT, 10)
        assert seen, f"wave {wave}: origin saw {origin.heads_received - heads_before} of {POOL_LIMIT} heads"
        for sock in socks:
            sock.close()
        aborted += POOL_LIMIT

    def incomplete(o: RawOrigin) -> int:
        return sum(1 for r in o.requests_to("/pool/upload") if not r.complete)

    assert origin.wait_until(lambda o: incomplete(o) == aborted, 10), (
        f"only {incomplete(origin)} of {aborted} aborted uploads were cut off upstream"
    )
    assert origin.wait_until(lambda o: o.open_connections <= POOL_LIMIT, 10), (
        f"{origin.open_connections} upstream connections still open (pool limit {POOL_LIMIT})"
    )
    print(f"\n[pool] origin accepted {origin.total_connections} connections, {origin.open_connections} open")

    started = time.monotonic()
    request = raw_request("POST", "/pool/upload", [("Content-Length", "3")], b"end")
    response = raw_exchange(proxy.port, request)
    assert response.status == 200
    assert response.json()["length"] == 3
    assert time.monotonic() - started < 2.0


# --- 8. Set-Cookie and status codes -------------------------------------------------------------------


def test_several_set_cookie_headers_arrive_separately(proxy, origin) -> None:
    cookies = [
        "session=abc; Path=/; HttpOnly",
        "theme=dark; Expires=Wed, 21 Oct 2037 07:28:00 GMT",
        "empty=; Max-Age=0",
    ]
    origin.route("/cookies", http_response(200, [("Set-Cookie", c) for c in cookies], b"ok"))
    response = raw_exchange(proxy.port, raw_request("GET", "/cookies", [("X-User-Id", "u1")]))
    assert response.status == 200
    assert response.values("set-cookie") == cookies


@pytest.mark.parametrize("status", [201, 204, 301, 404, 418, 500, 503])
def test_origin_status_codes_pass_through(proxy, origin, status: int) -> None:
    body = b"" if status == 204 else f"status {status}".encode()
    headers = [("Location", "/elsewhere")] if status == 301 else []
    origin.route(f"/status/{status}", http_response(status, headers, body))
    response = raw_exchange(proxy.port, raw_request("GET", f"/status/{status}"))
    assert response.status == status
    assert response.body == body
    if status == 301:  # redirects are the client's business, not followed by the proxy
        assert response.value("location") == "/elsewhere"
        assert len(origin.requests_to("/elsewhere")) == 0


# --- 9. raw path and query --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/a%2Fb/%7Euser/x%20y;p=1?q=%2B1&x=a+b&&z",
        "/raw/./dots/../kept//double?=&%zz=%E2%82%AC",
        "/raw/%25%2e%2E/%C3%A9?a=1;b=2&a=3",
    ],
)
def test_raw_path_and_query_arrive_byte_exact(proxy, origin, target: str) -> None:
    assert raw_exchange(proxy.port, raw_request("GET", target)).status == 200
    path = target.partition("?")[0]
    seen = origin.only_request_to(path)
    assert seen.request_line == f"GET {target} HTTP/1.1".encode()


# --- 10. prefix routing -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def route_origins(origin_factory) -> dict[str, RawOrigin]:
    origins = {name: origin_factory() for name in "ABC"}
    for name, o in origins.items():
        o.default = http_response(200, [("X-Origin", name)], name.encode())
    return origins


@pytest.fixture(scope="module")
def routing_proxy(proxy_factory, route_origins) -> ProxyProcess:
    a, b, c = (route_origins[n].url for n in "ABC")
    return proxy_factory([f"/api={a}", f"/api/v2={b}", c], flags=FLAGS)


@pytest.fixture(scope="module")
def toml_routing_proxy(proxy_factory, route_origins) -> ProxyProcess:
    a, b, c = (route_origins[n].url for n in "ABC")
    config = (
        f'[[origins]]\nprefix = "/svc"\nurl = "{a}"\nstrip_prefix = true\n\n'
        f'[[origins]]\nprefix = "/based"\nurl = "{b}/base"\n\n'
        f'[[origins]]\nprefix = "/both/"\nurl = "{b}/base/"\nstrip_prefix = true\n\n'
        f'[[origins]]\nprefix = "/"\nurl = "{c}"\n'
    )
    return proxy_factory(config=config, flags=FLAGS)


def assert_routed(proxy: ProxyProcess, origins: dict[str, RawOrigin], target: str, name: str, upstream: str):
    before = {n: len(o.requests) for n, o in origins.items()}
    response = raw_exchange(proxy.port, raw_request("GET", target))
    assert response.status == 200
    assert response.body == name.encode()
    after = {n: len(o.requests) for n, o in origins.items()}
    assert {n: after[n] - before[n] for n in after} == {n: int(n == name) for n in after}
    assert origins[name].requests[-1].request_line == f"GET {upstream} HTTP/1.1".encode()


@pytest.mark.parametrize(
    ("target", "name", "upstream_target"),
    [
        ("/api", "A", "/api"),
        ("/api/", "A", "/api/"),
        ("/api/users?id=1", "A", "/api/users?id=1"),
        ("/api/v20", "A", "/api/v20"),
        ("/api/v2", "B", "/api/v2"),
        ("/api/v2/items", "B", "/api/v2/items"),
        ("/apiX", "C", "/apiX"),
        ("/ap", "C", "/ap"),
        ("/", "C", "/"),
    ],
)
def test_longest_prefix_wins_on_segment_boundaries(
    routing_proxy, route_origins, target: str, name: str, upstream_target: str
) -> None:
    assert_routed(routing_proxy, route_origins, target, name, upstream_target)


@pytest.mark.parametrize(
    ("target", "name", "upstream_target"),
    [
        ("/svc/items?x=1", "A", "/items?x=1"),
        ("/svc", "A", "/"),
        ("/svc/", "A", "/"),
        ("/svcx/items", "C", "/svcx/items"),
        ("/based/x%2Fy?q", "B", "/base/based/x%2Fy?q"),
        ("/both/deep/path", "B", "/base/deep/path"),
        ("/both", "B", "/base/"),
        ("/other", "C", "/other"),
    ],
)
def test_strip_prefix_and_origin_base_path(
    toml_routing_proxy, route_origins, target: str, name: str, upstream_target: str
) -> None:
    assert_routed(toml_routing_proxy, route_origins, target, name, upstream_target)


# --- 11. methods, bodies, no invented headers ---------------------------------------------------------


def test_get_without_body_has_no_framing_and_no_invented_headers(proxy, origin) -> None:
    assert raw_exchange(proxy.port, raw_request("GET", "/method/get")).status == 200
    seen = origin.only_request_to("/method/get")
    assert seen.method == "GET"
    assert set(seen.names) == PROXY_ADDED, seen.head
    assert seen.body == b""


def test_post_with_content_length_is_forwarded_with_that_length(proxy, origin) -> None:
    body = b'{"a": 1}'
    request = raw_request("POST", "/method/post", [("Content-Length", str(len(body)))], body)
    assert raw_exchange(proxy.port, request).status == 200
    seen = origin.only_request_to("/method/post")
    assert seen.values("Content-Length") == [str(len(body))]
    assert seen.body == body and not seen.chunked
    # No Content-Type / Accept / Accept-Encoding / User-Agent that the client did not send.
    assert set(seen.names) == PROXY_ADDED | {"content-length"}, seen.head


def test_client_headers_are_forwarded_verbatim(proxy, origin) -> None:
    sent = [
        ("Accept", "text/html;q=0.9, */*;q=0.1"),
        ("Accept-Encoding", "identity"),
        ("User-Agent", "raw-test/1.0"),
        ("Content-Type", "text/plain; charset=latin-1"),
        ("X-Dup", "1"),
        ("X-Dup", "2"),
        ("Content-Length", "4"),
    ]
    assert raw_exchange(proxy.port, raw_request("PUT", "/method/put", sent, b"data")).status == 200
    seen = origin.only_request_to("/method/put")
    assert seen.method == "PUT"
    for name in ("Accept", "Accept-Encoding", "User-Agent", "Content-Type", "Content-Length"):
        assert seen.values(name) == [v for n, v in sent if n == name]
    assert seen.values("X-Dup") == ["1", "2"]
    assert seen.body == b"data"


def test_head_and_delete_pass_through(proxy, origin) -> None:
    origin.route("/method/head", http_response(200, [("Content-Length", "1234")], content_length=False))
    response = raw_exchange(proxy.port, raw_request("HEAD", "/method/head"))
    assert response.status == 200
    assert response.value("content-length") == "1234"
    assert origin.only_request_to("/method/head").method == "HEAD"

    assert raw_exchange(proxy.port, raw_request("DELETE", "/method/delete")).status == 200
    seen = origin.only_request_to("/method/delete")
    assert seen.method == "DELETE"
    assert seen.value("Transfer-Encoding") is None
    assert seen.values("Content-Length") == []  # nothing added to what the client sent
    assert seen.body == b""


# --- 12. config errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "config", "field"),
    [
        ([], {"FLAGPROXY_HEADER_LIMIT_BYTES": "abc"}, None, "limit_bytes"),
        ([], {}, "[upstream]\nread_timeout = 1\n", "read_timeout"),
        (["--port", "70000"], {}, None, "port"),
        ([], {"FLAGPROXY_PROXY_TRUSTED_PROXIES": "10.0.0.0/33"}, None, "trusted_proxies"),
        ([], {}, None, "origin"),
        ([], {"FLAGPROXY_UPSTREAM_POOL_LIMIT": "0"}, None, "pool_limit"),
    ],
    ids=["env-not-an-int", "unknown-toml-key", "port-out-of-range", "bad-cidr", "no-origin", "zero-pool"],
)
def test_config_errors_exit_2_naming_the_field(tmp_path, args, env, config, field) -> None:
    argv = list(args)
    if config is not None:
        path = tmp_path / "bad.toml"
        path.write_text(config + '\n[[origins]]\nurl = "http://127.0.0.1:9"\n')
        argv += ["--config", str(path)]
    elif field != "origin":
        argv += ["--origin", "http://127.0.0.1:9"]
    argv += ["--flags", str(tmp_path / "none.json")]
    result = run_serve(argv, env)
    assert result.returncode == 2, result.stderr
    assert field in result.stderr
    assert "config error" in result.stderr
    assert "Traceback" not in result.stderr
