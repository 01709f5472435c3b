"""The sources the proxy knows, in default precedence order. Adding a vendor: one line here.

``[store] sources`` picks which of them are enabled and their precedence (like flagd's source
list): when two define the same flag key, the later one wins; overrides (kill, promote) apply on top.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from proxy.engine import Flag
from proxy.sources.base import Compiled, Source
from proxy.sources.native import NativeSource
from proxy.sources.split import SplitSource
from proxy.sources.unleash import UnleashSource

SOURCES: tuple[Source, ...] = (SplitSource(), UnleashSource(), NativeSource())


class UnknownSource(ValueError):
    pass


class Registry:
    """A set of sources in precedence order; also the store's ``Compiler``."""

    def __init__(self, sources: Sequence[Source] = SOURCES, order: Iterable[str] | None = None) -> None:
        self.known = {source.name: source for source in sources}
        names = list(order) if order is not None else [source.name for source in sources]
        unknown = [name for name in names if name not in self.known]
        if unknown:
            raise UnknownSource(f"unknown source {unknown[0]!r} (known: {', '.join(self.known)})")
        self.sources: tuple[Source, ...] = tuple(self.known[name] for name in dict.fromkeys(names))

    def ordered(self, order: Iterable[str]) -> Registry:
        """The same sources, only those named, in that precedence order."""
        return Registry(list(self.known.values()), order)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(source.name for source in self.sources)

    def get(self, name: str) -> Source:
        try:
            return self.known[name]
        except KeyError:
            raise UnknownSource(f"unknown source {name!r} (known: {', '.join(self.known)})") from None

    def settings_sections(self) -> dict[str, type]:
        """``[name]`` settings sections the sources own (every known source, enabled or not)."""
        return {s.name: s.settings_type for s in self.known.values() if s.settings_type is not None}

    def load_file(
        self, source: str, path: str | Path, segments_dir: str | Path | None = None
    ) -> dict[str, Flag]:
        return self.get(source).load_file(path, segments_dir)

    # --- the store's Compiler ---------------------------------------------------------------------

    @property
    def precedence(self) -> tuple[str, ...]:
        return self.names

    @property
    def kinds(self) -> Mapping[str, tuple[str, ...]]:
        """Every known source's kinds, enabled or not: a store shared with instances that enable
        other sources keeps (and re-seeds) their items too."""
        return {source.name: source.kinds for source in self.known.values()}

    def compile(self, source: str, kinds: Mapping[str, Mapping[str, str]], cache: dict[str, Any]) -> Compiled:
        return self.get(source).compile(kinds, cache)


DEFAULT = Registry()
