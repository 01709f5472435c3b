"""Offline evaluation for ``flagproxy eval``: the values X-Feature-Flags would carry."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from proxy.dataplane.context import make_context
from proxy.engine import Flag


class KeysFileError(ValueError):
    pass


def evaluate_all(flags: Iterable[Flag], context: Mapping[str, Any]) -> dict[str, Any]:
    """Every flag (those with ``routes`` only when ``path`` is in the context and matches)."""
    path = context.get("path")
    if not isinstance(path, str):
        return {f.key: f.evaluate(context).value for f in flags}
    return {f.key: f.evaluate(context).value for f in flags if f.applies_to(path)}


def parse_key_line(line: str, number: int) -> tuple[Any, dict[str, Any]]:
    """A keys-file line: ``{"key", "bucketingKey"?, "attributes"?}`` or a bare key → (key, context)."""
    text = line.strip()
    try:
        item = json.loads(text)
    except json.JSONDecodeError:
        return text, make_context(text, {})
    if isinstance(item, (str, int)) and not isinstance(item, bool):
        return item, make_context(item, {})
    if not isinstance(item, dict) or "key" not in item:
        raise KeysFileError(f'line {number}: expected a key or an object with "key"')
    attributes = item.get("attributes") or {}
    if not isinstance(attributes, dict):
        raise KeysFileError(f'line {number}: "attributes" must be an object')
    return item["key"], make_context(item["key"], attributes, item.get("bucketingKey"))


def evaluate_lines(flags: Iterable[Flag], lines: Iterable[str]) -> Iterator[str]:
    ordered = sorted(flags, key=lambda f: f.key)
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        key, context = parse_key_line(line, number)
        values = evaluate_all(ordered, context)
        yield json.dumps({"key": key, "flags": values}, separators=(",", ":"), ensure_ascii=False)
