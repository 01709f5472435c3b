"""The store interface the rest of the proxy sees: one immutable snapshot at a time, and writes."""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxy.engine import Flag
from proxy.engine.plan import TrimPlan
from proxy.store.bounded import BoundedCache
from proxy.store.change import Change
from proxy.store.state import ApplyResult, Compiler, NoSources, RawState, SnapshotBuilder

log = logging.getLogger("flagproxy.store")


PATH_CACHE_BYTES = 4 << 20  # the per-path plan cache's keys
PLAN_CACHE_BYTES = 32 << 20  # the distinct plans (they hold tuples as long as their flag sets)
PLAN_ENTRY_BYTES = 120  # per flag in a plan: keep, position, inverse, calls and the set key


@dataclass(frozen=True)
class Snapshot:
    """Compiled flags at one store version; never mutated, replaced whole."""

    version: int
    flags: Mapping[str, Flag]
    raw: RawState
    loaded_at: float = field(default_factory=time.time)
    ordered: tuple[Flag, ...] = ()
    routed: bool = False  # does any flag declare routes?
    invalid: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # source → key → problem
    # by path (bytes-bounded: paths are client input) and by distinct set of flags
    _plans: BoundedCache[TrimPlan] = field(
        default_factory=lambda: BoundedCache(PATH_CACHE_BYTES), compare=False, repr=False
    )
    _by_set: BoundedCache[TrimPlan] = field(
        default_factory=lambda: BoundedCache(PLAN_CACHE_BYTES), compare=False, repr=False
    )

    @classmethod
    def build(
        cls,
        version: int,
        flags: Mapping[str, Flag],
        raw: RawState,
        invalid: Mapping[str, Mapping[str, str]] | None = None,
    ) -> Snapshot:
        ordered = tuple(flags[k] for k in sorted(flags))
        routed = any(f.route_match is not None for f in ordered)
        return cls(
            version=version, flags=flags, raw=raw, ordered=ordered, routed=routed, invalid=invalid or {}
        )

    def for_path(self, path: str) -> tuple[Flag, ...]:
        """The flags resolved for ``path``, in key order (cached per path, bounded)."""
        if not self.routed:
            return self.ordered
        return self.plan_for_path(path).flags

    def plan_for_path(self, path: str) -> TrimPlan:
        """The flags that apply to ``path``, in keep order, for fitting into the header budget.

        Cached per path (``PATH_CACHE_BYTES`` of paths) but shared per distinct set of flags
        (``PLAN_CACHE_BYTES`` of plans): a path costs a dict entry, not a copy of its flag list,
        however many flags apply (paths are client input).
        """
        plans = self._plans
        if not self.routed:
            found = plans.get("")
            if found is None:
                found = plans.put("", TrimPlan.of(self.ordered))
            return found
        found = plans.get(path)
        if found is None:
            flags = tuple(f for f in self.ordered if f.applies_to(path))
            key = tuple(map(id, flags))
            found = self._by_set.get(key)
            if found is None:
                found = self._by_set.put(key, TrimPlan.of(flags), PLAN_ENTRY_BYTES * (len(flags) + 1))
            plans.put(path, found)
        return found


class StoreUnavailable(Exception):
    """A write could not reach the store (Redis); nothing was applied."""


class StoreTimeout(Exception):
    """A write reached the store but its answer did not come back: it may or may not be applied
    (a slow or paused Redis still runs it later). Read the state back before retrying."""


EMPTY = Snapshot.build(0, {}, RawState())
Listener = Callable[[Snapshot], None]
# an applied change, its result and the snapshot served before it (change notices)
ApplyListener = Callable[[Change, ApplyResult, Snapshot], None]


class FlagStore(Protocol):
    @property
    def snapshot(self) -> Snapshot: ...

    @property
    def ready(self) -> bool: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def apply(self, change: Change) -> ApplyResult: ...

    async def audit(self, limit: int) -> list[dict[str, Any]]: ...

    async def note(self, entry: dict[str, Any]) -> None:
        """Add an audit entry for an action that changed no flag (an experiment's data reset)."""
        ...

    def on_change(self, listener: Listener) -> None: ...


