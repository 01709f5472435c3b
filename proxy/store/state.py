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

Compiling is lenient where writing is strict: a stored definition that no longer compiles (bad
text written straight into Redis, a field from a newer release the source cannot ignore) keeps
serving the flag's last good definition, and the problem is logged once and exposed on the
snapshot (``Snapshot.invalid``, ``flagproxy_store_invalid_definitions``).
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


@dataclass(frozen=True)
class Generation:
    """Which seeding of a shared store a state belongs to (``proxy.store.redis``): ``id`` is new at
    every seed or re-seed; ``base_id``/``base_version`` name the content the seed was written from
    (``base_version`` -1: the flags file, nothing before it)."""

    id: str = ""
    base_id: str = ""
    base_version: int = -1

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "base_id": self.base_id, "base_version": self.base_version}

    @classmethod
    def from_json(cls, raw: Any) -> Generation:
        if not isinstance(raw, Mapping):
            return cls()
        return cls(str(raw.get("id", "")), str(raw.get("base_id", "")), int(raw.get("base_version", -1)))


@dataclass
class RawState:
    version: int = 0
    data: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)  # source → kind → key → text
    item_versions: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    source_versions: dict[str, dict[str, int]] = field(default_factory=dict)  # source → kind → version
    generation: Generation = field(default_factory=Generation)

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
            "generation": self.generation.to_json(),
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
            generation=Generation.from_json(raw.get("generation")),
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
    """Compiles raw state into flags; each source reuses what did not change (its own cache).

    A stored item that does not compile keeps the flag its key last compiled to (per source): bad
    data in the store never takes a served flag away. ``problems`` holds the latest build's.
    """

    def __init__(self, compiler: Compiler) -> None:
        self.compiler = compiler
        self._caches: dict[str, dict[str, Any]] = {}
        self._served: dict[str, dict[str, Flag]] = {}  # source → key → the flag last built for it
        self._reported: set[tuple[str, str, str]] = set()
        self._overrides: dict[str, Mapping[str, Any]] = {}  # key → the override last applied
        self.problems: dict[str, dict[str, str]] = {}  # source → key → why its stored item is not used

    def compile(self, state: RawState) -> dict[str, Flag]:
        flags: dict[str, Flag] = {}
        self.problems = {}
        for source in self.compiler.precedence:
            kinds = state.data.get(source)
            if not kinds or not kinds.get("flags"):
                self._served.pop(source, None)
                continue
            try:
                compiled, problems = self.compiler.compile(source, kinds, self._caches.setdefault(source, {}))
            except Exception as exc:  # a broken source must not take the others (or the proxy) down
                compiled, problems = {}, {"*": f"{type(exc).__name__}: {exc}"}
            compiled = self._keep_last_good(source, kinds["flags"], compiled, problems)
            if problems:
                self.problems[source] = dict(problems)
            self._served[source] = compiled
            flags.update(compiled)
        overrides: dict[str, Any] = {}
        for key, text in state.items(OVERRIDES).items():
            override = self._override(key, text)
            if override is not None:
                overrides[key] = override
                if key in flags:
                    flags[key] = with_override(flags[key], override)
        self._overrides = overrides
        return flags

    def _override(self, key: str, text: str) -> Mapping[str, Any] | None:
        """A stored kill or promotion; one that does not parse keeps the last good one (a garbled
        kill must not switch the kill off)."""
        try:
            override = json.loads(text)
            if isinstance(override, dict):
                return override
            problem = "not a JSON object"
        except (ValueError, RecursionError) as exc:
            problem = f"invalid JSON: {exc}"
        self.problems.setdefault(OVERRIDES, {})[key] = problem
        kept = self._overrides.get(key)
        if (OVERRIDES, key, problem) not in self._reported:
            self._reported.add((OVERRIDES, key, problem))
            still = "still applying the last good one" if kept is not None else "ignored"
            log.error("stored override for %r is not valid (%s): %s", key, problem, still)
        return kept

    def _keep_last_good(
        self, source: str, stored: Mapping[str, str], compiled: dict[str, Flag], problems: Mapping[str, str]
    ) -> dict[str, Flag]:
        """``compiled`` plus, for each stored key that failed, the flag it compiled to before."""
        previous = self._served.get(source, {})
        failed = list(stored) if "*" in problems else [k for k in problems if k in stored]
        kept = {key: previous[key] for key in failed if key not in compiled and key in previous}
        for key, problem in problems.items():
            if (source, key, problem) in self._reported:  # say it once, not on every resync
                continue
            self._reported.add((source, key, problem))
            if key in kept:
                log.error(
                    "stored %s flag %r does not compile (%s): still serving its last good definition",
                    source,
                    key,
                    problem,
                )
            elif key == "*" and kept:
                log.error(
                    "stored %s flags do not compile (%s): still serving their last good definitions",
                    source,
                    problem,
                )
            else:
                log.error("stored %s flag %r does not compile and is not served: %s", source, key, problem)
        return {**compiled, **kept}
