"""The seam between the data plane and flag evaluation: one call per request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from proxy.context import ContextBuilder, Header, Scope
from proxy.engine import Flag, Served
from proxy.header import FlagHeaders
from proxy.store import FlagStore


@dataclass(slots=True)
class Resolution:
    resolved: list[tuple[Flag, Served]]
    response_headers: list[Header] = field(default_factory=list)


class Resolver(Protocol):
    headers: FlagHeaders

    def resolve(self, scope: Scope) -> Resolution: ...


class FlagResolver:
    """Resolves every flag that applies to the request path against the store's current snapshot."""

    def __init__(self, store: FlagStore, headers: FlagHeaders, context: ContextBuilder) -> None:
        self.store = store
        self.headers = headers
        self.context = context

    def resolve(self, scope: Scope) -> Resolution:
        context, response_headers = self.context.build(scope)
        resolved = [(f, f.evaluate(context)) for f in self.store.snapshot.for_path(context["path"])]
        return Resolution(resolved, response_headers)
