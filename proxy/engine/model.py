"""Native flag documents: validation and compilation into fast callables.

A flag compiles to a ``Flag`` whose ``evaluate(context)`` does the least work possible per call:
every outcome (``Served``) is built and JSON-encoded once, at load.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_right
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from proxy.engine.bucketing import BUCKETS, boundaries, bucket, bucket_value

Context = Mapping[str, Any]

FLAG_FIELDS = frozenset(
    {
        "enabled", "variants", "defaultVariant", "rules", "percentage", "bucketBy", "salt",
        "priority", "routes", "note", "updatedAt", "expiresAt",
    }
)
VARIANT_FIELDS = frozenset({"weight", "config"})
DOCUMENT_FIELDS = frozenset({"flags", "$schema", "version", "updatedAt", "note"})
MAX_KEY_LENGTH = 256


class FlagError(ValueError):
    """A flag definition is invalid; ``path`` names the flag and field."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


def encode_json(value: Any) -> str:
    """Compact, ASCII-only JSON: safe to place in an HTTP header value."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


@dataclass(frozen=True, slots=True)
class Served:
    """One possible outcome of a flag, encoded once at load."""

    value: bool | str
    config: Any = None
    has_config: bool = False
    value_json: str = ""
    config_json: str | None = None

    @classmethod
    def make(cls, value: bool | str, config: Any = None, has_config: bool = False) -> Served:
        return cls(
            value=value,
            config=config,
            has_config=has_config,
            value_json=encode_json(value),
            config_json=encode_json(config) if has_config else None,
        )


Evaluate = Callable[[Context], Served]
Explain = Callable[[Context], tuple[Served, dict[str, Any]]]


@dataclass(frozen=True, slots=True)
class Flag:
    key: str
    key_json: str
    evaluate: Evaluate
    explain: Explain
    served: tuple[Served, ...]
    priority: int = 0
    routes: tuple[str, ...] | None = None
    route_match: Callable[[str], bool] | None = None
    definition: Mapping[str, Any] = field(default_factory=dict)

    def applies_to(self, path: str) -> bool:
        return self.route_match is None or self.route_match(path)


# --- helpers --------------------------------------------------------------------------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_timestamp(path: str, value: Any) -> None:
    if not isinstance(value, str):
        raise FlagError(path, "expected an ISO-8601 timestamp string")
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise FlagError(path, f"{value!r} is not an ISO-8601 timestamp") from None


def glob_to_regex(pattern: str) -> str:
    """``**`` matches anything, ``*`` anything but ``/``, ``?`` one character other than ``/``."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


def compile_routes(path: str, routes: Any) -> tuple[tuple[str, ...], Callable[[str], bool]]:
    if not isinstance(routes, list) or not routes:
        raise FlagError(path, "expected a non-empty list of path globs")
    for i, route in enumerate(routes):
        if not isinstance(route, str) or not route.startswith("/"):
            raise FlagError(f"{path}[{i}]", "a route glob must be a string starting with '/'")
    regex = re.compile("|".join(f"(?:{glob_to_regex(r)})" for r in routes))
    return tuple(routes), lambda p: regex.fullmatch(p) is not None


# --- compilation ----------------------------------------------------------------------------------

