"""Embedded in-memory store: the default when no Redis is configured."""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

from proxy.store.base import SnapshotHolder
from proxy.store.change import Change
from proxy.store.state import ApplyResult, Compiler, RawState, apply_change, audit_entries

log = logging.getLogger("flagproxy.store")


class MemoryStore(SnapshotHolder):
    def __init__(
        self, state: RawState | None = None, audit_max: int = 1000, compiler: Compiler | None = None
    ) -> None:
        super().__init__(compiler)
        self._state = state or RawState()
        self._audit: deque[dict[str, Any]] = deque(maxlen=audit_max)
        self.install_now(self._state)

    @property
    def ready(self) -> bool:
        return True

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self.stop_compiling()

    async def apply(self, change: Change) -> ApplyResult:
        state = self._state.copy()
        result = apply_change(state, change)
        if result.status == "stale":
            return result
        moved = state.source_versions != self._state.source_versions
        self._state = state  # also when unchanged: the source version may have moved on
        if result.status == "applied" or moved:
            await self.install(state)  # same store version when only a source version moved
        if result.status == "applied":
            items = state.items(change.source, change.kind)
            actions = {k: ("upsert" if k in items else "delete") for k in result.changed}
            for entry in audit_entries(change, result, actions):
                self._audit.appendleft(entry)
        return result

    async def audit(self, limit: int) -> list[dict[str, Any]]:
        return list(self._audit)[:limit]
