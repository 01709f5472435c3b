"""The native flag schema: validate definitions and compile them into ``Flag`` objects.

Compilation resolves everything that does not depend on the request (outcomes, split boundaries,
conditions, the bucketer), so evaluating a flag is a few closure calls.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeGuard

from proxy.engine.bucketing import BUCKETS, Bucketer, boundaries, make_bucketer, make_picker
from proxy.engine.flag import Context, Evaluate, Experiment, Explain, Flag, FlagError, Served, encode_json
from proxy.engine.jsonlogic import Logic, LogicError, compile_logic, truthy
from proxy.engine.routes import compile_routes

FLAG_FIELDS = frozenset(
    {
        "enabled",
        "variants",
        "defaultVariant",
        "rules",
        "percentage",
        "bucketBy",
        "salt",
        "priority",
        "required",
        "routes",
        "note",
        "updatedAt",
        "expiresAt",
        "createdAt",
        "type",
        "owner",
        "experiment",
    }
)
# Lifecycle types (Unleash's): their default lifetimes are settings ([lifecycle], docs/lifecycle.md)
FLAG_TYPES = ("release", "experiment", "operational", "kill-switch", "permission")
EXPERIMENT_FIELDS = frozenset({"control", "goals", "window_hours"})
DEFAULT_WINDOW_HOURS = 72
MAX_GOAL_LENGTH = 128
VARIANT_FIELDS = frozenset({"weight", "config"})
DOCUMENT_FIELDS = frozenset({"flags", "$schema", "version", "updatedAt", "note"})
RULE_FIELDS_VARIANTS = frozenset({"if", "variant", "rollout", "note"})
RULE_FIELDS_BOOLEAN = frozenset({"if", "value", "percentage", "note"})
MAX_KEY_LENGTH = 256

# bucket (None: nothing to bucket by) → (served, bucket used or None): a rule's or the fallthrough's result.
Outcome = Callable[[int | None], tuple[Served, int | None]]
Rule = tuple[Logic, Outcome]
# A flag's outcomes by the value they serve: true/false for boolean flags, variant names otherwise.
ByValue = Mapping[bool | str, Served]


# --- helpers --------------------------------------------------------------------------------------


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_timestamp(path: str, value: Any) -> None:
    if not isinstance(value, str):
        raise FlagError(path, "expected an ISO-8601 timestamp string")
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise FlagError(path, f"{value!r} is not an ISO-8601 timestamp") from None


# --- compilation ----------------------------------------------------------------------------------


def compile_document(document: Any) -> dict[str, Flag]:
    """Validate a whole native document ``{"flags": {...}}``; raise FlagError on the first problem."""
    if not isinstance(document, dict):
        raise FlagError("document", "expected a JSON object with a 'flags' object")
    unknown = sorted(set(document) - DOCUMENT_FIELDS)
    if unknown:
        raise FlagError(unknown[0], "unknown top-level field")
    flags = document.get("flags")
    if not isinstance(flags, dict):
        raise FlagError("flags", "expected an object of flag definitions")
    return {key: compile_flag(key, definition) for key, definition in flags.items()}


def compile_flag(key: str, definition: Any) -> Flag:
    """Validate one native flag definition and compile it."""
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
        raise FlagError(f"flags.{key!r}", f"a flag key must be a string of 1..{MAX_KEY_LENGTH} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in key):
        raise FlagError(f"flags.{key!r}", "a flag key must not contain control characters")
    where = f"flags.{key}"
    if not isinstance(definition, dict):
        raise FlagError(where, "a flag definition must be a JSON object")
    unknown = sorted(set(definition) - FLAG_FIELDS)
    if unknown:
        raise FlagError(f"{where}.{unknown[0]}", "unknown field")

    enabled = definition.get("enabled", True)
    if not isinstance(enabled, bool):
        raise FlagError(f"{where}.enabled", "expected true or false")
    bucket_by = definition.get("bucketBy", "key")
    if not isinstance(bucket_by, str) or not bucket_by:
        raise FlagError(f"{where}.bucketBy", "expected a non-empty attribute name")
    salt = definition.get("salt", key)
    if not isinstance(salt, str):
        raise FlagError(f"{where}.salt", "expected a string")
    priority = definition.get("priority", 0)
    if not _is_int(priority):
        raise FlagError(f"{where}.priority", "expected an integer")
    required = definition.get("required", False)
    if not isinstance(required, bool):
        raise FlagError(f"{where}.required", "expected true or false")
    for name in ("note", "owner"):
        if name in definition and not isinstance(definition[name], str):
            raise FlagError(f"{where}.{name}", "expected a string")
    if "type" in definition and definition["type"] not in FLAG_TYPES:
        raise FlagError(
            f"{where}.type", f"expected one of {', '.join(FLAG_TYPES)}, got {definition['type']!r}"
        )
    for name in ("updatedAt", "expiresAt", "createdAt"):
        if name in definition:
            _check_timestamp(f"{where}.{name}", definition[name])
    routes: tuple[str, ...] | None = None
    route_match: Callable[[str], bool] | None = None
    if "routes" in definition:
        routes, route_match = compile_routes(f"{where}.routes", definition["routes"])

    if "variants" in definition:
        evaluate, explain, served = _compile_variants(where, definition, enabled, bucket_by, salt)
    else:
        evaluate, explain, served = _compile_boolean(where, definition, enabled, bucket_by, salt)
    if "variants" in definition:
        default_name = definition.get("defaultVariant", next(iter(definition["variants"])))
        default = next(s for s in served if s.value == default_name)
    else:
        default = served[1]  # boolean: false
    experiment = None
    if "experiment" in definition:
        experiment = _compile_experiment(f"{where}.experiment", definition, served, default)
    return Flag(
        key=key,
        key_json=encode_json(key),
        evaluate=evaluate,
        explain=explain,
        served=served,
        default=default,
        priority=priority,
        required=required,
        routes=routes,
        route_match=route_match,
        experiment=experiment,
    )


def _compile_experiment(
    where: str, definition: dict[str, Any], served: tuple[Served, ...], default: Served
) -> Experiment:
    """``{"control": variant, "goals": [...], "window_hours": 72}`` → an ``Experiment``.

    The control defaults to ``defaultVariant`` (boolean flags: false). The weights SRM expects are
    the fallthrough's: variant weights, or ``percentage`` for boolean flags.
    """
    spec = definition["experiment"]
    if not isinstance(spec, dict):
        raise FlagError(where, "expected an object with goals and optional control and window_hours")
    unknown = sorted(set(spec) - EXPERIMENT_FIELDS)
    if unknown:
        raise FlagError(f"{where}.{unknown[0]}", "unknown field")
    by_value = {s.value: s for s in served}
    control = spec.get("control", default.value)
    if isinstance(control, bool) != isinstance(default.value, bool) or control not in by_value:
        names = ", ".join(encode_json(s.value) for s in served)
        raise FlagError(f"{where}.control", f"{encode_json(control)} is not one of the outcomes ({names})")
    goals = spec.get("goals")
    if not isinstance(goals, list) or not goals:
        raise FlagError(f"{where}.goals", "expected a non-empty array of goal names")
    for i, goal in enumerate(goals):
        if not isinstance(goal, str) or not goal or len(goal) > MAX_GOAL_LENGTH:
            raise FlagError(f"{where}.goals[{i}]", f"expected a string of 1..{MAX_GOAL_LENGTH} characters")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in goal):
            raise FlagError(f"{where}.goals[{i}]", "a goal name must not contain control characters")
    if len(set(goals)) != len(goals):
        raise FlagError(f"{where}.goals", "a goal is listed twice")
    window = spec.get("window_hours", DEFAULT_WINDOW_HOURS)
    if not _is_number(window) or not 0 < window <= 24 * 366:
        raise FlagError(f"{where}.window_hours", "expected a number of hours above 0 (at most a year)")
    if "variants" in definition:
        variant_weights = {name: v.get("weight", 0) for name, v in definition["variants"].items()}
        weights = [(s.value, float(variant_weights[s.value])) for s in served]
    else:
        on = float(definition.get("percentage", 100))
        weights = [(True, on), (False, 100.0 - on)]
    ordered = [w for w in weights if w[0] == control] + [w for w in weights if w[0] != control]
    return Experiment(control=control, goals=tuple(goals), window_hours=float(window), weights=tuple(ordered))


@dataclass(frozen=True, slots=True)
class _Split:
    """A weighted choice over outcomes by bucket (the fallthrough, or a rule's rollout)."""

    bounds: tuple[int, ...]
    outcomes: tuple[Served, ...]

    def pick(self, b: int) -> Served:
        return self.outcomes[bisect_right(self.bounds, b)]


def _compile_rules(where: str, rules: Any, boolean: bool, served: ByValue, default: Served) -> list[Rule]:
    """Each rule → (condition, outcome)."""
    if not isinstance(rules, list):
        raise FlagError(f"{where}.rules", "expected a list of rules")
    compiled: list[Rule] = []
    allowed = RULE_FIELDS_BOOLEAN if boolean else RULE_FIELDS_VARIANTS
    for i, rule in enumerate(rules):
        rwhere = f"{where}.rules[{i}]"
        if not isinstance(rule, dict):
            raise FlagError(rwhere, "expected an object with 'if' and an outcome")
        unknown = sorted(set(rule) - allowed)
        if unknown:
            hint = " (boolean flags use value or percentage)" if boolean else " (use variant or rollout)"
            raise FlagError(f"{rwhere}.{unknown[0]}", "unknown field" + hint)
        if "if" not in rule:
            raise FlagError(f"{rwhere}.if", "missing condition")
        try:
            condition = compile_logic(rule["if"], "if")
        except LogicError as exc:
            raise FlagError(f"{rwhere}.{exc.path}", exc.message) from None
        outcomes = [k for k in (("value", "percentage") if boolean else ("variant", "rollout")) if k in rule]
        if len(outcomes) != 1:
            names = "'value' or 'percentage'" if boolean else "'variant' or 'rollout'"
            raise FlagError(rwhere, f"needs exactly one of {names}")
        kind = outcomes[0]
        compiled.append((condition, _rule_outcome(f"{rwhere}.{kind}", kind, rule[kind], served, default)))
    return compiled


def _rule_outcome(where: str, kind: str, spec: Any, served: ByValue, default: Served) -> Outcome:
    if kind == "value":
        if not isinstance(spec, bool):
            raise FlagError(where, "expected true or false")
        fixed = served[spec]
        return lambda b: (fixed, None)
    if kind == "variant":
        if not isinstance(spec, str) or spec not in served:
            raise FlagError(where, f"{spec!r} is not one of the variants")
        fixed = served[spec]
        return lambda b: (fixed, None)
    if kind == "percentage":
        if not _is_number(spec) or not 0 <= spec <= 100:
            raise FlagError(where, "expected a number from 0 to 100")
        threshold = round(spec * 100)
        on, off = served[True], served[False]
        return lambda b: (off, b) if b is None else ((on if b < threshold else off), b)
    # rollout
    if not isinstance(spec, dict) or not spec:
        raise FlagError(where, "expected an object of variant weights")
    weights: list[int] = []
    outcomes: list[Served] = []
    for name, weight in spec.items():
        if name not in served:
            raise FlagError(f"{where}.{name}", f"{name!r} is not one of the variants")
        if not _is_int(weight) or weight < 0:
            raise FlagError(f"{where}.{name}", "expected an integer weight >= 0")
        weights.append(weight)
        outcomes.append(served[name])
    if not any(weights):
        raise FlagError(where, "all weights are zero")
    split = _Split(boundaries(weights), tuple(outcomes))
    return lambda b: (default, None) if b is None else (split.pick(b), b)


def _assemble(
    enabled: bool,
    default: Served,
    rules: list[Rule],
    fallthrough: Outcome,
    pick: Callable[[int], Served] | None,
    bucket_of: Bucketer,
    bucket_by: str,
    salt: str,
) -> tuple[Evaluate, Explain]:
    """Build evaluate/explain: disabled → default; first matching rule; else the fallthrough.

    ``pick`` is the fallthrough's bucket → outcome (None when no bucketing is needed: one outcome).
    ``evaluate`` is the hot path; ``explain`` (admin, CLI) also says why.
    """
    if not enabled:
        return (lambda ctx: default), (lambda ctx: (default, {"reason": "disabled"}))

    # which rules split by bucket (a rollout or percentage: they report the bucket they were given);
    # explain hashes the unit only for those and for a split fallthrough (the client API's hot path)
    rule_buckets = tuple(outcome(0)[1] is not None for _, outcome in rules)

    def explain(ctx: Context) -> tuple[Served, dict[str, Any]]:
        for index, (condition, outcome) in enumerate(rules):
            try:
                matched = truthy(condition(ctx))
            except Exception:  # a condition must never break a request
                matched = False
            if matched:
                buckets = rule_buckets[index]
                result, used = outcome(bucket_of(ctx) if buckets else None)
                detail: dict[str, Any] = {"reason": "rule", "rule": index}
                if used is not None:
                    detail["bucket"] = used
                elif buckets:  # the rule's rollout had nothing to bucket by
                    detail["unbucketed"] = True
                return result, detail
        result, used = fallthrough(bucket_of(ctx) if pick is not None else None)
        if used is None and pick is not None:
            return result, {"reason": "default", "detail": f"no {bucket_by!r} to bucket by"}
        if used is None:
            return result, {"reason": "fallthrough"}
        return result, {"reason": "split", "bucket": used}

    rest: Evaluate
    if pick is None:  # one possible outcome: no hashing at all
        fixed = fallthrough(None)[0]
        rest = lambda ctx: fixed  # noqa: E731
    else:
        rest = make_picker(bucket_by, salt, pick, default, bucket_of)

    if not rules:
        return rest, explain

    def evaluate(ctx: Context) -> Served:
        try:
            for condition, outcome in rules:
                matched = condition(ctx)
                if matched is True or (matched is not False and truthy(matched)):
                    return outcome(bucket_of(ctx))[0]
        except Exception:  # a condition must never break a request
            return default
        return rest(ctx)

    return evaluate, explain


def _compile_boolean(
    where: str, definition: dict[str, Any], enabled: bool, bucket_by: str, salt: str
) -> tuple[Evaluate, Explain, tuple[Served, ...]]:
    if "defaultVariant" in definition:
        raise FlagError(f"{where}.defaultVariant", "only flags with variants have a defaultVariant")
    percentage = definition.get("percentage", 100)
    if not _is_number(percentage) or not 0 <= percentage <= 100:
        raise FlagError(f"{where}.percentage", "expected a number from 0 to 100")
    on, off = Served.make(True), Served.make(False)
    served: dict[bool | str, Served] = {True: on, False: off}
    threshold = round(percentage * 100)
    rules = _compile_rules(where, definition["rules"], True, served, off) if "rules" in definition else []

    pick: Callable[[int], Served] | None = None
    if threshold >= BUCKETS:
        fallthrough: Outcome = lambda b: (on, None)  # noqa: E731
    elif threshold <= 0:
        fallthrough = lambda b: (off, None)  # noqa: E731
    else:
        fallthrough = lambda b: (off, None) if b is None else ((on if b < threshold else off), b)  # noqa: E731
        pick = lambda b: on if b < threshold else off  # noqa: E731
    bucket_of = make_bucketer(bucket_by, salt)
    evaluate, explain = _assemble(enabled, off, rules, fallthrough, pick, bucket_of, bucket_by, salt)
    return evaluate, explain, (on, off)


def _compile_variants(
    where: str, definition: dict[str, Any], enabled: bool, bucket_by: str, salt: str
) -> tuple[Evaluate, Explain, tuple[Served, ...]]:
    variants = definition["variants"]
    if not isinstance(variants, dict) or not variants:
        raise FlagError(f"{where}.variants", "expected a non-empty object of variants")
    if "percentage" in definition:
        raise FlagError(f"{where}.percentage", "percentage applies to boolean flags; use variant weights")
    served: dict[bool | str, Served] = {}
    weights: list[int] = []
    for name, spec in variants.items():
        vwhere = f"{where}.variants.{name}"
        if not name:
            raise FlagError(vwhere, "a variant name must not be empty")
        if not isinstance(spec, dict):
            raise FlagError(vwhere, "expected an object with weight and optional config")
        unknown = sorted(set(spec) - VARIANT_FIELDS)
        if unknown:
            raise FlagError(f"{vwhere}.{unknown[0]}", "unknown field")
        weight = spec.get("weight", 0)
        if not _is_int(weight) or weight < 0:
            raise FlagError(f"{vwhere}.weight", "expected an integer >= 0")
        try:
            served[name] = Served.make(name, spec.get("config"), "config" in spec)
        except ValueError as exc:
            raise FlagError(f"{vwhere}.config", f"not encodable as JSON: {exc}") from None
        weights.append(weight)

    default_name = definition.get("defaultVariant", next(iter(variants)))
    if not isinstance(default_name, str) or default_name not in served:
        raise FlagError(f"{where}.defaultVariant", f"{default_name!r} is not one of the variants")
    default = served[default_name]
    if not any(weights) and "rules" not in definition:
        raise FlagError(f"{where}.variants", "all weights are zero")
    rules: list[Rule] = []
    if "rules" in definition:
        rules = _compile_rules(where, definition["rules"], False, served, default)

    outcomes = tuple(served.values())
    positive = [s for s, w in zip(outcomes, weights, strict=True) if w > 0]
    split = _Split(boundaries(weights), outcomes)
    pick: Callable[[int], Served] | None = None
    if len(positive) == 1:
        only = positive[0]
        fallthrough: Outcome = lambda b: (only, None)  # noqa: E731
    elif not positive:
        fallthrough = lambda b: (default, None)  # noqa: E731
    else:
        fallthrough = lambda b: (default, None) if b is None else (split.pick(b), b)  # noqa: E731
        bounds = split.bounds
        pick = lambda b: outcomes[bisect_right(bounds, b)]  # noqa: E731
    bucket_of = make_bucketer(bucket_by, salt)
    evaluate, explain = _assemble(enabled, default, rules, fallthrough, pick, bucket_of, bucket_by, salt)
    return evaluate, explain, outcomes
