"""Flow control across exchanges on one connection: a pause for one request never outlives it, a
request starting while the client does not read is held back too, and a complete body waiting for
a connection is not timed as a stalled one. Each against a real ``flagproxy serve`` process and a
raw scripted origin (loopback only, every wait bounded); each failed before its fix."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest
from support import (
    LOCALHOST,
    OriginConnection,
    RecordedRequest,
    http_response,
    raw_request,
    read_response,
)

BODY_OVER_64K_HEAD = 65000  # the first part of a body: under the 64 KiB buffer limit
BODY_OVER_64K_TAIL = 1000  # the rest, in one small send: the limit is crossed in the read that ends it


def gated(gate: threading.Event, body: bytes = b"first") -> object:
    """A handler that answers only once ``gate`` is set (the request stays in flight until then)."""

    async def handler(request: RecordedRequest, conn: OriginConnection) -> None:
        await asyncio.to_thread(gate.wait, 10)
        await conn.send(http_response(200, [("Content-Type", "text/plain")], body))

    return handler


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection((LOCALHOST, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def send_body_over_64k(sock: socket.socket, method: str, target: str) -> None:
    """A request with a 66,000-byte body sent as head + 65,000 bytes, then 1,000 bytes: whatever the
    reads, the one that crosses the proxy's 64 KiB body buffer also completes the request."""
    total = BODY_OVER_64K_HEAD + BODY_OVER_64K_TAIL
    sock.sendall(raw_request(method, target, [("Content-Length", str(total))], b"a" * BODY_OVER_64K_HEAD))
    sock.sendall(b"a" * BODY_OVER_64K_TAIL)


# --- 1. a pause reason that nobody lifts: the keep-alive connection stops reading ---------------------


@pytest.fixture(scope="module")
def routed(origin_factory, proxy_factory):
    origin = origin_factory()
    config = (
        "[server]\nkeepalive_timeout_s = 3\n\n"
        "[upstream]\npool_limit = 1\npool_timeout_s = 0.3\n\n"
        f'[[origins]]\nprefix = "/api"\nurl = "{origin.url}"\n'
    )
    return proxy_factory(config=config), origin


def test_a_queued_request_with_a_big_body_that_fails_at_start_leaves_the_connection_deaf(routed) -> None:
    """A (in flight) | B = POST to an unrouted path with a 66 KB body, queued behind A | then C.
    B's body is buffered while it waits (> 64 KiB: reading pauses for "buffer"); B then fails in
    ``start`` (404 no_route) with its body complete, so the connection is kept — but nothing ever
    resumes reading: C is never read and the connection is closed silently at the keep-alive timeout."""
    proxy, origin = routed
    gate = threading.Event()
    origin.route("/api/hold-1", gated(gate))
    with connect(proxy.port) as sock:
        sock.sendall(raw_request("GET", "/api/hold-1"))
        origin.wait_until(lambda o: any(r.path == b"/api/hold-1" for r in o.requests))
        send_body_over_64k(sock, "POST", "/nowhere")
        gate.set()
        first = read_response(sock)
        assert first.status == 200
        second = read_response(sock, "POST")
        assert second.status == 404 and second.json()["error"] == "no_route"
        assert second.value("Connection") != "close"  # the proxy keeps the connection...
        sock.sendall(raw_request("GET", "/api/after-404"))  # ...so a next request must be answered
        third = read_response(sock)
        assert third.status == 200


def test_a_pool_timeout_after_a_big_body_leaves_the_connection_deaf(routed) -> None:
    """pool_limit = 1 and the one connection is busy. POST /api/x with a 66 KB body waits for a
    connection: its body is buffered (> 64 KiB: reading pauses); after pool_timeout_s it gets
    503 pool_exhausted on a kept connection — and the next request on it is never read."""
    proxy, origin = routed
    gate = threading.Event()
    origin.route("/api/hold-2", gated(gate))
    with connect(proxy.port) as busy, connect(proxy.port) as sock:
        busy.sendall(raw_request("GET", "/api/hold-2"))
        origin.wait_until(lambda o: any(r.path == b"/api/hold-2" for r in o.requests))
        send_body_over_64k(sock, "POST", "/api/waits")
        failed = read_response(sock, "POST")
        gate.set()
        assert read_response(busy).status == 200
        assert failed.status == 503 and failed.json()["error"] == "pool_exhausted"
        assert failed.value("Connection") != "close"
        sock.sendall(raw_request("GET", "/api/after-503"))
        assert read_response(sock).status == 200


