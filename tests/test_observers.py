"""Observers: every finished exchange reaches them once, and none can slow or fail a request.

The proxy runs in this process (uvicorn in a thread) so that test observers can be plugged in; the
origin is a real socket server on 127.0.0.1.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import LOCALHOST, InProcessProxy, RawOrigin, free_port, wait_for

from proxy.app import FlagProxy
from proxy.config import load_settings
from proxy.dataplane.exchange import Exchange
from proxy.observers.base import Observers

FLAGS = {"flags": {"banner": {"variants": {"red": {"weight": 1}, "blue": {"weight": 1}}}}}


class Recorder:
    name = "recorder"
    inline = False

    def __init__(self) -> None:
        self.seen: list[Exchange] = []
        self.event = threading.Event()

    def observe(self, exchange: Exchange) -> None:
        self.seen.append(exchange)
        self.event.set()


class Raising:
    name = "raising"
    inline = True

    def __init__(self) -> None:
        self.calls = 0

    def observe(self, exchange: Exchange) -> None:
        self.calls += 1
        raise RuntimeError("observer bug")


class Blocking:
    name = "blocking"
    inline = False

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()

    def observe(self, exchange: Exchange) -> None:
        self.entered.set()
        self.release.wait(30)


def serve(origin_url: str, tmp_path: Path, observers: list[Any]) -> InProcessProxy:
    flags = tmp_path / "flags.json"
    flags.write_text(json.dumps(FLAGS))
    settings = load_settings(env={"FLAGPROXY_STORE_FLAGS_FILE": str(flags)}, origins=[origin_url])
    return InProcessProxy(FlagProxy(settings, observers=observers), free_port())


@pytest.fixture
def proxy_with(origin: RawOrigin, tmp_path: Path) -> Iterator[Any]:
    started: list[InProcessProxy] = []

    def make(observers: list[Any], origin_url: str = origin.url) -> InProcessProxy:
        proxy = serve(origin_url, tmp_path, observers).__enter__()
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.__exit__()


def test_an_exchange_carries_what_happened(proxy_with: Any, origin: RawOrigin) -> None:
    recorder = Recorder()
    proxy = proxy_with([recorder])
    response = httpx.get(f"{proxy.url}/obs/one?x=1", headers={"X-User-Id": "alice", "X-Request-Id": "rid-7"})
    assert response.status_code == 200
    assert recorder.event.wait(10)
    exchange = recorder.seen[0]
    received = origin.only_request_to("/obs/one")
    assert (exchange.method, exchange.path, exchange.status, exchange.request_id) == (
        "GET",
        "/obs/one",
        200,
        "rid-7",
    )
    assert exchange.key == "alice" and exchange.origin_label == "/"
    assert [f.key for f, _ in exchange.sent()] == ["banner"]
    assert received.value("X-Feature-Flags") == json.dumps(
        {"banner": exchange.sent()[0][1].value}, separators=(",", ":")
    )
    assert exchange.bytes_sent == len(response.content)
    assert exchange.upstream_latency_s is not None and exchange.duration_s >= exchange.upstream_latency_s


def test_errors_and_control_plane_requests_are_exchanges_too(proxy_with: Any, origin: RawOrigin) -> None:
    recorder = Recorder()
    proxy = proxy_with([recorder])
    assert httpx.get(f"{proxy.url}/__flags/healthz").status_code == 200
    wait_for(lambda: len(recorder.seen) == 1, what="the control-plane exchange")
    control = recorder.seen[0]
    assert (control.control, control.status, control.origin_label) == (True, 200, None)
    other = proxy_with([recorder], origin_url=f"http://{LOCALHOST}:{free_port()}")  # nobody listens
    assert httpx.get(f"{other.url}/obs/dead").status_code == 502
    wait_for(lambda: len(recorder.seen) == 2, what="the 502 exchange")
    failed = recorder.seen[1]
    assert (failed.status, failed.upstream_error, failed.control) == (502, "connect", False)


def test_an_observer_that_raises_fails_no_request(proxy_with: Any, origin: RawOrigin) -> None:
    raising, recorder = Raising(), Recorder()
    proxy = proxy_with([raising, recorder])
    with httpx.Client() as client:
        statuses = [client.get(f"{proxy.url}/obs/raise/{i}").status_code for i in range(20)]
    assert statuses == [200] * 20
    wait_for(lambda: len(recorder.seen) == 20, what="the other observer to see every exchange")
    assert raising.calls == 20
    errors = proxy.app.metrics.registry.get_sample_value(
        "flagproxy_observer_errors_total", {"observer": "raising"}
    )
    assert errors == 20


def test_an_observer_that_blocks_slows_no_request(proxy_with: Any, origin: RawOrigin) -> None:
    blocking = Blocking()
    proxy = proxy_with([blocking])
    proxy.app.observers.queue_size = 5
    try:
        with httpx.Client() as client:
            assert client.get(f"{proxy.url}/obs/block/first").status_code == 200
            assert blocking.entered.wait(10)  # the observer thread is now stuck in it
            started = time.monotonic()
            statuses = [client.get(f"{proxy.url}/obs/block/{i}").status_code for i in range(30)]
        assert statuses == [200] * 30  # every request answered while the observer is still blocked
        assert not blocking.release.is_set()
        dropped = proxy.app.metrics.registry.get_sample_value(
            "flagproxy_observer_dropped_total", {"observer": "blocking"}
        )
        assert dropped == 30 - 5 == proxy.app.observers.dropped
        assert time.monotonic() - started < 30  # no request waited for the observer's 30 s timeout
    finally:
        blocking.release.set()


def test_the_dispatcher_runs_inline_observers_first_and_isolates_each() -> None:
    order: list[str] = []

    class Inline:
        inline = True

        def __init__(self, name: str, fail: bool = False) -> None:
            self.name, self.fail = name, fail

        def observe(self, exchange: Exchange) -> None:
            order.append(self.name)
            if self.fail:
                raise ValueError(self.name)

    errors: list[str] = []
    observers = Observers([Inline("a", fail=True), Inline("b")], on_error=errors.append)
    observers.finish(Exchange("GET", "/", None, "r1"))
    assert order == ["a", "b"] and errors == ["a"]
