"""What the control plane may use: a narrow set of collaborators, not the whole proxy."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.requests import Request

from proxy.config import Settings
from proxy.dataplane.header_fit import FlagHeaders
from proxy.dataplane.upstream import Router
from proxy.metrics import Metrics
from proxy.store.base import FlagStore

if TYPE_CHECKING:
    from proxy.control.chat.runtime import ChatRuntime
    from proxy.control.clients import ClientAPI
    from proxy.experiments.analytics import Analytics
    from proxy.experiments.recorder import Recorder
    from proxy.lifecycle.service import Lifecycle
    from proxy.sources.base import Sync


@dataclass(frozen=True)
class ControlDeps:
    settings: Settings
    store: FlagStore
    metrics: Metrics
    router: Router  # the data plane's routes: which origin (and budget) serves a path
    flag_headers: FlagHeaders  # the data plane's fitter, for the evaluate preview
    precedence: tuple[str, ...]  # enabled sources, later wins: which source a flag comes from
    syncs: Mapping[str, Sync] = field(default_factory=dict)  # sources' background syncs, by source
    recorder: Recorder | None = None  # exposures and conversions; None when experiments are disabled
    analytics: Mapping[str, Analytics] = field(default_factory=dict)  # sources' own (Split's events)
    chat: ChatRuntime | None = None  # the chat endpoints' state and background poster
    lifecycle: Lifecycle | None = None  # potentially stale flags (GET /api/stale)
    clients: ClientAPI | None = None  # the client flags API (/ofrep, /client); None: not served


def deps_of(request: Request) -> ControlDeps:
    """The control plane's collaborators, kept on the Starlette app (``build_control_app``)."""
    deps: ControlDeps = request.app.state.deps
    return deps
