"""What the experiment store is written with and what it answers: one module of plain types.

An *exposure* says a unit (the request's key) was served a variant of an experiment flag; the first
one fixes the unit's variant and time. A *conversion* says a unit reached a goal; it counts once per
(unit, experiment, goal), when it happens at or after the unit's first exposure and within the
experiment's window. Times are Unix seconds (floats).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


class ExposureRecord(NamedTuple):  # a tuple: built on the event loop for every new exposure
    flag: str
    unit: str
    variant: str  # ``variant_name``: the variant, or "true"/"false" for boolean flags
    at: float


class ConversionRecord(NamedTuple):
    flag: str
    goal: str
    unit: str
    at: float
    window_s: float  # the experiment's window when the conversion was recorded
    value: float | None = None
    # False: if the unit is not exposed (yet), record nothing and answer NOT_EXPOSED_YET — its
    # exposure may still be on its way (another worker's queue, the request still being answered);
    # the recorder asks again, final, a little later
    final: bool = True


# What applying a record did (also the ``result`` label of the conversion metrics).
EXPOSED = "new"  # the unit's first exposure
REPEAT = "repeat"  # the unit was already exposed to this variant
MULTIPLE = "multiple"  # the unit was already exposed to another variant (it keeps its first)
COUNTED = "counted"
DUPLICATE = "duplicate"  # this unit's conversion for this goal was already counted
UNATTRIBUTED = "unattributed"  # the unit was never exposed
NOT_EXPOSED_YET = "not_exposed_yet"  # not final, and no exposure of the unit is written yet
BEFORE_EXPOSURE = "before_exposure"
OUTSIDE_WINDOW = "outside_window"


@dataclass(slots=True)
class Applied:
    """What one batch did, record by record (in the order given)."""

    exposures: list[str] = field(default_factory=list)
    conversions: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Counts:
    """Everything the results are computed from, for one experiment flag."""

    started_at: float | None = None  # earliest first exposure
    users: dict[str, int] = field(default_factory=dict)  # variant → exposed units
    multiple_exposures: int = 0  # units exposed to more than one variant
    unattributed: int = 0  # conversions of units never exposed
    conversions: dict[str, dict[str, int]] = field(default_factory=dict)  # goal → variant → units
    values: dict[str, dict[str, float]] = field(default_factory=dict)  # goal → variant → sum of values
