"""Caches keyed by client input (request paths), bounded by bytes rather than entries.

A client chooses its paths: counting entries would let 60 KB paths hold hundreds of megabytes.
Keys longer than ``LONG_KEY`` characters are replaced by a 16-byte BLAKE2b digest, and every entry
is charged its key's size plus a fixed overhead; when the budget is spent the cache starts over
(cheap, and the values are recomputed on demand).
"""

from __future__ import annotations

import hashlib
import sys
from typing import Generic, TypeVar

V = TypeVar("V")

LONG_KEY = 256
ENTRY_OVERHEAD = 100  # the dict slot, the key object's header, the reference to the value


def cache_key(text: str) -> str | bytes:
    """``text`` itself when short, else its digest (collisions: 2**-64 for any two paths)."""
    if len(text) <= LONG_KEY:
        return text
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class BoundedCache(Generic[V]):
    """``get``/``put`` by client-chosen text; at most ``budget`` accounted bytes."""

    __slots__ = ("budget", "entries", "used")

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.entries: dict[str | bytes, V] = {}
        self.used = 0

    def get(self, text: str) -> V | None:
        return self.entries.get(text if len(text) <= LONG_KEY else cache_key(text))

    def put(self, text: str, value: V, value_bytes: int = 0) -> V:
        key = cache_key(text)
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