class SnapshotHolder:
    """The part every store shares: compile raw state off the event loop, swap the snapshot in, in
    order, tell listeners.

    Compiling thousands of flags takes seconds of CPU; on the event loop that is seconds without a
    single proxied request. ``install`` compiles on one dedicated thread (the builder's caches are not
    shared between threads) and swaps the result in on the loop. The compile thread still holds the
    GIL while it runs Python code, but CPython hands it to the waiting loop thread every switch
    interval (5 ms): the loop keeps turning during a compile, slower, pausing only while the garbage
    collector runs, instead of stopping for all of it. Listeners run on the loop after the swap.

    Swaps keep the order in which installs were asked for: a compile that finishes after a later one
    was swapped in is dropped, and so is a state older (by version) than the current snapshot, unless
    the caller says older is fine (``allow_older``: Redis is the truth, whatever version it holds).
    """

    def __init__(self, compiler: Compiler | None = None) -> None:
        self._snapshot = EMPTY
        self.compiler: Compiler = compiler or NoSources()
        self._builder = SnapshotBuilder(self.compiler)
        self._listeners: list[Listener] = []
        self._apply_listeners: list[ApplyListener] = []
        self._compile_lock = threading.Lock()  # one compile at a time, whichever thread runs it
        self._compile_thread: ThreadPoolExecutor | None = None
        self._tickets = itertools.count(1)
        self._installed_ticket = 0

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def on_change(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def on_apply(self, listener: ApplyListener) -> None:
        """Call ``listener`` for each change applied through this instance (once per change, whichever
        instance serves it: the one that wrote it)."""
        self._apply_listeners.append(listener)

    def applied(self, change: Change, result: ApplyResult, before: Snapshot) -> None:
        for listener in self._apply_listeners:
            try:
                listener(change, result, before)
            except Exception:
                log.exception("apply listener failed")

    def install_now(self, state: RawState) -> Snapshot:
        """Compile ``state`` on this thread and make it current: for constructors, before a loop runs."""
        return self._swap(next(self._tickets), self._build(state), allow_older=True)

    async def install(self, state: RawState, *, allow_older: bool = False) -> Snapshot:
        """Compile ``state`` on the compile thread, then make it current (see the class docstring);
        returns the snapshot current afterwards. A cancelled caller does not cancel the swap."""
        ticket = next(self._tickets)
        if self._compile_thread is None:
            self._compile_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flagproxy-compile")
        compiling = asyncio.get_running_loop().run_in_executor(self._compile_thread, self._build, state)

        async def swap_when_compiled() -> Snapshot:
            return self._swap(ticket, await compiling, allow_older)

        return await asyncio.shield(asyncio.ensure_future(swap_when_compiled()))

    def stop_compiling(self) -> None:
        """Let the compile thread go (the store is closing); a compile under way finishes unseen."""
        if self._compile_thread is not None:
            self._compile_thread.shutdown(wait=False, cancel_futures=True)
            self._compile_thread = None

    def _build(self, state: RawState) -> Snapshot:
        with self._compile_lock:
            flags = self._builder.compile(state)
            return Snapshot.build(state.version, flags, state, self._builder.problems)

    def _swap(self, ticket: int, snapshot: Snapshot, allow_older: bool) -> Snapshot:
        current = self._snapshot
        if ticket < self._installed_ticket or (not allow_older and snapshot.version < current.version):
            log.info(
                "compiled snapshot version %d not installed: the current one (version %d) is newer",
                snapshot.version,
                current.version,
            )
            return current
        self._installed_ticket = ticket
        self._snapshot = snapshot
        for listener in self._listeners:
            try:
                listener(snapshot)
            except Exception:
                log.exception("snapshot listener failed")
        return snapshot
