"""The engine's types: a compiled ``Flag``, its pre-encoded ``Served`` outcomes, and overrides.

Every outcome is built and JSON-encoded once, at load, so ``evaluate(context)`` does the least work
possible per call.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

Context = Mapping[str, Any]


class FlagError(ValueError):
    """A flag definition is invalid; ``path`` names the flag and field."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


def encode_json(value: Any) -> str:
    """Compact, ASCII-only JSON: safe to place in an HTTP header value."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


@dataclass(frozen=True, slots=True)
class Served:
    """One possible outcome of a flag, encoded once at load."""

    value: bool | str
    config: Any = None
    has_config: bool = False
    value_json: str = ""
    config_json: str | None = None

    @classmethod
    def make(cls, value: bool | str, config: Any = None, has_config: bool = False) -> Served:
        return cls(
            value=value,
            config=config,
            has_config=has_config,
            value_json=encode_json(value),
            config_json=encode_json(config) if has_config else None,
        )


def variant_name(value: bool | str) -> str:
    """How experiments name an outcome: the variant name, or ``true``/``false`` for boolean flags."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


@dataclass(frozen=True, slots=True)
class Experiment:
    """A flag run as an experiment: which outcome is the control, the goals it is judged on, how long
    after a unit's first exposure a conversion counts, and the weights its users should split by."""

    control: bool | str
    goals: tuple[str, ...]
    window_hours: float
    # every outcome in the flag's order, control first, with the fallthrough's weight (SRM's expectation)
    weights: tuple[tuple[bool | str, float], ...]

    @property
    def window_s(self) -> float:
        return self.window_hours * 3600.0


Evaluate = Callable[[Context], Served]
Fragments = tuple[str, str | None, int, int]  # value entry, config entry, their sizes with a comma
Explain = Callable[[Context], tuple[Served, dict[str, Any]]]


@dataclass(frozen=True, slots=True)
class Flag:
    key: str
    key_json: str
    evaluate: Evaluate
    explain: Explain
    served: tuple[Served, ...]
    default: Served
    priority: int = 0
    required: bool = False  # never trimmed: a request whose budget cannot hold it is refused (431)
    routes: tuple[str, ...] | None = None
    route_match: Callable[[str], bool] | None = None
    definition: Mapping[str, Any] = field(default_factory=dict)
    source: str = "native"
    experiment: Experiment | None = None  # only experiment flags produce exposures
    overridden: str | None = None  # "killed" or "promoted": everyone gets one outcome (no experiment runs)
    # a source whose explanations use its own words maps them (``explain``'s dict) to one of
    # OpenFeature's standard reasons; None: the engine's own words (docs/clients.md maps those)
    reason_of: Callable[[Mapping[str, Any]], str] | None = None

    @property
    def experimenting(self) -> bool:
        """An experiment flag still splitting its users: its exposures are recorded."""
        return self.experiment is not None and self.overridden is None

    # id(served) → ('"key":value', '"key":config' or None, len(value) + 1, len(config) + 1 or 0):
    # the header fragments and their sizes with a comma, encoded once (see __post_init__).
    entries: Mapping[int, Fragments] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        entries = {id(s): self._fragments(s) for s in (*self.served, self.default)}
        object.__setattr__(self, "entries", entries)

    def _fragments(self, served: Served) -> Fragments:
        value = f"{self.key_json}:{served.value_json}"
        config = None if served.config_json is None else f"{self.key_json}:{served.config_json}"
        return value, config, len(value) + 1, 0 if config is None else len(config) + 1

    def applies_to(self, path: str) -> bool:
        return self.route_match is None or self.route_match(path)

    def entry(self, served: Served) -> Fragments:
        """This flag's header fragments for ``served`` (precomputed for every declared outcome)."""
        found = self.entries.get(id(served))
        return self._fragments(served) if found is None else found

    def outcome(self, value: Any) -> Served | None:
        """The outcome serving ``value`` (a variant name, or true/false for boolean flags)."""
        for served in self.served:
            if served.value == value and type(served.value) is type(value):
                return served
        return None


def with_override(flag: Flag, override: Mapping[str, Any]) -> Flag:
    """A kill (everyone gets the default) or a promotion (everyone gets one outcome) on top of a flag."""
    if override.get("kill"):
        served, why = flag.default, {"reason": "killed"}
    else:
        promoted = flag.outcome(override.get("promote"))
        if promoted is None:  # the promoted variant no longer exists: the flag serves as defined
            return flag
        served, why = promoted, {"reason": "promoted"}
    # a killed or promoted experiment is over: it records no more exposures (its results stay readable)
    return replace(
        flag, evaluate=lambda ctx: served, explain=lambda ctx: (served, dict(why)), overridden=why["reason"]
    )
