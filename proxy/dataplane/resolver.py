"""The seam between the data plane and flag evaluation: one call per request."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxy.asgi import Header, Scope
from proxy.dataplane.context import ContextBuilder
from proxy.engine import Flag, Served
from proxy.store.base import Snapshot


@dataclass(slots=True)
class Resolution:
    context: Mapping[str, Any]
    resolved: list[tuple[Flag, Served]]
    response_headers: list[Header] = field(default_factory=list)


class Resolver(Protocol):
    def resolve(self, scope: Scope) -> Resolution: ...


class Snapshots(Protocol):
    """Anything serving the current snapshot: every store."""

    @property
    def snapshot(self) -> Snapshot: ...


class FlagResolver:
    """Resolves every flag that applies to the request path against the current snapshot."""

    def __init__(self, store: Snapshots, context: ContextBuilder) -> None:
        self.store = store
        self.context = context

    def resolve(self, scope: Scope) -> Resolution:
        context, response_headers = self.context.build(scope)
        resolved = [(f, f.evaluate(context)) for f in self.store.snapshot.for_path(context["path"])]
        return Resolution(context, resolved, response_headers)
