"""Pattern matching: Python's backtracking ``re`` against what the engine uses (RE2, hybrid globs).

    python bench/patterns.py [--json FILE]

Rows: the time of one match for catastrophic regexes and globs as the input grows (the backtracking
engine only up to sizes that finish in seconds), and the per-call cost of an everyday targeting regex
and route glob on both engines (a glob with one ``*``/``**`` run stays on ``re``, where it is linear).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.engine.patterns import Pattern
from proxy.engine.routes import glob_matcher, glob_to_regex


def once(match: Callable[[str], object], text: str) -> float:
    start = time.perf_counter()
    match(text)
    return time.perf_counter() - start


def per_call(match: Callable[[str], object], text: str, calls: int = 100_000) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        match(text)
    return (time.perf_counter() - start) / calls


def growth(
    name: str,
    backtracking: Callable[[str], object],
    linear: Callable[[str], object],
    inputs: list[str],
    backtrack_up_to: int,
) -> list[dict[str, Any]]:
    rows = []
    for text in inputs:
        row: dict[str, Any] = {"case": name, "chars": len(text), "linear_s": once(linear, text)}
        if len(text) <= backtrack_up_to:
            row["re_s"] = once(backtracking, text)
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the rows as JSON")
    args = parser.parse_args()

    rows: list[dict[str, Any]] = []
    nested = "(a+)+$"
    rows += growth(
        nested,
        re.compile(nested).search,
        Pattern(nested).search,
        ["a" * n + "!" for n in (16, 20, 23, 29, 8000)],
        backtrack_up_to=24,
    )
    overlapping = "^(a|aa)*b$"
    rows += growth(
        overlapping,
        re.compile(overlapping).search,
        Pattern(overlapping).search,
        ["a" * n for n in (24, 28, 31, 8000)],
        backtrack_up_to=31,
    )
    glob = "/**a**a**a**b"
    rows += growth(
        f"glob {glob}",
        re.compile(glob_to_regex(glob)).fullmatch,
        glob_matcher(glob),
        ["/" + "a" * n for n in (100, 200, 400, 100_000)],
        backtrack_up_to=401,
    )
    for row in rows:
        re_s = f"{row['re_s'] * 1000:10.2f} ms" if "re_s" in row else "         — "
        print(
            f"{row['case']:<18} {row['chars']:>7} chars   re {re_s}   linear {row['linear_s'] * 1e6:9.1f} µs"
        )

    email, email_rx = "ann.smith@example.com", r"@example\.com$"
    path, path_glob = "/api/v2/users/42/orders", "/api/**"
    path2_glob = "/api/*/users/*/orders"
    calls = {
        "regex @example\\.com$ (RE2)": (re.compile(email_rx).search, Pattern(email_rx).search, email),
        "glob /api/** (one run: re)": (
            re.compile(glob_to_regex(path_glob)).fullmatch,
            glob_matcher(path_glob),
            path,
        ),
        "glob /api/*/users/*/orders (RE2)": (
            re.compile(glob_to_regex(path2_glob)).fullmatch,
            glob_matcher(path2_glob),
            path,
        ),
    }
    for name, (backtracking, linear, text) in calls.items():
        before, after = per_call(backtracking, text), per_call(linear, text)
        rows.append({"case": name, "re_ns": before * 1e9, "engine_ns": after * 1e9})
        print(f"{name:<34} re {before * 1e9:7.0f} ns/call   engine {after * 1e9:7.0f} ns/call")

    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
