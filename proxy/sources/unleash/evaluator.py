"""Unleash features → engine flags, evaluated as ``UnleashClient`` 6.9.1 (its Yggdrasil engine) does.

A feature is compiled twice, as in the engine: once as one rule (its strategies ORed: is it
enabled?) and once strategy by strategy (which strategy matched first: whose variants?). A rule that
does not rewrite, parse or compile turns the feature off (logged once). Evaluation:

1. a disabled feature, or an unmet dependency, is off;
2. the first strategy that matches decides; if it has variants, one of them is picked (sticky on
   the strategy's ``stickiness``, grouped by its ``groupId``, default the feature name), otherwise
   one of the feature's variants (sticky on the first variant's ``stickiness``, group = the
   feature name); variant overrides are checked first, variant by variant;
3. no strategy matching → off; a feature without strategies is on.

Dependencies are one level deep: a missing parent or a parent with dependencies of its own fails
the child; the parent is evaluated with the child's name as the default rollout group.

Outcomes (``UnleashServed``): ``False`` when off; ``True`` when on without a variant; the variant's
name when one resolves, its payload as the config (a ``json`` payload parsed, any other as its
string). ``enabled``/``variant``/``payload`` keep what the SDK's ``is_enabled``/``get_variant``
return, for ``flagproxy eval``.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.engine import Flag, Served, encode_json
from proxy.sources.unleash.context import UnleashContext, from_request
from proxy.sources.unleash.documents import feature_problem, segment_problem
from proxy.sources.unleash.fragments import FragmentError, Rule, compile_node
from proxy.sources.unleash.grammar import RuleSyntaxError, parse
from proxy.sources.unleash.hashing import VARIANT_SEED, normalized_hash
from proxy.sources.unleash.rules import KNOWN_STRATEGIES, RuleError, strategy_rules

log = logging.getLogger("proxy.sources.unleash")

REASON_DISABLED = "disabled"
REASON_DEPENDENCY = "dependency not met"
REASON_MATCHED = "strategy matched"
REASON_NO_MATCH = "no strategy matched"
REASON_BROKEN = "rule does not compile"

_warned: set[tuple[str, str]] = set()


def _warn_once(feature: str, message: str) -> None:
    if (feature, message) not in _warned:
        _warned.add((feature, message))
        log.warning("unleash feature %r: %s", feature, message)


@dataclass(frozen=True, slots=True)
class UnleashServed(Served):
    """An outcome, with what Unleash's SDK itself returns for it."""

    enabled: bool = False
    variant: str = "disabled"
    payload: Mapping[str, str] | None = None


def _served(
    value: bool | str, enabled: bool, variant: str, payload: Mapping[str, str] | None
) -> UnleashServed:
    config: Any = None
    if payload is not None:
        config = payload["value"]
        if payload["type"] == "json":
            try:
                config = json.loads(config)
                encode_json(config)
            except ValueError:  # not JSON (or NaN/Infinity, which the header encoding refuses)
                config = payload["value"]
    has_config = payload is not None
    return UnleashServed(
        value=value,
        config=config,
        has_config=has_config,
        value_json=encode_json(value),
        config_json=encode_json(config) if has_config else None,
        enabled=enabled,
        variant=variant,
        payload=payload,
    )


OFF = _served(False, False, "disabled", None)
ON = _served(True, True, "disabled", None)


class Variant:
    __slots__ = ("name", "overrides", "served", "stickiness", "weight")

    def __init__(self, raw: Mapping[str, Any], stickiness: str | None, overrides: bool) -> None:
        self.name: str = raw["name"]
        self.weight: int = raw["weight"]
        self.stickiness = stickiness
        payload = raw.get("payload")
        self.overrides: tuple[tuple[str, frozenset[str]], ...] = (
            tuple((o["contextName"], frozenset(o["values"])) for o in raw.get("overrides") or [])
            if overrides
            else ()
        )
        self.served = _served(self.name, True, self.name, None if payload is None else dict(payload))


def _seed(stickiness: str | None, c: UnleashContext) -> str | None:
    if stickiness is None or stickiness == "default":
        return c.user_id if c.user_id is not None else c.session_id
    if stickiness == "currentTime":  # not a stickiness field of the engine: read as a property
        return c.properties.get(stickiness)
    return c.field(stickiness)


