"""Flag stores: where compiled snapshots come from (memory now, Redis later)."""

from proxy.store.base import FlagStore, Snapshot
from proxy.store.memory import MemoryStore, initial_state

__all__ = ["FlagStore", "MemoryStore", "Snapshot", "initial_state"]
