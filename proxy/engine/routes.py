"""Route globs: which request paths a flag applies to, compiled into one regex per flag."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from proxy.engine.flag import FlagError


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


def compile_routes(path: str, routes: Any) -> tuple[tuple[str, ...], Callable[[str], bool]]:
    """Validate a ``routes`` list (``path`` names it in errors); return it and its matcher."""
    if not isinstance(routes, list) or not routes:
        raise FlagError(path, "expected a non-empty list of path globs")
    for i, route in enumerate(routes):
        if not isinstance(route, str) or not route.startswith("/"):
            raise FlagError(f"{path}[{i}]", "a route glob must be a string starting with '/'")
    regex = re.compile("|".join(f"(?:{glob_to_regex(r)})" for r in routes))
    return tuple(routes), lambda p: regex.fullmatch(p) is not None
