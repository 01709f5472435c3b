"""The store interface the rest of the proxy sees: one immutable snapshot at a time, and writes."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxy.engine import Flag
from proxy.engine.plan import TrimPlan
from proxy.store.change import Change
from proxy.store.state import ApplyResult, Compiler, NoSources, RawState, SnapshotBuilder

log = logging.getLogger("flagproxy.store")


@dataclass(frozen=True)
class Snapshot:
    """Compiled flags at one store version; never mutated, replaced whole."""

    version: int
    flags: Mapping[str, Flag]
    raw: RawState
    loaded_at: float = field(default_factory=time.time)
    ordered: tuple[Flag, ...] = ()
    routed: bool = False  # does any flag declare routes?
    _by_path: dict[str, tuple[Flag, ...]] = field(default_factory=dict, compare=False, repr=False)
    _plans: dict[str, TrimPlan] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, version: int, flags: Mapping[str, Flag], raw: RawState) -> Snapshot:
        ordered = tuple(flags[k] for k in sorted(flags))
        routed = any(f.route_match is not None for f in ordered)
        return cls(version=version, flags=flags, raw=raw, ordered=ordered, routed=routed)

    def for_path(self, path: str) -> tuple[Flag, ...]:
        """The flags resolved for ``path``, in key order (cached per path, bounded)."""
        if not self.routed:
            return self.ordered
        found = self._by_path.get(path)
        if found is None:
            if len(self._by_path) >= 4096:
                self._by_path.clear()
            found = self._by_path[path] = tuple(f for f in self.ordered if f.applies_to(path))
        return found

    def plan_for_path(self, path: str) -> TrimPlan:
        """``for_path(path)`` in keep order, for fitting into the header budget (cached alike)."""
        key = path if self.routed else ""
        found = self._plans.get(key)
        if found is None:
            if len(self._plans) >= 4096:
                self._plans.clear()
            found = self._plans[key] = TrimPlan.of(self.for_path(path))
        return found


class StoreUnavailable(Exception):
    """A write could not reach the store (Redis); nothing was applied."""


EMPTY = Snapshot.build(0, {}, RawState())
Listener = Callable[[Snapshot], None]


class FlagStore(Protocol):
    @property
    def snapshot(self) -> Snapshot: ...

    @property
    def ready(self) -> bool: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def apply(self, change: Change) -> ApplyResult: ...

    async def audit(self, limit: int) -> list[dict[str, Any]]: ...

    def on_change(self, listener: Listener) -> None: ...


class SnapshotHolder:
    """The part every store shares: compile raw state, swap the snapshot, tell listeners."""

    def __init__(self, compiler: Compiler | None = None) -> None:
        self._snapshot = EMPTY
        self.compiler: Compiler = compiler or NoSources()
        self._builder = SnapshotBuilder(self.compiler)
        self._listeners: list[Listener] = []

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def on_change(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def install(self, state: RawState) -> Snapshot:
        """Compile ``state`` and make it current (the compile happens before anything is swapped)."""
        snapshot = Snapshot.build(state.version, self._builder.compile(state), state)
        self._snapshot = snapshot
        for listener in self._listeners:
            try:
                listener(snapshot)
            except Exception:
                log.exception("snapshot listener failed")
        return snapshot
