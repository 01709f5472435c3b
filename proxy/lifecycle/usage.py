"""Per-instance usage counters: O(1) per evaluated flag on the event loop, drained to the store.

Per flag: the fingerprint of the definition it is counted under (``fingerprints``), when this
instance first saw that fingerprint, the last time it was evaluated and the distinct outcomes served
since (two at most). Memory is bounded by the flags of the current snapshot.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

from proxy.engine.flag import Flag, Served, variant_name
from proxy.store.base import Snapshot
from proxy.store.ledger import MAX_VALUES, UsageDelta
from proxy.store.state import OVERRIDES


def fingerprints(snapshot: Snapshot) -> dict[str, str]:
    """Flag key → a digest of what serves it (its stored definition and its kill or promotion): a
    change to either is a change of the flag; equal on every instance serving the same state."""
    raw = snapshot.raw
    overrides = raw.items(OVERRIDES)
    out: dict[str, str] = {}
    for key, flag in snapshot.flags.items():
        text = raw.items(flag.source).get(key, "")
        digest = hashlib.sha1(
            f"{flag.source}\0{text}\0{overrides.get(key, '')}".encode(), usedforsecurity=False
        )
        out[key] = digest.hexdigest()[:16]
    return out


class UsageCounter:
    def __init__(self) -> None:
        self._fp: dict[str, str] = {}
        self._since: dict[str, float] = {}
        self._last: dict[str, float] = {}
        self._values: dict[str, set[bool | str]] = {}
        self._drained: dict[str, tuple[float, int]] = {}  # key → (last, outcomes) as last drained

    def use(self, prints: Mapping[str, str], now: float) -> None:
        """A new snapshot: flags whose fingerprint moved start counting outcomes afresh."""
        for key in [k for k in self._fp if k not in prints]:
            for table in (self._fp, self._since, self._last, self._values, self._drained):
                table.pop(key, None)
        for key, fp in prints.items():
            if self._fp.get(key) != fp:
                self._fp[key] = fp
                self._since[key] = now
                self._values[key] = set()
                self._drained.pop(key, None)

    def seen(self, key: str, value: bool | str, now: float) -> None:
        """``key`` was evaluated and served ``value``."""
        values = self._values.get(key)
        if values is not None:
            self._last[key] = now
            if len(values) < MAX_VALUES:
                values.add(value)

    def seen_all(self, resolved: Iterable[tuple[Flag, Served]], now: float) -> None:
        """One request's resolved flags (on the event loop: a few dict operations per flag)."""
        last, outcomes = self._last, self._values
        for flag, served in resolved:
            key = flag.key
            values = outcomes.get(key)
            if values is not None:
                last[key] = now
                if len(values) < MAX_VALUES:
                    values.add(served.value)

    def drain(self) -> list[UsageDelta]:
        """What moved since the last drain (new definitions, evaluations), as store deltas."""
        out: list[UsageDelta] = []
        for key in sorted(self._fp):
            state = (self._last.get(key, 0.0), len(self._values[key]))
            if self._drained.get(key) == state:
                continue
            self._drained[key] = state
            names = sorted(variant_name(v) for v in self._values[key])
            out.append((key, self._fp[key], self._since[key], state[0], names))
        return out

    def restore(self, deltas: list[UsageDelta]) -> None:
        """A flush failed: send these again at the next one."""
        for delta in deltas:
            self._drained.pop(delta[0], None)
