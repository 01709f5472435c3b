"""What a store holds, how a change applies to it, and how it compiles into a snapshot.

Raw state: per source and kind, flag (or segment) key → the definition's JSON text, plus per-item
and per-kind source versions. A ``Change`` applies with the same rules in memory (here) and in
Redis (the Lua script in ``proxy.store.redis``):

- a change carrying a source version not newer than the stored one is **stale**: nothing applies;
- a ``replace`` without a source version once one is stored is refused (**version_required**): a
  versionless document must not undo versioned ones;
- an item carrying its own version (updatedAt, changeNumber) not newer than the stored item's is
  ignored, the rest of the change applies;
- an item without one takes the change's ``stamp`` (when it was made), applied unless the stored
  item is newer (equal applies: stamps are whole seconds); with ``supersede`` it always applies and
  keeps the higher of the two; with no stamp it is unordered;
- a delete leaves its version behind (a tombstone), so an older upsert cannot bring the item back;
- ``replace`` deletes every stored item the change does not mention;
- only real differences bump the store version, which every snapshot carries.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxy.engine import Flag, with_override
from proxy.store.change import Change, now_iso

log = logging.getLogger("flagproxy.store")

OVERRIDES = "overrides"  # kills and promotions (the admin API): applied on top of every source
OVERRIDE_KINDS = ("flags",)


class Compiler(Protocol):
    """What the store is handed to turn stored items into flags (the source registry implements it).

    The store knows no source: it holds text per source and kind, and asks this.
    """

    @property
    def precedence(self) -> tuple[str, ...]:
        """Sources in precedence order: a later source wins a flag key two of them define."""
        ...

    @property
    def kinds(self) -> Mapping[str, tuple[str, ...]]:
        """The kinds of items each source stores (``flags`` at least)."""
        ...

    def compile(
        self, source: str, kinds: Mapping[str, Mapping[str, str]], cache: dict[str, Any]
    ) -> tuple[dict[str, Flag], dict[str, str]]:
        """One source's stored items → (flags, {key: problem}); ``cache`` is the source's own."""
        ...


class NoSources:
    """A compiler that knows no source: raw state is kept, nothing is compiled (store tests)."""

    precedence: tuple[str, ...] = ()
    kinds: Mapping[str, tuple[str, ...]] = {}

    def compile(
        self, source: str, kinds: Mapping[str, Mapping[str, str]], cache: dict[str, Any]
    ) -> tuple[dict[str, Flag], dict[str, str]]:
        return {}, {}


def layout(compiler: Compiler) -> dict[str, tuple[str, ...]]:
    """Every (source → kinds) the store keeps: the sources', and the overrides."""
    return {**compiler.kinds, OVERRIDES: OVERRIDE_KINDS}


@dataclass
class ApplyResult:
    status: str  # "applied" | "unchanged" | "stale" | "version_required" | "duplicate"
    version: int
    changed: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    stored_source_version: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "version": self.version, "changed": self.changed}
        if self.ignored:
            out["ignored"] = self.ignored
        if self.stored_source_version is not None:
            out["stored_source_version"] = self.stored_source_version
        return out


@dataclass
class RawState:
    version: int = 0
    data: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)  # source → kind → key → text
    item_versions: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    source_versions: dict[str, dict[str, int]] = field(default_factory=dict)  # source → kind → version

    def items(self, source: str, kind: str = "flags") -> dict[str, str]:
        return self.data.get(source, {}).get(kind, {})

    def copy(self) -> RawState:
        return copy.deepcopy(self)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "data": self.data,
            "item_versions": self.item_versions,
            "source_versions": self.source_versions,
            "saved_at": now_iso(),
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> RawState:
        return cls(
            version=int(raw.get("version", 0)),
            data={s: {k: dict(v) for k, v in kinds.items()} for s, kinds in raw.get("data", {}).items()},
            item_versions={
                s: {k: {i: int(n) for i, n in v.items()} for k, v in kinds.items()}
                for s, kinds in raw.get("item_versions", {}).items()
            },
            source_versions={
                s: {k: int(n) for k, n in kinds.items()}
                for s, kinds in raw.get("source_versions", {}).items()
            },
        )


