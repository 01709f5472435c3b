"""Flag stores: where compiled snapshots come from (memory now, Redis later)."""

from proxy.store.base import FlagStore, Snapshot
from proxy.store.memory import MemoryStore, load_document_file

__all__ = ["FlagStore", "MemoryStore", "Snapshot", "load_document_file"]
