"""Request smuggling and oversized heads are refused at the protocol layer, with JSON and a close."""

from __future__ import annotations

import json
import socket

import pytest
from support import raw_exchange, raw_request


@pytest.fixture(scope="module")
def proxy(proxy_factory, origin):
    return proxy_factory([origin.url], env={"FLAGPROXY_SERVER_MAX_REQUEST_HEAD_BYTES": "8192"})


def exchange_and_closed(port: int, request: bytes) -> tuple[bytes, bool]:
    """Send raw bytes, read until the server closes; return (reply, closed by the server)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            return b"".join(chunks), False
        return b"".join(chunks), True


def json_body(reply: bytes) -> dict:
    return json.loads(reply.split(b"\r\n\r\n", 1)[1])


@pytest.mark.parametrize(
    ("extra", "body", "needle"),
    [
        (b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n", "Transfer-Encoding"),
        (b"Content-Length: 3\r\nContent-Length: 4\r\n", b"abcd", "Content-Length"),
        (b"Content-Length: abc\r\n", b"", "Content-Length"),
        (b"Transfer-Encoding: chunked\r\n", b"zz\r\nabc\r\n0\r\n\r\n", "chunk"),
    ],
)
def test_framing_attacks_get_json_400_and_a_closed_connection(proxy, origin, extra, body, needle) -> None:
    path = f"/smuggle/{abs(hash(extra))}"
    request = f"POST {path} HTTP/1.1\r\nHost: test.example\r\n".encode() + extra + b"\r\n" + body
    request += f"GET {path}/second HTTP/1.1\r\nHost: test.example\r\n\r\n".encode()  # the smuggled one
    reply, closed = exchange_and_closed(proxy.port, request)
    assert reply.startswith(b"HTTP/1.1 400"), reply[:200]
    error = json_body(reply)
    assert error["error"] == "bad_request" and needle.lower() in error["detail"].lower()
    assert closed
    assert origin.requests_to(f"{path}/second") == []  # nothing smuggled reached the origin


def test_request_head_above_the_limit_gets_431(proxy, origin) -> None:
    request = raw_request("GET", "/huge-head", [("X-Big", "a" * 9000)])
    reply, closed = exchange_and_closed(proxy.port, request)
    assert reply.startswith(b"HTTP/1.1 431"), reply[:200]
    assert json_body(reply)["error"] == "request_head_too_large" and closed
    assert origin.requests_to("/huge-head") == []


def test_an_endless_header_line_gets_431_too(proxy) -> None:
    request = b"GET /slow HTTP/1.1\r\nHost: test.example\r\nX-Endless: " + b"b" * 20000  # never finished
    reply, closed = exchange_and_closed(proxy.port, request)
    assert reply.startswith(b"HTTP/1.1 431") and closed


def test_heads_below_the_limit_but_over_the_flag_budget_are_forwarded(proxy, origin) -> None:
    request = raw_request("GET", "/big-but-allowed", [("X-User-Id", "u"), ("X-Big", "c" * 7000)])
    assert raw_exchange(proxy.port, request).status == 200
    assert origin.only_request_to("/big-but-allowed").value("X-Big") == "c" * 7000