def resolve_variant(variants: Sequence[Variant], group: str, c: UnleashContext) -> Variant | None:
    if not variants:
        return None
    for variant in variants:
        for context_name, values in variant.overrides:
            value = c.field(context_name)
            if value is not None and value in values:
                return variant
    total = sum(v.weight for v in variants)
    if total <= 0:
        return None  # the engine cannot divide by a zero total (it fails the call)
    seed = _seed(variants[0].stickiness, c)
    target = (
        normalized_hash(group, seed, total, VARIANT_SEED) if seed is not None else random.randint(1, total)
    )
    running = 0
    for variant in variants:
        running += variant.weight
        if running >= target:
            return variant
    return None


class Feature:
    """One compiled feature; ``features`` is the whole set (for dependencies)."""

    def __init__(
        self, name: str, raw: Mapping[str, Any], segments: Mapping[int, Any], features: Mapping[str, Feature]
    ) -> None:
        self.name = name
        self.on: bool = raw["enabled"]
        self.features = features
        self.dependencies = tuple(
            (d["feature"], d.get("enabled", True) is not False, d.get("variants"))
            for d in raw.get("dependencies") or []
        )
        self.variants = tuple(
            Variant(v, v.get("stickiness"), overrides=True) for v in raw.get("variants") or []
        )
        strategies = raw.get("strategies") or []
        for strategy in strategies:
            if strategy["name"] not in KNOWN_STRATEGIES:
                _warn_once(name, f"strategy {strategy['name']!r} is not supported: it never matches")
        self.error: str | None = None
        self.rule: Rule | None
        try:
            texts = strategy_rules(strategies, segments)
            self.rule = compile_node(parse(" or ".join(texts))) if texts else (lambda c, toggle: True)
        except (RuleError, RuleSyntaxError, FragmentError) as exc:
            self.error = str(exc)
            self.rule = None
            _warn_once(name, f"{exc}; the feature is always off")
        self.strategies: tuple[tuple[Rule, tuple[Variant, ...], str], ...] | None
        try:
            compiled = []
            for strategy, text in zip(strategies, strategy_rules(strategies, segments), strict=True):
                params = strategy.get("parameters") or {}
                stickiness = params.get("stickiness", "default")
                variants = tuple(
                    Variant(v, stickiness, overrides=False) for v in strategy.get("variants") or []
                )
                compiled.append((compile_node(parse(text)), variants, params.get("groupId", name)))
            self.strategies = tuple(compiled)
        except (RuleError, RuleSyntaxError, FragmentError):
            self.strategies = None
        outcomes = [OFF, ON, *(v.served for v in self.variants)]
        for _, variants, _ in self.strategies or ():
            outcomes.extend(v.served for v in variants)
        self.outcomes = tuple(outcomes)

    def enabled(self, c: UnleashContext, toggle: str) -> bool:
        rule = self.rule
        return self.on and self.dependencies_met(c) and rule is not None and rule(c, toggle)

    def dependencies_met(self, c: UnleashContext) -> bool:
        for parent_name, expected, variants in self.dependencies:
            parent = self.features.get(parent_name)
            if parent is None or parent.dependencies:
                return False
            parent_enabled = parent.enabled(c, self.name)
            if variants is not None:
                chosen = parent.choose(c, self.name, parent.matched(c, self.name))
                if chosen is not None and variants and chosen.name not in variants:
                    return False
            if parent_enabled != expected:
                return False
        return True

    def matched(self, c: UnleashContext, toggle: str) -> tuple[tuple[Variant, ...], str] | None:
        for rule, variants, group in self.strategies or ():
            if rule(c, toggle):
                return variants, group
        return None

    def choose(
        self, c: UnleashContext, toggle: str, matched: tuple[tuple[Variant, ...], str] | None
    ) -> Variant | None:
        if matched is not None and matched[0]:
            return resolve_variant(matched[0], matched[1], c)
        return resolve_variant(self.variants, self.name, c)

    def evaluate(self, c: UnleashContext) -> tuple[UnleashServed, str]:
        """(outcome, reason)."""
        if not self.on:
            return OFF, REASON_DISABLED
        if self.dependencies and not self.dependencies_met(c):
            return OFF, REASON_DEPENDENCY
        name = self.name
        matched = self.matched(c, name) if self.strategies else None
        if matched is None:
            if self.strategies:
                return OFF, REASON_NO_MATCH
            rule = self.rule
            if rule is None:
                return OFF, REASON_BROKEN
            if not rule(c, name):
                return OFF, REASON_NO_MATCH
        chosen = self.choose(c, name, matched)
        return (ON if chosen is None else chosen.served), REASON_MATCHED


