"""Which flags are potentially stale: pure (no I/O, the clock is an argument).

A flag is potentially stale when

- ``lifetime``: it is older (``createdAt``, else when the store first saw it) than its type's
  expected lifetime;
- ``expired``: its ``expiresAt`` has passed;
- ``single_variant``: for ``stale_after`` seconds it has served one outcome to everyone, with no
  change to its definition (or its kill / promotion);
- ``unused``: it has not been evaluated for ``stale_after`` seconds (counted from when it was first
  seen, or last changed, if it never was).

Times are epoch seconds. ``since`` is when the flag first met one of its reasons.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

DAY_S = 86400.0
REASONS = ("lifetime", "expired", "single_variant", "unused")


@dataclass(frozen=True)
class Policy:
    lifetimes_days: Mapping[str, float] = field(
        default_factory=lambda: {
            "release": 40.0,
            "experiment": 40.0,
            "operational": 7.0,
            "kill-switch": 0.0,
            "permission": 0.0,
        }
    )
    default_type: str = ""
    stale_after_days: float = 7.0


@dataclass(frozen=True)
class Usage:
    """What every instance saw of a flag since its definition last changed (``changed_at``)."""

    changed_at: float
    last_evaluated: float | None = None  # by any instance, whatever the definition was then
    values: frozenset[str] = frozenset()  # distinct outcomes served since the change (two at most)


def parse_time(value: Any) -> float | None:
    """An ISO-8601 timestamp (``Z`` allowed; no zone = UTC) → epoch seconds; None if not one."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def stale_flags(
    definitions: Mapping[str, Mapping[str, Any]],
    first_seen: Mapping[str, float],
    usage: Mapping[str, Usage],
    now: float,
    policy: Policy | None = None,
) -> list[dict[str, Any]]:
    """The potentially stale flags among ``definitions`` (key → definition; for flags of other sources
    an empty mapping), sorted by key: ``{"flag", "owner", "type", "reasons", "since"}``."""
    policy = policy or Policy()
    window = policy.stale_after_days * DAY_S
    out: list[dict[str, Any]] = []
    for key in sorted(definitions):
        definition = definitions[key]
        kind = definition.get("type")
        kind = kind if isinstance(kind, str) else (policy.default_type or None)
        owner = definition.get("owner")
        owner = owner if isinstance(owner, str) else None
        created = parse_time(definition.get("createdAt"))
        if created is None:
            created = first_seen.get(key)
        found: dict[str, float] = {}  # reason → since when

        lifetime = policy.lifetimes_days.get(kind or "", 0.0)
        if lifetime > 0 and created is not None and now >= created + lifetime * DAY_S:
            found["lifetime"] = created + lifetime * DAY_S
        expires = parse_time(definition.get("expiresAt"))
        if expires is not None and now >= expires:
            found["expired"] = expires

        seen = usage.get(key)
        if seen is not None and len(seen.values) == 1 and now >= seen.changed_at + window:
            found["single_variant"] = seen.changed_at + window
        idle_from: float | None
        if seen is not None and seen.last_evaluated is not None:
            idle_from = seen.last_evaluated
        else:  # never evaluated: since counting began (the store first saw it)
            idle_from = first_seen.get(key, seen.changed_at if seen is not None else created)
        if idle_from is not None and now >= idle_from + window:
            found["unused"] = idle_from + window

        if found:
            out.append(
                {
                    "flag": key,
                    "owner": owner,
                    "type": kind,
                    "reasons": [r for r in REASONS if r in found],
                    "since": iso(min(found.values())),
                }
            )
    return out
