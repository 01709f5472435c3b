"""Split matchers: their input conversions and their compilation into tests.

A compiled matcher is a ``Test`` — ``(matching key, bucketing key, context, depth) → bool`` — or a
constant True/False that callers fold away. The conversions reproduce the SDK's handling of input
(ints and int strings for numbers, JSON-encoding for strings, ``set(value)`` for sets, the SDK's
semver parser); ``_MatcherCompiler`` builds one test per matcher type the Python SDK knows, raising
``_Unsupported`` for the others, and reaches segments, other flags and rule-based segments through
what the flag compiler hands it; ``_all_of`` ANDs a matcher group.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from proxy.engine.patterns import Pattern
from proxy.sources.split.semver import SplitSemver, compare_semver, parse_semver

Context = Mapping[str, Any]
# A compiled matcher or condition: (matching key, bucketing key, context, depth) → bool; or a constant.
Test = Callable[[str, str, Context, int], bool]
NOT_ATTRIBUTES = frozenset({"key", "bucketingKey"})
_EMPTY: frozenset[Any] = frozenset()


class _Unsupported(Exception):
    """A matcher type the Python SDK does not know."""


# --- input conversions -----------------------------------------------------------------------------


def _as_string(value: Any) -> str | None:
    """String matchers' input: strings as they are, anything else JSON-encoded (None if it cannot be)."""
    if type(value) is str:
        return value
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return None


def _as_int(value: Any) -> Any:
    """Numeric matchers' input: ints and int strings; floats and booleans are rejected (None)."""
    if type(value) is int:
        return value
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def _as_semver(value: Any) -> SplitSemver | None:
    text = _as_string(value)
    return None if text is None else parse_semver(text)


def _to_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if not isinstance(value, str):
        return None
    try:
        decoded = json.loads(value.lower())
    except ValueError:
        return None
    return decoded if isinstance(decoded, bool) else None


def _truncate_day(seconds: Any) -> Any:
    return seconds - seconds % 86400


def _truncate_minute(seconds: Any) -> Any:
    return seconds - seconds % 60


def _members(values: Iterable[Any]) -> frozenset[Any] | tuple[Any, ...]:
    """A container for ``in`` tests: a frozenset, or a tuple when some value is unhashable."""
    values = list(values)
    try:
        return frozenset(values)
    except TypeError:
        return tuple(values)


# --- tests and their combination ------------------------------------------------------------------


def _negated(test: Test) -> Test:
    return lambda mk, bk, ctx, depth: not test(mk, bk, ctx, depth)


def _on_input(attribute: str | None, accept: Callable[[Any], bool]) -> Test | bool:
    """A matcher over its input: the attribute (missing or None → no match) or the matching key."""
    if attribute is None:
        return lambda mk, bk, ctx, depth: accept(mk)
    if attribute in NOT_ATTRIBUTES:
        return False

    def test(mk: str, bk: str, ctx: Context, depth: int) -> bool:
        value = ctx.get(attribute)
        return value is not None and accept(value)

    return test


def _then_false(before: tuple[Test, ...]) -> Test:
    """Evaluate ``before`` (they may raise, as in the SDK's short-circuit AND), then fail."""

    def then_false(mk: str, bk: str, ctx: Context, depth: int) -> bool:
        for test in before:
            if not test(mk, bk, ctx, depth):
                return False
        return False

    return then_false


def _all_of(tests: list[Test | bool]) -> Test | bool:
    """AND of matchers in order, constants folded (a constant False still lets earlier ones raise)."""
    live: list[Test] = []
    for test in tests:
        if test is True:
            continue
        if test is False:
            return _then_false(tuple(live)) if live else False
        live.append(test)
    if not live:
        return True
    if len(live) == 1:
        return live[0]
    if len(live) == 2:
        first, second = live
        return lambda mk, bk, ctx, depth: first(mk, bk, ctx, depth) and second(mk, bk, ctx, depth)
    chain = tuple(live)

    def every(mk: str, bk: str, ctx: Context, depth: int) -> bool:
        for t in chain:  # noqa: SIM110 -- a plain loop beats all(<generator>) on the hot path
            if not t(mk, bk, ctx, depth):
                return False
        return True

    return every


# --- matchers --------------------------------------------------------------------------------------


