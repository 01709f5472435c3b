"""An experiment's results document: what is recorded (``Counts``), read against the flag's
experiment (control, goals, weights), with the statistics of ``stats``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from proxy.engine import Experiment, Flag, variant_name
from proxy.experiments.records import Counts
from proxy.experiments.stats import srm, variant_rows


def iso(at: float | None) -> str | None:
    if at is None:
        return None
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _number(value: float) -> float | int:
    """72.0 → 72 (as the flag's definition wrote it), 1.5 → 1.5."""
    return int(value) if value.is_integer() else value


def status_of(flag: Flag | None) -> str:
    """running, killed or promoted (the experiment is over), or ended (no experiment defined now)."""
    if flag is None or flag.experiment is None:
        return "ended"
    return flag.overridden or "running"


def variant_order(experiment: Experiment | None, counts: Counts) -> list[str]:
    """The flag's outcomes, control first, then recorded variants it no longer has (by name)."""
    declared = [] if experiment is None else [variant_name(v) for v, _ in experiment.weights]
    extra = sorted(set(counts.users) - set(declared))
    return [*declared, *extra]


def summary(key: str, flag: Flag | None, counts: Counts | None) -> dict[str, Any]:
    """One line of the experiments list."""
    counts = counts or Counts()
    experiment = None if flag is None else flag.experiment
    return {
        "flag": key,
        "status": status_of(flag),
        "variants": variant_order(experiment, counts),
        "users": sum(counts.users.values()),
        "started_at": iso(counts.started_at),
    }


def results(key: str, flag: Flag | None, counts: Counts | None) -> dict[str, Any]:
    """``GET /api/experiments/{flag}``: per goal, one row per variant, control first."""
    counts = counts or Counts()
    experiment = None if flag is None else flag.experiment
    order = variant_order(experiment, counts)
    users = counts.users
    goals = list(experiment.goals) if experiment is not None else []
    goals += sorted(set(counts.conversions) - set(goals))
    # a boolean flag's variants are shown as the flag serves them (true/false), stored as text
    shown: dict[str, bool | str] = (
        {} if experiment is None else {variant_name(v): v for v, _ in experiment.weights}
    )
    by_goal: dict[str, Any] = {}
    for goal in goals:
        converted = counts.conversions.get(goal, {})
        values = counts.values.get(goal, {})
        arms = [(shown.get(v, v), users.get(v, 0), min(converted.get(v, 0), users.get(v, 0))) for v in order]
        rows = variant_rows(arms)
        for row, v in zip(rows, order, strict=True):
            row["value"] = values.get(v, 0.0)
        by_goal[goal] = {"variants": rows}
    weights = [] if experiment is None else [(variant_name(v), w) for v, w in experiment.weights]
    return {
        "flag": key,
        "status": status_of(flag),
        "control": None if experiment is None else experiment.control,
        "window_hours": None if experiment is None else _number(experiment.window_hours),
        "started_at": iso(counts.started_at),
        "users": sum(users.values()),
        "multiple_exposures": counts.multiple_exposures,
        "unattributed": counts.unattributed,
        "srm": srm([(v, users.get(v, 0)) for v in order], weights),
        "goals": by_goal,
    }
