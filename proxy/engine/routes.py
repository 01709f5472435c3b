"""Route globs: which request paths a flag (or a ``[[routes]]`` table) applies to.

``**`` matches any run of characters but a newline, ``*`` any run without ``/``, ``?`` one character
other than ``/``; everything else is literal, and a glob matches the whole path.

Matching never backtracks. A glob with at most one ``*``/``**`` (the common ``/api/**``,
``/shop/*/cart``) runs on Python's ``re``, where one unbounded run retries at most once per
character against a fixed-width rest — linear, and the fastest call. A glob with several (``/**/a/**/b``,
quadratic and worse under backtracking) runs on RE2's automaton (``proxy.engine.patterns``), within
``GLOB_MEMORY`` bytes each however hostile the paths.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

from proxy.engine.flag import FlagError
from proxy.engine.patterns import Pattern, PatternError

Matcher = Callable[[str], bool]
GLOB_MEMORY = 256 << 10  # RE2's budget per glob; glob programs are small, and paths are client input


def glob_to_regex(pattern: str) -> str:
    """``**`` matches anything, ``*`` anything but ``/``, ``?`` one character other than ``/``."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


def unbounded_runs(pattern: str) -> int:
    """How many ``*``/``**`` runs the regex of ``pattern`` has (``***`` is two: ``**`` then ``*``)."""
    return pattern.count("**") + pattern.replace("**", "").count("*")


def compile_globs(patterns: Sequence[str]) -> Matcher:
    """One matcher for "any of ``patterns`` matches the whole path" (PatternError: too large for RE2)."""
    regex = "|".join(f"(?:{glob_to_regex(p)})" for p in patterns)
    if all(unbounded_runs(p) <= 1 for p in patterns):
        fullmatch = re.compile(regex).fullmatch
        return lambda path: fullmatch(path) is not None
    return Pattern(regex, max_mem=GLOB_MEMORY).fullmatch


@lru_cache(maxsize=4096)
def glob_matcher(pattern: str) -> Matcher:
    """``compile_globs([pattern])``, cached: for callers that match globs one at a time."""
    return compile_globs([pattern])


def compile_routes(path: str, routes: Any) -> tuple[tuple[str, ...], Matcher]:
    """Validate a ``routes`` list (``path`` names it in errors); return it and its matcher."""
    if not isinstance(routes, list) or not routes:
        raise FlagError(path, "expected a non-empty list of path globs")
    for i, route in enumerate(routes):
        if not isinstance(route, str) or not route.startswith("/"):
            raise FlagError(f"{path}[{i}]", "a route glob must be a string starting with '/'")
    try:
        return tuple(routes), compile_globs(routes)
    except PatternError as exc:  # only a glob too large for RE2's memory budget
        raise FlagError(path, f"route globs too large to compile: {exc}") from None
