"""Embedded in-memory store: the default when no Redis is configured."""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

from proxy.store.base import SnapshotHolder
from proxy.store.change import Change, now_iso
from proxy.store.ledger import MemoryLedger
from proxy.store.state import ApplyResult, Compiler, RawState, apply_change, audit_entries

log = logging.getLogger("flagproxy.store")


class MemoryStore(SnapshotHolder):
    def __init__(
        self, state: RawState | None = None, audit_max: int = 1000, compiler: Compiler | None = None
    ) -> None:
        super().__init__(compiler)
        self._state = state or RawState()
        self._audit: deque[dict[str, Any]] = deque(maxlen=audit_max)
        self._deliveries: dict[tuple[str, str], float] = {}  # (source, delivery id) → forget at (monotonic)
        self.ledger = MemoryLedger()  # lifecycle: first seen, usage, digest claims (this process)
        self.install_now(self._state)

    @property
    def ready(self) -> bool:
        return True

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self.stop_compiling()

    def _seen(self, change: Change) -> bool:
        """Was ``change.delivery`` applied within its window? (expired ids are forgotten here)"""
        now = time.monotonic()
        if len(self._deliveries) >= 1024:
            self._deliveries = {k: at for k, at in self._deliveries.items() if at > now}
        forget_at = self._deliveries.get((change.source, change.delivery))
        return forget_at is not None and forget_at > now

    async def apply(self, change: Change) -> ApplyResult:
        if change.delivery and self._seen(change):
            return ApplyResult("duplicate", self._state.version)
        before = self.snapshot
        state = self._state.copy()
        result = apply_change(state, change)
        if result.status in ("stale", "version_required"):
            return result
        if change.delivery:
            self._deliveries[(change.source, change.delivery)] = time.monotonic() + change.delivery_ttl_s
        moved = state.source_versions != self._state.source_versions
        self._state = state  # also when unchanged: the source version may have moved on
        if result.status == "applied" or moved:
            await self.install(state)  # same store version when only a source version moved
        if result.status == "applied":
            items = state.items(change.source, change.kind)
            actions = {k: ("upsert" if k in items else "delete") for k in result.changed}
            for entry in audit_entries(change, result, actions):
                self._audit.appendleft(entry)
            self.applied(change, result, before)
        return result

    async def audit(self, limit: int) -> list[dict[str, Any]]:
        return list(self._audit)[:limit]

    async def note(self, entry: dict[str, Any]) -> None:
        self._audit.appendleft({"time": now_iso(), **entry})
