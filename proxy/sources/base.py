"""The contract every flag source implements, and what a source is handed to do its work.

A source turns one vendor's definitions into engine ``Flag`` objects. It stores items of one or more
kinds (native: ``flags``; Split also ``segments`` and ``rbsegments``) as JSON text in the store,
compiles them when a snapshot is built, may load a file for the offline commands, may run a
background sync against its vendor, may take webhooks under ``/__flags/webhooks/``, and may own a
settings section ``[<name>]``. Vendor quirks live in the source's own package and nowhere else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from proxy.engine import Flag
from proxy.experiments.analytics import Analytics

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

    from proxy.config import Settings
    from proxy.control.index import Endpoint
    from proxy.metrics import Metrics
    from proxy.store.base import FlagStore

__all__ = ["Analytics", "Compiled", "Source", "Sync", "SyncContext", "analytics_of", "webhook_endpoints_of"]

Compiled = tuple[dict[str, Flag], dict[str, str]]  # flags, and {key: problem} for items not served


class Sync(Protocol):
    """A source's background pull from its vendor (Split's polling, Unleash's client API)."""

    @property
    def enabled(self) -> bool: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def trigger(self) -> None:
        """Pull now (a webhook said something changed); never blocks."""
        ...


@dataclass(frozen=True)
class SyncContext:
    """What a source's sync may use: its own settings section, the store to write to, the metrics."""

    settings: Settings
    section: Any
    store: FlagStore
    metrics: Metrics


class Source(Protocol):
    name: str  # also its store namespace, its [section] and its webhook path segment
    kinds: tuple[str, ...]  # stored item kinds, "flags" first
    settings_type: type | None  # the dataclass of its [name] settings section, or None

    def compile(self, kinds: Mapping[str, Mapping[str, str]], cache: dict[str, Any]) -> Compiled:
        """Stored items (kind → key → JSON text) → flags; ``cache`` is this source's own, across builds."""
        ...

    def load_file(self, path: str | Path, segments_dir: str | Path | None = None) -> dict[str, Flag]:
        """A definitions file in this source's format, for ``flagproxy eval`` and ``budget``."""
        ...

    def sync(self, context: SyncContext) -> Sync | None:
        """Its background sync, or None when it has none."""
        ...

    def webhook_routes(self) -> list[BaseRoute]:
        """Routes under ``/webhooks/`` (relative to the control prefix) that this source answers.

        Handlers reach the store, settings and the source's own sync through
        ``proxy.control.deps.deps_of(request)``."""
        ...


def webhook_endpoints_of(source: Source, settings: Settings) -> list[Endpoint]:
    """A source's ``webhook_endpoints(settings)`` for ``GET /__flags/`` — optional: which of its
    webhooks are on and the setting that turns each on."""
    describe = getattr(source, "webhook_endpoints", None)
    return [] if describe is None else list(describe(settings))


def analytics_of(source: Source, context: SyncContext) -> Analytics | None:
    """A source's ``analytics(context)`` — optional: a source without the method sends nothing."""
    make = getattr(source, "analytics", None)
    return None if make is None else make(context)