def item_version(change: Change, key: str, stored: int | None) -> tuple[bool, int | None]:
    """Does ``change`` apply to ``key`` (stored version ``stored``), and the item's version after it?

    ``None`` as the version: the item keeps no version (an upsert keeps the stored one, a delete
    forgets it). The Lua script in ``proxy.store.redis`` has the same function.
    """
    own = change.item_versions.get(key)
    if own is not None:
        return (stored is None or own > stored), own
    if change.stamp is None:
        return True, None
    if change.supersede:
        return True, change.stamp if stored is None else max(stored, change.stamp)
    return (stored is None or stored <= change.stamp), change.stamp


def apply_change(state: RawState, change: Change) -> ApplyResult:
    """Apply ``change`` to ``state`` in place (the memory store's write path)."""
    kinds = state.source_versions.setdefault(change.source, {})
    stored = kinds.get(change.kind)
    if change.source_version is not None and stored is not None and change.source_version <= stored:
        return ApplyResult("stale", state.version, stored_source_version=stored)
    if change.replace and change.source_version is None and stored is not None:
        return ApplyResult("version_required", state.version, stored_source_version=stored)

    items = state.data.setdefault(change.source, {}).setdefault(change.kind, {})
    versions = state.item_versions.setdefault(change.source, {}).setdefault(change.kind, {})
    changed: list[tuple[str, str]] = []
    ignored: list[str] = []

    for key, text in change.upsert.items():
        applies, version = item_version(change, key, versions.get(key))
        if not applies:
            ignored.append(key)
            continue
        if items.get(key) != text:
            items[key] = text
            changed.append((key, "upsert"))
        if version is not None:
            versions[key] = version
    deletes = [k for k in items if k not in change.upsert] if change.replace else change.delete
    for key in list(deletes):
        applies, version = item_version(change, key, versions.get(key))
        if not applies:
            ignored.append(key)
            continue
        if items.pop(key, None) is not None:
            changed.append((key, "delete"))
        if version is not None:
            versions[key] = version  # a tombstone: older upserts stay ignored
        else:
            versions.pop(key, None)
    if change.source_version is not None:
        kinds[change.kind] = change.source_version
    if not changed:
        return ApplyResult("unchanged", state.version, ignored=ignored)
    state.version += 1
    return ApplyResult("applied", state.version, changed=[k for k, _ in changed], ignored=ignored)


def audit_entries(change: Change, result: ApplyResult, actions: Mapping[str, str]) -> list[dict[str, Any]]:
    return [
        {
            "time": now_iso(),
            "source": change.source,
            "actor": change.actor,
            "flag": key,
            "action": change.action or actions.get(key, "upsert"),
            "old_version": result.version - 1,
            "new_version": result.version,
        }
        for key in result.changed
    ]


class SnapshotBuilder:
    """Compiles raw state into flags; each source reuses what did not change (its own cache)."""

    def __init__(self, compiler: Compiler) -> None:
        self.compiler = compiler
        self._caches: dict[str, dict[str, Any]] = {}
        self._reported: set[tuple[str, str, str]] = set()

    def compile(self, state: RawState) -> dict[str, Flag]:
        flags: dict[str, Flag] = {}
        for source in self.compiler.precedence:
            kinds = state.data.get(source)
            if not kinds or not kinds.get("flags"):
                continue
            try:
                compiled, problems = self.compiler.compile(source, kinds, self._caches.setdefault(source, {}))
            except Exception as exc:  # a broken source must not take the others (or the proxy) down
                compiled, problems = {}, {"*": f"{type(exc).__name__}: {exc}"}
            for key, problem in problems.items():
                if (source, key, problem) not in self._reported:  # say it once, not on every resync
                    self._reported.add((source, key, problem))
                    log.error(
                        "stored %s flag %r does not compile and is not served: %s", source, key, problem
                    )
            flags.update(compiled)
        for key, text in state.items(OVERRIDES).items():
            if key in flags:
                try:
                    flags[key] = with_override(flags[key], json.loads(text))
                except (ValueError, TypeError, AttributeError):
                    log.error("override for %r is not valid; ignored", key)
        return flags
