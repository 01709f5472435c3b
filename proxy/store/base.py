"""The store interface the rest of the proxy sees: one immutable snapshot at a time."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxy.engine import Flag


@dataclass(frozen=True)
class Snapshot:
    """Compiled flags at one store version; never mutated, replaced whole."""

    version: int
    flags: Mapping[str, Flag]
    document: Mapping[str, Any]
    loaded_at: float = field(default_factory=time.time)
    ordered: tuple[Flag, ...] = ()

    @classmethod
    def build(cls, version: int, flags: Mapping[str, Flag], document: Mapping[str, Any]) -> Snapshot:
        ordered = tuple(flags[k] for k in sorted(flags))
        return cls(version=version, flags=flags, document=document, ordered=ordered)


EMPTY = Snapshot.build(0, {}, {"flags": {}})


class FlagStore(Protocol):
    @property
    def snapshot(self) -> Snapshot: ...

    @property
    def ready(self) -> bool: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...
