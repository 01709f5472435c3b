"""Graceful shutdown, end to end: SIGTERM to a real ``flagproxy serve`` with requests in flight.

On SIGTERM uvicorn stops listening, lets in-flight requests finish for up to ``[server]
shutdown_grace_s``, then the lifespan shutdown closes the pools. These tests hold responses at a
scripted origin, signal the proxy while they are in flight, and check what every client gets.
A request still unanswered when the grace period ends is cancelled: its client gets a JSON 503
``shutting_down`` (or a cut body when the response had started), never a hang.
"""

from __future__ import annotations

import asyncio
import hashlib
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from support import (
    LOCALHOST,
    Handler,
    OriginConnection,
    ProxyProcess,
    RawOrigin,
    RecordedRequest,
    body_report,
    http_response,
    never_reply,
    pattern_chunks,
    pattern_digest,
    read_response,
    trickle,
    wait_for,
)

GRACE_S = 5.0  # long enough never to expire in the drain tests: every held request is released sooner
SHORT_GRACE_S = 1.0
DRAINING_S = 1.0  # how long the tests keep requests held after SIGTERM, the proxy draining meanwhile
EXIT_BOUND_S = 5.0  # how long a drained proxy may take to exit
HOLD_LIMIT_S = 20.0  # an origin handler never waits longer than this for its release (test failure)
CLIENT_TIMEOUT_S = 15.0
STREAM_BYTES = 2 << 20
UPLOAD_BYTES = 256 << 10
EXITED = (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM after a graceful shutdown


def grace_config(seconds: float) -> str:
    return f"[server]\nshutdown_grace_s = {seconds}\n"


def held(release: threading.Event, reply: bytes) -> Handler:
    """Answers ``reply`` only once ``release`` is set (the request stays in flight until then)."""

    async def handler(request: RecordedRequest, conn: OriginConnection) -> None:
        await asyncio.to_thread(release.wait, HOLD_LIMIT_S)
        await conn.send(reply)

    return handler


def held_stream(release: threading.Event, total: int, first: int = 1 << 16) -> Handler:
    """A chunked ``pattern_chunks(total)`` body: the first ``first`` bytes at once, the rest on release."""

    async def handler(request: RecordedRequest, conn: OriginConnection) -> None:
        await conn.send(http_response(200, [("Transfer-Encoding", "chunked")], content_length=False))
        for n, chunk in enumerate(pattern_chunks(total, first)):
            if n == 1:
                await asyncio.to_thread(release.wait, HOLD_LIMIT_S)
            await conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        await conn.send(b"0\r\n\r\n")

    return handler


def held_body(i: int) -> bytes:
    return b"".join(b"held-%d-%06d\n" % (i, n) for n in range(4096))  # ~60 KiB, distinct per request


def refused(port: int) -> bool:
    """True when nothing accepts connections on ``port`` any more."""
    try:
        with socket.create_connection((LOCALHOST, port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True


def wait_refusing(proxy: ProxyProcess, timeout: float = 3.0) -> float:
    """Bounded polling until the proxy's port refuses connections; the seconds it took."""
    started = time.monotonic()
    wait_for(lambda: refused(proxy.port), timeout=timeout, interval=0.02, what="the listener to close")
    return time.monotonic() - started


def get(url: str) -> httpx.Response:
    """One GET on a connection of its own."""
    with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client:
        return client.get(url)


def stream_digest(url: str, started: threading.Event) -> tuple[int, int, str]:
    """(status, body length, sha256) of a streamed GET; ``started`` is set once body bytes arrived."""
    digest = hashlib.sha256()
    length = 0
    with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client, client.stream("GET", url) as response:
        for chunk in response.iter_raw():
            digest.update(chunk)
            length += len(chunk)
            started.set()
        return response.status_code, length, digest.hexdigest()


def upload_in_two_halves(port: int, path: str, release: threading.Event) -> tuple[int, Any]:
    """POST ``pattern_chunks(UPLOAD_BYTES)``: the first half at once, the second after ``release``."""
    body = b"".join(pattern_chunks(UPLOAD_BYTES))
    half = UPLOAD_BYTES // 2
    head = (
        f"POST {path} HTTP/1.1\r\nHost: test.example\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {UPLOAD_BYTES}\r\n\r\n"
    ).encode()
    with socket.create_connection((LOCALHOST, port), timeout=CLIENT_TIMEOUT_S) as sock:
        sock.sendall(head + body[:half])
        assert release.wait(HOLD_LIMIT_S), "never released"
        sock.sendall(body[half:])
        response = read_response(sock, "POST")
        return response.status, response.json()


def still_draining(proxy: ProxyProcess, clients: list[Future[Any]]) -> None:
    """For DRAINING_S, no client gets an answer (an early 5xx, a cut) and the proxy does not exit."""
    assert proxy.process is not None
    done, _ = wait(clients, timeout=DRAINING_S, return_when=FIRST_COMPLETED)
    assert not done, [f.exception() or f.result() for f in done]
    assert proxy.process.poll() is None, f"exited with requests in flight:\n{proxy.stderr()}"


def exit_within(proxy: ProxyProcess, timeout: float) -> int:
    assert proxy.process is not None
    try:
        return proxy.process.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the proxy was still running {timeout}s later:\n{proxy.stderr()}")


@dataclass
class Scene:
    """A fresh scripted origin, client threads, and the event that lets held origin handlers answer."""

    origin: RawOrigin
    pool: ThreadPoolExecutor
    release: threading.Event
    make_proxy: Callable[..., ProxyProcess]
    proxies: list[ProxyProcess] = field(default_factory=list)

    def proxy(self, grace_s: float, **kwargs: Any) -> ProxyProcess:
        """A running ``flagproxy serve`` in front of ``origin`` with ``[server] shutdown_grace_s``."""
        proxy = self.make_proxy([self.origin.url], config=grace_config(grace_s), **kwargs)
        self.proxies.append(proxy)
        assert proxy.process is not None
        return proxy


@pytest.fixture
def scene(
    origin_factory: Callable[..., RawOrigin], proxy_factory: Callable[..., ProxyProcess]
) -> Iterator[Scene]:
    pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="shutdown-client")
    scene = Scene(origin_factory(), pool, threading.Event(), proxy_factory)
    try:
        yield scene
    finally:
        scene.release.set()  # nothing waits for ever, whatever failed
        for proxy in scene.proxies:
            proxy.stop()
        pool.shutdown(wait=True)


def test_sigterm_lets_every_in_flight_request_finish_with_its_full_body(scene: Scene) -> None:
    origin, pool, release = scene.origin, scene.pool, scene.release
    bodies = {f"/held/{i}": held_body(i) for i in range(3)}
    for path, body in bodies.items():
        reply = http_response(200, [("Content-Type", "application/octet-stream")], body)
        origin.route(path, held(release, reply))
    origin.route("/stream", held_stream(release, STREAM_BYTES))
    origin.route("/upload", body_report())
    proxy = scene.proxy(GRACE_S)

    gets = {path: pool.submit(get, f"{proxy.base_url}{path}") for path in bodies}
    stream_started = threading.Event()
    stream = pool.submit(stream_digest, f"{proxy.base_url}/stream", stream_started)
    upload = pool.submit(upload_in_two_halves, proxy.port, "/upload", release)
    clients: list[Future[Any]] = [*gets.values(), stream, upload]

    # All five are in flight: three held before their head, one mid-body, one mid-upload.
    assert origin.wait_until(lambda o: o.heads_received == 5), f"origin saw {origin.heads_received} heads"
    assert stream_started.wait(5), "the streamed response never started"
    assert not any(f.done() for f in clients)

    signalled = time.monotonic()
    proxy.process.send_signal(signal.SIGTERM)
    wait_refusing(proxy)  # the proxy is shutting down now, with all five still held
    still_draining(proxy, clients)

    release.set()
    released = time.monotonic()
    for path, future in gets.items():
        response = future.result(CLIENT_TIMEOUT_S)
        assert response.status_code == 200, (path, response.status_code, response.text[:200])
        assert response.content == bodies[path], path
    status, length, digest = stream.result(CLIENT_TIMEOUT_S)
    assert (status, length, digest) == (200, STREAM_BYTES, pattern_digest(STREAM_BYTES))
    status, report = upload.result(CLIENT_TIMEOUT_S)
    assert (status, report) == (200, {"length": UPLOAD_BYTES, "sha256": pattern_digest(UPLOAD_BYTES)})
    uploaded = origin.only_request_to("/upload")
    assert uploaded.complete and uploaded.body_length == UPLOAD_BYTES

    returncode = exit_within(proxy, EXIT_BOUND_S)
    exited = time.monotonic()
    print(
        f"\nSIGTERM with 5 in flight: exit {returncode} {exited - signalled:.2f}s after SIGTERM, "
        f"{exited - released:.2f}s after the origin let go"
    )
    assert returncode in EXITED, proxy.stderr()
    assert exited - released < 2.0  # done when the last response is: not the whole grace period
    assert "Traceback" not in proxy.stderr()


def test_after_sigterm_new_connections_are_refused_while_a_held_request_drains(scene: Scene) -> None:
    origin, pool, release = scene.origin, scene.pool, scene.release
    body = held_body(7)
    origin.route("/slow", held(release, http_response(200, [], body)))
    proxy = scene.proxy(GRACE_S)

    # An idle keep-alive connection that has already been served once.
    idle = socket.create_connection((LOCALHOST, proxy.port), timeout=5)
    try:
        idle.sendall(b"GET /before HTTP/1.1\r\nHost: test.example\r\n\r\n")
        assert read_response(idle).status == 200
        slow = pool.submit(get, f"{proxy.base_url}/slow")
        assert origin.wait_until(lambda o: len(o.requests_to("/slow")) == 1)

        proxy.process.send_signal(signal.SIGTERM)
        took = wait_refusing(proxy)
        assert all(refused(proxy.port) for _ in range(5))  # and it stays closed
        # The idle connection is closed by the proxy rather than left to carry a new request.
        idle.settimeout(1.0)  # well inside the grace period, which would end the wait anyway
        try:
            assert idle.recv(1) == b""
        except TimeoutError:
            pytest.fail("an idle keep-alive connection was still open 1 s after the listener closed")
    finally:
        idle.close()
    still_draining(proxy, [slow])

    release.set()
    response = slow.result(CLIENT_TIMEOUT_S)
    assert response.status_code == 200 and response.content == body
    returncode = exit_within(proxy, EXIT_BOUND_S)
    print(f"\nlistener closed {took:.2f}s after SIGTERM; held request drained; exit {returncode}")
    assert returncode in EXITED, proxy.stderr()


def test_the_grace_period_bounds_shutdown_when_the_origin_never_finishes(scene: Scene) -> None:
    origin, pool = scene.origin, scene.pool
    origin.route("/never", never_reply())
    origin.route("/endless", trickle())
    proxy = scene.proxy(SHORT_GRACE_S, env={"FLAGPROXY_UPSTREAM_READ_TIMEOUT_S": "30"})  # far beyond it

    def endless() -> tuple[int, float]:
        """Reads the never-ending body until the proxy cuts it: (bytes received, seconds since SIGTERM)."""
        received = 0
        with (
            pytest.raises(httpx.TransportError),
            httpx.Client(timeout=CLIENT_TIMEOUT_S) as client,
            client.stream("GET", f"{proxy.base_url}/endless") as response,
        ):
            assert response.status_code == 200
            for chunk in response.iter_raw():
                received += len(chunk)
                streaming.set()
        return received, time.monotonic() - signalled

    def never() -> tuple[Any, float]:
        response = get(f"{proxy.base_url}/never")
        return (response.status_code, response.json()), time.monotonic() - signalled

    streaming = threading.Event()
    signalled = float("inf")
    never_client = pool.submit(never)
    endless_client = pool.submit(endless)
    assert origin.wait_until(lambda o: o.heads_received == 2)
    assert streaming.wait(5)

    signalled = time.monotonic()
    proxy.process.send_signal(signal.SIGTERM)
    returncode = exit_within(proxy, SHORT_GRACE_S + 4)
    elapsed = time.monotonic() - signalled
    never_result, never_ended = never_client.result(5)
    received, endless_ended = endless_client.result(5)
    print(
        f"\ngrace {SHORT_GRACE_S:g}s: exit {returncode} after {elapsed:.2f}s; /never got {never_result} "
        f"after {never_ended:.2f}s; /endless cut after {received} bytes, {endless_ended:.2f}s"
    )
    assert returncode in EXITED, proxy.stderr()
    assert SHORT_GRACE_S <= elapsed < SHORT_GRACE_S + 3, elapsed  # waited the grace, then no longer
    status, body = never_result  # a JSON 503 naming the reason, never a hang or a bare 500
    assert status == 503 and body["error"] == "shutting_down", never_result
    assert "Exception in ASGI application" not in proxy.stderr()
    assert SHORT_GRACE_S <= never_ended < SHORT_GRACE_S + 3
    assert received > 0 and SHORT_GRACE_S <= endless_ended < SHORT_GRACE_S + 3
