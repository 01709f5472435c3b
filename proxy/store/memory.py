"""Embedded in-memory store: the default when no Redis is configured."""

from __future__ import annotations

import logging
from collections import deque
from pathlib import Path
from typing import Any

from proxy.sources.change import Change
from proxy.sources.native import load_document
from proxy.store.base import SnapshotHolder
from proxy.store.state import ApplyResult, RawState, apply_change, audit_entries

log = logging.getLogger("flagproxy.store")


def initial_state(path: str | Path, required: bool) -> RawState:
    """The flags file as raw state; a missing optional file (the default seeds) means no flags."""
    if not Path(path).exists():
        if required:
            raise FileNotFoundError(f"flags file {path} not found")
        log.warning("no flags file at %s: starting with no flags", path)
        return RawState()
    return RawState.from_native_document(load_document(Path(path)))


class MemoryStore(SnapshotHolder):
    def __init__(self, state: RawState | None = None, audit_max: int = 1000) -> None:
        super().__init__()
        self._state = state or RawState()
        self._audit: deque[dict[str, Any]] = deque(maxlen=audit_max)
        self.install(self._state)

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> MemoryStore:
        return cls(RawState.from_native_document(document))

    @property
    def ready(self) -> bool:
        return True

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def apply(self, change: Change) -> ApplyResult:
        state = self._state.copy()
        result = apply_change(state, change)
        if result.status == "stale":
            return result
        moved = state.source_versions != self._state.source_versions
        self._state = state  # also when unchanged: the source version may have moved on
        if result.status == "applied" or moved:
            self.install(state)  # same store version when only a source version moved
        if result.status == "applied":
            items = state.items(change.source, change.kind)
            actions = {k: ("upsert" if k in items else "delete") for k in result.changed}
            for entry in audit_entries(change, result, actions):
                self._audit.appendleft(entry)
        return result

    async def audit(self, limit: int) -> list[dict[str, Any]]:
        return list(self._audit)[:limit]
