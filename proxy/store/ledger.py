"""What the store keeps for the flag lifecycle (docs/lifecycle.md), beside the flags themselves:

- **first seen**: when a flag key first appeared, per key; the first writer wins (Redis ``HSETNX``),
  so every instance agrees and it outlives restarts;
- **usage**: per flag, the definition's fingerprint and when it was first seen (``changed``), the
  last time any instance evaluated it (``last``), and the distinct outcomes served since that
  fingerprint appeared (``values``, two at most: two already means "not one for everyone");
- **digest claims**: which flags a day's stale digest already named, so it names each once a day
  whichever instance sends it.

Usage is merged the same way in memory (``merge_usage``) and in Redis (the Lua script in
``proxy.store.redis_ledger``). Times are epoch seconds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

MAX_VALUES = 2
# a usage delta: (flag key, fingerprint, seen since (epoch s), last evaluated or 0, outcomes served)
UsageDelta = tuple[str, str, float, float, Sequence[str]]


class Ledger(Protocol):
    async def first_seen(self, times: Mapping[str, float]) -> dict[str, float]:
        """Record each key's time unless the key was seen before; every key's first-seen time."""
        ...

    async def add_usage(self, deltas: Sequence[UsageDelta]) -> None: ...

    async def usage(self) -> dict[str, dict[str, Any]]:
        """flag → ``{"fp", "changed", "last", "values"}``."""
        ...

    async def claim_digest(self, day: str, keys: Sequence[str]) -> list[str]:
        """The keys not yet named in ``day``'s digest, now claimed (by this caller only)."""
        ...


def merge_usage(stored: Mapping[str, Any] | None, delta: UsageDelta) -> dict[str, Any]:
    """One usage record after ``delta`` (the Lua script in ``proxy.store.redis_ledger`` does the same)."""
    _, fp, changed, last, values = delta
    record: dict[str, Any]
    if stored is None or (stored.get("fp") != fp and changed >= float(stored.get("changed", 0))):
        previous_last = float(stored.get("last", 0)) if stored is not None else 0.0
        record = {"fp": fp, "changed": changed, "last": previous_last, "values": []}
    else:
        record = dict(stored)
        known = stored.get("values")
        record["values"] = list(known) if isinstance(known, list) else []
    if last > float(record.get("last", 0)):
        record["last"] = last
    if record["fp"] == fp:
        merged: list[str] = record["values"]
        for value in values:
            if len(merged) >= MAX_VALUES:
                break
            if value not in merged:
                merged.append(value)
    return record


class MemoryLedger:
    """The embedded store's ledger: this process only (nothing outlives a restart)."""

    def __init__(self) -> None:
        self._first_seen: dict[str, float] = {}
        self._usage: dict[str, dict[str, Any]] = {}
        self._digests: dict[str, set[str]] = {}

    async def first_seen(self, times: Mapping[str, float]) -> dict[str, float]:
        for key, at in times.items():
            self._first_seen.setdefault(key, at)
        return dict(self._first_seen)

    async def add_usage(self, deltas: Sequence[UsageDelta]) -> None:
        for delta in deltas:
            self._usage[delta[0]] = merge_usage(self._usage.get(delta[0]), delta)

    async def usage(self) -> dict[str, dict[str, Any]]:
        return {k: dict(v) for k, v in self._usage.items()}

    async def claim_digest(self, day: str, keys: Sequence[str]) -> list[str]:
        for old in [d for d in self._digests if d < day]:
            del self._digests[old]
        named = self._digests.setdefault(day, set())
        claimed = [k for k in keys if k not in named]
        named.update(claimed)
        return claimed
