"""Big changes do not stall everyone: snapshots compile off the event loop, land in order, and the
Split API cannot hand the proxy an unbounded body.

A 5,000-flag webhook once blocked the loop for 1.2 s, and a 116 MB Split page for 24 s at 1.8 GB.
Where a compile runs is proven with a compiler that holds its compile until the test lets it go:
on the event loop that is a deadlock (the test cannot get there), off it the loop keeps working.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
import uvicorn
from support import LOCALHOST, RawOrigin, RedisServer, free_port, http_client, post_webhook
from test_split_sync import split

from proxy.app import FlagProxy
from proxy.config import ConfigError, StoreSettings, load_settings
from proxy.dataplane.client_side import ClientConnection
from proxy.engine import Flag, compile_flag
from proxy.metrics import Metrics
from proxy.sources.split import SplitApiError, SplitSettings, SplitSync
from proxy.store.change import Change, stored_text
from proxy.store.memory import MemoryStore
from proxy.store.redis import RedisStore
from proxy.store.state import RawState

pytestmark = pytest.mark.anyio

SECRET = "big-changes-secret"
API = "http://split.test/api"
ON = stored_text("on")


class GateCompiler:
    """The store's compiler for one source, ``gate``: a compile that reaches a held key waits (10 s at
    most) until the test releases it, and notes on which thread it ran."""

    precedence: tuple[str, ...] = ("gate",)
    kinds: Mapping[str, tuple[str, ...]] = {"gate": ("flags",)}

    def __init__(self, held: str = "held") -> None:
        self.held = held
        self.entered = threading.Event()
        self.released = threading.Event()
        self.released_in_time: list[bool] = []
        self.threads: list[threading.Thread] = []

    def compile(
        self, source: str, kinds: Mapping[str, Mapping[str, str]], cache: dict[str, Any]
    ) -> tuple[dict[str, Flag], dict[str, str]]:
        items = kinds.get("flags", {})
        self.threads.append(threading.current_thread())
        if self.held in items and not self.released.is_set():
            self.entered.set()
            self.released_in_time.append(self.released.wait(10))
        return {k: compile_flag(k, {"enabled": json.loads(t) == "on"}) for k, t in items.items()}, {}


async def entered(gate: GateCompiler) -> bool:
    return await asyncio.to_thread(gate.entered.wait, 10)


# --- off the loop ------------------------------------------------------------------------------------


async def test_the_memory_store_compiles_off_the_event_loop() -> None:
    gate = GateCompiler()
    store = MemoryStore(compiler=gate)
    try:
        applying = asyncio.create_task(store.apply(Change(source="gate", upsert={"held": ON})))
        assert await entered(gate)
        # The loop runs while the compile is under way; the previous snapshot keeps serving.
        assert (store.snapshot.version, dict(store.snapshot.flags)) == (0, {})
        gate.released.set()
        result = await applying
        assert (result.status, result.version) == ("applied", 1)
        assert gate.released_in_time == [True]
        assert gate.threads[0] is not threading.current_thread()
        assert store.snapshot.version == 1 and list(store.snapshot.flags) == ["held"]
    finally:
        gate.released.set()
        await store.close()


async def test_the_redis_store_compiles_off_the_event_loop(
    redis_server: RedisServer, redis_namespace: str
) -> None:
    gate = GateCompiler()
    settings = StoreSettings(redis_url=redis_server.url, environment=redis_namespace)
    store = RedisStore(settings, fallback=RawState, compiler=gate)
    try:
        applying = asyncio.create_task(store.apply(Change(source="gate", upsert={"held": ON})))
        assert await entered(gate)
        # Redis answers this instance while its compile is held: the loop is free.
        assert await store.redis.hget(store.keys.data("gate", "flags"), "held") == ON
        assert "held" not in store.snapshot.flags
        gate.released.set()
        result = await applying
        assert result.status == "applied"
        assert gate.released_in_time == [True]
        assert all(t is not threading.current_thread() for t in gate.threads)
        assert list(store.snapshot.flags) == ["held"]
    finally:
        gate.released.set()
        await store.close()


# --- in order ----------------------------------------------------------------------------------------


async def test_a_slow_compile_of_an_older_version_never_replaces_a_newer_one() -> None:
    gate = GateCompiler()
    store = MemoryStore(compiler=gate)
    installed: list[int] = []
    store.on_change(lambda snapshot: installed.append(snapshot.version))
    second_asked = asyncio.Event()

    async def second() -> Any:
        second_asked.set()  # apply() runs on to its install request before this task yields
        return await store.apply(Change(source="gate", upsert={"later": ON}))

    try:
        first = asyncio.create_task(store.apply(Change(source="gate", upsert={"held": ON})))
        assert await entered(gate)  # version 1 is compiling, held
        later = asyncio.create_task(second())
        await second_asked.wait()  # version 2 is asked for while version 1 still compiles
        gate.released.set()
        assert [(await first).version, (await later).version] == [1, 2]
        assert installed == [1, 2]
        assert store.snapshot.version == 2 and sorted(store.snapshot.flags) == ["held", "later"]
        assert gate.released_in_time == [True]
    finally:
        gate.released.set()
        await store.close()


async def test_an_install_older_than_the_current_snapshot_is_dropped() -> None:
    store = MemoryStore(compiler=GateCompiler())
    try:
        await store.apply(Change(source="gate", upsert={"a": ON}))
        await store.apply(Change(source="gate", upsert={"b": ON}))
        assert store.snapshot.version == 2
        older = RawState(version=1, data={"gate": {"flags": {"a": ON}}})
        kept = await store.install(older)
        assert kept is store.snapshot
        assert store.snapshot.version == 2 and sorted(store.snapshot.flags) == ["a", "b"]
        stepped_back = await store.install(older, allow_older=True)  # what the Redis store may ask
        assert stepped_back.version == 1 and store.snapshot is stepped_back
    finally:
        await store.close()


# --- a 5,000-flag webhook, with a ticker on the proxy's event loop ----------------------------------


def big_document(count: int) -> dict[str, Any]:
    def flag(i: int) -> dict[str, Any]:
        condition = {
            "and": [{"==": [{"var": "country"}, "NZ"]}, {"regex": [{"var": "email"}, f"@x{i}\\.com$"]}]
        }
        return {
            "variants": {"on": {"weight": 50}, "off": {"weight": 50}},
            "rules": [{"if": condition, "variant": "on"}],
        }

    return {"flags": {f"big_{i:04d}": flag(i) for i in range(count)}}


async def serve_in_this_loop(app: FlagProxy, port: int) -> tuple[uvicorn.Server, asyncio.Task[None]]:
    config = uvicorn.Config(
        app, host=LOCALHOST, port=port, lifespan="on", log_level="warning", http=ClientConnection
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 20
    while not server.started:  # bounded polling of uvicorn's readiness flag (it has no event)
        assert not task.done() and time.monotonic() < deadline, "the proxy did not start"
        await asyncio.sleep(0.01)
    return server, task


async def longest_stall_during(work: Awaitable[Any]) -> tuple[Any, float]:
    """Run ``work`` while a ticker on this loop notes the longest gap between its wake-ups."""
    longest = 0.0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal longest
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)  # the measurement's own clock, not a wait for anything
            now = time.perf_counter()
            longest, last = max(longest, now - last), now

    ticking = asyncio.create_task(ticker())
    try:
        result = await work
    finally:
        done.set()
        await ticking
    return result, longest


async def test_a_5000_flag_webhook_leaves_the_loop_serving(
    origin: RawOrigin, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    flags_file = tmp_path / "flags.json"
    flags_file.write_text('{"flags": {}}')
    env = {
        "FLAGPROXY_STORE_FLAGS_FILE": str(flags_file),
        "FLAGPROXY_WEBHOOKS_SECRET": SECRET,
        "FLAGPROXY_WEBHOOKS_MAX_BODY_BYTES": str(16 << 20),
    }
    app = FlagProxy(load_settings(env=env, origins=[origin.url]))
    body = json.dumps(big_document(5000)).encode()
    port = free_port()
    server, serving = await serve_in_this_loop(app, port)
    base = f"http://{LOCALHOST}:{port}"
    try:
        # The client runs on a thread of its own: the loop measured is the proxy's alone.
        posted = asyncio.to_thread(post_webhook, base, body=body, secret=SECRET, timeout=120)
        response, stall = await longest_stall_during(posted)
        assert response.status_code == 202, response.text
        assert len(response.json()["changed"]) == 5000
        assert len(app.store.snapshot.flags) == 5000
        proxied = await asyncio.to_thread(
            lambda: http_client().get(f"{base}/big/after", headers={"X-User-Id": "u1"})
        )
        assert proxied.status_code == 200
        received = origin.only_request_to("/big/after")
        served = json.loads(received.value("X-Feature-Flags") or "{}")
        assert served and all(key.startswith("big_") for key in served)  # the new flags serve at once
        assert len(served) + int(received.value("X-Feature-Flags-Omitted") or 0) == 5000
        record_property("longest_loop_stall_ms", round(stall * 1000, 1))
        print(f"\n5,000-flag webhook: longest event-loop stall {stall * 1000:.0f} ms")
        assert stall < 5.0  # generous: what is left is the snapshot listeners (pre-flight, heap freeze)
    finally:
        server.should_exit = True
        await serving


# --- the Split API: bounded bodies, bounded pages, counts in the log ---------------------------------


def changes(d: list[dict[str, Any]], s: int, t: int) -> dict[str, Any]:
    return {"ff": {"d": d, "s": s, "t": t}, "rbs": {"d": [], "s": -1, "t": -1}}


def settled_route(names: list[str], till: int = 5) -> respx.Route:
    pages = {-1: changes([split(n, till) for n in names], -1, till), till: changes([], till, till)}
    return respx.get(f"{API}/splitChanges").mock(
        side_effect=lambda request: httpx.Response(200, json=pages[int(request.url.params["since"])])
    )


def split_sync(store: MemoryStore, metrics: Metrics | None = None, **settings: Any) -> SplitSync:
    config = SplitSettings(sdk_key="sdk-1", api_url=API, **settings)
    return SplitSync(config, store, client=httpx.AsyncClient(), metrics=metrics)


def stored_raw(store: MemoryStore) -> dict[str, Any]:
    return store.snapshot.raw.to_json() | {"saved_at": None}


CHUNK = 64 << 10


@respx.mock
async def test_a_streamed_body_over_max_response_bytes_is_dropped_unread(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settled_route(["kept"])
    store = MemoryStore()
    metrics = Metrics()
    sync = split_sync(store, metrics, max_response_bytes=1 << 20)
    await sync.sync_once()
    before = stored_raw(store)
    respx.reset()
    pulled: list[int] = []

    async def four_mib() -> AsyncIterator[bytes]:  # no Content-Length: only counting can stop it
        for i in range(64):
            pulled.append(i)
            yield b" " * CHUNK

    respx.get(f"{API}/splitChanges").mock(side_effect=lambda request: httpx.Response(200, content=four_mib()))

    def errors() -> float:
        labels = {"source": "split", "result": "error"}
        return metrics.registry.get_sample_value("flagproxy_source_syncs_total", labels) or 0.0

    with caplog.at_level(logging.ERROR, logger="flagproxy.split"):
        await sync.start()  # the background pull: the error is counted and logged, not raised
        try:
            deadline = time.monotonic() + 10
            while errors() < 1:  # bounded polling of the counter the pull increments
                assert time.monotonic() < deadline, "the failed pull was not counted"
                await asyncio.sleep(0.01)
        finally:
            await sync.close()
    assert len(pulled) == (1 << 20) // CHUNK + 1  # it stopped at the chunk that crossed 1 MiB
    assert stored_raw(store) == before  # the last good definitions stay
    assert any("max_response_bytes (1048576 bytes)" in r.getMessage() for r in caplog.records)


@respx.mock
async def test_a_declared_length_over_the_limit_is_refused_before_reading() -> None:
    store = MemoryStore()
    sync = split_sync(store, max_response_bytes=1000)
    big = json.dumps(changes([split(f"f{i}", 5) for i in range(50)], -1, 5)).encode()
    assert len(big) > 1000
    respx.get(f"{API}/splitChanges").mock(return_value=httpx.Response(200, content=big))
    with pytest.raises(SplitApiError, match=f"Content-Length {len(big)}"):
        await sync.sync_once()
    assert store.snapshot.raw.items("split") == {}


@respx.mock
async def test_segment_bodies_are_capped_too() -> None:
    flag = split("seg", 5, segment="huge")
    pages = {-1: changes([flag], -1, 5), 5: changes([], 5, 5)}
    respx.get(f"{API}/splitChanges").mock(
        side_effect=lambda request: httpx.Response(200, json=pages[int(request.url.params["since"])])
    )
    members = {
        "name": "huge",
        "added": [f"user-{i}" for i in range(5000)],
        "removed": [],
        "since": -1,
        "till": 1,
    }
    respx.get(f"{API}/segmentChanges/huge").mock(return_value=httpx.Response(200, json=members))
    store = MemoryStore()
    with pytest.raises(
        SplitApiError, match=r"segmentChanges/huge: the body exceeds \[split\] max_response_bytes"
    ):
        await split_sync(store, max_response_bytes=20_000).sync_once()
    assert store.snapshot.raw.items("split", "segments") == {}


@respx.mock
async def test_a_pull_follows_at_most_max_pages() -> None:
    route = respx.get(f"{API}/splitChanges").mock(
        side_effect=lambda request: httpx.Response(
            200, json=changes([], int(request.url.params["since"]), int(request.url.params["since"]) + 1)
        )
    )
    store = MemoryStore()
    with pytest.raises(SplitApiError, match="within 3 pages"):
        await split_sync(store, max_pages=3).sync_once()
    assert route.call_count == 3
    assert store.snapshot.raw.items("split") == {}


@pytest.mark.parametrize(
    ("field", "value"), [("max_response_bytes", 0), ("max_response_bytes", -1), ("max_pages", 0)]
)
def test_the_limits_must_be_positive(field: str, value: int) -> None:
    with pytest.raises(ConfigError, match=rf"\[split\] {field}: must be positive"):
        load_settings(env={f"FLAGPROXY_SPLIT_{field.upper()}": str(value)})


@respx.mock
async def test_a_big_pull_logs_a_count_not_every_name(caplog: pytest.LogCaptureFixture) -> None:
    names = [f"flag-{i:03d}" for i in range(300)]
    settled_route(names)
    store = MemoryStore()
    with caplog.at_level(logging.INFO, logger="flagproxy.split"):
        await split_sync(store).sync_once()
    assert len(store.snapshot.raw.items("split")) == 300
    lines = [r.getMessage() for r in caplog.records if r.name == "flagproxy.split"]
    assert "Split flags: 300 changed (store version 1)" in lines
    assert not any("flag-1" in line for line in lines)


HEAP_FREEZER_CHECK = """
import gc
from proxy.app import HeapFreezer

