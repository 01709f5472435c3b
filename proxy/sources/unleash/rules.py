"""Strategies and constraints → the engine's rule text (Yggdrasil's ``strategy_upgrade.rs``).

The text is then parsed by ``grammar`` and compiled by ``fragments``. The rewriting is reproduced
character for character, quirks included: constraint values of non-list operators are pasted in
unquoted (so their shape picks the comparison), ``caseInsensitive`` is dropped for ``IN``/``NOT_IN``,
a ``SEMVER_*`` value starting with ``v`` becomes ``false`` (not inverted), unknown strategies become
an external value that nothing sets (``false``), and percentages must be unsigned integers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

DEFAULT_STICKINESS = "user_id | session_id | random[10000]"
DEFAULT_RANDOM = "random[10000]"

KNOWN_STRATEGIES = frozenset(
    {
        "default",
        "userWithId",
        "gradualRolloutUserId",
        "gradualRolloutSessionId",
        "gradualRolloutRandom",
        "flexibleRollout",
        "remoteAddress",
        "applicationHostname",
    }
)

OPERATORS = {
    "IN": "in",
    "NOT_IN": "not_in",
    "STR_ENDS_WITH": "ends_with_any",
    "STR_STARTS_WITH": "starts_with_any",
    "STR_CONTAINS": "contains_any",
    "REGEX": "matches_regex",
    "NUM_EQ": "==",
    "NUM_GT": ">",
    "NUM_GTE": ">=",
    "NUM_LT": "<",
    "NUM_LTE": "<=",
    "DATE_AFTER": ">",
    "DATE_BEFORE": "<",
    "SEMVER_EQ": "==",
    "SEMVER_LT": "<",
    "SEMVER_GT": ">",
    "SEMVER_LTE": "<=",
    "SEMVER_GTE": ">=",
    "IN_CIDR": "in_cidr",
}
_CASE_INSENSITIVE = {"STR_ENDS_WITH", "STR_STARTS_WITH", "STR_CONTAINS"}
_LISTY = {"IN", "NOT_IN", "STR_ENDS_WITH", "STR_STARTS_WITH", "STR_CONTAINS", "IN_CIDR"}
_SEMVER = {"SEMVER_EQ", "SEMVER_LT", "SEMVER_GT", "SEMVER_LTE", "SEMVER_GTE"}
_CONTEXT_NAMES = {
    "userId": "user_id",
    "sessionId": "session_id",
    "currentTime": "current_time",
    "environment": "environment",
    "appName": "app_name",
    "remoteAddress": "remote_address",
}


class RuleError(ValueError):
    """A strategy the engine cannot rewrite (unknown operator, missing value or segment): the
    feature is always off."""


def field_name(context_name: str) -> str:
    return _CONTEXT_NAMES.get(context_name) or f'context["{context_name}"]'


def _escape(text: str) -> str:
    return text.replace('"', '\\"')


def _unsigned(params: Mapping[str, str], name: str) -> int | None:
    """Rust's ``usize::from_str``: ASCII digits with an optional ``+``; else None."""
    text = params.get(name)
    if text is None:
        return None
    digits = text[1:] if text.startswith("+") else text
    if not digits or not digits.isascii() or not digits.isdigit():
        return None
    value = int(digits)
    return value if value < 1 << 64 else None


def _stickiness(param: str | None) -> str:
    if param is None or param == "default":
        return DEFAULT_STICKINESS
    if param == "random":
        return DEFAULT_RANDOM
    return field_name(param)


def strategy_body(name: str, params: Mapping[str, str], custom_index: int) -> str:
    """The rule for the strategy itself, before its constraints and segments."""
    if name == "default":
        return "true"
    if name == "userWithId":
        ids = params.get("userIds")
        if ids is None:
            return "false"
        return "user_id in [" + ",".join(f'"{_escape(i.strip())}"' for i in ids.split(",")) + "]"
    if name in ("gradualRolloutUserId", "gradualRolloutSessionId"):
        percentage, group = _unsigned(params, "percentage"), params.get("groupId")
        if percentage is None or group is None:
            return "false"
        field = "user_id" if name == "gradualRolloutUserId" else "session_id"
        return f'{percentage}% sticky on {field} with group_id of "{group}"'
    if name == "gradualRolloutRandom":
        percentage = _unsigned(params, "percentage")
        return "false" if percentage is None else f"random < {percentage}"
    if name == "flexibleRollout":
        rollout = _unsigned(params, "rollout")
        if rollout is None:
            return "false"
        rule = f"{rollout}% sticky on {_stickiness(params.get('stickiness'))}"
        group = params.get("groupId")
        return rule if group is None else f'{rule} with group_id of "{group}"'
    if name == "remoteAddress":
        ips = params.get("IPs")
        if ips is None:
            return "false"
        return "remote_address in_cidr [" + ", ".join(f'"{x.strip()}"' for x in ips.split(",")) + "]"
    if name == "applicationHostname":
        hosts = params.get("hostNames", "")
        return "hostname in [" + ", ".join(f'"{x.strip()}"' for x in hosts.split(",")) + "]"
    return f'external_value["customStrategy{custom_index}"]'


def constraint_rule(constraint: Mapping[str, Any]) -> str:
    operator = constraint["operator"]
    op = OPERATORS.get(operator)
    if op is None:
        raise RuleError(f"unknown constraint operator {operator!r}")
    if constraint.get("caseInsensitive") and operator in _CASE_INSENSITIVE:
        op += "_ignore_case"
    elif constraint.get("caseInsensitive") and operator == "REGEX":
        op = "matches_regex_ignoring_case"
    inversion = "!" if constraint.get("inverted") else ""
    value: str | None
    if operator in _LISTY:
        values = constraint.get("values") or []
        value = "[" + ", ".join(f'"{_escape(v)}"' for v in values) + "]"
    elif operator == "REGEX":
        value = f'"{_escape(constraint.get("value") or "")}"'
    else:
        value = constraint.get("value")
        if value is None:
            raise RuleError(f"constraint {operator} on {constraint['contextName']!r} has no value")
        if operator in _SEMVER and value.startswith("v"):
            return "false"
    return f"{inversion}{field_name(constraint['contextName'])} {op} {value}"


def strategy_rule(
    strategy: Mapping[str, Any], segments: Mapping[int, Sequence[Mapping[str, Any]]], custom_index: int
) -> str:
    """One strategy with its own constraints, then its segments' constraints, ANDed."""
    body = strategy_body(strategy["name"], strategy.get("parameters") or {}, custom_index)
    constraints = list(strategy.get("constraints") or [])
    for segment_id in strategy.get("segments") or []:
        if segment_id not in segments:
            raise RuleError(f"segment {segment_id} is not defined")
        constraints.extend(segments[segment_id])
    if not constraints:
        return body
    return f"({body} and ({' and '.join(constraint_rule(c) for c in constraints)}))"


def strategy_rules(
    strategies: Sequence[Mapping[str, Any]], segments: Mapping[int, Sequence[Mapping[str, Any]]]
) -> list[str]:
    """Each strategy's rule text, in order (custom strategies numbered from 1 as the engine does)."""
    rules, custom = [], 0
    for strategy in strategies:
        if strategy["name"] not in KNOWN_STRATEGIES:
            custom += 1
        rules.append(strategy_rule(strategy, segments, custom))
    return rules
