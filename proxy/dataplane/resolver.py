"""The seam between the data plane and flag evaluation: one call per request."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxy.asgi import Header, Scope
from proxy.dataplane.context import ContextBuilder
from proxy.engine import Flag, Served
from proxy.engine.plan import TrimPlan
from proxy.store.base import Snapshot


@dataclass(slots=True)
class Resolution:
    context: Mapping[str, Any]
    plan: TrimPlan  # the flags that apply to the path, in keep order; evaluated by the header fit
    response_headers: list[Header] = field(default_factory=list)

    @property
    def resolved(self) -> list[tuple[Flag, Served]]:
        """Every applying flag evaluated, in key order (the CLI and tests; the data plane evaluates
        through ``FlagHeaders.fit_plan`` instead, which stops when the budget is full)."""
        return [(f, f.evaluate(self.context)) for f in self.plan.flags]


class Resolver(Protocol):
    def resolve(self, scope: Scope) -> Resolution: ...


class Snapshots(Protocol):
    """Anything serving the current snapshot: every store."""

    @property
    def snapshot(self) -> Snapshot: ...


class FlagResolver:
    """The caller's context and the flags that apply to the request path, from the current snapshot."""

    def __init__(self, store: Snapshots, context: ContextBuilder) -> None:
        self.store = store
        self.context = context

    def resolve(self, scope: Scope) -> Resolution:
        context, response_headers = self.context.build(scope)
        return Resolution(context, self.store.snapshot.plan_for_path(context["path"]), response_headers)
