"""Consistent bucketing: which of 10,000 buckets a context falls in for a flag.

bucket = mmh3 x86_32 (unsigned, seed 0) of the UTF-8 string ``"{salt}:{value}"`` modulo 10,000.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mmh3

from proxy.engine.flag import Context

BUCKETS = 10_000

Bucketer = Callable[[Context], int | None]


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
    out: list[int] = []
    for w in weights:
        running += w
        out.append(running * BUCKETS // total)
    return tuple(out)


def make_bucketer(bucket_by: str, salt: str) -> Bucketer:
    """``ctx → bucket`` (None when there is nothing to bucket by), specialised once per flag.

    The default attribute ``key`` means the bucketing key: a separate one when supplied, else the key.
    Non-ASCII text is hashed as UTF-8 bytes (lone surrogates kept): mmh3 must never see a str it
    cannot encode.
    """
    prefix = salt + ":"
    murmur = mmh3.hash

    def hashed(value: str) -> int:
        text = prefix + value
        data: str | bytes = text if text.isascii() else text.encode("utf-8", "surrogatepass")
        return murmur(data, 0, False) % BUCKETS

    def slow(raw: Any) -> int | None:
        value = bucket_value(raw)
        return None if value is None else hashed(value)

    if bucket_by == "key":

        def by_key(ctx: Context) -> int | None:
            raw = ctx.get("bucketingKey") or ctx.get("key")
            if type(raw) is str and raw:
                return hashed(raw)
            return slow(raw)

        return by_key

    def by_attribute(ctx: Context) -> int | None:
        raw = ctx.get(bucket_by)
        if type(raw) is str and raw:
            return hashed(raw)
        return slow(raw)

    return by_attribute


def make_picker(
    bucket_by: str, salt: str, pick: Callable[[int], Any], default: Any, bucket_of: Bucketer
) -> Callable[[Context], Any]:
    """``ctx → pick(bucket)`` (``default`` when there is nothing to bucket by): the same result as
    ``bucket_of`` then ``pick``, with the bucketing inlined for the common case of a string key —
    one call per flag instead of three on the hot path."""
    if bucket_by != "key":

        def by_attribute(ctx: Context) -> Any:
            b = bucket_of(ctx)
            return default if b is None else pick(b)

        return by_attribute
    prefix = salt + ":"
    murmur = mmh3.hash

    def by_key(ctx: Context) -> Any:
        raw = ctx.get("bucketingKey") or ctx.get("key")
        if type(raw) is str and raw:
            text = prefix + raw
            if text.isascii():
                return pick(murmur(text, 0, False) % BUCKETS)
            return pick(murmur(text.encode("utf-8", "surrogatepass"), 0, False) % BUCKETS)
        b = bucket_of(ctx)
        return default if b is None else pick(b)

    return by_key
