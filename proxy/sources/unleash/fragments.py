"""A parsed rule (``grammar``) → a closure ``(context, toggle name) -> bool``, as Yggdrasil compiles it.

The toggle name is an argument because a rollout without ``groupId`` hashes on it, and a parent
feature is evaluated with its *child's* name. Compile errors (``FragmentError``) turn the feature
off, as in the engine: a number, date or version in the rule that its parser refuses, or a rollout
without stickiness. ``random`` draws from Python's ``random`` (the engine's ``rand``).

Regular expressions run on RE2 (``proxy.engine.patterns``, linear time) where the engine uses Rust's
``regex`` crate: the same syntax family (neither has look-around or back-references); a pattern that
RE2 cannot compile makes the constraint false, as Rust's does for its own refusals.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from operator import attrgetter
from typing import Any, cast

from proxy.engine.patterns import Pattern, PatternError
from proxy.sources.unleash.context import UnleashContext
from proxy.sources.unleash.grammar import Constraint, Expr, Field, Node
from proxy.sources.unleash.hashing import normalized_hash
from proxy.sources.unleash.values import instant_ns, ip_address, ip_network, rust_f64, semver

Rule = Callable[[UnleashContext, str], bool]
Getter = Callable[[UnleashContext], str | None]

_EPSILON = 2.220446049250313e-16  # f64::EPSILON


class FragmentError(ValueError):
    """The rule parses but a part of it does not compile (the engine's ``StrategyParseError``)."""


_STANDARD = frozenset({"user_id", "session_id", "environment", "app_name", "remote_address", "current_time"})


def _getter(field: Field) -> Getter:
    if field.kind in _STANDARD:  # the grammar's names are the context's attribute names
        return cast(Getter, attrgetter(field.kind))
    if field.kind == "random":
        bound = field.bound
        if bound <= 1:
            raise FragmentError(f"random[{bound}] has an empty range")
        return lambda c: str(random.randrange(1, bound))
    name = field.name
    return lambda c: c.properties.get(name)


def _compare(op: str) -> Callable[[Any, Any], bool]:
    if op == "<":
        return lambda a, b: bool(a < b)
    if op == "<=":
        return lambda a, b: bool(a <= b)
    if op == ">":
        return lambda a, b: bool(a > b)
    if op == ">=":
        return lambda a, b: bool(a >= b)
    return lambda a, b: bool(a == b)


def _rollout(args: tuple[Any, ...]) -> Rule:
    percent, stickiness, group = args
    if stickiness is None:
        raise FragmentError("a rollout without stickiness")
    getters = [_getter(f) for f in stickiness]

    def rollout(c: UnleashContext, toggle: str) -> bool:
        for get in getters:
            value = get(c)
            if value is not None:
                return bool(normalized_hash(toggle if group is None else group, value, 100, 0) <= percent)
        return False

    return rollout


def _numeric(field: Field, op: str, text: str) -> Rule:
    number = rust_f64(text)
    if number is None:
        raise FragmentError(f"{text!r} is not a number")
    get = _getter(field)
    if op == "==":

        def equal(c: UnleashContext, toggle: str) -> bool:
            value = get(c)
            parsed = None if value is None else rust_f64(value)
            return parsed is not None and abs(parsed - number) < _EPSILON

        return equal
    compare = _compare(op)

    def numeric(c: UnleashContext, toggle: str) -> bool:
        value = get(c)
        parsed = None if value is None else rust_f64(value)
        return parsed is not None and not math.isnan(parsed) and compare(parsed, number)

    return numeric


def _typed(field: Field, op: str, target: Any, read: Callable[[str], Any]) -> Rule:
    get, compare = _getter(field), _compare(op)

    def typed(c: UnleashContext, toggle: str) -> bool:
        value = get(c)
        parsed = None if value is None else read(value)
        return parsed is not None and compare(parsed, target)

    return typed


def _date(field: Field, op: str, text: str) -> Rule:
    target = instant_ns(text)
    if target is None:
        raise FragmentError(f"{text!r} is not a date")
    return _typed(field, op, target, instant_ns)


def _semver(field: Field, op: str, text: str) -> Rule:
    target = semver(text)
    if target is None:
        raise FragmentError(f"{text!r} is not a semantic version")

    def key(value: str) -> Any:
        version = semver(value)
        return None if version is None else version.key

    return _typed(field, op, target.key, key)


def _fragment(field: Field, op: str, values: list[str]) -> Rule:
    get = _getter(field)
    ignore_case = op.endswith("_ignore_case")
    items = tuple(v.lower() for v in values) if ignore_case else tuple(values)
    if op.startswith("starts_with"):

        def test(value: str) -> bool:
            return value.startswith(items)
    elif op.startswith("ends_with"):

        def test(value: str) -> bool:
            return value.endswith(items)
    else:

        def test(value: str) -> bool:
            return any(item in value for item in items)

    def fragment(c: UnleashContext, toggle: str) -> bool:
        value = get(c)
        if value is None:
            return False
        return test(value.lower() if ignore_case else value)

    return fragment


def _regex(field: Field, ignore_case: bool, pattern: str) -> Rule:
    try:
        compiled = Pattern(f"(?i){pattern}" if ignore_case else pattern)
    except PatternError:
        return lambda c, toggle: False
    get, search = _getter(field), compiled.search

    def regex(c: UnleashContext, toggle: str) -> bool:
        value = get(c)
        return value is not None and search(value)

    return regex


def _list(field: Field, op: str, kind: str, values: list[str]) -> Rule:
    get, is_in = _getter(field), op == "in"
    if kind == "empty":
        return lambda c, toggle: not is_in
    if kind == "numeric":
        numbers = []
        for text in values:
            number = rust_f64(text)
            if number is None:
                raise FragmentError(f"{text!r} is not a number")
            numbers.append(number)

        def numeric_list(c: UnleashContext, toggle: str) -> bool:
            value = get(c)
            parsed = None if value is None else rust_f64(value)
            return parsed is not None and (parsed in numbers) == is_in

        return numeric_list
    members = frozenset(values)
    if is_in:
        return lambda c, toggle: get(c) in members

    def not_in(c: UnleashContext, toggle: str) -> bool:
        value = get(c)
        return value is None or value not in members

    return not_in


def _ip(field: Field, values: list[str]) -> Rule:
    networks = [n for n in map(ip_network, values) if n is not None]
    get = _getter(field)

    def ip(c: UnleashContext, toggle: str) -> bool:
        value = get(c)
        address = None if value is None else ip_address(value)
        return address is not None and any(address in n for n in networks)

    return ip


def _hostname(values: list[str]) -> Rule:
    """``applicationHostname``: the engine inside UnleashClient 6.9.1 is built without host-name
    support, so its hostname constraint never matches (checked by running it); neither does ours."""
    return lambda c, toggle: False


def _constraint(node: Constraint) -> Rule:
    kind, args = node.kind, node.args
    rule: Rule
    if kind == "rollout":
        rule = _rollout(args)
    elif kind == "boolean":
        fixed = bool(args[0])
        rule = (lambda c, toggle: True) if fixed else (lambda c, toggle: False)
    elif kind == "numeric":
        rule = _numeric(*cast(tuple[Field, str, str], args))
    elif kind == "date":
        rule = _date(*cast(tuple[Field, str, str], args))
    elif kind == "semver":
        rule = _semver(*cast(tuple[Field, str, str], args))
    elif kind == "fragment":
        rule = _fragment(*cast(tuple[Field, str, list[str]], args))
    elif kind == "regex":
        rule = _regex(*cast(tuple[Field, bool, str], args))
    elif kind == "list":
        rule = _list(*cast(tuple[Field, str, str, list[str]], args))
    elif kind == "ip":
        rule = _ip(*cast(tuple[Field, list[str]], args))
    elif kind == "hostname":
        rule = _hostname(cast(list[str], args[0]))
    else:  # external: a custom strategy's result, which nothing provides here
        rule = lambda c, toggle: False  # noqa: E731
    if not node.inverted:
        return rule
    inner = rule
    return lambda c, toggle: not inner(c, toggle)


def _all(rules: list[Rule]) -> Rule:
    if len(rules) == 1:
        return rules[0]
    return lambda c, toggle: all(r(c, toggle) for r in rules)


def _any(rules: list[Rule]) -> Rule:
    if len(rules) == 1:
        return rules[0]
    return lambda c, toggle: any(r(c, toggle) for r in rules)


def compile_node(node: Node) -> Rule:
    """Compile a tree; ``or`` binds tighter than ``and`` (the engine's Pratt table adds ``or`` last)."""
    if isinstance(node, Constraint):
        return _constraint(node)
    assert isinstance(node, Expr)
    groups: list[list[Rule]] = [[compile_node(node.terms[0])]]
    for op, term in zip(node.ops, node.terms[1:], strict=True):
        if op == "and":
            groups.append([])
        groups[-1].append(compile_node(term))
    return _all([_any(group) for group in groups])
