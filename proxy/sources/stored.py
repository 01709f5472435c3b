"""What every vendor source does with its stored texts: parse them, and compile only on change.

The store hands a source all its items (kind → key → JSON text) at every snapshot build; sources
recompile only when the texts changed (``compile_on_change``), and report text that is not JSON as
a problem keyed by the item (``parsed``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any

from proxy.engine import Flag

Kinds = Mapping[str, Mapping[str, str]]


def fingerprint(kinds: Kinds) -> str:
    """A digest of every (kind, key, text), unambiguous whatever the texts contain."""
    digest = hashlib.sha256()
    for kind in sorted(kinds):
        for name, text in sorted(kinds[kind].items()):
            for part in (kind, name, text):
                data = part.encode("utf-8", "surrogatepass") if isinstance(part, str) else bytes(part)
                digest.update(len(data).to_bytes(8, "little"))
                digest.update(data)
    return digest.hexdigest()


def parsed(kinds: Kinds, kind: str, problems: dict[str, str]) -> dict[str, Any]:
    """One kind's texts as JSON; a text that is not JSON is a problem keyed by its name (flags) or
    ``"<kind>:<name>"``."""
    out = {}
    for name, text in kinds.get(kind, {}).items():
        try:
            out[name] = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            problems[name if kind == "flags" else f"{kind}:{name}"] = f"invalid JSON: {exc}"
    return out


def compile_on_change(
    kinds: Kinds, cache: dict[str, Any], build: Callable[[dict[str, str]], dict[str, Flag]]
) -> tuple[dict[str, Flag], dict[str, str]]:
    """``build(problems)`` → flags, run only when the stored texts differ from the cached build's."""
    digest = fingerprint(kinds)
    if cache.get("fingerprint") == digest:
        return dict(cache["flags"]), dict(cache["problems"])
    problems: dict[str, str] = {}
    flags = build(problems)
    cache.clear()
    cache.update(fingerprint=digest, flags=flags, problems=dict(problems))
    return dict(flags), problems
