"""Unleash's client API bodies: ``/api/client/features`` and the delta format, checked item by item.

``parse_features`` reads a full body (``{"version", "features": [...], "segments": [...]}``) or a
delta body (``{"events": [...]}``: ``hydration``, ``feature-updated``, ``feature-removed``,
``segment-updated``, ``segment-removed``, applied in order) into features by name and segments by
id. ``feature_problem`` / ``segment_problem`` say what in one item does not have the shape the
engine deserialises (a field of the wrong type, a parameter that is not a string): the engine
refuses the whole body then; here only that item is reported and left out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.engine import FlagError


def parse_features(document: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A features or delta body → ({feature name: raw feature}, {segment id as text: raw segment})."""
    if not isinstance(document, dict):
        raise FlagError("features", 'expected a JSON object ({"features": [...], "segments": [...]})')
    if "events" in document and "features" not in document:
        return _apply_events(document["events"])
    features = document.get("features")
    segments = document.get("segments") or []
    if not isinstance(features, list):
        raise FlagError("features", "expected a list of features")
    if not isinstance(segments, list):
        raise FlagError("segments", "expected a list of segments")
    return _features_by_name(features, "features"), _segments_by_id(segments, "segments")


def _features_by_name(items: list[Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise FlagError(f"{where}[{i}]", "expected an object with a name")
        out[item["name"]] = item
    return out


def _segments_by_id(items: list[Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not _is_int(item.get("id")):
            raise FlagError(f"{where}[{i}]", "expected an object with an integer id")
        out[str(item["id"])] = item
    return out


def _apply_events(events: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    if not isinstance(events, list):
        raise FlagError("events", "expected a list of delta events")
    features: dict[str, Any] = {}
    segments: dict[str, Any] = {}
    for i, event in enumerate(events):
        where = f"events[{i}]"
        kind = event.get("type") if isinstance(event, dict) else None
        if kind == "hydration":
            features = _features_by_name(_list(event, "features", where), f"{where}.features")
            segments = _segments_by_id(_list(event, "segments", where), f"{where}.segments")
        elif kind == "feature-updated":
            features.update(_features_by_name([event.get("feature")], f"{where}.feature"))
        elif kind == "feature-removed":
            features.pop(str(event.get("featureName")), None)
        elif kind == "segment-updated":
            segments.update(_segments_by_id([event.get("segment")], f"{where}.segment"))
        elif kind == "segment-removed":
            segments.pop(str(event.get("segmentId")), None)
        else:
            raise FlagError(where, f"unknown delta event type {kind!r}")
    return features, segments


def _list(event: Mapping[str, Any], name: str, where: str) -> list[Any]:
    value = event.get(name) or []
    if not isinstance(value, list):
        raise FlagError(f"{where}.{name}", "expected a list")
    return value


# --- shapes, as the engine's deserialiser requires them ---------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -(1 << 31) <= value < 1 << 31


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _optional(raw: Mapping[str, Any], name: str, test: Any) -> bool:
    return raw.get(name) is None or bool(test(raw[name]))


def _check(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{where}: {message}")


def _constraint(raw: Any, where: str) -> None:
    _check(isinstance(raw, dict), where, "expected an object")
    _check(isinstance(raw.get("contextName"), str), where, "contextName must be a string")
    _check(isinstance(raw.get("operator"), str), where, "operator must be a string")
    _check(_optional(raw, "values", _strings), where, "values must be a list of strings")
    _check(_optional(raw, "value", lambda v: isinstance(v, str)), where, "value must be a string")
    for flag in ("inverted", "caseInsensitive"):
        _check(_optional(raw, flag, lambda v: isinstance(v, bool)), where, f"{flag} must be true or false")


def _constraints(raw: Mapping[str, Any], where: str) -> None:
    constraints = raw.get("constraints")
    _check(constraints is None or isinstance(constraints, list), where, "constraints must be a list")
    for i, constraint in enumerate(constraints or []):
        _constraint(constraint, f"{where}.constraints[{i}]")


def _payload(raw: Any, where: str) -> None:
    ok = isinstance(raw, dict) and isinstance(raw.get("type"), str) and isinstance(raw.get("value"), str)
    _check(ok, where, 'payload must be {"type": string, "value": string}')


def _variant(raw: Any, where: str, strategy: bool) -> None:
    _check(
        isinstance(raw, dict) and isinstance(raw.get("name"), str), where, "expected a variant with a name"
    )
    _check(_is_int(raw.get("weight")), where, "weight must be an integer")
    _check(raw["weight"] >= 0, where, "weight must not be negative")
    _check(_optional(raw, "stickiness", lambda v: isinstance(v, str)), where, "stickiness must be a string")
    if raw.get("payload") is not None:
        _payload(raw["payload"], f"{where}.payload")
    overrides = [] if strategy else raw.get("overrides") or []
    _check(isinstance(overrides, list), where, "overrides must be a list")
    for i, override in enumerate(overrides):
        ok = isinstance(override, dict) and isinstance(override.get("contextName"), str)
        _check(
            ok and _strings(override.get("values")),
            f"{where}.overrides[{i}]",
            "expected {contextName, values}",
        )


def _variants(raw: Mapping[str, Any], where: str, strategy: bool) -> None:
    variants = raw.get("variants")
    _check(variants is None or isinstance(variants, list), where, "variants must be a list")
    for i, variant in enumerate(variants or []):
        _variant(variant, f"{where}.variants[{i}]", strategy)


def _strategy(raw: Any, where: str) -> None:
    _check(
        isinstance(raw, dict) and isinstance(raw.get("name"), str), where, "expected a strategy with a name"
    )
    params = raw.get("parameters")
    ok = params is None or (isinstance(params, dict) and all(isinstance(v, str) for v in params.values()))
    _check(ok, where, "parameters must be an object of strings")
    _check(
        _optional(raw, "segments", lambda v: isinstance(v, list) and all(map(_is_int, v))),
        where,
        "segments must be a list of ids",
    )
    _constraints(raw, where)
    _variants(raw, where, strategy=True)


def feature_problem(raw: Any) -> str | None:
    """What keeps one feature from deserialising, or None."""
    try:
        _check(isinstance(raw, dict), "feature", "expected an object")
        _check(isinstance(raw.get("enabled"), bool), "enabled", "must be true or false")
        strategies = raw.get("strategies")
        _check(strategies is None or isinstance(strategies, list), "strategies", "must be a list")
        for i, strategy in enumerate(strategies or []):
            _strategy(strategy, f"strategies[{i}]")
        _variants(raw, "feature", strategy=False)
        dependencies = raw.get("dependencies")
        _check(dependencies is None or isinstance(dependencies, list), "dependencies", "must be a list")
        for i, dependency in enumerate(dependencies or []):
            where = f"dependencies[{i}]"
            _check(
                isinstance(dependency, dict) and isinstance(dependency.get("feature"), str),
                where,
                "expected {feature}",
            )
            _check(
                _optional(dependency, "enabled", lambda v: isinstance(v, bool)),
                where,
                "enabled must be true or false",
            )
            _check(_optional(dependency, "variants", _strings), where, "variants must be a list of strings")
    except ValueError as exc:
        return str(exc)
    return None


def segment_problem(raw: Any) -> str | None:
    try:
        _check(
            isinstance(raw, dict) and _is_int(raw.get("id")),
            "segment",
            "expected an object with an integer id",
        )
        _check(isinstance(raw.get("constraints"), list), "segment", "constraints must be a list")
        _constraints(raw, "segment")
    except ValueError as exc:
        return str(exc)
    return None
