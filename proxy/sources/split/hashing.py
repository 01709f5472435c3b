"""Split's bucketing hashes, as the Python SDK 10.7.0 computes them.

``murmur_hash`` (MurmurHash3 x86_32 of the UTF-8 key, ``algo: 2``) and ``legacy_hash`` (Java's
``String.hashCode`` folded with the seed, any other ``algo``), the SDK's 1..100 ``bucket``, and
``_bucketer``, which specialises ``bucketing key → bucket`` once per flag seed (a seed that is not an
integer makes every call raise, as in the SDK).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mmh3

_INT32_LOW = -(1 << 31) - 1  # the SDK's int32 wrap leaves these two boundary values untouched
_INT32_HIGH = 1 << 31
_HALF = 1 << 31


def _wrap_int32(value: int) -> int:
    if _INT32_LOW <= value <= _INT32_HIGH:
        return value
    return ((value + _HALF) & 0xFFFFFFFF) - _HALF


def legacy_hash(key: str, seed: int) -> int:
    """Split's legacy hash (``algo: 1``): Java ``String.hashCode`` folded with the seed; signed int32."""
    wrap = _wrap_int32
    acc = 0
    for code in map(ord, key):
        acc = wrap(wrap(31 * wrap(acc)) + code)
    return wrap(acc ^ wrap(seed))


def murmur_hash(key: str, seed: int) -> int:
    """MurmurHash3 x86_32 (``algo: 2``) of the UTF-8 key, seed as uint32; unsigned."""
    # mmh3 crashes the interpreter on str with lone surrogates: always give it bytes.
    return mmh3.hash(key.encode("utf-8"), seed & 0xFFFFFFFF, False)


def is_murmur(algo: Any) -> bool:
    """``HashAlgorithm(algo)``: 2 is murmur; anything else (missing, 1, invalid) is legacy."""
    return type(algo) in (int, float) and algo == 2


def bucket(key: str, seed: int, algo: Any = 2) -> int:
    """The SDK's bucket, 1..100: ``abs(hash(key, seed)) % 100 + 1``."""
    hashed = murmur_hash(key, seed) if is_murmur(algo) else legacy_hash(key, seed)
    return abs(hashed) % 100 + 1


def _bucketer(seed: Any, murmur: bool) -> Callable[[str], int]:
    """``bucketing key → bucket`` for one flag seed, specialised once."""
    if not isinstance(seed, int):

        def broken(key: str) -> int:  # the SDK raises here (e.g. ``None & 0xFFFFFFFF``)
            raise TypeError(f"seed {seed!r} is not an integer")

        return broken
    if murmur:
        unsigned = seed & 0xFFFFFFFF
        murmur3 = mmh3.hash

        def by_murmur(key: str) -> int:
            if key.isascii():
                return murmur3(key, unsigned, False) % 100 + 1
            return murmur3(key.encode("utf-8"), unsigned, False) % 100 + 1

        return by_murmur
    wrapped = _wrap_int32(seed)
    return lambda key: abs(legacy_hash(key, wrapped)) % 100 + 1
