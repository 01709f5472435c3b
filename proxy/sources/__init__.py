"""Flag sources: each vendor's definitions become engine ``Flag`` objects here, quirks included.

``load_flags(source, path, ...)`` is the offline entry point (CLI ``eval``); webhooks and sync
live in each vendor's module.
"""

from __future__ import annotations

from pathlib import Path

from proxy.engine import Flag

SOURCES = ("native",)


def load_flags(source: str, path: str | Path, segments_dir: str | Path | None = None) -> dict[str, Flag]:
    if source == "native":
        from proxy.sources.native import load_file

        return load_file(path)
    raise ValueError(f"unknown source {source!r} (known: {', '.join(SOURCES)})")
