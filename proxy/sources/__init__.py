"""Flag sources: each vendor's definitions become engine ``Flag`` objects here, quirks included.

A source stores items of one or more kinds (native: ``flags``; Split also ``segments``) as JSON
text; ``compile_source`` turns them into flags. ``load_flags`` is the offline entry (CLI ``eval``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from proxy.engine import Flag

SOURCES = ("native", "split")
SOURCE_KINDS: dict[str, tuple[str, ...]] = {
    "native": ("flags",),
    "split": ("flags", "segments", "rbsegments"),
    "overrides": ("flags",),
}


def load_flags(source: str, path: str | Path, segments_dir: str | Path | None = None) -> dict[str, Flag]:
    if source == "native":
        from proxy.sources.native import load_file

        return load_file(path)
    if source == "split":
        from proxy.sources.split import load_file as load_split_file

        return load_split_file(path, segments_dir)
    raise ValueError(f"unknown source {source!r} (known: {', '.join(SOURCES)})")


def compile_source(
    source: str, kinds: Mapping[str, Mapping[str, str]], cache: dict[str, Any]
) -> tuple[dict[str, Flag], dict[str, str]]:
    """Stored items → (flags, {key: problem} for items that no longer compile)."""
    if source == "native":
        from proxy.sources.native import compile_items

        return compile_items(kinds.get("flags", {}), cache)
    if source == "split":
        from proxy.sources.split import compile_items as compile_split_items

        return compile_split_items(kinds, cache)
    raise ValueError(f"unknown source {source!r}")
