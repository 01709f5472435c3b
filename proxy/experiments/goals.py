"""``[[goals]]``: which proxied requests count as reaching a goal, once the origin's status is known.

A goal matches a request by method (any when unset), path (a glob, as flag routes) and status
(``"2xx"``, ``"201"``, ``"2xx,3xx"``). The goals a (method, path) may match are looked up once per
distinct path (a byte-bounded cache: clients choose their paths); the status is checked per request.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from proxy.config import GoalSettings, status_matcher
from proxy.engine import glob_matcher
from proxy.store.bounded import BoundedCache

CACHE_BYTES = 4 << 20


@dataclass(frozen=True, slots=True)
class Goal:
    name: str
    method: str  # upper case; "" = any
    matches_path: Callable[[str], bool]
    classes: frozenset[int]
    codes: frozenset[int]

    def reached_with(self, status: int) -> bool:
        return status in self.codes or status // 100 in self.classes


class Goals:
    """The configured goals, matched against finished proxied requests."""

    def __init__(self, goals: Sequence[GoalSettings]) -> None:
        compiled = []
        for g in goals:
            classes, codes = status_matcher(g.status)
            compiled.append(Goal(g.name, g.method.upper(), glob_matcher(g.path), classes, codes))
        self.goals = tuple(compiled)
        self.names = frozenset(g.name for g in compiled)
        self._by_path: BoundedCache[tuple[Goal, ...]] = BoundedCache(CACHE_BYTES)

    def __bool__(self) -> bool:
        return bool(self.goals)

    def reached(self, method: str, path: str, status: int) -> list[str]:
        """The goals a request reached (each name once)."""
        key = (method, path)
        candidates = self._by_path.get(key)
        if candidates is None:
            candidates = tuple(g for g in self.goals if g.method in ("", method) and g.matches_path(path))
            self._by_path.put(key, candidates, 8 * len(candidates) + len(path))
        names: list[str] = []
        for goal in candidates:
            if goal.reached_with(status) and goal.name not in names:
                names.append(goal.name)
        return names