class _MatcherCompiler:
    """Matchers → tests, over the flag compiler's segments, flags and rule-based segments."""

    def __init__(
        self,
        segments: Mapping[str, frozenset[Any]],
        treatment_of: Callable[[Any, str, str, Context, int], Any],
        in_rule_based_segment: Callable[[Any, str, str, Context, int], bool],
    ) -> None:
        self.segments = segments
        self.treatment_of = treatment_of
        self.in_rule_based_segment = in_rule_based_segment
        self.builders: dict[str, Callable[[Mapping[str, Any], str | None], Test | bool]] = {
            "ALL_KEYS": lambda raw, attr: True,
            "IN_SEGMENT": self._in_segment,
            "IN_RULE_BASED_SEGMENT": self._in_rule_based_segment,
            "IN_SPLIT_TREATMENT": self._in_split_treatment,
            "WHITELIST": self._whitelist,
            "STARTS_WITH": self._starts_with,
            "ENDS_WITH": self._ends_with,
            "CONTAINS_STRING": self._contains_string,
            "MATCHES_STRING": self._matches_string,
            "EQUAL_TO": self._numeric("unaryNumericMatcherData", "==", _truncate_day),
            "GREATER_THAN_OR_EQUAL_TO": self._numeric("unaryNumericMatcherData", ">=", _truncate_minute),
            "LESS_THAN_OR_EQUAL_TO": self._numeric("unaryNumericMatcherData", "<=", _truncate_minute),
            "BETWEEN": self._numeric("betweenMatcherData", "between", _truncate_minute),
            "EQUAL_TO_SET": self._set_matcher(lambda wl, s: wl == s),
            "CONTAINS_ALL_OF_SET": self._set_matcher(lambda wl, s: wl <= s),
            "CONTAINS_ANY_OF_SET": self._set_matcher(lambda wl, s: not wl.isdisjoint(s)),
            "PART_OF_SET": self._set_matcher(lambda wl, s: bool(s) and s <= wl),
            "EQUAL_TO_BOOLEAN": self._boolean,
            "EQUAL_TO_SEMVER": self._semver_compare(lambda v, t: v.version == t.version),
            "GREATER_THAN_OR_EQUAL_TO_SEMVER": self._semver_compare(lambda v, t: compare_semver(v, t) >= 0),
            "LESS_THAN_OR_EQUAL_TO_SEMVER": self._semver_compare(lambda v, t: compare_semver(v, t) <= 0),
            "BETWEEN_SEMVER": self._between_semver,
            "IN_LIST_SEMVER": self._in_list_semver,
        }

    def matcher(self, raw: Any) -> Test | bool:
        kind = raw["matcherType"]
        build = self.builders.get(kind) if isinstance(kind, str) else None
        if build is None:
            raise _Unsupported(f"matcher type {kind!r} is not supported by the Python SDK")
        selector = raw.get("keySelector")
        attribute = selector.get("attribute") if isinstance(selector, dict) else None
        test = build(raw, attribute)
        if raw.get("negate", False):
            return (not test) if isinstance(test, bool) else _negated(test)
        return test

    def _in_segment(self, raw: Mapping[str, Any], attribute: str | None) -> Test | bool:
        members = self.segments.get(raw["userDefinedSegmentMatcherData"]["segmentName"], _EMPTY)
        if not members or attribute in NOT_ATTRIBUTES:
            return False
        if attribute is None:
            return lambda mk, bk, ctx, depth: mk in members
        return lambda mk, bk, ctx, depth: ctx.get(attribute) is not None and mk in members

    def _in_rule_based_segment(self, raw: Mapping[str, Any], attribute: str | None) -> Test | bool:
        name = raw["userDefinedSegmentMatcherData"]["segmentName"]
        if name is None:
            return False
        member = self.in_rule_based_segment
        return lambda mk, bk, ctx, depth: member(name, mk, bk, ctx, depth)

    def _in_split_treatment(self, raw: Mapping[str, Any], attribute: str | None) -> Test:
        data = raw["dependencyMatcherData"]
        name, treatments = data["split"], _members(data["treatments"])
        treatment_of = self.treatment_of
        return lambda mk, bk, ctx, depth: treatment_of(name, mk, bk, ctx, depth) in treatments

    @staticmethod
    def _whitelist(raw: Mapping[str, Any], attribute: str | None) -> Test | bool:
        allowed = frozenset(raw["whitelistMatcherData"]["whitelist"])

        def accept(value: Any) -> bool:
            text = value if type(value) is str else _as_string(value)
            return text is not None and text in allowed

        return _on_input(attribute, accept)

    @staticmethod
    def _affix(raw: Mapping[str, Any], attribute: str | None, method: Callable[..., bool]) -> Test | bool:
        items = frozenset(raw["whitelistMatcherData"]["whitelist"])
        if all(isinstance(i, str) for i in items):
            choices = tuple(items)

            def accept(value: Any) -> bool:
                text = value if type(value) is str else _as_string(value)
                return text is not None and method(text, choices)

        else:  # non-string items make the SDK raise once it reaches them: keep its iteration

            def accept(value: Any) -> bool:
                text = value if type(value) is str else _as_string(value)
                return text is not None and any(method(text, i) for i in items)

        return _on_input(attribute, accept)

    def _starts_with(self, raw: Mapping[str, Any], attribute: str | None) -> Test | bool:
        return self._affix(raw, attribute, str.startswith)

    def _ends_with(self, raw: Mapping[str, Any], attribute: str | None) -> Test | bool:
        return self._affix(raw, attribute, str.endswith)

    @staticmethod
    def _contains_string(raw: Mapping[str, Any], attribute: str | None) -> Test | bool:
        items = frozenset(raw["whitelistMatcherData"]["whitelist"])
        parts = tuple(items)

        def accept(value: Any) -> bool:
            text = value if type(value) is str else _as_string(value)
            if text is None:
                return False
            for part in parts:  # noqa: SIM110 -- hot path: no generator
                if part in text:
                    return True
            return False

        return _on_input(attribute, accept)

    @staticmethod
    def _matches_string(raw: Mapping[str, Any], attribute: str | None) -> Test | bool:
        data = raw["stringMatcherData"]
        if not isinstance(data, str):
            raise TypeError(f"MATCHES_STRING: stringMatcherData must be a string, got {data!r}")
        search = Pattern(data).search  # RE2: PatternError (a ValueError) reports the split

        def accept(value: Any) -> bool:
            text = value if type(value) is str else _as_string(value)
            return text is not None and search(text)

        return _on_input(attribute, accept)

    @staticmethod
    def _numeric(field: str, op: str, truncate: Callable[[Any], Any]) -> Callable[..., Test | bool]:
        def build(raw: Mapping[str, Any], attribute: str | None) -> Test | bool:
            data = raw[field]
            kind = data["dataType"]
            shape: Callable[[Any], Any] | None
            if kind == "NUMBER":
                shape = None
                target: Callable[[Any], Any] = lambda v: v  # noqa: E731
            elif kind == "DATETIME":  # the definition holds milliseconds, the attribute epoch seconds
                shape = truncate
                target = lambda v: truncate(v / 1000)  # noqa: E731
            else:
                raise ValueError(f"unknown dataType {kind!r}")
            if op == "between":
                low, high = target(data["start"]), target(data["end"])

                def accept(value: Any) -> bool:
                    number = _as_int(value)
                    if number is None:
                        return False
                    if shape is not None:
                        number = shape(number)
                    return bool(low <= number <= high)

                return _on_input(attribute, accept)
            goal = target(data["value"])

            def compare(value: Any) -> bool:
                number = _as_int(value)
                if number is None:
                    return False
                if shape is not None:
                    number = shape(number)
                if op == "==":
                    return bool(number == goal)
                if op == ">=":
                    return bool(number >= goal)
                return bool(number <= goal)

            return _on_input(attribute, compare)

        return build

    @staticmethod
    def _set_matcher(relation: Callable[[frozenset[Any], set[Any]], bool]) -> Callable[..., Test | bool]:
        def build(raw: Mapping[str, Any], attribute: str | None) -> Test | bool:
            allowed = frozenset(raw["whitelistMatcherData"]["whitelist"])

            def accept(value: Any) -> bool:
                try:
                    given = set(value)
                except TypeError:
                    return False
                return relation(allowed, given)

            return _on_input(attribute, accept)

        return build

    @staticmethod
    def _boolean(raw: Mapping[str, Any], attribute: str | None) -> Test | bool:
        expected = raw["booleanMatcherData"]

        def accept(value: Any) -> bool:
            decoded = _to_bool(value)
            return decoded is not None and decoded == expected

        return _on_input(attribute, accept)

    @staticmethod
    def _target_semver(text: Any) -> SplitSemver | None:
        if not isinstance(text, str):  # the SDK fails to build the matcher (``None.find``)
            raise TypeError(f"expected a version string, got {text!r}")
        return parse_semver(text)

    def _semver_compare(
        self, relation: Callable[[SplitSemver, SplitSemver], bool]
    ) -> Callable[..., Test | bool]:
        def build(raw: Mapping[str, Any], attribute: str | None) -> Test | bool:
            target = self._target_semver(raw.get("stringMatcherData"))
            if target is None:
                return False

            def accept(value: Any) -> bool:
                version = _as_semver(value)
                return version is not None and relation(version, target)

            return _on_input(attribute, accept)

        return build

    def _between_semver(self, raw: Mapping[str, Any], attribute: str | None) -> Test | bool:
        data = raw.get("betweenStringMatcherData")
        start, end = self._target_semver(data["start"]), self._target_semver(data["end"])  # type: ignore[index]
        if start is None or end is None:
            return False

        def accept(value: Any) -> bool:
            version = _as_semver(value)
            return version is not None and compare_semver(start, version) <= 0 <= compare_semver(end, version)

        return _on_input(attribute, accept)

    def _in_list_semver(self, raw: Mapping[str, Any], attribute: str | None) -> Test | bool:
        versions = set()
        for item in raw["whitelistMatcherData"]["whitelist"]:
            if item:
                parsed = self._target_semver(item)
                if parsed is not None:
                    versions.add(parsed.version)
        if not versions:
            return False
        allowed = frozenset(versions)

        def accept(value: Any) -> bool:
            version = _as_semver(value)
            return version is not None and version.version in allowed

        return _on_input(attribute, accept)
