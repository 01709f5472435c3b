"""Split source: hashing, matcher semantics, evaluation order, loading and the ``eval`` CLI contract.

Expected values follow splitio-client 10.7.0 (docs: /work/shared/reference/split.md); the SDK itself is
exercised in test_split_conformance.py.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from proxy.dataplane.context import make_context
from proxy.engine import FlagError, with_override
from proxy.sources.registry import DEFAULT
from proxy.sources.split import (
    CONTROL,
    bucket,
    compile_split,
    legacy_hash,
    murmur_hash,
    parse_semver,
    parse_split_changes,
)

ROOT = Path(__file__).resolve().parent.parent

# --- helpers ---------------------------------------------------------------------------------------


def matcher(kind: str, attribute: str | None = None, negate: bool = False, **data: Any) -> dict[str, Any]:
    m: dict[str, Any] = {
        "keySelector": {"trafficType": "user", "attribute": attribute},
        "matcherType": kind,
        "negate": negate,
    }
    m.update(data)
    return m


def condition(
    matchers: list[dict[str, Any]],
    partitions: list[tuple[str, int]] | None = None,
    kind: str = "ROLLOUT",
    label: str = "rule",
) -> dict[str, Any]:
    return {
        "conditionType": kind,
        "matcherGroup": {"combiner": "AND", "matchers": matchers},
        "partitions": [{"treatment": t, "size": s} for t, s in (partitions or [("on", 100)])],
        "label": label,
    }


def split(name: str = "f", conditions: list[dict[str, Any]] | None = None, **fields: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": name,
        "trafficTypeName": "user",
        "trafficAllocation": 100,
        "trafficAllocationSeed": 1234567,
        "seed": -7654321,
        "status": "ACTIVE",
        "killed": False,
        "defaultTreatment": "off",
        "changeNumber": 1,
        "algo": 2,
        "conditions": conditions if conditions is not None else [],
    }
    raw.update(fields)
    return raw


ALL = matcher("ALL_KEYS")


def one(raw: dict[str, Any], segments: dict[str, Any] | None = None, rbs: dict[str, Any] | None = None):
    problems: dict[str, str] = {}
    flags = compile_split({raw["name"]: raw}, segments or {}, rbs or {}, problems)
    assert problems == {}
    return flags[raw["name"]]


def treat(flag: Any, key: str = "alice", bucketing: str | None = None, **attrs: Any) -> Any:
    return flag.evaluate(make_context(key, attrs, bucketing)).value


def why(flag: Any, key: str = "alice", bucketing: str | None = None, **attrs: Any) -> Any:
    return flag.explain(make_context(key, attrs, bucketing))[1]["reason"]


def matches(
    m: dict[str, Any], key: str = "alice", segments: dict[str, Any] | None = None, **attrs: Any
) -> bool:
    flag = one(split(conditions=[condition([m], [("on", 100)])]), segments)
    return treat(flag, key, **attrs) == "on"


# --- hashing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "seed", "hashed", "expected_bucket"),
    [
        ("aUfEsdPN1twuEjff9Sl", 467569525, 2488980051, 52),  # murmur3-sample-data-v2.csv
        ("211cc9c0-4154-0135-021e-0242ac112609", 1798236110, 1029223426, 27),  # murmur3-custom-uuids.csv
    ],
)
def test_murmur_vectors(key: str, seed: int, hashed: int, expected_bucket: int) -> None:
    assert murmur_hash(key, seed) == hashed
    assert bucket(key, seed, 2) == expected_bucket


def test_legacy_vector() -> None:  # sample-data.jsonl
    assert legacy_hash("oHDuTSey2rdeIP2P", 973529038) == -446921171
    assert bucket("oHDuTSey2rdeIP2P", 973529038, 1) == 72


def test_algo_selection_and_seed_handling() -> None:
    key = "aUfEsdPN1twuEjff9Sl"
    assert bucket(key, 467569525, None) == bucket(key, 467569525, 1)  # missing algo → legacy
    assert bucket(key, 467569525, "2") == bucket(key, 467569525, 1)  # invalid algo → legacy
    assert bucket(key, 467569525, 2.0) == bucket(key, 467569525, 2)
    assert murmur_hash(key, -1) == murmur_hash(key, 0xFFFFFFFF)  # negative seeds as uint32
    assert 1 <= bucket("", -5, 1) <= 100


def test_lone_surrogate_key_serves_control_instead_of_crashing() -> None:
    flag = one(split(conditions=[condition([ALL], [("on", 50), ("off", 50)])]))
    assert treat(flag, "a\udc80") == CONTROL


# --- matchers --------------------------------------------------------------------------------------


def test_all_keys_and_whitelist_on_the_matching_key() -> None:
    assert matches(ALL)
    assert not matches(matcher("ALL_KEYS", negate=True))
    wl = {"whitelistMatcherData": {"whitelist": ["alice", "bob"]}}
    assert matches(matcher("WHITELIST", **wl), "alice")
    assert not matches(matcher("WHITELIST", **wl), "carol")
    assert matches(matcher("WHITELIST", negate=True, **wl), "carol")


def test_missing_attribute_is_no_match_and_negate_turns_it_into_a_match() -> None:
    m = {"whitelistMatcherData": {"whitelist": ["pro"]}}
    assert matches(matcher("WHITELIST", "plan", **m), plan="pro")
    assert not matches(matcher("WHITELIST", "plan", **m))
    assert matches(matcher("WHITELIST", "plan", negate=True, **m))
    assert not matches(matcher("WHITELIST", "plan", negate=True, **m), plan="pro")


def test_string_matchers_json_encode_non_strings() -> None:
    assert matches(matcher("WHITELIST", "age", whitelistMatcherData={"whitelist": ["42"]}), age=42)
    assert matches(matcher("WHITELIST", "ok", whitelistMatcherData={"whitelist": ["true"]}), ok=True)
    assert matches(
        matcher("WHITELIST", "tags", whitelistMatcherData={"whitelist": ['["a", "b"]']}), tags=["a", "b"]
    )


def test_prefix_suffix_contains_and_regex() -> None:
    data = {"whitelistMatcherData": {"whitelist": ["ann", "bob"]}}
    assert matches(matcher("STARTS_WITH", "email", **data), email="ann@acme.com")
    assert not matches(matcher("STARTS_WITH", "email", **data), email="Ann@acme.com")  # case-sensitive
    ends = {"whitelistMatcherData": {"whitelist": ["@acme.com"]}}
    assert matches(matcher("ENDS_WITH", "email", **ends), email="ann@acme.com")
    assert not matches(matcher("ENDS_WITH", "email", **ends), email="ann@acme.co")
    contains = {"whitelistMatcherData": {"whitelist": ["cme"]}}
    assert matches(matcher("CONTAINS_STRING", "email", **contains), email="ann@acme.com")
    assert matches(matcher("STARTS_WITH", **data), "annabel")  # no attribute: the matching key
    regex = {"stringMatcherData": r"\d{3}"}
    assert matches(matcher("MATCHES_STRING", "phone", **regex), phone="x1234")  # unanchored search
    assert not matches(matcher("MATCHES_STRING", "phone", **regex), phone="12")
    assert matches(matcher("MATCHES_STRING", "n", **regex), n=5000)  # JSON-encoded number


def test_numeric_matchers_take_ints_and_int_strings_only() -> None:
    eq = {"unaryNumericMatcherData": {"dataType": "NUMBER", "value": 30}}
    assert matches(matcher("EQUAL_TO", "age", **eq), age=30)
    assert matches(matcher("EQUAL_TO", "age", **eq), age="30")
    assert not matches(matcher("EQUAL_TO", "age", **eq), age=30.0)  # floats are rejected
    assert not matches(matcher("EQUAL_TO", "age", **eq), age=True)  # and booleans
    assert matches(matcher("EQUAL_TO", "age", negate=True, **eq), age=30.0)
    gte = {"unaryNumericMatcherData": {"dataType": "NUMBER", "value": 18}}
    assert matches(matcher("GREATER_THAN_OR_EQUAL_TO", "age", **gte), age=18)
    assert not matches(matcher("GREATER_THAN_OR_EQUAL_TO", "age", **gte), age=17)
    assert matches(matcher("LESS_THAN_OR_EQUAL_TO", "age", **gte), age=-3)
    between = {"betweenMatcherData": {"dataType": "NUMBER", "start": 10, "end": 20}}
    assert matches(matcher("BETWEEN", "age", **between), age=10)
    assert matches(matcher("BETWEEN", "age", **between), age=20)
    assert not matches(matcher("BETWEEN", "age", **between), age=21)


def test_datetime_matchers_truncate_and_read_attributes_as_seconds() -> None:
    day = 1_700_000_000 - 1_700_000_000 % 86400  # 00:00 UTC
    eq = {"unaryNumericMatcherData": {"dataType": "DATETIME", "value": (day + 3600) * 1000}}
    assert matches(matcher("EQUAL_TO", "ts", **eq), ts=day + 86399)  # same day
    assert not matches(matcher("EQUAL_TO", "ts", **eq), ts=day + 86400)
    assert not matches(matcher("EQUAL_TO", "ts", **eq), ts=(day + 3600) * 1000)  # ms are not seconds
    gte = {"unaryNumericMatcherData": {"dataType": "DATETIME", "value": (day + 90) * 1000}}
    assert matches(matcher("GREATER_THAN_OR_EQUAL_TO", "ts", **gte), ts=day + 60)  # minute truncation
    assert not matches(matcher("GREATER_THAN_OR_EQUAL_TO", "ts", **gte), ts=day + 59)
    between = {"betweenMatcherData": {"dataType": "DATETIME", "start": day * 1000, "end": (day + 120) * 1000}}
    assert matches(matcher("BETWEEN", "ts", **between), ts=day + 179)
    assert not matches(matcher("BETWEEN", "ts", **between), ts=day + 180)


def test_set_matchers() -> None:
    wl = {"whitelistMatcherData": {"whitelist": ["a", "b"]}}
    assert matches(matcher("EQUAL_TO_SET", "t", **wl), t=["b", "a", "a"])
    assert not matches(matcher("EQUAL_TO_SET", "t", **wl), t=["a"])
    assert matches(matcher("CONTAINS_ALL_OF_SET", "t", **wl), t=["a", "b", "c"])
    assert not matches(matcher("CONTAINS_ALL_OF_SET", "t", **wl), t=["a", "c"])
    assert matches(matcher("CONTAINS_ANY_OF_SET", "t", **wl), t=["c", "b"])
    assert not matches(matcher("CONTAINS_ANY_OF_SET", "t", **wl), t=[])
    assert matches(matcher("PART_OF_SET", "t", **wl), t=["a"])
    assert not matches(matcher("PART_OF_SET", "t", **wl), t=[])  # empty input is not part of
    assert not matches(matcher("PART_OF_SET", "t", **wl), t=["a", "z"])
    assert matches(matcher("EQUAL_TO_SET", "t", **wl), t="ab")  # SDK quirk: a string is its characters
    assert not matches(matcher("CONTAINS_ANY_OF_SET", "t", **wl), t=7)  # not iterable


def test_boolean_matcher() -> None:
    yes = {"booleanMatcherData": True}
    assert matches(matcher("EQUAL_TO_BOOLEAN", "beta", **yes), beta=True)
    assert matches(matcher("EQUAL_TO_BOOLEAN", "beta", **yes), beta="TRUE")
    assert matches(matcher("EQUAL_TO_BOOLEAN", "beta", **yes), beta=" true ")
    assert not matches(matcher("EQUAL_TO_BOOLEAN", "beta", **yes), beta="yes")
    assert not matches(matcher("EQUAL_TO_BOOLEAN", "beta", **yes), beta=1)
    assert matches(matcher("EQUAL_TO_BOOLEAN", "beta", booleanMatcherData=False), beta="false")


def test_semver_matchers() -> None:
    def sv(kind: str, **data: Any) -> dict[str, Any]:
        return matcher(kind, "v", **data)

    assert matches(sv("EQUAL_TO_SEMVER", stringMatcherData="1.2.3"), v="1.2.3")
    assert not matches(sv("EQUAL_TO_SEMVER", stringMatcherData="1.2.3"), v="1.2.3+build")  # metadata counts
    assert matches(sv("EQUAL_TO_SEMVER", stringMatcherData="1.2.3"), v="01.2.3")  # normalised
    assert not matches(sv("EQUAL_TO_SEMVER", stringMatcherData="1.2.3"), v="1.2")  # not a version
    gte = {"stringMatcherData": "1.2.3-beta.2"}
    assert matches(sv("GREATER_THAN_OR_EQUAL_TO_SEMVER", **gte), v="1.2.3-beta.10")  # numeric identifiers
    assert matches(sv("GREATER_THAN_OR_EQUAL_TO_SEMVER", **gte), v="1.2.3")  # release after pre-release
    assert not matches(sv("GREATER_THAN_OR_EQUAL_TO_SEMVER", **gte), v="1.2.3-alpha")
    assert matches(sv("LESS_THAN_OR_EQUAL_TO_SEMVER", stringMatcherData="2.0.0"), v="1.10.0")
    between = {"betweenStringMatcherData": {"start": "1.0.0", "end": "2.0.0"}}
    assert matches(sv("BETWEEN_SEMVER", **between), v="2.0.0+meta")
    assert not matches(sv("BETWEEN_SEMVER", **between), v="2.0.1")
    in_list = {"whitelistMatcherData": {"whitelist": ["1.0.0", "2.0.0-rc.1", "garbage"]}}
    assert matches(sv("IN_LIST_SEMVER", **in_list), v="2.0.0-rc.1")
    assert not matches(sv("IN_LIST_SEMVER", **in_list), v="2.0.0")
    assert not matches(sv("EQUAL_TO_SEMVER", stringMatcherData="not a version"), v="1.0.0")
    assert parse_semver("1.2.3-") is None and parse_semver("1.2.3+") is None
    assert parse_semver("1.02.3-07.x+m").version == "1.2.3-7.x+m"


def test_in_segment_tests_the_matching_key() -> None:
    segs = {"beta": {"alice", "bob"}}
    m = matcher("IN_SEGMENT", userDefinedSegmentMatcherData={"segmentName": "beta"})
    assert matches(m, "alice", segs)
    assert not matches(m, "carol", segs)
    unknown = matcher("IN_SEGMENT", userDefinedSegmentMatcherData={"segmentName": "nope"})
    assert not matches(unknown, "alice", segs)
    # with an attribute, only its presence counts; membership is still the matching key's
    by_attr = matcher("IN_SEGMENT", "plan", userDefinedSegmentMatcherData={"segmentName": "beta"})
    assert matches(by_attr, "alice", segs, plan="carol")
    assert not matches(by_attr, "alice", segs)


def test_matchers_are_anded_and_conditions_run_in_order() -> None:
    pro = matcher("WHITELIST", "plan", whitelistMatcherData={"whitelist": ["pro"]})
    de = matcher("WHITELIST", "country", whitelistMatcherData={"whitelist": ["de"]})
    flag = one(
        split(
            conditions=[
                condition([pro, de], [("v1", 100)], "WHITELIST", "both"),
                condition([pro], [("v2", 100)], "ROLLOUT", "pro"),
            ]
        )
    )
    assert treat(flag, plan="pro", country="de") == "v1"
    assert why(flag, plan="pro", country="de") == "both"
    assert treat(flag, plan="pro", country="us") == "v2"
    assert treat(flag, plan="free") == "off"
    assert why(flag, plan="free") == "default rule"


# --- partitions, traffic allocation, kill ----------------------------------------------------------


def test_partitions_by_bucket_of_the_bucketing_key() -> None:
    raw = split(conditions=[condition([ALL], [("a", 30), ("b", 30), ("c", 40)])])
    flag = one(raw)
    for key in ("alice", "bob", "carol", "dave", "eve", "ключ", "😀"):
        b = bucket(key, raw["seed"], 2)
        expected = "a" if b <= 30 else "b" if b <= 60 else "c"
        assert treat(flag, key) == expected
        assert treat(flag, "someone-else", bucketing=key) == expected  # bucketing key decides


def test_partitions_below_100_leave_control() -> None:
    raw = split(conditions=[condition([ALL], [("a", 10)])])
    flag = one(raw)
    keys = [f"user{i}" for i in range(200)]
    for key in keys:
        assert treat(flag, key) == ("a" if bucket(key, raw["seed"], 2) <= 10 else CONTROL)


def test_traffic_allocation_uses_its_own_seed_at_the_first_rollout_condition() -> None:
    vip = matcher("WHITELIST", whitelistMatcherData={"whitelist": ["vip"]})
    raw = split(
        conditions=[
            condition([vip], [("v1", 100)], "WHITELIST", "whitelisted"),
            condition([ALL], [("on", 100)]),
        ],
        trafficAllocation=40,
        trafficAllocationSeed=987654,
    )
    flag = one(raw)
    assert treat(flag, "vip") == "v1"  # whitelist before the first ROLLOUT: no allocation check
    for i in range(200):
        key = f"user{i}"
        inside = bucket(key, 987654, 2) <= 40
        assert treat(flag, key) == ("on" if inside else "off")
        assert why(flag, key) == ("rule" if inside else "not in split")
    zero = one(split(conditions=[condition([ALL])], trafficAllocation=0))
    assert treat(zero, "anyone") == "off"


def test_traffic_allocation_only_applies_to_rollout_conditions() -> None:
    flag = one(split(conditions=[condition([ALL], kind="WHITELIST")], trafficAllocation=0))
    assert treat(flag) == "on"


def test_out_of_range_traffic_allocation_means_100() -> None:
    flag = one(split(conditions=[condition([ALL])], trafficAllocation=150))
    assert treat(flag) == "on"


def test_killed_serves_the_default_treatment_with_its_config() -> None:
    flag = one(split(conditions=[condition([ALL])], killed=True, configurations={"off": '{"x": 1}'}))
    served, detail = flag.explain(make_context("alice", {}))
    assert (served.value, served.config, served.has_config, detail["reason"]) == (
        "off",
        {"x": 1},
        True,
        "killed",
    )
    assert flag.default is served


def test_configurations_are_parsed_json_when_possible() -> None:
    raw = split(
        conditions=[condition([ALL], [("on", 100)])],
        configurations={"on": '{"color": "blue"}', "off": "plain text"},
    )
    flag = one(raw)
    on = flag.evaluate(make_context("alice", {}))
    assert (on.config, on.has_config, on.config_json) == ({"color": "blue"}, True, '{"color":"blue"}')
    assert flag.default.config == "plain text" and flag.default.has_config
    bare = one(split(conditions=[condition([ALL])]))
    served = bare.evaluate(make_context("alice", {}))
    assert (served.config, served.has_config) == (None, False)


def test_control_never_has_a_config() -> None:
    flag = one(
        split(conditions=[condition([ALL], [("control", 100)])], configurations={"control": '{"a": 1}'})
    )
    served = flag.evaluate(make_context("alice", {}))
    assert (served.value, served.has_config) == (CONTROL, False)


def test_invalid_keys_serve_control() -> None:
    flag = one(split(conditions=[condition([ALL])]))
    for key in ("", "   ", "x" * 251):
        assert flag.evaluate({"key": key}).value == CONTROL
    assert flag.evaluate({}).value == CONTROL
    assert flag.evaluate({"key": "x" * 250}).value == "on"
    assert flag.evaluate({"key": 12}).value == "on"  # numbers are converted
    assert flag.evaluate({"key": True}).value == CONTROL
    assert flag.evaluate({"key": "alice", "bucketingKey": " "}).value == CONTROL
    assert flag.explain({"key": ""})[1] == {"reason": "invalid key"}


def test_key_and_bucketing_key_are_not_attributes() -> None:
    m = matcher("WHITELIST", "key", whitelistMatcherData={"whitelist": ["alice"]})
    assert not matches(m, "alice")


# --- prerequisites, dependencies, rule-based segments ----------------------------------------------


def _two(dependent: dict[str, Any], base_treatment: str = "on", **base_fields: Any) -> dict[str, Any]:
    base = split("base", [condition([ALL], [(base_treatment, 100)])], **base_fields)
    problems: dict[str, str] = {}
    flags = compile_split({"base": base, "dep": dependent}, {}, {}, problems)
    assert problems == {}
    return flags


def test_prerequisites() -> None:
    dependent = split("dep", [condition([ALL], [("v1", 100)])], prerequisites=[{"n": "base", "ts": ["on"]}])
    flags = _two(dependent)
    assert treat(flags["dep"]) == "v1"
    flags = _two(dependent, "off")
    assert treat(flags["dep"]) == "off"
    assert why(flags["dep"]) == "prerequisites not met"
    flags = _two(dependent, killed=True)  # base killed → off
    assert why(flags["dep"]) == "prerequisites not met"


def test_prerequisites_not_met_with_control_default_fall_through_to_the_conditions() -> None:
    dependent = split(
        "dep", [condition([ALL], [("v1", 100)], label="r")], defaultTreatment="control",
        prerequisites=[{"n": "base", "ts": ["nope"]}],
    )  # fmt: skip
    flags = _two(dependent)
    assert (treat(flags["dep"]), why(flags["dep"])) == ("v1", "r")


def test_prerequisite_on_a_missing_flag_sees_control() -> None:
    dependent = split("dep", [condition([ALL])], prerequisites=[{"n": "ghost", "ts": ["control"]}])
    assert treat(_two(dependent)["dep"]) == "on"


def test_dependency_matcher() -> None:
    dep = matcher("IN_SPLIT_TREATMENT", dependencyMatcherData={"split": "base", "treatments": ["on"]})
    dependent = split("dep", [condition([dep], [("v1", 100)])])
    assert treat(_two(dependent)["dep"]) == "v1"
    assert treat(_two(dependent, "off")["dep"]) == "off"
    # the dependency sees the same bucketing key and attributes
    base_pro = matcher("WHITELIST", "plan", whitelistMatcherData={"whitelist": ["pro"]})
    flags = compile_split({"base": split("base", [condition([base_pro])]), "dep": dependent}, {}, {})
    assert treat(flags["dep"], plan="pro") == "v1"
    assert treat(flags["dep"], plan="free") == "off"


def test_dependency_cycles_serve_control() -> None:
    def on_other(other: str) -> dict[str, Any]:
        return matcher("IN_SPLIT_TREATMENT", dependencyMatcherData={"split": other, "treatments": ["on"]})

    flags = compile_split(
        {
            "a": split("a", [condition([on_other("b")])]),
            "b": split("b", [condition([on_other("a")])]),
            "self": split("self", [condition([ALL])], prerequisites=[{"n": "self", "ts": ["on"]}]),
        },
        {},
        {},
    )
    for name in ("a", "b", "self"):
        assert treat(flags[name]) == CONTROL
        assert why(flags[name]) == "exception"


RBS = {
    "name": "power",
    "status": "ACTIVE",
    "trafficTypeName": "user",
    "changeNumber": 5,
    "excluded": {"keys": ["mallory"], "segments": [{"name": "banned", "type": "standard"}]},
    "conditions": [
        {
            "conditionType": "WHITELIST",
            "matcherGroup": {
                "combiner": "AND",
                "matchers": [matcher("GREATER_THAN_OR_EQUAL_TO", "age", unaryNumericMatcherData={
                    "dataType": "NUMBER", "value": 18})],
            },
        }
    ],
}  # fmt: skip


def test_rule_based_segments() -> None:
    in_rbs = matcher("IN_RULE_BASED_SEGMENT", userDefinedSegmentMatcherData={"segmentName": "power"})
    flag = one(split(conditions=[condition([in_rbs])]), {"banned": {"trudy"}}, {"power": RBS})
    assert treat(flag, "alice", age=30) == "on"
    assert treat(flag, "alice", age=10) == "off"
    assert treat(flag, "mallory", age=30) == "off"  # excluded key
    assert treat(flag, "trudy", age=30) == "off"  # excluded segment


def test_rule_based_segment_exclusion_by_another_rule_based_segment() -> None:
    minor = matcher(
        "LESS_THAN_OR_EQUAL_TO", "age", unaryNumericMatcherData={"dataType": "NUMBER", "value": 17}
    )
    minors = {
        "name": "minors", "status": "ACTIVE", "excluded": {"keys": ["kid-exception"], "segments": []},
        "conditions": [{"matcherGroup": {"combiner": "AND", "matchers": [minor]}}],
    }  # fmt: skip
    everyone = {
        "name": "everyone", "status": "ACTIVE",
        "excluded": {"keys": [], "segments": [{"name": "minors", "type": "rule-based"},
                                                {"name": "banned", "type": "standard"}]},
        "conditions": [{"matcherGroup": {"combiner": "AND", "matchers": [ALL]}}],
    }  # fmt: skip
    in_rbs = matcher("IN_RULE_BASED_SEGMENT", userDefinedSegmentMatcherData={"segmentName": "everyone"})
    flag = one(
        split(conditions=[condition([in_rbs])]), {"banned": {"kid-exception", "trudy"}},
        {"minors": minors, "everyone": everyone},
    )  # fmt: skip
    assert treat(flag, "alice", age=30) == "on"
    assert treat(flag, "alice", age=10) == "off"  # excluded through "minors"
    assert treat(flag, "trudy", age=30) == "off"  # excluded through "banned"
    # SDK quirk: a key excluded *from* a nested rule-based segment stops the exclusion check,
    # so "banned" (listed after it) is not consulted
    assert treat(flag, "kid-exception", age=10) == "on"


def test_missing_rule_based_segment_serves_control_when_reached() -> None:
    vip = matcher("WHITELIST", whitelistMatcherData={"whitelist": ["vip"]})
    in_rbs = matcher("IN_RULE_BASED_SEGMENT", userDefinedSegmentMatcherData={"segmentName": "gone"})
    flag = one(split(conditions=[condition([vip], [("v1", 100)], "WHITELIST"), condition([in_rbs])]))
    assert treat(flag, "vip") == "v1"
    assert treat(flag, "alice") == CONTROL
    archived = dict(RBS, status="ARCHIVED", name="gone")
    flag = one(split(conditions=[condition([in_rbs])]), {}, {"gone": archived})
    assert treat(flag, "alice") == CONTROL


# --- unsupported matchers and parse problems -------------------------------------------------------


def test_unsupported_matcher_makes_the_flag_control(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="proxy.sources.split")
    large = matcher("IN_LARGE_SEGMENT", userDefinedLargeSegmentMatcherData={"largeSegmentName": "big"})
    raw = split("large_flag", [condition([ALL], [("v1", 100)], "WHITELIST"), condition([large])])
    flag = one(raw)
    assert treat(flag) == CONTROL
    assert why(flag) == "targeting rule type unsupported by sdk"
    assert sum("large_flag" in r.getMessage() for r in caplog.records) == 1
    one(raw)
    assert sum("large_flag" in r.getMessage() for r in caplog.records) == 1  # logged once
    # the template is a ROLLOUT condition: traffic allocation and kill still apply
    assert treat(one(dict(raw, name="large2", trafficAllocation=0))) == "off"
    assert treat(one(dict(raw, name="large3", killed=True))) == "off"


def test_malformed_definitions_are_problems() -> None:
    problems: dict[str, str] = {}
    bad_regex = matcher("MATCHES_STRING", stringMatcherData="(")
    flags = compile_split(
        {
            "regex": split("regex", [condition([bad_regex])]),
            "size": split("size", [condition([ALL], [("on", 101)])]),
            "no_default": {k: v for k, v in split("no_default").items() if k != "defaultTreatment"},
            "datatype": split("datatype", [condition([matcher("EQUAL_TO", "a", unaryNumericMatcherData={
                "dataType": "MONEY", "value": 1})])]),
            "fine": split("fine", [condition([ALL])]),
        },
        {},
        {},
        problems,
    )  # fmt: skip
    assert sorted(flags) == ["fine"]
    assert sorted(problems) == ["datatype", "no_default", "regex", "size"]
    assert "defaultTreatment" in problems["no_default"]


# --- flag metadata and overrides -------------------------------------------------------------------


def test_flag_metadata() -> None:
    raw = split("meta", [condition([ALL], [("on", 50), ("v2", 50)])], configurations={"v3": "{}"})
    flag = one(raw)
    assert flag.source == "split"
    assert flag.definition is raw
    assert flag.key_json == '"meta"'
    assert {s.value for s in flag.served} == {"on", "v2", "v3", "off", CONTROL}
    assert flag.default.value == "off"
    killed = with_override(flag, {"kill": True})
    assert killed.evaluate(make_context("alice", {})).value == "off"
    promoted = with_override(flag, {"promote": "v2"})
    assert promoted.evaluate(make_context("alice", {})).value == "v2"


# --- loading ---------------------------------------------------------------------------------------


def test_spec_13_and_11_and_archived_removal() -> None:
    active = split("a", [condition([ALL])])
    archived = split("b", [condition([ALL])], status="ARCHIVED")
    odd = split("c", [condition([ALL])], status="PAUSED")  # the SDK maps unknown statuses to ARCHIVED
    new_flags, new_rbs = parse_split_changes(
        {"ff": {"d": [active, archived, odd], "s": -1, "t": 5}, "rbs": {"d": [RBS], "s": -1, "t": 3}}
    )
    old_flags, old_rbs = parse_split_changes({"splits": [active, archived, odd], "since": -1, "till": 5})
    assert list(new_flags) == list(old_flags) == ["a"]
    assert list(new_rbs) == ["power"] and old_rbs == {}
    with pytest.raises(FlagError):
        parse_split_changes({"nothing": []})
    archived_rbs = dict(RBS, status="ARCHIVED")
    assert parse_split_changes({"ff": {"d": []}, "rbs": {"d": [archived_rbs]}}) == ({}, {})


def test_dependency_on_an_archived_flag_sees_control(tmp_path: Path) -> None:
    dep = matcher("IN_SPLIT_TREATMENT", dependencyMatcherData={"split": "old", "treatments": ["control"]})
    document = {
        "ff": {"d": [split("old", [condition([ALL])], status="ARCHIVED"), split("new", [condition([dep])])]},
        "rbs": {"d": []},
    }
    path = tmp_path / "splits.json"
    path.write_text(json.dumps(document))
    flags = DEFAULT.load_file("split", path)
    assert sorted(flags) == ["new"]
    assert treat(flags["new"]) == "on"


def test_registration() -> None:
    assert "split" in DEFAULT.names
    assert DEFAULT.kinds["split"] == ("flags", "segments", "rbsegments")


def test_compile_source_formats_and_cache() -> None:
    in_seg = matcher("IN_SEGMENT", userDefinedSegmentMatcherData={"segmentName": "beta"})
    in_rbs = matcher("IN_RULE_BASED_SEGMENT", userDefinedSegmentMatcherData={"segmentName": "power"})
    kinds = {
        "flags": {
            "seg": json.dumps(split("seg", [condition([in_seg])])),
            "rbs": json.dumps(split("rbs", [condition([in_rbs])])),
            "old": json.dumps(split("old", status="ARCHIVED")),
            "broken": "{not json",
        },
        "segments": {
            "beta": json.dumps(["alice"]),
            "gamma": json.dumps(
                {"name": "gamma", "added": ["x", "y"], "removed": ["y"], "since": -1, "till": 1}
            ),
            "bad": json.dumps({"added": 5}),
        },
        "rbsegments": {"power": json.dumps(RBS), "nope": "[]"},
    }
    cache: dict[str, Any] = {}
    flags, problems = DEFAULT.compile("split", kinds, cache)
    assert sorted(flags) == ["rbs", "seg"]
    assert sorted(problems) == ["broken", "rbsegments:nope", "segments:bad"]
    assert treat(flags["seg"], "alice") == "on" and treat(flags["seg"], "bob") == "off"
    assert treat(flags["rbs"], "alice", age=40) == "on"
    again, _ = DEFAULT.compile("split", {k: dict(v) for k, v in kinds.items()}, cache)
    assert again["seg"] is flags["seg"]  # unchanged texts: nothing recompiled
    kinds["segments"]["beta"] = json.dumps(["bob"])
    changed, _ = DEFAULT.compile("split", kinds, cache)
    assert changed["seg"] is not flags["seg"]
    assert treat(changed["seg"], "bob") == "on" and treat(changed["seg"], "alice") == "off"


# --- the eval CLI contract -------------------------------------------------------------------------


def test_eval_cli_contract(tmp_path: Path) -> None:
    in_seg = matcher("IN_SEGMENT", userDefinedSegmentMatcherData={"segmentName": "beta"})
    adult = matcher(
        "GREATER_THAN_OR_EQUAL_TO", "age", unaryNumericMatcherData={"dataType": "NUMBER", "value": 18}
    )
    document = {
        "ff": {
            "d": [
                split("beta_flag", [condition([in_seg], [("on", 100)], "WHITELIST", "in segment beta")]),
                split("adults", [condition([adult], [("v2", 100)])], defaultTreatment="v1"),
                split("gone", [condition([ALL])], status="ARCHIVED"),
                split("rollout", [condition([ALL], [("on", 50), ("off", 50)])], seed=467569525),
            ],
            "s": -1,
            "t": 10,
        },
        "rbs": {"d": [], "s": -1, "t": -1},
    }
    flags_file = tmp_path / "splitChanges.json"
    flags_file.write_text(json.dumps(document))
    segments = tmp_path / "segments"
    segments.mkdir()
    (segments / "beta.json").write_text(
        json.dumps({"name": "beta", "added": ["carol", "dave"], "removed": ["dave"], "since": -1, "till": 3})
    )
    keys = tmp_path / "keys.jsonl"
    lines = [
        {"key": "carol", "attributes": {"age": 17}},
        {"key": "dave", "attributes": {"age": 18}},
        {"key": "erin", "bucketingKey": "aUfEsdPN1twuEjff9Sl", "attributes": {"age": "30"}},
        {"key": "frank", "attributes": {"age": 30.0}},
    ]
    keys.write_text("".join(json.dumps(line) + "\n" for line in lines))
    command = [
        sys.executable, "-m", "proxy", "eval", "--source", "split", "--flags", str(flags_file),
        "--segments", str(segments), "--keys-file", str(keys),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    rollout = {k: ("on" if bucket(k, 467569525, 2) <= 50 else "off") for k in ("carol", "dave", "frank")}
    rollout["erin"] = "off"  # bucket 52 for the bucketing key (murmur3 vector)
    expected = [
        {"key": "carol", "flags": {"adults": "v1", "beta_flag": "on", "rollout": rollout["carol"]}},
        {"key": "dave", "flags": {"adults": "v2", "beta_flag": "off", "rollout": rollout["dave"]}},
        {"key": "erin", "flags": {"adults": "v2", "beta_flag": "off", "rollout": rollout["erin"]}},
        {"key": "frank", "flags": {"adults": "v1", "beta_flag": "off", "rollout": rollout["frank"]}},
    ]
    assert result.stdout.splitlines() == [json.dumps(e, separators=(",", ":")) for e in expected]


def test_eval_cli_rejects_a_malformed_file(tmp_path: Path) -> None:
    flags_file = tmp_path / "bad.json"
    flags_file.write_text(json.dumps({"ff": {"d": [split("x", [condition([ALL], [("on", 101)])])]}}))
    command = [
        sys.executable,
        "-m",
        "proxy",
        "eval",
        "--source",
        "split",
        "--flags",
        str(flags_file),
        "--key",
        "k",
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 2
    assert "x" in result.stderr and "101" in result.stderr


def test_self_referencing_rule_based_segment_serves_control() -> None:
    loop = matcher("IN_RULE_BASED_SEGMENT", userDefinedSegmentMatcherData={"segmentName": "loop"})
    rbs = {"name": "loop", "status": "ACTIVE", "conditions": [condition([loop])]}
    excluded_loop = {
        "name": "ex", "status": "ACTIVE", "excluded": {"segments": [{"name": "ex", "type": "rule-based"}]},
        "conditions": [condition([ALL])],
    }  # fmt: skip
    in_ex = matcher("IN_RULE_BASED_SEGMENT", userDefinedSegmentMatcherData={"segmentName": "ex"})
    flags = compile_split(
        {"a": split("a", [condition([loop])]), "b": split("b", [condition([in_ex])])},
        {},
        {"loop": rbs, "ex": excluded_loop},
    )
    assert (treat(flags["a"]), why(flags["a"])) == (CONTROL, "exception")
    assert (treat(flags["b"]), why(flags["b"])) == (CONTROL, "exception")