collections = []


def full(phase, info):
    if phase == "start" and info["generation"] == 2:
        collections.append(2)


gc.callbacks.append(full)
freezer = HeapFreezer()
freezer.collect()
base = gc.get_freeze_count()
assert collections, "the full pass collects"
collections.clear()
kept = [[i] for i in range(1000)]  # a new snapshot, say: alive, frozen, not walked
freezer()
assert collections == [] and gc.get_freeze_count() >= base + 1000, (collections, base)
gc.disable()  # nothing collects the cycles behind the freezer's back
junk = [[] for _ in range(base)]  # cyclic garbage as large as the heap
for item in junk:
    item.append(item)
del junk
freezer()  # frozen along with everything else: the set has doubled
assert collections == [] and gc.get_freeze_count() > base * 1.5, (collections, base)
freezer()  # grown by more than half since the full pass: collected
assert collections and gc.get_freeze_count() < base * 1.5, (collections, base)
assert kept[999] == [999]
print("ok")
"""


def test_the_heap_freezer_freezes_without_walking_the_heap_until_cyclic_garbage_piles_up() -> None:
    # the garbage collector is the process's: checked in an interpreter of its own, where no other
    # test's threads collect or freeze meanwhile
    import subprocess

    from support import PYTHON, REPO

    done = subprocess.run(
        [PYTHON, "-c", HEAP_FREEZER_CHECK], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