def test_a_control_request_whose_body_the_app_never_reads_leaves_the_connection_deaf(routed) -> None:
    """A (in flight) | B = POST /__flags/healthz with a 66 KB body | C. B's body is buffered (reading
    pauses for "control", lifted only by ``receive``); the app answers without reading it (405), the
    connection is kept, and C is never read."""
    proxy, origin = routed
    gate = threading.Event()
    origin.route("/api/hold-3", gated(gate))
    with connect(proxy.port) as sock:
        sock.sendall(raw_request("GET", "/api/hold-3"))
        origin.wait_until(lambda o: any(r.path == b"/api/hold-3" for r in o.requests))
        send_body_over_64k(sock, "POST", "/__flags/healthz")
        gate.set()
        assert read_response(sock).status == 200
        second = read_response(sock, "POST")
        assert second.status == 405
        assert second.value("connection") != "close"
        sock.sendall(raw_request("GET", "/api/after-405"))
        assert read_response(sock).status == 200


# --- 2. a request started while the client's transport is already paused is never flow-controlled -----

BIG = 40 << 20


@pytest.fixture(scope="module")
def big_control(origin_factory, proxy_factory):
    origin = origin_factory()
    config = f'[admin]\ntoken = "tok"\n\n[[origins]]\nprefix = "/api"\nurl = "{origin.url}"\n'
    flags = {
        "flags": {
            f"flag-{i:04d}": {"variants": {"a": {"weight": 1, "config": "c" * 1000}}} for i in range(7000)
        }
    }
    return proxy_factory(config=config, flags=flags), origin


def test_the_request_after_a_large_control_response_buffers_its_whole_response(big_control) -> None:
    """GET /__flags/api/evaluate (a ~8 MB answer, written in one go: the client transport goes over its
    high-water mark and ``pause_writing`` fires) pipelined with GET /api/big (40 MB). The client reads
    nothing. ``pause_writing`` went to the control exchange; the proxied exchange that starts next is
    never told (``client_paused`` is only called on transitions), so it never pauses its origin and
    never arms send_idle: the proxy reads all 40 MB from the origin into memory."""
    proxy, origin = big_control
    finished = threading.Event()

    async def handler(request: RecordedRequest, conn: OriginConnection) -> None:
        await conn.send(http_response(200, [("Content-Length", str(BIG))], content_length=False))
        block = b"z" * (1 << 18)
        for _ in range(BIG // len(block)):
            conn.write(block)
            await conn.drain()
        finished.set()

    origin.route("/api/big", handler)
    baseline = proxy.rss_bytes()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a slow reader: a tiny window
        sock.settimeout(5)
        sock.connect((LOCALHOST, proxy.port))
        sock.sendall(
            raw_request("GET", "/__flags/api/evaluate", [("Authorization", "Bearer tok")])
            + raw_request("GET", "/api/big")
        )
        origin.wait_until(lambda o: any(r.path == b"/api/big" for r in o.requests), timeout=10)
        # With flow control the origin blocks after a few MB (socket buffers); here it finishes.
        sent_everything = finished.wait(5)
        growth = proxy.rss_bytes() - baseline
        assert not sent_everything and growth < 20 << 20, (
            f"the origin sent all {BIG} bytes to a client that read nothing; proxy RSS grew {growth} bytes"
        )
    finally:
        sock.close()


# --- 3. a complete request body waiting for a pooled connection is timed as a stalled body ------------


@pytest.fixture(scope="module")
def one_slot(origin_factory, proxy_factory):
    origin = origin_factory()
    config = (
        "[server]\nbody_idle_timeout_s = 0.5\n\n"
        "[upstream]\npool_limit = 1\npool_timeout_s = 8\n\n"
        f'[[origins]]\nprefix = "/api"\nurl = "{origin.url}"\n'
    )
    return proxy_factory(config=config), origin


def test_a_complete_body_waiting_for_a_connection_gets_408_body_timeout(one_slot) -> None:
    """pool_limit = 1 with the connection busy; POST /api/queued with a complete 5-byte body waits for
    it (pool_timeout_s = 8). ``request_end`` only leaves the BODY phase when an upstream connection is
    there, so body_idle_timeout_s (0.5 s) fires while it waits: 408 body_timeout, "the request body
    stalled" — though the whole body came at once. It should wait for the connection (then 200)."""
    proxy, origin = one_slot
    gate = threading.Event()
    origin.route("/api/hold-4", gated(gate))
    try:
        with connect(proxy.port, timeout=8) as busy, connect(proxy.port, timeout=8) as sock:
            busy.sendall(raw_request("GET", "/api/hold-4"))
            origin.wait_until(lambda o: any(r.path == b"/api/hold-4" for r in o.requests))
            sock.sendall(raw_request("POST", "/api/queued", [("Content-Length", "5")], b"hello"))
            # the answer, whatever it is; a correct proxy answers only once the gate opens, so open it
            # as soon as a second has passed without one
            sock.settimeout(1.5)
            try:
                answer = read_response(sock, "POST")
            except TimeoutError:
                gate.set()
                sock.settimeout(8)
                answer = read_response(sock, "POST")
            assert answer.status == 200, (answer.status, answer.body)
            gate.set()
            assert read_response(busy).status == 200
    finally:
        gate.set()