def compile_flag(key: str, definition: Any) -> Flag:
    """Validate one native flag definition and compile it."""
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
        raise FlagError(f"flags.{key!r}", f"a flag key must be a string of 1..{MAX_KEY_LENGTH} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in key):
        raise FlagError(f"flags.{key!r}", "a flag key must not contain control characters")
    where = f"flags.{key}"
    if not isinstance(definition, dict):
        raise FlagError(where, "a flag definition must be a JSON object")
    unknown = sorted(set(definition) - FLAG_FIELDS)
    if unknown:
        raise FlagError(f"{where}.{unknown[0]}", "unknown field")

    enabled = definition.get("enabled", True)
    if not isinstance(enabled, bool):
        raise FlagError(f"{where}.enabled", "expected true or false")
    bucket_by = definition.get("bucketBy", "key")
    if not isinstance(bucket_by, str) or not bucket_by:
        raise FlagError(f"{where}.bucketBy", "expected a non-empty attribute name")
    salt = definition.get("salt", key)
    if not isinstance(salt, str):
        raise FlagError(f"{where}.salt", "expected a string")
    priority = definition.get("priority", 0)
    if not _is_int(priority):
        raise FlagError(f"{where}.priority", "expected an integer")
    for name in ("note",):
        if name in definition and not isinstance(definition[name], str):
            raise FlagError(f"{where}.{name}", "expected a string")
    for name in ("updatedAt", "expiresAt"):
        if name in definition:
            _check_timestamp(f"{where}.{name}", definition[name])
    routes: tuple[str, ...] | None = None
    route_match = None
    if "routes" in definition:
        routes, route_match = compile_routes(f"{where}.routes", definition["routes"])
    if "rules" in definition:
        raise FlagError(f"{where}.rules", "targeting rules are not supported by this build")

    if "variants" in definition:
        evaluate, explain, served = _compile_variants(where, definition, enabled, bucket_by, salt)
    else:
        evaluate, explain, served = _compile_boolean(where, definition, enabled, bucket_by, salt)
    return Flag(
        key=key,
        key_json=encode_json(key),
        evaluate=evaluate,
        explain=explain,
        served=served,
        priority=priority,
        routes=routes,
        route_match=route_match,
        definition=definition,
    )


def _compile_boolean(
    where: str, definition: dict[str, Any], enabled: bool, bucket_by: str, salt: str
) -> tuple[Evaluate, Explain, tuple[Served, ...]]:
    if "defaultVariant" in definition:
        raise FlagError(f"{where}.defaultVariant", "only flags with variants have a defaultVariant")
    percentage = definition.get("percentage", 100)
    if not _is_number(percentage) or not 0 <= percentage <= 100:
        raise FlagError(f"{where}.percentage", "expected a number from 0 to 100")
    on, off = Served.make(True), Served.make(False)
    threshold = round(percentage * 100)

    if not enabled:
        return (lambda ctx: off), (lambda ctx: (off, {"reason": "disabled"})), (on, off)
    if threshold >= BUCKETS:
        return (lambda ctx: on), (lambda ctx: (on, {"reason": "percentage", "percentage": 100})), (on, off)
    if threshold <= 0:
        return (lambda ctx: off), (lambda ctx: (off, {"reason": "percentage", "percentage": 0})), (on, off)

    def evaluate(ctx: Context) -> Served:
        value = bucket_value(ctx.get(bucket_by))
        if value is None:
            return off
        return on if bucket(salt, value) < threshold else off

    def explain(ctx: Context) -> tuple[Served, dict[str, Any]]:
        value = bucket_value(ctx.get(bucket_by))
        if value is None:
            return off, {"reason": "default", "detail": f"no {bucket_by!r} to bucket by"}
        b = bucket(salt, value)
        return (on if b < threshold else off), {"reason": "percentage", "bucket": b, "percentage": percentage}

    return evaluate, explain, (on, off)


def _compile_variants(
    where: str, definition: dict[str, Any], enabled: bool, bucket_by: str, salt: str
) -> tuple[Evaluate, Explain, tuple[Served, ...]]:
    variants = definition["variants"]
    if not isinstance(variants, dict) or not variants:
        raise FlagError(f"{where}.variants", "expected a non-empty object of variants")
    if "percentage" in definition:
        raise FlagError(f"{where}.percentage", "percentage applies to boolean flags; use variant weights")
    served: dict[str, Served] = {}
    weights: list[int] = []
    for name, spec in variants.items():
        vwhere = f"{where}.variants.{name}"
        if not name:
            raise FlagError(vwhere, "a variant name must not be empty")
        if not isinstance(spec, dict):
            raise FlagError(vwhere, "expected an object with weight and optional config")
        unknown = sorted(set(spec) - VARIANT_FIELDS)
        if unknown:
            raise FlagError(f"{vwhere}.{unknown[0]}", "unknown field")
        weight = spec.get("weight", 0)
        if not _is_int(weight) or weight < 0:
            raise FlagError(f"{vwhere}.weight", "expected an integer >= 0")
        try:
            served[name] = Served.make(name, spec.get("config"), "config" in spec)
        except ValueError as exc:
            raise FlagError(f"{vwhere}.config", f"not encodable as JSON: {exc}") from None
        weights.append(weight)

    default_name = definition.get("defaultVariant", next(iter(variants)))
    if not isinstance(default_name, str) or default_name not in served:
        raise FlagError(f"{where}.defaultVariant", f"{default_name!r} is not one of the variants")
    default = served[default_name]
    if not any(weights) and "rules" not in definition:
        raise FlagError(f"{where}.variants", "all weights are zero")

    outcomes = tuple(served.values())
    bounds = boundaries(weights)
    positive = [s for s, w in zip(outcomes, weights, strict=True) if w > 0]

    if not enabled:
        return (lambda ctx: default), (lambda ctx: (default, {"reason": "disabled"})), outcomes
    if len(positive) == 1:
        only = positive[0]
        return (lambda ctx: only), (lambda ctx: (only, {"reason": "split", "detail": "single variant"})), outcomes
    if not positive:
        return (lambda ctx: default), (lambda ctx: (default, {"reason": "default"})), outcomes

    def evaluate(ctx: Context) -> Served:
        value = bucket_value(ctx.get(bucket_by))
        if value is None:
            return default
        return outcomes[bisect_right(bounds, bucket(salt, value))]

    def explain(ctx: Context) -> tuple[Served, dict[str, Any]]:
        value = bucket_value(ctx.get(bucket_by))
        if value is None:
            return default, {"reason": "default", "detail": f"no {bucket_by!r} to bucket by"}
        b = bucket(salt, value)
        return outcomes[bisect_right(bounds, b)], {"reason": "split", "bucket": b}

    return evaluate, explain, outcomes


def compile_document(document: Any) -> dict[str, Flag]:
    """Validate a whole native document ``{"flags": {...}}``; raise FlagError on the first problem."""
    if not isinstance(document, dict):
        raise FlagError("document", "expected a JSON object with a 'flags' object")
    unknown = sorted(set(document) - DOCUMENT_FIELDS)
    if unknown:
        raise FlagError(unknown[0], "unknown top-level field")
    flags = document.get("flags")
    if not isinstance(flags, dict):
        raise FlagError("flags", "expected an object of flag definitions")
    return {key: compile_flag(key, definition) for key, definition in flags.items()}
