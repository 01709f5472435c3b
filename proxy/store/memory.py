"""Embedded in-memory store: the default when no Redis is configured."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from proxy.engine import FlagError, compile_document
from proxy.store.base import EMPTY, Snapshot

log = logging.getLogger("flagproxy.store")


def load_document_file(path: str | Path) -> dict[str, Any]:
    """Read and validate a native flags file; FlagError/OSError/ValueError name the problem."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FlagError(str(path), f"invalid JSON: {exc}") from None
    compile_document(document)
    return document


class MemoryStore:
    def __init__(self, document: dict[str, Any] | None = None) -> None:
        self._snapshot = EMPTY
        if document is not None:
            self.replace(document)

    @classmethod
    def from_file(cls, path: str | Path, required: bool = True) -> MemoryStore:
        """Load a native flags file; a missing optional file (the default seeds) means no flags."""
        if not Path(path).exists():
            if required:
                raise FileNotFoundError(f"flags file {path} not found")
            log.warning("no flags file at %s: starting with no flags", path)
            return cls({"flags": {}})
        return cls(load_document_file(path))

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @property
    def ready(self) -> bool:
        return True

    def replace(self, document: dict[str, Any]) -> Snapshot:
        """Compile first, swap after: an invalid document leaves the store untouched."""
        flags = compile_document(document)
        self._snapshot = Snapshot.build(self._snapshot.version + 1, flags, document)
        return self._snapshot

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None