def standard_reason(why: Mapping[str, Any]) -> str:
    """An explanation's reason as one of OpenFeature's standard reasons (the client flags API)."""
    reason = why.get("reason")
    if reason == REASON_DISABLED:
        return "DISABLED"
    if reason == REASON_BROKEN:
        return "ERROR"
    if reason in (REASON_NO_MATCH, REASON_DEPENDENCY):
        return "DEFAULT"
    return "TARGETING_MATCH"


@dataclass
class RequestDefaults:
    """``appName``/``environment`` for requests that do not carry them (``[unleash]`` settings)."""

    app_name: str | None = None
    environment: str | None = None


class _LastContext:
    """The Unleash context of the request context seen last: every flag of one request reads the
    same one, so it is built once per request rather than once per flag."""

    __slots__ = ("defaults", "last")

    def __init__(self, defaults: RequestDefaults) -> None:
        self.defaults = defaults
        self.last: tuple[Any, UnleashContext | None] = (None, None)

    def of(self, ctx: Mapping[str, Any]) -> UnleashContext:
        seen, built = self.last  # one tuple, swapped whole: safe across threads
        if seen is ctx and built is not None:
            return built
        built = from_request(ctx, self.defaults.app_name, self.defaults.environment)
        self.last = (ctx, built)
        return built


def _flag(feature: Feature, raw: Mapping[str, Any], contexts: _LastContext) -> Flag:
    to_unleash = contexts.of

    def evaluate(ctx: Mapping[str, Any]) -> Served:
        return feature.evaluate(to_unleash(ctx))[0]

    def explain(ctx: Mapping[str, Any]) -> tuple[Served, dict[str, Any]]:
        served, reason = feature.evaluate(to_unleash(ctx))
        why: dict[str, Any] = {"reason": reason}
        if feature.error is not None:
            why["error"] = feature.error
        if isinstance(served, UnleashServed) and served.enabled and served.variant != "disabled":
            why["variant"] = served.variant
        return served, why

    return Flag(
        key=feature.name,
        key_json=encode_json(feature.name),
        evaluate=evaluate,
        explain=explain,
        served=feature.outcomes,
        default=OFF,
        definition=raw,
        source="unleash",
        reason_of=standard_reason,
    )


def compile_features(
    features: Mapping[str, Any],
    segments: Mapping[str, Any],
    problems: dict[str, str] | None = None,
    defaults: RequestDefaults | None = None,
) -> tuple[dict[str, Flag], dict[str, Feature]]:
    """Raw features (by name) and raw segments (by id as text) → (engine flags, compiled features).

    A feature or segment whose shape the engine cannot read is left out and reported in
    ``problems`` (logged when no dict is given); a strategy using a left-out segment turns its
    feature off, as a missing segment does in the engine.
    """
    report: dict[str, str] = {} if problems is None else problems
    segment_constraints: dict[int, Any] = {}
    for key, raw in segments.items():
        problem = segment_problem(raw)
        if problem is not None:
            report[f"segments:{key}"] = problem
            continue
        segment_constraints[raw["id"]] = raw["constraints"]
    compiled: dict[str, Feature] = {}
    raws: dict[str, Any] = {}
    for name, raw in features.items():
        problem = feature_problem(raw)
        if problem is not None:
            report[name] = problem
            continue
        compiled[name] = Feature(name, raw, segment_constraints, compiled)
        raws[name] = raw
    contexts = _LastContext(defaults or RequestDefaults())
    flags = {name: _flag(feature, raws[name], contexts) for name, feature in compiled.items()}
    if problems is None:
        for name, message in report.items():
            log.error("unleash definition %r is not served: %s", name, message)
    return flags, compiled
