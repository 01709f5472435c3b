"""Pre-flight: the worst case each route can reach, before any traffic does.

For every route glob the flags declare (and "all routes" for flags without ``routes``), the worst
case is a representative request of ``[header] typical_request_bytes`` plus the flag headers with
every applicable flag at its largest outcome (value + config). ``flagproxy budget`` prints it; the
proxy recomputes it on every store change and alerts before a route crosses the alert ratio.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from proxy.config import Settings, flag_header_names, header_budget
from proxy.dataplane.header_fit import FlagHeaders
from proxy.engine import Flag, Served

ALL_ROUTES = "*"


@dataclass(frozen=True)
class Row:
    origin: str
    route: str
    flags: int
    worst_bytes: int
    budget: int

    @property
    def ratio(self) -> float:
        return self.worst_bytes / self.budget if self.budget else float("inf")


def largest_outcome(flag: Flag) -> Served:
    return max(flag.served, key=lambda s: len(s.value_json) + len(s.config_json or ""))


def sample_path(glob: str) -> str:
    """A concrete path the glob matches, as deep as it allows (``**`` → ``x/x``, ``*``/``?`` → ``x``)."""
    return glob.replace("**", "\0").replace("*", "x").replace("?", "x").replace("\0", "x/x")


def route_groups(flags: Iterable[Flag]) -> dict[str, list[Flag]]:
    """Route glob → the flags a request matching it gets: the flags for every route, plus every flag
    with a glob matching that route's sample path (so ``/a/b/**`` also counts the ``/a/**`` flags)."""
    flags = list(flags)
    everywhere = [f for f in flags if f.routes is None]
    routed = [f for f in flags if f.routes is not None]
    groups: dict[str, list[Flag]] = {ALL_ROUTES: everywhere}
    for glob in sorted({r for f in routed for r in f.routes or ()}):
        path = sample_path(glob)
        groups[glob] = everywhere + [f for f in routed if f.applies_to(path)]
    return groups


def _origin_for(prefixes: list[str], path: str) -> str | None:
    """The origin prefix the router would pick for ``path`` (longest prefix, whole segments)."""
    for prefix in sorted(prefixes, key=len, reverse=True):
        bare = prefix.rstrip("/")
        if not bare or path == bare or path.startswith(bare + "/"):
            return prefix
    return None


def worst_case(
    settings: Settings, flags: Mapping[str, Flag], headers: FlagHeaders | None = None
) -> list[Row]:
    encoder = headers or FlagHeaders(flag_header_names(settings))
    ordered = [flags[k] for k in sorted(flags)]
    origins = settings.origins or ()
    budgets = {o.prefix: header_budget(settings, o) for o in origins} or {"/": header_budget(settings)}
    rows = []
    for route, group in sorted(route_groups(ordered).items()):
        group = sorted(group, key=lambda f: f.key)
        size = encoder.fit([(f, largest_outcome(f)) for f in group], None).size
        worst = settings.header.typical_request_bytes + size
        reached = list(budgets) if route == ALL_ROUTES else [_origin_for(list(budgets), sample_path(route))]
        for origin in sorted(o for o in reached if o is not None):
            rows.append(Row(origin, route, len(group), worst, budgets[origin]))
    return rows


def render(rows: list[Row]) -> str:
    lines = [
        "| origin | route | flags | worst-case bytes | budget | % of budget |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        mark = " ⚠" if r.worst_bytes > r.budget else ""
        cells = [
            r.origin,
            r.route,
            str(r.flags),
            f"{r.worst_bytes:,}",
            f"{r.budget:,}",
            f"{100 * r.ratio:.1f} %{mark}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
