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

from proxy.engine import Flag, Served

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

    from proxy.config import Settings
    from proxy.metrics import Metrics
    from proxy.store.base import FlagStore

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


class Analytics(Protocol):
    """A source's own destination for exposures and conversions (Split: impressions and events).

    ``exposed`` and ``converted`` are called on the event loop, after the request is over: they must
    be O(1) and never block or raise (queue, and send in the background; a full queue drops and
    counts). ``start`` and ``close`` run at startup and shutdown; ``close`` sends what is queued.
    """

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def exposed(self, flag: Flag, served: Served, context: Mapping[str, Any], at_ms: int) -> None:
        """``flag`` (one of this source's) reached the caller or the origin with ``served``;
        ``context`` is what it was evaluated with (the key, the bucketing key, attributes)."""
        ...

    def converted(
        self, key: str, event: str, value: float | None, at_ms: int, properties: Mapping[str, Any] | None
    ) -> None:
        """The unit ``key`` reached the goal ``event`` (a ``[[goals]]`` match or a tracked event)."""
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


def analytics_of(source: Source, context: SyncContext) -> Analytics | None:
    """A source's ``analytics(context)`` — optional: a source without the method sends nothing."""
    make = getattr(source, "analytics", None)
    return None if make is None else make(context)
