"""The contract of a flag source's own analytics destination (Split: impressions and events).

Defined here, beside the recorder, so that the observers can use it without knowing any source;
``proxy.sources.base`` re-exports it as part of the source contract.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from proxy.engine import Flag, Served


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
