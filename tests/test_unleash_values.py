"""The engine's readers and rule language, case by case: expected values written out from Yggdrasil's
grammar and parsers (Rust's f64, chrono, semver, IpAddr) and checked once against UnleashClient 6.9.1,
not computed by the code under test."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.sources.unleash import CONTEXT_KEY, compile_features, from_sdk_context
from proxy.sources.unleash.grammar import RuleSyntaxError, parse
from proxy.sources.unleash.rules import strategy_rule
from proxy.sources.unleash.values import instant_ns, ip_address, ip_network, rust_f64, semver

NUMBERS = [("+85", 85.0), ("1e2", 100.0), (".5", 0.5), ("5.", 5.0), ("-3", -3.0), ("1E+2", 100.0)]
NOT_NUMBERS = [(" 90", None), ("1_0", None), ("1,250.00", None), ("٣", None), ("", None), ("0x10", None)]


@pytest.mark.parametrize(("text", "expected"), [*NUMBERS, *NOT_NUMBERS, ("e5", None)])
def test_numbers_as_rust_reads_them(text: str, expected: float | None) -> None:
    assert rust_f64(text) == expected


def test_rust_reads_inf_and_nan() -> None:
    assert rust_f64("inf") == float("inf") and rust_f64("-Infinity") == float("-inf")
    nan = rust_f64("NaN")
    assert nan is not None and nan != nan


EPOCH_2024 = 1_704_067_200 * 10**9  # 2024-01-01T00:00:00Z


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-01-01T00:00:00Z", EPOCH_2024),
        ("2024-01-01 00:00:00Z", EPOCH_2024),
        ("2024-01-01T02:00:00+02:00", EPOCH_2024),
        ("2024-01-01T02:00:00+0200", EPOCH_2024),
        ("2024-01-01T00:00:00.123456789Z", EPOCH_2024 + 123_456_789),
        ("2024-01-01T00:00:00", None),
        ("2024-01-01", None),
        ("1704067200", None),
        ("2024-02-30T00:00:00Z", None),
    ],
)
def test_instants_as_chrono_reads_them(text: str, expected: int | None) -> None:
    assert instant_ns(text) == expected


def test_versions_are_strict_semver() -> None:
    for text in ("v4.2.0", "4.2", "04.2.0", " 4.2.0", "1.2.3-01", "1.2.3-"):
        assert semver(text) is None, text
    ordered = ["1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta.2", "1.0.0-beta.11", "1.0.0"]
    keys = [semver(v).key for v in ordered]  # type: ignore[union-attr]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert semver("1.2.3+build.5").key == semver("1.2.3").key  # type: ignore[union-attr]


def test_addresses_must_be_exact() -> None:
    assert ip_address("10.0.0.1") is not None and ip_address("::1") is not None
    for text in ("10.0.0.1:80", " 10.0.0.1", "fe80::1%eth0", "010.0.0.1", "bad"):
        assert ip_address(text) is None, text
    network = ip_network("192.168.7.12/30")  # host bits set: accepted
    assert network is not None and ip_address("192.168.7.13") in network
    assert ip_network("10.0.0.1/33") is None and ip_network("bad") is None


def _enabled(constraint: dict[str, Any], context: dict[str, Any]) -> bool:
    feature = {"name": "f", "enabled": True, "strategies": [{"name": "default", "constraints": [constraint]}]}
    flags, _ = compile_features({"f": json.loads(json.dumps(feature))}, {}, {})
    return bool(flags["f"].evaluate({CONTEXT_KEY: from_sdk_context(context)}).enabled)


def test_the_value_shape_picks_the_comparison() -> None:
    late = {"properties": {"v": "2024-06-01T00:00:00Z"}}
    assert _enabled({"contextName": "v", "operator": "NUM_GT", "value": "2024-01-01T00:00:00Z"}, late)
    ten = {"properties": {"v": "10.0"}}
    assert _enabled({"contextName": "v", "operator": "SEMVER_EQ", "value": "10"}, ten)  # compared as numbers
    assert not _enabled({"contextName": "v", "operator": "SEMVER_EQ", "value": "v10.0.0"}, ten)
    inverted_v = {"contextName": "v", "operator": "SEMVER_EQ", "value": "v1.0.0", "inverted": True}
    assert not _enabled(inverted_v, ten)  # "v…" becomes a plain false, not inverted


def test_values_that_break_the_grammar_turn_the_feature_off() -> None:
    anyone = {"properties": {"v": "x"}}
    assert not _enabled({"contextName": "v", "operator": "NOT_IN", "values": ["a\\"]}, anyone)
    assert _enabled(
        {"contextName": "v", "operator": "NOT_IN", "values": ['a"b']}, anyone
    )  # quotes are escaped
    assert not _enabled({"contextName": 'v"', "operator": "NOT_IN", "values": ["a"]}, anyone)
    assert not _enabled({"contextName": "v", "operator": "STR_CONTAINS", "values": []}, anyone)
    assert not _enabled(
        {"contextName": "v", "operator": "DATE_AFTER", "value": "2024-01-01T00:00:00.000000Z"}, anyone
    )
    assert not _enabled({"contextName": "v", "operator": "NUM_EQ", "value": "not a number"}, anyone)
    assert not _enabled({"contextName": "v", "operator": "NOPE", "values": []}, anyone)


def test_inverted_flips_missing_values_and_not_in_of_nothing_is_true() -> None:
    nothing: dict[str, Any] = {}
    assert _enabled({"contextName": "v", "operator": "NOT_IN", "values": ["a"]}, nothing)
    assert _enabled({"contextName": "v", "operator": "NUM_GT", "value": "1", "inverted": True}, nothing)
    assert not _enabled({"contextName": "v", "operator": "IN", "values": ["a"], "inverted": True}, {"v": "a"})


def test_strategy_rules_are_the_engines_text() -> None:
    flexible = {
        "name": "flexibleRollout",
        "parameters": {"rollout": "+05", "stickiness": "userId", "groupId": "g"},
    }
    assert strategy_rule(flexible, {}, 0) == '5% sticky on user_id with group_id of "g"'
    users = {"name": "userWithId", "parameters": {"userIds": ' a, b ,c"'}}
    assert strategy_rule(users, {}, 0) == 'user_id in ["a","b","c\\""]'
    assert strategy_rule({"name": "flexibleRollout", "parameters": {"rollout": "33.5"}}, {}, 0) == "false"
    assert strategy_rule({"name": "mine"}, {}, 2) == 'external_value["customStrategy2"]'
    with_segment = {
        "name": "default",
        "segments": [4],
        "constraints": [{"contextName": "a", "operator": "IN", "values": []}],
    }
    segment = [{"contextName": "b", "operator": "STR_STARTS_WITH", "values": ["x"], "caseInsensitive": True}]
    assert strategy_rule(with_segment, {4: segment}, 0) == (
        '(true and (context["a"] in [] and context["b"] starts_with_any_ignore_case ["x"]))'
    )


def test_the_grammar_refuses_what_pest_refuses() -> None:
    for text in ("101% sticky on user_id", 'user_id in ["a"] and', "!!true", "(true", "user_id == 1.2.3.4"):
        with pytest.raises(RuleSyntaxError):
            parse(text)
    assert parse("  true or false  ") is not None
