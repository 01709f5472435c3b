"""Flag stores: raw state per source and kind, compiled into immutable snapshots (memory or Redis).

The store imports no source: the composition root hands it a ``Compiler`` (the source registry).
"""

from proxy.store.base import FlagStore, Snapshot
from proxy.store.memory import MemoryStore

__all__ = ["FlagStore", "MemoryStore", "Snapshot"]
