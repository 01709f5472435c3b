"""Live updates of the client flags API (``GET /__flags/client/v1/stream``, Server-Sent Events):
events after admin changes, heartbeats, token auth, the stream cap, a client that never reads, and
shutdown."""

from __future__ import annotations

import asyncio
import json
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from support import LOCALHOST, ProxyProcess, RawOrigin

from proxy.config import ClientKeySettings, Settings
from proxy.control.clients.keys import KeyRing
from proxy.control.clients.service import ClientAPI
from proxy.control.clients.stream import FlagStream
from proxy.engine import compile_document
from proxy.metrics import Metrics
from proxy.store.base import Snapshot
from proxy.store.state import RawState

KEY = "stream-key-0123456789ab"
NARROW = "narrow-key-0123456789ab"
ADMIN = "admin-token-0123456789"
FLAGS = {"flags": {"banner": {}, "other": {}, "game-mode": {"variants": {"a": {"weight": 1}}}}}
CONFIG = f"""
[admin]
token = "{ADMIN}"
[client_api]
heartbeat_s = 0.3
max_streams = 3
[[client_keys]]
name = "web"
key = "{KEY}"
[[client_keys]]
name = "narrow"
key = "{NARROW}"
flags = ["banner"]
"""


class SseReader:
    """Reads a stream's lines on a thread; ``next_block`` waits for the next event or comment."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.client = httpx.Client(timeout=httpx.Timeout(10, read=30))
        self.response = self.client.send(self.client.build_request("GET", url, headers=headers), stream=True)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for line in self.response.iter_lines():
                self.lines.put(line)
        except httpx.HTTPError:
            pass
        self.lines.put(None)

    def next_block(self, timeout: float = 5.0) -> list[str] | None:
        """The lines up to the next blank line; None when the stream ended."""
        block: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            if line is None:
                return None
            if line == "":
                if block:
                    return block
                continue
            block.append(line)

    def next_event(self, timeout: float = 5.0) -> dict[str, Any]:
        while True:
            block = self.next_block(timeout)
            assert block is not None, "the stream ended"
            if block[0] == "event: message":
                assert block[1].startswith("data: ")
                data: dict[str, Any] = json.loads(block[1][len("data: ") :])
                return data

    def close(self) -> None:
        self.response.close()
        self.client.close()


@pytest.fixture(scope="module")
def proxy(proxy_factory: Callable[..., ProxyProcess], origin: RawOrigin) -> ProxyProcess:
    return proxy_factory([origin.url], config=CONFIG, flags=FLAGS)


@pytest.fixture
def open_stream(proxy: ProxyProcess) -> Iterator[Callable[..., SseReader]]:
    opened: list[SseReader] = []

    def make(path: str = "/__flags/client/v1/stream", key: str | None = KEY) -> SseReader:
        reader = SseReader(f"{proxy.base_url}{path}", {"X-API-Key": key} if key else None)
        opened.append(reader)
        return reader

    yield make
    for reader in opened:
        reader.close()
    deadline = time.monotonic() + 5
    while open_streams(proxy):  # the proxy has seen them go: the next test has every slot
        assert time.monotonic() < deadline
        time.sleep(0.02)


def open_streams(proxy: ProxyProcess) -> float:
    text = httpx.get(f"{proxy.base_url}/__flags/metrics").text
    return sum(
        float(line.split()[1]) for line in text.splitlines() if line.startswith("flagproxy_client_streams ")
    )


def admin(proxy: ProxyProcess, action: str, flag: str) -> int:
    response = httpx.post(
        f"{proxy.base_url}/__flags/api/flags/{flag}/{action}", headers={"Authorization": f"Bearer {ADMIN}"}
    )
    assert response.status_code == 200, response.text
    version: int = response.json()["version"]
    return version


def stream_uri(proxy: ProxyProcess, key: str = KEY) -> str:
    body = httpx.post(
        f"{proxy.base_url}/__flags/ofrep/v1/evaluate/flags",
        json={"context": {"targetingKey": "u"}},
        headers={"X-API-Key": key},
    ).json()
    uri: str = body["eventStreams"][0]["endpoint"]["requestUri"]
    return uri


def test_an_admin_change_reaches_the_stream_as_a_refetch_event(
    proxy: ProxyProcess, open_stream: Callable[..., SseReader]
) -> None:
    reader = open_stream()
    assert reader.response.status_code == 200
    assert reader.response.headers["content-type"].startswith("text/event-stream")
    assert reader.next_block() == ["retry: 2000", ": connected"]
    started = time.monotonic()
    version = admin(proxy, "kill", "banner")
    assert reader.next_event() == {"type": "refetchEvaluation", "etag": f'"v{version}"'}
    assert time.monotonic() - started < 1.0
    admin(proxy, "restore", "banner")
    reader.next_event()


def test_a_change_to_a_flag_the_key_does_not_see_sends_nothing(
    proxy: ProxyProcess, open_stream: Callable[..., SseReader]
) -> None:
    reader = open_stream(key=NARROW)
    reader.next_block()
    admin(proxy, "kill", "other")  # not the narrow key's
    version = admin(proxy, "kill", "banner")
    assert reader.next_event()["etag"] == f'"v{version}"'  # the first event is banner's
    admin(proxy, "restore", "other")
    version = admin(proxy, "restore", "banner")
    assert reader.next_event()["etag"] == f'"v{version}"'


def test_idle_streams_get_heartbeat_comments(open_stream: Callable[..., SseReader]) -> None:
    reader = open_stream()
    reader.next_block()
    assert reader.next_block(timeout=2) == [": heartbeat"]
    assert reader.next_block(timeout=2) == [": heartbeat"]


def test_the_advertised_token_opens_the_stream(
    proxy: ProxyProcess, open_stream: Callable[..., SseReader]
) -> None:
    reader = open_stream(stream_uri(proxy), key=None)
    assert reader.response.status_code == 200
    reader.next_block()
    version = admin(proxy, "kill", "game-mode")
    assert reader.next_event()["etag"] == f'"v{version}"'
    admin(proxy, "restore", "game-mode")


def test_garbled_expired_or_foreign_tokens_are_401(proxy: ProxyProcess) -> None:
    ring = KeyRing([ClientKeySettings(name="web", key=KEY)])
    expired = ring.mint(ring.by_name["web"], int(time.time()) - 1)
    good = stream_uri(proxy).split("token=")[1]
    name, expiry, signature = good.split(".")
    forged_expiry = f"{name}.{int(expiry) + 3600}.{signature}"
    other_key = f"narrow.{expiry}.{signature}"
    for token in ("", "garbage", expired, forged_expiry, other_key, good[:-2] + "AA", good + "x"):
        response = httpx.get(f"{proxy.base_url}/__flags/client/v1/stream", params={"token": token})
        assert response.status_code == 401, token
        assert response.json()["error"] == "unauthorized"
    assert httpx.get(f"{proxy.base_url}/__flags/client/v1/stream").status_code == 401  # no key at all


def test_streams_beyond_max_streams_are_503(
    proxy: ProxyProcess, open_stream: Callable[..., SseReader]
) -> None:
    readers = [open_stream() for _ in range(3)]
    for reader in readers:
        reader.next_block()
    refused = httpx.get(f"{proxy.base_url}/__flags/client/v1/stream", headers={"X-API-Key": KEY})
    assert refused.status_code == 503 and refused.json()["error"] == "too_many_streams"
    readers[0].close()

    def admitted() -> bool:
        with httpx.stream(
            "GET", f"{proxy.base_url}/__flags/client/v1/stream", headers={"X-API-Key": KEY}
        ) as response:
            return response.status_code == 200

    deadline = time.monotonic() + 5
    while not admitted():  # the closed stream's place is freed once the proxy sees it go
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_client_that_never_reads_does_not_hold_the_others_back(
    proxy: ProxyProcess, open_stream: Callable[..., SseReader]
) -> None:
    """Changes while a client reads nothing: the others get their events at once, memory stays put
    (what that stream holds is one pending beacon: the in-process test below)."""
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect((LOCALHOST, proxy.port))
    stuck.sendall(f"GET /__flags/client/v1/stream HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n\r\n".encode())
    reader = open_stream()
    reader.next_block()
    rss = proxy.rss_bytes()
    for _ in range(25):
        admin(proxy, "kill", "other")
        admin(proxy, "restore", "other")
    started = time.monotonic()
    version = admin(proxy, "kill", "banner")
    while reader.next_event()["etag"] != f'"v{version}"':
        pass
    assert time.monotonic() - started < 1.0
    assert proxy.rss_bytes() - rss < 8 << 20
    admin(proxy, "restore", "banner")
    stuck.close()


def test_shutdown_ends_open_streams_cleanly_and_at_once(
    proxy_factory: Callable[..., ProxyProcess], origin: RawOrigin
) -> None:
    own = proxy_factory([origin.url], config=CONFIG, flags=FLAGS)
    reader = SseReader(f"{own.base_url}/__flags/client/v1/stream", {"X-API-Key": KEY})
    reader.next_block()
    started = time.monotonic()
    assert own.process is not None
    own.process.send_signal(signal.SIGTERM)
    while reader.next_block(timeout=5) is not None:  # heartbeats until the end
        pass
    assert time.monotonic() - started < 3.0  # not the 10 s grace period
    assert own.process.wait(10) in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM after a graceful exit
    reader.close()


# --- in process: what one stream holds while its client does not read ----------------------------


class StubStore:
    def __init__(self) -> None:
        self.snapshot = Snapshot.build(1, compile_document(FLAGS), RawState())
        self.listeners: list[Callable[[Snapshot], None]] = []

    def on_change(self, listener: Callable[[Snapshot], None]) -> None:
        self.listeners.append(listener)

    def change(self) -> None:
        self.snapshot = Snapshot.build(self.snapshot.version + 1, compile_document(FLAGS), RawState())
        for listener in self.listeners:
            listener(self.snapshot)


class StuckStream:
    """One stream served in process to a client that stops reading at the first event: that write
    never drains. ``disconnected`` lets the client go."""

    def __init__(self) -> None:
        settings = Settings(client_keys=(ClientKeySettings(name="web", key=KEY),))
        self.store: Any = StubStore()
        self.clients = ClientAPI(settings, self.store, Metrics())
        self.stuck = asyncio.Event()
        self.disconnected = asyncio.Event()
        self.sent: list[Any] = []

    async def send(self, message: Any) -> None:
        self.sent.append(message)
        if message.get("body", b"").startswith(b"event:"):
            self.stuck.set()
            await asyncio.Event().wait()  # the client stopped reading: this write never drains

    async def receive(self) -> Any:
        if not self.sent:
            return {"type": "http.request", "body": b"", "more_body": False}
        await self.disconnected.wait()
        return {"type": "http.disconnect"}

    async def start(self) -> asyncio.Task[None]:
        """The stream, running, with its first event stuck in the write."""
        scope = {"type": "http", "headers": [(b"x-api-key", KEY.encode())], "query_string": b""}
        task = asyncio.create_task(FlagStream(self.clients)(scope, self.receive, self.send))
        while self.clients.hub.count == 0:
            await asyncio.sleep(0)
        self.store.change()
        await self.stuck.wait()
        return task


@pytest.mark.anyio
async def test_a_stream_whose_writes_block_holds_one_pending_beacon_however_many_changes() -> None:
    stream = StuckStream()
    task = await stream.start()
    for _ in range(1000):
        stream.store.change()
    assert stream.clients.hub.pending() == 1  # a thousand changes, one beacon waiting
    assert len(stream.sent) == 3  # head, opening comment, the one event being written
    stream.disconnected.set()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert stream.clients.hub.count == 0


@pytest.mark.anyio
async def test_shutdown_cuts_a_stream_whose_write_is_stuck_on_a_client_not_reading() -> None:
    """A write that never drains would hold the shutdown for its whole grace period: closing the
    hub gives it up, and the stream ends unfinished (the connection is then cut)."""
    stream = StuckStream()
    task = await stream.start()
    stream.clients.hub.close_all()
    await asyncio.wait_for(task, 2)  # returns: not stuck until the grace period's cancellation
    assert not any(m.get("more_body") is False for m in stream.sent)  # unfinished: cut, not ended
    assert stream.clients.hub.count == 0
