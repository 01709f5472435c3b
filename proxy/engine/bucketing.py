"""Consistent bucketing helpers; the per-flag hashing itself is ``model.make_bucketer``.

bucket = mmh3 x86_32 (unsigned, seed 0) of the UTF-8 string ``"{salt}:{value}"`` modulo 10,000.
"""

from __future__ import annotations

BUCKETS = 10_000


def bucket_value(raw: object) -> str | None:
    """The string that is hashed for an attribute value; None when it cannot bucket."""
    if raw is None or raw == "":
        return None
    if isinstance(raw, str):
        return raw
    if isinstance(raw, bool):
        return "true" if raw else "false"
    if isinstance(raw, int):
        return str(raw)
    if isinstance(raw, float):
        return str(int(raw)) if raw.is_integer() else repr(raw)
    return None


def boundaries(weights: list[int]) -> tuple[int, ...]:
    """Cumulative upper bounds in buckets, weights scaled to 10,000 (last bound is exactly 10,000)."""
    total = sum(weights)
    if total <= 0:
        return ()
    running = 0
    out = []
    for w in weights:
        running += w
        out.append(running * BUCKETS // total)
    return tuple(out)
