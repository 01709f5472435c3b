"""Budget events from live traffic and from pre-flight checks, turned into counted, deduplicated alerts."""

from __future__ import annotations

import functools
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from proxy.alerts import Alert, Alerter
from proxy.budget import ALL_ROUTES, largest_outcome, route_groups, worst_case
from proxy.config import Settings
from proxy.engine import Flag, Served, glob_to_regex
from proxy.header import Fitted, FlagHeaders

if TYPE_CHECKING:
    from proxy.forward import Origin
    from proxy.store.base import Snapshot


@dataclass
class BudgetStats:
    near_limit: int = 0
    trimmed: int = 0
    over_budget: int = 0
    omitted_entries: int = 0
    preflight_over_ratio: int = 0


def origin_label(url: str) -> str:
    """scheme://host[:port] without any credentials, for messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


def normal_prefix(prefix: str) -> str:
    """An origin prefix as the router keeps it (no trailing slash), "/" for the root."""
    return prefix.rstrip("/") or "/"


@functools.lru_cache(maxsize=4096)
def _glob(pattern: str) -> re.Pattern[str]:
    return re.compile(glob_to_regex(pattern))


def route_pattern(origin_prefix: str, path: str, resolved: Sequence[tuple[Flag, Served]]) -> str:
    """The configured pattern the request matched: the longest matching flag route glob, else the prefix.

    Each glob is matched on its own: a flag applies when any of its globs matches, and only the
    globs that match this path may name its route.
    """
    best = ""
    for flag, _ in resolved:
        if flag.routes is None:
            continue
        for glob in flag.routes:
            if len(glob) > len(best) and _glob(glob).fullmatch(path):
                best = glob
    return best or origin_prefix


def request_id(scope: dict[str, Any]) -> str:
    """The id the forwarder gave this request (and sent to the origin and the client)."""
    found = scope.get("flagproxy.request_id")
    if found:
        return found
    for name, value in scope["headers"]:
        if name == b"x-request-id" and value:
            return value.decode("latin-1")[:128]
    return uuid.uuid4().hex


class BudgetWatch:
    def __init__(self, settings: Settings, alerter: Alerter, headers: FlagHeaders) -> None:
        self.settings = settings
        self.alerter = alerter
        self.headers = headers
        self.stats = BudgetStats()
        self.labels = {normal_prefix(o.prefix): origin_label(o.url) for o in settings.origins}

    def exceeded(
        self,
        scope: dict[str, Any],
        origin: Origin,
        resolved: Sequence[tuple[Flag, Served]],
        fitted: Fitted,
        used: int,
    ) -> None:
        """A request trimmed flags or crossed the alert ratio (called on the data path: cheap)."""
        if fitted.over_budget:
            condition = "over_budget"
            self.stats.over_budget += 1
        elif fitted.omitted:
            condition = "trimmed"
            self.stats.trimmed += 1
        else:
            condition = "near_limit"
            self.stats.near_limit += 1
        self.stats.omitted_entries += fitted.omitted
        if origin.metrics is not None:
            origin.metrics.budget_event(condition, fitted.omitted)
        prefix = origin.label
        sizes = sorted(
            ((f.key, len(s.value_json) + len(s.config_json or "")) for f, s in resolved),
            key=lambda kv: -kv[1],
        )
        self.alerter.notify(
            Alert(
                condition=condition,
                origin=self.labels.get(prefix) or origin_label(origin.base),
                route=route_pattern(prefix, scope["path"], resolved),
                used=used,
                budget=origin.budget,
                largest=sizes[:5],
                omitted=[*fitted.omitted_values, *(f"{k} (config)" for k in fitted.omitted_configs)],
                request_id=request_id(scope),
            )
        )

    def preflight(self, snapshot: Snapshot) -> None:
        """On every store change: alert for routes whose worst case crosses the ratio."""
        ratio = self.settings.header.alert_ratio
        groups = route_groups(list(snapshot.flags.values()))
        for row in worst_case(self.settings, snapshot.flags, self.headers):
            if row.ratio < ratio:
                continue
            self.stats.preflight_over_ratio += 1
            group = groups.get(row.route, [])
            outcomes = [(f.key, largest_outcome(f)) for f in group]
            sizes = sorted(
                ((k, len(s.value_json) + len(s.config_json or "")) for k, s in outcomes),
                key=lambda kv: -kv[1],
            )
            self.alerter.notify(
                Alert(
                    condition="preflight",
                    origin=self.labels.get(normal_prefix(row.origin), row.origin),
                    route=row.origin if row.route == ALL_ROUTES else row.route,
                    used=row.worst_bytes,
                    budget=row.budget,
                    largest=sizes[:5],
                )
            )
