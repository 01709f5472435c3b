"""An experiment's results as text: one table per goal (``flagproxy experiments``, ``/flag stats``).

``render_results`` takes the results document (``proxy.experiments.results.results``, or the JSON the
admin API answers with); ``render_table`` and ``render_srm`` its parts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

HEADINGS = ("Variant", "Users Exposed", "Conversions", "Conversion Rate", "vs. Control")
NA = "n/a"


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _count(value: object) -> str:
    number = _number(value)
    return NA if number is None else f"{number:,.0f}"


def _share(value: object, spec: str) -> str:
    number = _number(value)
    return NA if number is None else format(number, spec)


def format_p(value: object) -> str:
    p = _number(value)
    if p is None:
        return NA
    if p >= 0.001:
        return f"{p:.3f}"
    return f"{p:.2g}" if p > 0 else "<1e-300"


def _variant(value: object) -> str:
    return json.dumps(value) if isinstance(value, bool) or value is None else str(value)


def versus_control(row: Mapping[str, Any]) -> str:
    """``+28.2% [+5.3%, +51.2%] p=0.016`` (``(control)`` for the control row)."""
    if "uplift" not in row:
        return "(control)"
    if _number(row.get("uplift")) is None:
        return NA
    low, high = _share(row.get("ci_low"), "+.1%"), _share(row.get("ci_high"), "+.1%")
    return f"{_share(row['uplift'], '+.1%')} [{low}, {high}] p={format_p(row.get('p_value'))}"


def render_table(rows: Sequence[Mapping[str, Any]]) -> str:
    cells = [HEADINGS] + [
        (
            _variant(row.get("variant")),
            _count(row.get("users")),
            _count(row.get("conversions")),
            _share(row.get("rate"), ".2%"),
            versus_control(row),
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(HEADINGS))]
    lines = []
    for line in cells:
        first, *numbers, last = line
        middle = [cell.rjust(width) for cell, width in zip(numbers, widths[1:-1], strict=True)]
        lines.append("  ".join([first.ljust(widths[0]), *middle, last]).rstrip())
    return "\n".join(lines)


def render_srm(result: object) -> str:
    p = _number(result.get("p_value")) if isinstance(result, dict) else None
    if p is None:
        return "SRM: n/a (needs at least 2 variants with a weight, and users)"
    if isinstance(result, dict) and result.get("mismatch"):
        return (
            f"SRM: p={format_p(p)} MISMATCH — users are not split as the weights say; "
            "do not trust these results"
        )
    return f"SRM: p={format_p(p)} (ok)"


STATUS_NOTES = {
    "promoted": "The flag is promoted: everyone gets one variant; nothing more is recorded.",
    "killed": "The flag is killed: everyone gets the default; nothing more is recorded.",
    "ended": "The flag no longer defines this experiment: these are the data recorded while it did.",
}


def render_results(payload: Mapping[str, Any], goals: Mapping[str, Any]) -> str:
    """The header line, the SRM line, then a table per goal."""
    header = (
        f"Experiment {payload.get('flag', NA)}: {_count(payload.get('users'))} users"
        f" since {payload.get('started_at') or NA}; window: {_count(payload.get('window_hours'))} h;"
        f" control: {_variant(payload.get('control', NA))};"
        f" multiple exposures: {_count(payload.get('multiple_exposures'))};"
        f" unattributed: {_count(payload.get('unattributed'))}"
    )
    parts = [header]
    status = payload.get("status")
    if status in STATUS_NOTES:
        parts.append(STATUS_NOTES[status])
    parts.append(render_srm(payload.get("srm")))
    if not goals:
        parts.append("\nno goals yet: no conversions have been recorded")
    for goal, result in goals.items():
        rows = result.get("variants") if isinstance(result, dict) else None
        parts.append(f"\nGoal: {goal}")
        parts.append(render_table([row for row in rows or () if isinstance(row, dict)]))
    return "\n".join(parts)
