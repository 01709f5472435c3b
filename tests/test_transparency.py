"""The data plane forwards at the protocol level: what the client sent reaches the origin as sent and
what the origin answered reaches the client as answered — and every limit is a setting.

One test per behaviour, each against a real origin on 127.0.0.1 (a raw-socket origin recording
bytes, a ``websockets`` server) and a ``flagproxy serve`` process.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import websockets
from support import (
    LOCALHOST,
    OriginConnection,
    ProxyProcess,
    RawOrigin,
    RecordedRequest,
    http_response,
    raw_exchange,
    raw_request,
    read_response,
    wait_for,
)
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import serve as ws_serve

FLAGS = {"flags": {"new-ui": {"enabled": True}}}
CONFIG = """
[log]
access_log = true
format = "json"

[server]
header_timeout_s = 1.0
body_idle_timeout_s = 1.0
send_idle_timeout_s = 1.0

[upstream]
read_timeout_s = 5.0
stream_idle_timeout_s = 1.0
pool_limit = 4
pool_timeout_s = 0.5

[[routes]]
path = "/slow/**"
read_timeout_s = 0.5

[[routes]]
path = "/sse/**"
stream_idle_timeout_s = 0

[[routes]]
path = "/total/**"
total_timeout_s = 0.8
"""


@pytest.fixture(scope="module")
def proxy(proxy_factory: Callable[..., ProxyProcess], origin: RawOrigin) -> ProxyProcess:
    return proxy_factory([origin.url], config=CONFIG, flags=FLAGS, log_level="info")


def access_events(proxy: ProxyProcess, path: str) -> list[dict[str, Any]]:
    events = []
    for line in proxy.stderr().splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == "request" and event.get("path") == path:
                events.append(event)
    return events


def access_event(proxy: ProxyProcess, path: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = wait_for(lambda: access_events(proxy, path), what=f"access log of {path}")
    return found[0]


def metric(proxy: ProxyProcess, name: str, **labels: str) -> float:
    text = httpx.get(f"{proxy.base_url}/__flags/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{"):
            got = line[len(name) + 1 : line.index("}")]
            if all(part in got.split(",") for part in want.split(",") if part):
                total += float(line.rsplit(" ", 1)[1])
    return total


def connect(proxy: ProxyProcess, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection((LOCALHOST, proxy.port), timeout=timeout)


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            return data
        if not chunk:
            return data
        data += chunk


# --- byte-exact both ways --------------------------------------------------------------------------


def test_header_names_order_and_case_reach_the_origin_as_sent(proxy, origin) -> None:
    request = (
        b"GET /exact/case HTTP/1.1\r\nhOsT: test.example\r\nX-lower-UPPER: 1\r\nx-second: 2\r\n"
        b"X-Third: 3\r\n\r\n"
    )
    assert raw_exchange(proxy.port, request).status == 200
    seen = origin.only_request_to("/exact/case")
    names = [name for name, _ in seen.headers]
    assert names[:4] == [b"hOsT", b"X-lower-UPPER", b"x-second", b"X-Third"]
    assert b"\r\nX-Feature-Flags: " in seen.head  # the proxy's own headers spelled as documented


def test_response_header_case_order_and_reason_phrase_reach_the_client(proxy, origin) -> None:
    origin.route(
        "/exact/response",
        b"HTTP/1.1 299 Fine Thanks\r\nx-Mixed-CASE: a\r\nZ-First: b\r\nA-Second: c\r\n"
        b"Content-Length: 2\r\n\r\nok",
    )
    response = raw_exchange(proxy.port, raw_request("GET", "/exact/response"))
    assert response.head.startswith(b"HTTP/1.1 299 Fine Thanks\r\n")
    assert b"\r\nx-Mixed-CASE: a\r\nZ-First: b\r\nA-Second: c\r\nContent-Length: 2\r\n" in response.head


@pytest.mark.parametrize("target", [b"/exact/q?", b"/exact/q?a=1&&b", b"/exact/q/%7E%2F;x?%20"])
def test_the_request_target_is_byte_exact(proxy, origin, target: bytes) -> None:
    request = b"GET " + target + b" HTTP/1.1\r\nHost: test.example\r\n\r\n"
    assert raw_exchange(proxy.port, request).status == 200
    assert any(r.target == target for r in origin.requests_to(target.partition(b"?")[0].decode()))


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
def test_nothing_is_added_to_a_bodyless_request(proxy, origin, method: str) -> None:
    path = f"/exact/bodyless/{method}"
    assert raw_exchange(proxy.port, raw_request(method, path)).status == 200
    seen = origin.only_request_to(path)
    assert "content-length" not in seen.names and "transfer-encoding" not in seen.names


# --- framing ---------------------------------------------------------------------------------------


def test_an_http10_client_never_gets_chunked(proxy, origin) -> None:
    origin.route(
        "/framing/chunked",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
    )
    with connect(proxy) as sock:
        sock.sendall(b"GET /framing/chunked HTTP/1.0\r\nHost: test.example\r\n\r\n")
        data = read_all(sock)  # close-delimited: the proxy closes after the body
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower()
    assert body == b"abcde"


def test_an_http10_keepalive_client_keeps_a_length_delimited_connection(proxy, origin) -> None:
    with connect(proxy) as sock:
        for i in range(2):
            sock.sendall(b"GET /framing/ka HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            response = read_response(sock)
            assert response.status == 200 and response.body == b"ok"
            assert (response.value("connection") or "").lower() == "keep-alive", i


def test_a_half_closed_client_still_gets_its_response(proxy, origin) -> None:
    with connect(proxy) as sock:
        sock.sendall(raw_request("POST", "/framing/half-close", [("Content-Length", "5")], b"hello"))
        sock.shutdown(socket.SHUT_WR)
        data = read_all(sock)
    assert data.startswith(b"HTTP/1.1 200 ")
    assert data.endswith(b"ok")
    assert origin.only_request_to("/framing/half-close").body == b"hello"


def test_interim_responses_are_relayed(proxy, origin) -> None:
    origin.route(
        "/framing/103",
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
        + http_response(200, [("Content-Type", "text/plain")], b"done"),
    )
    with connect(proxy) as sock:
        sock.sendall(raw_request("GET", "/framing/103"))
        data = b""
        while not data.endswith(b"done"):
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
    early, _, final = data.partition(b"\r\n\r\n")
    assert early == b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload"
    assert final.startswith(b"HTTP/1.1 200 ") and final.endswith(b"\r\n\r\ndone")


@pytest.mark.parametrize(
    ("method", "status"), [("HEAD", 200), ("GET", 204), ("GET", 304)], ids=["head", "204", "304"]
)
def test_bodyless_responses_are_framed_without_a_body(proxy, origin, method: str, status: int) -> None:
    path = f"/framing/nobody/{method}/{status}"
    length = "42" if method == "HEAD" else None
    headers = [("Content-Length", length)] if length else []
    origin.route(path, http_response(status, headers, b"", content_length=False))
    with connect(proxy) as sock:
        sock.sendall(raw_request(method, path) + raw_request("GET", "/framing/after"))
        first = read_response(sock, method)
        second = read_response(sock)  # the connection is still in sync
    assert first.status == status
    if length:
        assert first.value("content-length") == "42"
    assert second.status == 200 and second.body == b"ok"


def test_pipelined_requests_are_answered_in_order(proxy, origin) -> None:
    origin.route("/pipe/slow", streamed_after(0.2, b"first"))
    with connect(proxy) as sock:
        sock.sendall(
            raw_request("GET", "/pipe/slow")
            + raw_request("GET", "/pipe/fast")
            + raw_request("GET", "/pipe/third")
        )
        bodies = [read_response(sock).body for _ in range(3)]
    assert bodies == [b"first", b"ok", b"ok"]


def streamed_after(delay_s: float, body: bytes) -> Callable[[RecordedRequest, OriginConnection], Any]:
    async def handler(request: RecordedRequest, conn: OriginConnection) -> None:
        await asyncio.sleep(delay_s)  # the origin is slow: the later requests must wait their turn
        await conn.send(http_response(200, [], body))

    return handler


@pytest.mark.parametrize("value", [b"5 ", b"+5", b"0x5", b"5, 5"])
def test_content_length_must_be_digits_only(proxy, origin, value: bytes) -> None:
    request = b"POST /framing/cl HTTP/1.1\r\nHost: t\r\nContent-Length: " + value + b"\r\n\r\nhello"
    response = raw_exchange(proxy.port, request)
    assert response.status == 400, response.head
    assert response.json()["error"] == "bad_request"
    assert origin.requests_to("/framing/cl") == []


def test_connect_is_refused(proxy, origin) -> None:
    response = raw_exchange(proxy.port, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
    assert response.status == 405
    assert response.json()["error"] == "method_not_allowed"


def test_an_upgrade_with_a_body_that_the_origin_declines_is_answered(proxy, origin) -> None:
    request = raw_request(
        "POST",
        "/framing/upgrade-foo",
        [("Upgrade", "foo"), ("Connection", "Upgrade"), ("Content-Length", "5")],
        b"hello",
    )
    started = time.monotonic()
    response = raw_exchange(proxy.port, request)
    assert response.status == 200 and time.monotonic() - started < 3
    seen = origin.only_request_to("/framing/upgrade-foo")
    assert seen.body == b"hello" and seen.value("Upgrade") == "foo"


# --- response head limits --------------------------------------------------------------------------


def test_big_response_heads_pass_and_the_limit_is_named(proxy, origin) -> None:
    fields = [(f"X-F{i}", "v") for i in range(200)] + [("X-Long", "L" * 12000)]
    origin.route("/limits/big", http_response(200, fields, b"ok"))
    response = raw_exchange(proxy.port, raw_request("GET", "/limits/big"))
    assert response.status == 200 and response.value("x-long") == "L" * 12000
    assert sum(1 for name in response.names if name.startswith("x-f")) == 200

    origin.route("/limits/huge", http_response(200, [("X-Huge", "H" * 70000)], b"ok"))
    response = raw_exchange(proxy.port, raw_request("GET", "/limits/huge"))
    assert response.status == 502
    assert "max_response_head_bytes" in response.json()["detail"]


# --- Expect ----------------------------------------------------------------------------------------


def test_expect_is_answered_by_the_proxy_and_not_forwarded(proxy, origin) -> None:
    origin.send_100_continue = False  # an origin that never sends 100 Continue
    try:
        with connect(proxy) as sock:
            sock.sendall(
                raw_request("PUT", "/expect/never", [("Content-Length", "5"), ("Expect", "100-continue")])
            )
            interim = read_response(sock)
            assert interim.status == 100
            sock.sendall(b"hello")
            final = read_response(sock)
        assert final.status == 200
        seen = origin.only_request_to("/expect/never")
        assert "expect" not in seen.names and seen.body == b"hello"
    finally:
        origin.send_100_continue = True


def test_forward_expect_passes_it_on(proxy_factory, origin) -> None:
    proxy = proxy_factory([origin.url], config="[upstream]\nforward_expect = true\n", flags=FLAGS)
    with connect(proxy) as sock:
        sock.sendall(
            raw_request("PUT", "/expect/forwarded", [("Content-Length", "5"), ("Expect", "100-continue")])
        )
        interim = read_response(sock)  # the origin's own 100, relayed
        assert interim.status == 100
        sock.sendall(b"hello")
        assert read_response(sock).status == 200
    assert origin.only_request_to("/expect/forwarded").value("Expect") == "100-continue"


# --- timeouts --------------------------------------------------------------------------------------


def never_answers() -> Callable[[RecordedRequest, OriginConnection], Any]:
    async def handler(request: RecordedRequest, conn: OriginConnection) -> None:
        await conn.wait_peer_closed()
        conn.close_after = True

    return handler


def test_a_route_read_timeout_beats_the_global_one(proxy, origin) -> None:
    origin.route("/slow/", never_answers())
    started = time.monotonic()
    response = raw_exchange(proxy.port, raw_request("GET", "/slow/x"))
    elapsed = time.monotonic() - started
    assert response.status == 504 and response.json()["error"] == "gateway_timeout"
    assert "read_timeout_s" in response.json()["detail"]
    assert 0.4 < elapsed < 3, elapsed  # the route's 0.5 s, not the global 5 s


def quiet_stream(first: bytes) -> Callable[[RecordedRequest, OriginConnection], Any]:
    async def handler(request: RecordedRequest, conn: OriginConnection) -> None:
        await conn.send(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%b\r\n" % (len(first), first)
        )
        await conn.wait_peer_closed()
        conn.close_after = True

    return handler


def test_a_stream_idle_cut_is_incomplete_logged_and_counted(proxy, origin) -> None:
    origin.route("/stream/quiet", quiet_stream(b"data: 1\n\n"))
    before = metric(proxy, "flagproxy_upstream_errors_total", reason="stream_idle")
    with connect(proxy) as sock:
        sock.sendall(raw_request("GET", "/stream/quiet"))
        data = read_all(sock)
    assert data.startswith(b"HTTP/1.1 200 ")
    assert b"data: 1" in data and not data.endswith(b"0\r\n\r\n")  # no terminating chunk
    event = access_event(proxy, "/stream/quiet")
    assert event["cut"] == "stream_idle"
    assert wait_for(
        lambda: metric(proxy, "flagproxy_upstream_errors_total", reason="stream_idle") == before + 1
    )


def test_stream_idle_zero_lets_a_quiet_stream_live(proxy, origin) -> None:
    origin.route("/sse/quiet", quiet_stream(b"data: 1\n\n"))
    with connect(proxy, timeout=2.5) as sock:
        sock.sendall(raw_request("GET", "/sse/quiet"))
        first = b""
        while b"data: 1" not in first:  # the head and the first event
            chunk = sock.recv(65536)
            assert chunk, first
            first += chunk
        assert first.startswith(b"HTTP/1.1 200 ")
        with pytest.raises(TimeoutError):
            sock.recv(65536)  # 2.5 s of silence, more than the global 1 s: still open


def test_total_timeout_bounds_the_whole_exchange(proxy, origin) -> None:
    async def trickle(request: RecordedRequest, conn: OriginConnection) -> None:
        await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(100):
            await conn.send(b"1\r\nx\r\n")
            await asyncio.sleep(0.05)

    origin.route("/total/trickle", trickle)
    started = time.monotonic()
    with connect(proxy) as sock:
        sock.sendall(raw_request("GET", "/total/trickle"))
        data = read_all(sock)
    assert time.monotonic() - started < 3
    assert not data.endswith(b"0\r\n\r\n")
    assert access_event(proxy, "/total/trickle")["cut"] == "total"


def test_slowloris_is_closed_by_the_header_timeout(proxy) -> None:
    with connect(proxy) as sock:
        sock.sendall(b"GET /slowloris HTTP/1.1\r\nHost: t\r\n")
        started = time.monotonic()
        for _ in range(30):
            try:
                sock.sendall(b"X-a: b\r\n")
            except OSError:
                break
            time.sleep(0.1)  # the attack itself: one header line per 100 ms
            if time.monotonic() - started > 2:
                break
        data = read_all(sock)
    assert data.startswith(b"HTTP/1.1 408 ")
    assert b'"header_timeout"' in data


def test_a_slow_upload_gets_408_and_frees_the_upstream(proxy, origin) -> None:
    with connect(proxy) as sock:
        sock.sendall(raw_request("POST", "/slow-upload", [("Content-Length", "100")]) + b"x" * 10)
        data = read_all(sock)  # then silence: the body idle timeout (1 s) answers
    assert data.startswith(b"HTTP/1.1 408 ")
    assert b'"body_timeout"' in data
    assert wait_for(
        lambda: origin.requests_to("/slow-upload") and not origin.requests_to("/slow-upload")[0].complete
    )


def test_a_reader_that_stops_reading_is_cut(proxy, origin) -> None:
    big = b"B" * (32 << 20)
    origin.route("/slow-reader", http_response(200, [], big))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect((LOCALHOST, proxy.port))
    with sock:
        sock.sendall(raw_request("GET", "/slow-reader"))
        sock.recv(1024)  # then never read again
        event = wait_for(lambda: access_events(proxy, "/slow-reader"), timeout=10, what="the cut")[0]
    assert event["cut"] == "send_idle"


def test_pool_exhaustion_answers_503_within_the_pool_timeout(proxy_factory, origin) -> None:
    proxy = proxy_factory(
        [origin.url], config="[upstream]\npool_limit = 1\npool_timeout_s = 0.3\n", flags=FLAGS
    )
    origin.route("/pool/hold", never_answers())
    holder = connect(proxy)
    holder.sendall(raw_request("GET", "/pool/hold"))
    try:
        assert origin.wait_until(lambda o: bool(o.requests_to("/pool/hold")))
        started = time.monotonic()
        response = raw_exchange(proxy.port, raw_request("GET", "/pool/other"))
        assert response.status == 503 and response.json()["error"] == "pool_exhausted"
        assert time.monotonic() - started < 2
    finally:
        holder.close()


def test_max_connections_refuses_and_counts(proxy_factory, origin) -> None:
    proxy = proxy_factory([origin.url], config="[server]\nmax_connections = 3\n", flags=FLAGS)
    held = [connect(proxy) for _ in range(3)]
    try:
        for sock in held:  # each is served, so each is surely counted before the next one comes
            sock.sendall(raw_request("GET", "/maxconn/held"))
            assert read_response(sock).status == 200
        extra = [connect(proxy) for _ in range(2)]
        refused = [read_all(s) for s in extra]
        for s in extra:
            s.close()
        assert all(r.startswith(b"HTTP/1.1 503 ") and b"too_many_connections" in r for r in refused)
    finally:
        for s in held:
            s.close()
    assert wait_for(
        lambda: metric(proxy, "flagproxy_rejected_requests_total", error="too_many_connections") == 2
    )


def test_a_stale_pooled_connection_is_retried_once_for_an_idempotent_request(proxy, origin) -> None:
    async def answer_then_drop(request: RecordedRequest, conn: OriginConnection) -> None:
        await conn.send(http_response(200, [], b"once"))
        conn.close_after = True  # closes without saying so (no Connection: close)

    origin.route("/retry/", answer_then_drop)
    first = raw_exchange(proxy.port, raw_request("GET", "/retry/a"))
    wait_for(lambda: origin.open_connections == 0 or True)
    second = raw_exchange(proxy.port, raw_request("GET", "/retry/b"))
    assert (first.status, second.status) == (200, 200)
    assert second.body == b"once"


# --- WebSocket -------------------------------------------------------------------------------------


class EchoServer:
    """A real WebSocket server (the ``websockets`` library) in a background thread."""

    def __init__(self) -> None:
        self.port = 0
        self.closed = threading.Event()
        self.headers: list[Any] = []  # websockets' Headers: case-insensitive
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Future[None] | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()

    def _run(self) -> None:
        async def echo(ws: Any) -> None:
            self.headers.append(ws.request.headers)
            try:
                async for message in ws:
                    await ws.send(message)
            finally:
                self.closed.set()

        async def main() -> None:
            self._stop = asyncio.get_running_loop().create_future()
            async with ws_serve(echo, LOCALHOST, 0) as server:
                self.port = next(iter(server.sockets)).getsockname()[1]
                self._ready.set()
                await self._stop

        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(main())
        self._loop.close()

    def __enter__(self) -> EchoServer:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set_result, None)
        self._thread.join(10)


@pytest.fixture(scope="module")
def echo() -> Iterator[EchoServer]:
    with EchoServer() as server:
        yield server


def test_websocket_is_tunnelled_with_flags_counted_and_logged(proxy_factory, echo: EchoServer) -> None:
    proxy = proxy_factory([f"http://{LOCALHOST}:{echo.port}"], config=CONFIG, flags=FLAGS, log_level="info")

    async def talk() -> list[str]:
        async with ws_connect(
            f"ws://{LOCALHOST}:{proxy.port}/ws/echo", additional_headers={"X-User-Id": "7"}
        ) as ws:
            got = []
            for i in range(50):
                await ws.send(f"m{i}")
                got.append(str(await ws.recv()))
            big = "z" * 200_000
            await ws.send(big)
            assert await ws.recv() == big
            return got

    assert asyncio.run(talk()) == [f"m{i}" for i in range(50)]
    assert echo.closed.wait(5)  # the client's close reached the origin
    assert json.loads(echo.headers[-1]["X-Feature-Flags"]) == {"new-ui": True}
    event = access_event(proxy, "/ws/echo")
    assert event["status"] == 101 and event.get("upgraded") is True
    assert metric(proxy, "flagproxy_requests_total", status_class="1xx") >= 1


def test_an_origin_that_refuses_the_upgrade_is_answered_normally(proxy, origin) -> None:
    async def talk() -> None:
        async with ws_connect(f"ws://{LOCALHOST}:{proxy.port}/ws/refused"):
            pass

    with pytest.raises(websockets.exceptions.InvalidStatus) as raised:
        asyncio.run(talk())
    assert raised.value.response.status_code == 200


# --- what follows a last request is never a request -------------------------------------------------


def test_bytes_after_a_closing_request_are_not_read_as_a_request(proxy, origin) -> None:
    with connect(proxy) as sock:
        sock.sendall(
            raw_request("GET", "/last/one", [("Connection", "close")])
            + raw_request("GET", "/last/two", [("X-Feature-Flags", '{"evil":true}')])
        )
        data = read_all(sock)
    assert data.startswith(b"HTTP/1.1 200 ") and data.count(b"HTTP/1.1") == 1
    assert origin.requests_to("/last/two") == []


def test_after_a_refused_upgrade_the_next_bytes_never_reach_the_origin(proxy, origin) -> None:
    upgrade = raw_request(
        "GET", "/last/upgrade-refused", [("Upgrade", "websocket"), ("Connection", "Upgrade")]
    )
    smuggled = raw_request("GET", "/last/smuggled", [("X-Feature-Flags", '{"evil":true}')])
    with connect(proxy) as sock:
        sock.sendall(upgrade + smuggled)
        data = read_all(sock)
    assert data.startswith(b"HTTP/1.1 200 ")
    assert origin.wait_until(lambda o: bool(o.requests_to("/last/upgrade-refused")))
    assert origin.requests_to("/last/smuggled") == []
    assert all(b"evil" not in r.head for r in origin.requests)


def test_an_upgrade_with_early_data_and_a_half_close_reaches_the_origin_and_ends(proxy, origin) -> None:
    async def switch_and_echo(request: RecordedRequest, conn: OriginConnection) -> None:
        await conn.send(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n")
        while data := await conn.reader.read(65536):
            await conn.send(data.upper())
        conn.close_after = True

    origin.route("/last/echo", switch_and_echo)
    request = raw_request("GET", "/last/echo", [("Upgrade", "echo"), ("Connection", "Upgrade")])
    with connect(proxy) as sock:
        sock.sendall(request + b"early bytes")
        sock.shutdown(socket.SHUT_WR)  # before the origin has even answered
        data = read_all(sock)  # ends: the origin saw the half-close and closed
    assert data.startswith(b"HTTP/1.1 101 ")
    assert data.endswith(b"EARLY BYTES")
