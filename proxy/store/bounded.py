"""Caches keyed by client input (request paths), bounded by bytes rather than entries.

A client chooses its paths: counting entries would let 60 KB paths hold hundreds of megabytes.
Text keys longer than ``LONG_KEY`` characters are replaced by a 16-byte BLAKE2b digest, and every
entry is charged its key's size, a fixed overhead and what the caller says its value holds; when
the budget is spent the cache starts over (cheap, and the values are recomputed on demand).
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Hashable
from typing import Generic, TypeVar

V = TypeVar("V")

LONG_KEY = 256
ENTRY_OVERHEAD = 100  # the dict slot, the key object's header, the reference to the value


def cache_key(key: Hashable) -> Hashable:
    """``key`` itself, or the digest of a long text key (collisions: 2**-64 for any two paths)."""
    if not isinstance(key, str) or len(key) <= LONG_KEY:
        return key
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class BoundedCache(Generic[V]):
    """``get``/``put`` by a client-chosen key; at most ``budget`` accounted bytes."""

    __slots__ = ("budget", "entries", "used")

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.entries: dict[Hashable, V] = {}
        self.used = 0

    def get(self, key: Hashable) -> V | None:  # cache_key inlined: this runs on every request
        return self.entries.get(key if not isinstance(key, str) or len(key) <= LONG_KEY else cache_key(key))

    def put(self, key: Hashable, value: V, value_bytes: int = 0) -> V:
        """Store ``value``; ``value_bytes``: what it holds beyond the key (the caller knows best)."""
        key = cache_key(key)
        cost = sys.getsizeof(key) + ENTRY_OVERHEAD + value_bytes
        if self.used + cost > self.budget:
            self.entries.clear()
            self.used = 0
        if key not in self.entries:
            self.used += cost
        self.entries[key] = value
        return value

    def clear(self) -> None:
        self.entries.clear()
        self.used = 0

    def __len__(self) -> int:
        return len(self.entries)
