"""Properties of the Unleash source, with UnleashClient 6.9.1 as the oracle where one exists.

- Any context value, through every operator: the answer equals the SDK's (the number, date, version
  and address readers against the engine's Rust parsers).
- Any constraint value built from the characters the rule grammar cares about (digits, signs, dots,
  quotes, backslashes, ...): the answer equals the SDK's (the grammar and the rewriting).
- Rollouts are monotone: whoever is in at p% is in at every higher percentage.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import quiet_loggers

pytest.importorskip("UnleashClient", reason="UnleashClient==6.9.1 (the oracle) is not installed")

from unleash_corpus import OPERATORS, Oracle

from proxy.sources.unleash import CONTEXT_KEY, compile_features, from_sdk_context, parse_features

VALUES = {
    "IN": ["5", "abc"],
    "NOT_IN": ["5", "abc"],
    "STR_STARTS_WITH": ["ab", "ß"],
    "STR_ENDS_WITH": ["c", "Z"],
    "STR_CONTAINS": [".", "1"],
    "NUM_EQ": "5",
    "NUM_GT": "5",
    "NUM_GTE": "-2.5",
    "NUM_LT": "1e2",
    "NUM_LTE": "0",
    "DATE_AFTER": "2024-01-01T00:00:00Z",
    "DATE_BEFORE": "2024-06-01T12:00:00.500+02:00",
    "SEMVER_EQ": "1.2.3",
    "SEMVER_GT": "1.2.3-beta.2",
    "SEMVER_LT": "2.0.0",
    "SEMVER_GTE": "1.0.0-alpha",
    "SEMVER_LTE": "1.10.0",
    "REGEX": "^[a-c]+[0-9]?$",
    "IN_CIDR": ["10.0.0.0/8", "2001:db8::/32", "192.168.1.1"],
}


@pytest.fixture(autouse=True, scope="module")
def _quiet_loggers() -> Iterator[None]:
    """The corpus' deliberate breakage logs a warning per feature."""
    with quiet_loggers("proxy.sources.unleash", "UnleashClient", "yggdrasil_engine"):
        yield


def _feature(name: str, operator: str, value: Any, **extra: Any) -> dict[str, Any]:
    constraint: dict[str, Any] = {"contextName": "v", "operator": operator, **extra}
    constraint["values" if isinstance(value, list) else "value"] = value
    return {"name": name, "enabled": True, "strategies": [{"name": "default", "constraints": [constraint]}]}


def _compiled(body: dict[str, Any]) -> dict[str, Any]:
    features, segments = parse_features(json.loads(json.dumps(body)))
    problems: dict[str, str] = {}
    flags, _ = compile_features(features, segments, problems)
    assert not problems, problems
    return flags


FIXED_BODY = {
    "version": 2,
    "features": [
        *(_feature(op, op, VALUES[op]) for op in OPERATORS),
        *(_feature(f"{op}-ci-inv", op, VALUES[op], caseInsensitive=True, inverted=True) for op in OPERATORS),
    ],
}
CONTEXT_TEXT = st.one_of(
    st.text(max_size=30),
    st.text(alphabet="0123456789.-+eE:TZ ", max_size=30),
    st.sampled_from(["1.2.3", "2024-03-01T10:00:00Z", "10.1.2.3", "inf", "+5", "ABC", "abc9"]),
)


class _Fixed:
    """The fixed feature set, compiled and loaded into the oracle once (not a fixture: hypothesis
    would print its repr)."""

    flags: dict[str, Any] | None = None
    oracle: Oracle | None = None


@pytest.fixture(scope="module", autouse=True)
def _fixed() -> Iterator[None]:
    _Fixed.flags, _Fixed.oracle = _compiled(FIXED_BODY), Oracle(FIXED_BODY)
    yield
    _Fixed.oracle.close()


@settings(max_examples=300, deadline=None)
@given(value=CONTEXT_TEXT, where=st.sampled_from(["properties", "top"]))
def test_any_context_value_through_every_operator(value: str, where: str) -> None:
    flags, oracle = _Fixed.flags, _Fixed.oracle
    assert flags is not None and oracle is not None
    context: dict[str, Any] = {"userId": "u", "currentTime": "2024-03-01T00:00:00Z"}
    if where == "top":
        context["v"] = value
    else:
        context["properties"] = {"v": value}
    ours = {CONTEXT_KEY: from_sdk_context(context)}
    for name, flag in flags.items():
        assert flag.evaluate(ours).enabled is oracle.answer(name, context)["enabled"], (name, value)


CONSTRAINT_TEXT = st.text(alphabet='0123456789.-+eEvT:Z"\\ ab[],', min_size=0, max_size=16)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(CONSTRAINT_TEXT, min_size=1, max_size=3),
    contexts=st.lists(CONSTRAINT_TEXT, min_size=1, max_size=4),
)
def test_any_constraint_value_rewrites_and_parses_like_the_engine(
    values: list[str], contexts: list[str]
) -> None:
    body = {
        "version": 2,
        "features": [
            _feature(op, op, values if isinstance(VALUES[op], list) else values[0]) for op in OPERATORS
        ]
        + [
            {
                "name": "rollout",
                "enabled": True,
                "strategies": [
                    {"name": "flexibleRollout", "parameters": {"rollout": values[0], "groupId": values[-1]}}
                ],
            },
            {
                "name": "users",
                "enabled": True,
                "strategies": [{"name": "userWithId", "parameters": {"userIds": ",".join(values)}}],
            },
        ],
    }
    flags = _compiled(body)
    oracle = Oracle(body)
    try:
        for text in contexts:
            context = {"userId": text, "properties": {"v": text}, "currentTime": "2024-03-01T00:00:00Z"}
            ours = {CONTEXT_KEY: from_sdk_context(context)}
            for name, flag in flags.items():
                assert flag.evaluate(ours).enabled is oracle.answer(name, context)["enabled"], (
                    name,
                    values,
                    text,
                )
    finally:
        oracle.close()


@settings(max_examples=200, deadline=None)
@given(
    user=st.text(max_size=20), group=st.text(max_size=10), low=st.integers(0, 100), high=st.integers(0, 100)
)
def test_rollouts_are_monotone(user: str, group: str, low: int, high: int) -> None:
    low, high = sorted((low, high))
    body = {
        "features": [
            {
                "name": f"p{p}",
                "enabled": True,
                "strategies": [
                    {"name": "gradualRolloutUserId", "parameters": {"percentage": str(p), "groupId": group}}
                ],
            }
            for p in (low, high)
        ]
    }
    flags = _compiled(body)
    ours = {CONTEXT_KEY: from_sdk_context({"userId": user})}
    if flags[f"p{low}"].evaluate(ours).enabled:
        assert flags[f"p{high}"].evaluate(ours).enabled
