"""The order in which a path's flags give way when the header budget is short, compiled per snapshot.

Entries are dropped lowest ``priority`` first, ties by key; the data plane evaluates in the reverse
(keep) order and stops once the budget is full, so the cost of a request does not grow with the
number of flags that cannot fit anyway. ``required`` flags are never dropped: they stand apart from
the keep order and are always evaluated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proxy.engine.flag import Flag, Fragments, Served

Encoded = Callable[[int], Fragments | None]


@dataclass(frozen=True, slots=True)
class TrimPlan:
    keep: tuple[Flag, ...]  # highest priority first (ties: key descending) — the reverse of trim order
    position: tuple[int, ...]  # keep[i]'s place in key order (the order members are written in)
    count: int  # how many flags apply
    inverse: tuple[int, ...] = ()  # the key-order flag j is keep[inverse[j]]
    # per kept flag: (flag, its evaluate, its encoded entries' get) — looked up once per snapshot
    calls: tuple[tuple[Flag, Callable[[Any], Served], Encoded], ...] = ()
    flags: tuple[Flag, ...] = ()  # every applying flag in key order, required ones included
    required: tuple[tuple[Flag, Callable[[Any], Served], Encoded], ...] = ()  # key order, not in keep

    @classmethod
    def of(cls, flags: tuple[Flag, ...]) -> TrimPlan:
        """``flags`` in key order."""
        every = flags
        required = tuple((f, f.evaluate, f.entries.get) for f in flags if f.required)
        if required:
            flags = tuple(f for f in flags if not f.required)
        order = sorted(range(len(flags)), key=lambda i: (flags[i].priority, flags[i].key), reverse=True)
        inverse = [0] * len(flags)
        for kept_at, key_at in enumerate(order):
            inverse[key_at] = kept_at
        keep = tuple(flags[i] for i in order)
        calls = tuple((f, f.evaluate, f.entries.get) for f in keep)
        return cls(keep, tuple(order), len(flags), tuple(inverse), calls, every, required)
