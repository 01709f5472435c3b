"""Budget alerts: from each exchange that trimmed flags or crossed the alert ratio (an observer), and
from the pre-flight check of every new snapshot. Slack sending is queued by the ``Alerter``."""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

from proxy.alerts import Alert, Alerter
from proxy.config import Settings
from proxy.dataplane.exchange import Exchange
from proxy.dataplane.header_fit import FlagHeaders
from proxy.dataplane.preflight import ALL_ROUTES, largest_outcome, route_groups, worst_case
from proxy.engine import Flag, Served, glob_matcher
from proxy.store.base import Snapshot


def origin_label(url: str) -> str:
    """scheme://host[:port] without any credentials, for messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


def normal_prefix(prefix: str) -> str:
    """An origin prefix as the router keeps it (no trailing slash), "/" for the root."""
    return prefix.rstrip("/") or "/"


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
            if len(glob) > len(best) and glob_matcher(glob)(path):
                best = glob
    return best or origin_prefix


class BudgetWatch:
    name = "budget_alerts"
    inline = True  # a cooldown check and a queue put (Alerter.notify); Slack is posted in the background

    def __init__(self, settings: Settings, alerter: Alerter, headers: FlagHeaders) -> None:
        self.alerter = alerter
        self.headers = headers
        self.reconfigure(settings)

    def reconfigure(self, settings: Settings) -> None:
        """New origins or header settings (a reload); the next preflight uses them."""
        self.settings = settings
        self.labels = {normal_prefix(o.prefix): origin_label(o.url) for o in settings.origins}
        self._routes: dict[tuple[str, str], str] = {}  # (origin prefix, path) → route pattern

    def observe(self, exchange: Exchange) -> None:
        """A request that trimmed flags or crossed the alert ratio: one alert (deduplicated)."""
        condition = exchange.budget_condition
        origin, fitted = exchange.origin, exchange.fitted
        if condition is None or origin is None or fitted is None:
            return
        prefix = origin.label
        resolved = exchange.resolved
        where = self.labels.get(prefix) or origin_label(origin.base)
        route = self._routes.get((prefix, exchange.path))
        if route is None:  # a regex per route glob: once per path and snapshot, not per request
            route = route_pattern(prefix, exchange.path, resolved)
            if len(self._routes) >= 4096:
                self._routes.clear()
            self._routes[(prefix, exchange.path)] = route
        if self.alerter.cooling_down(where, route, condition):
            return  # before any sorting: most trimmed requests land here
        sizes = sorted(
            ((f.key, len(s.value_json) + len(s.config_json or "")) for f, s in resolved),
            key=lambda kv: -kv[1],
        )
        self.alerter.notify(
            Alert(
                condition=condition,
                origin=where,
                route=route,
                used=exchange.head_bytes,
                budget=origin.budget,
                largest=sizes[:5],
                omitted=[*fitted.omitted_values, *(f"{k} (config)" for k in fitted.omitted_configs)],
                request_id=exchange.request_id,
            )
        )

    def preflight(self, snapshot: Snapshot) -> None:
        """On every store change: alert for routes whose worst case crosses the ratio."""
        self._routes = {}  # the flags (and their routes) changed
        ratio = self.settings.header.alert_ratio
        groups = route_groups(list(snapshot.flags.values()))
        for row in worst_case(self.settings, snapshot.flags, self.headers):
            if row.ratio < ratio:
                continue
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
