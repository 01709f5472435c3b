"""One ``Exchange`` per request: everything that happened to it, handed to the observers when it ends.

Created where the request enters (the app), filled in by the forwarding path (route, caller, flags
resolved and sent, status, timings, bytes) and handed once, when the request is over — also after a
4xx, 5xx or 499 — to every observer. Nothing else carries per-request state between the layers.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from proxy.engine import Flag, Served

if TYPE_CHECKING:
    from proxy.dataplane.header_fit import Fitted
    from proxy.dataplane.upstream import Origin

NO_ROUTE = "none"  # the origin label of requests no origin matched


@dataclass(slots=True, eq=False)
class Exchange:
    method: str
    path: str
    client: str | None
    request_id: str
    control: bool = False  # a control-plane request (under the reserved prefix)
    started: float = field(default_factory=time.perf_counter)

    origin: Origin | None = None  # the upstream that served it
    origin_label: str | None = None  # its route prefix, NO_ROUTE, or None for the control plane
    context: Mapping[str, Any] | None = None  # what the engine saw (key, attributes, path, method)
    resolved: Sequence[tuple[Flag, Served]] = ()  # every flag that applied, with its outcome
    fitted: Fitted | None = None  # the flag headers sent, and what the budget left out
    head_bytes: int = 0  # the request head as sent upstream, flag headers included
    forwarded: bool = False  # the request head (with its flag headers) was written to the origin
    flag_header_bytes: int = 0  # of which flag headers (values, configs, omitted count, signature)

    status: int = 0  # what the client got; 499 when it left first
    response_started: bool = False  # the response head went out
    bytes_sent: int = 0  # response body bytes sent to the client
    upstream_latency_s: float | None = None  # request sent → origin's response head
    upstream_error: str | None = None  # timeout, connect or other, when the origin did not answer
    client_gone: bool = False  # the client left before its response was complete
    cut: str | None = None  # why a started response was cut short (stream_idle, total, send_idle, ...)
    upgraded: bool = False  # switched protocols (101) and tunnelled
    duration_s: float = 0.0  # set when the exchange ends

    @property
    def key(self) -> str | None:
        """The caller's key (header, cookie, JWT claim, Telegram user or anonymous id)."""
        return None if self.context is None else self.context.get("key")

    @property
    def budget_condition(self) -> str | None:
        """``over_budget``, ``trimmed``, ``near_limit`` (crossed the alert ratio) or None."""
        fitted = self.fitted
        if fitted is None or self.origin is None:
            return None
        if fitted.over_budget:
            return "over_budget"
        if fitted.omitted:
            return "trimmed"
        if self.head_bytes >= self.origin.alert_at:
            return "near_limit"
        return None

    def sent(self) -> Sequence[tuple[Flag, Served]]:
        """The flags whose value the origin received (resolved minus what the budget left out)."""
        if self.fitted is None:
            return ()
        left_out = self.fitted.omitted_values
        if not left_out:
            return self.resolved
        dropped = set(left_out)
        return [(flag, served) for flag, served in self.resolved if flag.key not in dropped]
