"""Split's documents: splitChanges and segmentChanges bodies, files and stored texts.

``parse_split_changes`` reads a splitChanges body (spec 1.3 ``ff``/``rbs`` or spec 1.1 ``splits``)
into raw flags and rule-based segments by name, dropping items that are not ACTIVE;
``segment_members`` reads a segmentChanges document or a plain member list; ``referenced_segments``
names the standard segments that definitions (raw objects or stored JSON texts) need, for the CLI's
``load_segments`` and for the sync's segment pulls alike.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from proxy.engine import FlagError

log = logging.getLogger("proxy.sources.split")  # one logger for the package, as when it was one module


def _active(raw: Mapping[str, Any]) -> bool:
    return bool(raw.get("status", "ACTIVE") == "ACTIVE")


def parse_split_changes(document: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A splitChanges body (spec 1.3 or 1.1) → ({flag: raw split}, {name: raw rule-based segment}).

    Items that are not ACTIVE are dropped (the SDK deletes them from storage).
    """
    if not isinstance(document, dict):
        raise FlagError("splitChanges", 'expected a JSON object ({"ff": ..., "rbs": ...} or {"splits": ...})')
    if "ff" in document:
        ff = document["ff"]
        if not isinstance(ff, dict) or not isinstance(ff.get("d", []), list):
            raise FlagError("ff", 'expected {"d": [split, ...], "s": since, "t": till}')
        flag_items = ff.get("d", [])
        rbs = document.get("rbs") or {}
        if not isinstance(rbs, dict) or not isinstance(rbs.get("d", []), list):
            raise FlagError("rbs", 'expected {"d": [rule-based segment, ...], "s": since, "t": till}')
        rbs_items = rbs.get("d", [])
    elif "splits" in document:
        flag_items = document["splits"]
        if not isinstance(flag_items, list):
            raise FlagError("splits", "expected a list of splits")
        rbs_items = []
    else:
        raise FlagError("splitChanges", 'expected "ff" (spec 1.3) or "splits" (spec 1.1)')
    return _by_name(flag_items, "ff.d"), _by_name(rbs_items, "rbs.d")


def _by_name(items: list[Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"].strip():
            raise FlagError(f"{where}[{i}]", "expected an object with a non-empty name")
        if _active(item):
            out[item["name"]] = item
        else:
            out.pop(item["name"], None)
    return out


def segment_members(document: Any, where: str = "segment") -> frozenset[Any]:
    """A segmentChanges document (``set(added) - set(removed)``) or a plain list of member keys."""
    if isinstance(document, list):
        return frozenset(document)
    if isinstance(document, dict):
        added = document.get("added") or []
        removed = document.get("removed") or []
        if isinstance(added, list) and isinstance(removed, list):
            try:
                return frozenset(added) - frozenset(removed)
            except TypeError:
                pass
    raise FlagError(where, 'expected a list of keys or {"name", "added": [...], "removed": [...]}')


def _matchers_of(raw: Mapping[str, Any]) -> Iterable[Mapping[str, Any]]:
    conditions = raw.get("conditions")
    for condition in conditions if isinstance(conditions, list) else ():
        group = condition.get("matcherGroup") if isinstance(condition, dict) else None
        matchers = group.get("matchers") if isinstance(group, dict) else None
        for matcher in matchers if isinstance(matchers, list) else ():
            if isinstance(matcher, dict):
                yield matcher


def _definition(item: Any) -> Any:
    """A raw definition as given, or parsed from its stored JSON text (None when that is not JSON)."""
    if isinstance(item, str | bytes | bytearray):
        try:
            return json.loads(item)
        except ValueError:
            return None
    return item


def referenced_segments(definitions: Iterable[Any]) -> set[str]:
    """Standard segment names used by IN_SEGMENT matchers and rule-based exclusions.

    ``definitions``: flags and rule-based segments, each a raw object or its stored JSON text (text
    that is not JSON is skipped). An excluded segment is standard unless its ``type`` is
    ``"rule-based"`` (the SDK reads an unknown type as standard, and so does the compiler).
    """
    names: set[str] = set()
    for raw in map(_definition, definitions):
        if not isinstance(raw, dict):
            continue
        for matcher in _matchers_of(raw):
            data = matcher.get("userDefinedSegmentMatcherData")
            kind = matcher.get("matcherType")
            if kind == "IN_SEGMENT" and isinstance(data, dict) and isinstance(data.get("segmentName"), str):
                names.add(data["segmentName"])
        excluded = raw.get("excluded")
        segments = excluded.get("segments") if isinstance(excluded, dict) else None
        for segment in segments if isinstance(segments, list) else ():
            standard = isinstance(segment, dict) and segment.get("type") != "rule-based"
            if standard and isinstance(segment.get("name"), str):
                names.add(segment["name"])
    return names


def load_segments(directory: str | Path, names: Iterable[str]) -> dict[str, frozenset[Any]]:
    """``<directory>/<name>.json`` for each name; a missing file is an unknown (empty) segment."""
    out: dict[str, frozenset[Any]] = {}
    for name in sorted(names):
        path = Path(directory) / f"{name}.json"
        if not path.is_file():
            log.warning("split segment %r: %s not found; treated as empty", name, path)
            continue
        try:
            document = json.loads(path.read_bytes())
        except (ValueError, UnicodeDecodeError) as exc:
            raise FlagError(str(path), f"invalid JSON: {exc}") from None
        out[name] = segment_members(document, str(path))
    return out
