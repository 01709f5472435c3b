"""The flag engine: bucketing formula, weighted splits, rules, validation (pure, no I/O)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from typing import Any

import mmh3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.engine import FlagError, compile_document, compile_flag


def expected_variant(salt: str, key: str, weights: list[tuple[str, int]]) -> str:
    """The documented formula, written out independently of the engine."""
    b = mmh3.hash((salt + ":" + key).encode("utf-8"), 0, signed=False) % 10000
    total = sum(w for _, w in weights)
    running = 0
    for name, w in weights:
        running += w
        if b < running * 10000 // total:
            return name
    raise AssertionError("unreachable")


THRESHOLD = {
    "variants": {
        "control": {"weight": 50, "config": {"minConfidence": 0.85}},
        "treatment_a": {"weight": 25, "config": {"minConfidence": 0.75}},
        "treatment_b": {"weight": 25, "config": {"minConfidence": 0.80}},
    },
    "defaultVariant": "control",
    "enabled": True,
}


def test_weighted_variant_follows_documented_formula() -> None:
    flag = compile_flag("signal-confidence-threshold", THRESHOLD)
    weights = [("control", 50), ("treatment_a", 25), ("treatment_b", 25)]
    for i in range(2000):
        key = f"user-{i}"
        assert flag.evaluate({"key": key}).value == expected_variant(
            "signal-confidence-threshold", key, weights
        )


def test_salt_and_bucket_by_change_the_hash_input() -> None:
    flag = compile_flag("f", {**THRESHOLD, "salt": "s1", "bucketBy": "account"})
    weights = [("control", 50), ("treatment_a", 25), ("treatment_b", 25)]
    for i in range(500):
        ctx = {"key": "same-user", "account": f"acct-{i}"}
        assert flag.evaluate(ctx).value == expected_variant("s1", f"acct-{i}", weights)


def test_boolean_percentage_is_bucket_below_p_times_100() -> None:
    flag = compile_flag("ramp", {"percentage": 37.5})
    for i in range(3000):
        key = str(i)
        b = mmh3.hash(f"ramp:{key}", 0, signed=False) % 10000
        assert flag.evaluate({"key": key}).value is (b < 3750)


def test_served_outcomes_carry_config_only_when_declared() -> None:
    flag = compile_flag(
        "p", {"variants": {"a": {"weight": 1, "config": None}, "b": {"weight": 0}}, "defaultVariant": "a"}
    )
    served = flag.evaluate({"key": "x"})
    assert served.value == "a" and served.has_config and served.config_json == "null"
    only_b = compile_flag("p", {"variants": {"a": {"weight": 0}, "b": {"weight": 5}}})
    assert only_b.evaluate({"key": "x"}).config_json is None


@pytest.mark.parametrize(
    "weights",
    [
        [("control", 50), ("treatment_a", 25), ("treatment_b", 25)],
        [("control", 90), ("treatment", 10)],
        [("a", 1), ("b", 1), ("c", 1)],
    ],
)
def test_distribution_within_one_and_a_half_points(weights: list[tuple[str, int]]) -> None:
    flag = compile_flag("dist", {"variants": {n: {"weight": w} for n, w in weights}})
    counts = Counter(flag.evaluate({"key": f"k{i}"}).value for i in range(100_000))
    total = sum(w for _, w in weights)
    for name, w in weights:
        assert abs(counts[name] / 100_000 - w / total) <= 0.015, (name, counts)


def test_same_variants_in_another_process() -> None:
    doc = {"flags": {"t": THRESHOLD, "b": {"percentage": 50}}}
    keys = [f"user-{i}" for i in range(300)]
    script = (
        "import json,sys\nfrom proxy.engine import compile_document\n"
        "doc, keys = json.load(sys.stdin)\nflags = compile_document(doc)\n"
        "print(json.dumps([[flags[k].evaluate({'key': u}).value for k in sorted(flags)] for u in keys]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps([doc, keys]),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={"PYTHONHASHSEED": "123", "PATH": ""},
    )
    flags = compile_document(doc)
    here = [[flags[k].evaluate({"key": u}).value for k in sorted(flags)] for u in keys]
    assert json.loads(out.stdout) == here


@settings(max_examples=200, deadline=None)
@given(p=st.floats(0, 100), q=st.floats(0, 100), keys=st.lists(st.text(min_size=1, max_size=20), max_size=30))
def test_raising_a_percentage_never_turns_anyone_off(p: float, q: float, keys: list[str]) -> None:
    lo, hi = sorted((p, q))
    low = compile_flag("ramp", {"percentage": lo})
    high = compile_flag("ramp", {"percentage": hi})
    for key in keys:
        if low.evaluate({"key": key}).value:
            assert high.evaluate({"key": key}).value


@settings(max_examples=100, deadline=None)
@given(
    new_weights=st.lists(st.integers(0, 100), min_size=2, max_size=4).filter(any),
    keys=st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=40),
)
def test_editing_one_flag_never_moves_anyone_in_another(new_weights: list[int], keys: list[str]) -> None:
    before = compile_document({"flags": {"a": THRESHOLD, "b": {"percentage": 30}}})
    edited = {"variants": {f"v{i}": {"weight": w} for i, w in enumerate(new_weights)}}
    after = compile_document({"flags": {"a": edited, "b": {"percentage": 30}, "c": {"percentage": 5}}})
    for key in keys:
        assert before["b"].evaluate({"key": key}) == after["b"].evaluate({"key": key})


@settings(max_examples=100, deadline=None)
@given(
    ctx=st.dictionaries(
        st.text(max_size=8),
        st.one_of(
            st.none(),
            st.booleans(),
            st.floats(),
            st.lists(st.integers()),
            st.dictionaries(st.text(max_size=3), st.integers()),
        ),
    )
)
def test_missing_or_odd_bucket_attribute_falls_back_to_default(ctx: dict[str, Any]) -> None:
    flag = compile_flag("f", {**THRESHOLD, "defaultVariant": "treatment_b", "bucketBy": "account"})
    ctx.pop("account", None)
    assert flag.evaluate(ctx).value == "treatment_b"
    ctx["account"] = [1, 2]
    assert flag.evaluate(ctx).value == "treatment_b"


def test_disabled_serves_default_and_booleans_false() -> None:
    assert (
        compile_flag("v", {**THRESHOLD, "enabled": False, "defaultVariant": "treatment_a"})
        .evaluate({"key": "x"})
        .value
        == "treatment_a"
    )
    assert compile_flag("k", {"enabled": False}).evaluate({"key": "x"}).value is False
    assert compile_flag("k", {"enabled": True}).evaluate({}).value is True


def test_origin_story_shapes_load_unchanged() -> None:
    compile_flag(
        "ENABLE_BATCH_STREAMING", {"enabled": True, "updatedAt": "2025-01-01T00:00:00.000Z", "note": "x"}
    )
    compile_flag("signal-confidence-threshold", THRESHOLD)


# --- rules ----------------------------------------------------------------------------------------

RULED = {
    "variants": {"control": {"weight": 100}, "beta": {"weight": 0}, "gamma": {"weight": 0}},
    "defaultVariant": "control",
    "rules": [
        {"if": {"==": [{"var": "country"}, "NZ"]}, "variant": "beta"},
        {"if": {"sem_ver": [{"var": "version"}, ">=", "2.0.0"]}, "rollout": {"beta": 1, "gamma": 1}},
        {"if": {"in": [{"var": "country"}, ["US", "CA"]]}, "variant": "gamma"},
    ],
}


def test_rules_first_match_wins_then_fallthrough() -> None:
    flag = compile_flag("r", RULED)
    assert flag.evaluate({"key": "u", "country": "NZ", "version": "3.0.0"}).value == "beta"
    assert flag.evaluate({"key": "u", "country": "US"}).value == "gamma"
    assert flag.evaluate({"key": "u", "country": "FR"}).value == "control"
    for i in range(300):
        key = f"user{i}"
        got = flag.evaluate({"key": key, "country": "US", "version": "2.1"}).value
        assert got == expected_variant("r", key, [("beta", 1), ("gamma", 1)])


def test_rule_rollout_without_key_serves_default() -> None:
    assert compile_flag("r", RULED).evaluate({"version": "2.0.0"}).value == "control"


def test_boolean_rules_value_and_percentage() -> None:
    flag = compile_flag(
        "b",
        {
            "percentage": 0,
            "rules": [
                {"if": {"ends_with": [{"var": "email"}, "@staff.example"]}, "value": True},
                {"if": {"==": [{"var": "plan"}, "pro"]}, "percentage": 50},
            ],
        },
    )
    assert flag.evaluate({"key": "a", "email": "x@staff.example"}).value is True
    assert flag.evaluate({"key": "a"}).value is False
    for i in range(200):
        b = mmh3.hash(f"b:k{i}", 0, signed=False) % 10000
        assert flag.evaluate({"key": f"k{i}", "plan": "pro"}).value is (b < 5000)


def test_explain_names_rule_bucket_and_reason() -> None:
    flag = compile_flag("r", RULED)
    assert flag.explain({"key": "u", "country": "NZ"})[1] == {"reason": "rule", "rule": 0}
    _, why = flag.explain({"key": "u7", "version": "2.0.0"})
    assert why["reason"] == "rule" and why["rule"] == 1 and 0 <= why["bucket"] < 10000
    assert compile_flag("d", {**THRESHOLD, "enabled": False}).explain({})[1] == {"reason": "disabled"}


# --- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("definition", "path"),
    [
        ({"enabled": "yes"}, "flags.f.enabled"),
        ({"colour": "red"}, "flags.f.colour"),
        ({"variants": {"a": {"weight": -1}}}, "flags.f.variants.a.weight"),
        ({"variants": {"a": {"weight": 0}, "b": {"weight": 0}}}, "flags.f.variants"),
        ({"variants": {"a": {"weight": 1, "extra": 1}}}, "flags.f.variants.a.extra"),
        ({"variants": {"a": {"weight": 1}}, "defaultVariant": "z"}, "flags.f.defaultVariant"),
        (
            {"variants": {"a": {"weight": 1}}, "rules": [{"if": True, "variant": "nope"}]},
            "flags.f.rules[0].variant",
        ),
        (
            {"variants": {"a": {"weight": 1}}, "rules": [{"if": True, "rollout": {"a": 0}}]},
            "flags.f.rules[0].rollout",
        ),
        (
            {"variants": {"a": {"weight": 1}}, "rules": [{"if": {"frobnicate": [1]}, "variant": "a"}]},
            "flags.f.rules[0].if.frobnicate",
        ),
        ({"rules": [{"if": {"==": [1]}, "value": True}]}, "flags.f.rules[0].if.=="),
        ({"rules": [{"if": {"==": [1, 2], "!=": [1, 2]}, "value": True}]}, "flags.f.rules[0].if"),
        ({"rules": [{"if": {"regex": [{"var": "a"}, "("]}, "value": True}]}, "flags.f.rules[0].if.regex[1]"),
        (
            {"rules": [{"if": {"sem_ver": [{"var": "v"}, "~>", "1.0.0"]}, "value": True}]},
            "flags.f.rules[0].if.sem_ver[1]",
        ),
        (
            {"rules": [{"if": {"sem_ver": [{"var": "v"}, ">", "one"]}, "value": True}]},
            "flags.f.rules[0].if.sem_ver[2]",
        ),
        ({"rules": [{"if": True, "variant": "a"}]}, "flags.f.rules[0].variant"),
        ({"rules": [{"value": True}]}, "flags.f.rules[0].if"),
        ({"percentage": 101}, "flags.f.percentage"),
        ({"routes": ["api/*"]}, "flags.f.routes[0]"),
        ({"updatedAt": "yesterday"}, "flags.f.updatedAt"),
        ({"priority": 1.5}, "flags.f.priority"),
    ],
)
def test_invalid_definitions_name_flag_and_field(definition: dict[str, Any], path: str) -> None:
    with pytest.raises(FlagError) as info:
        compile_document({"flags": {"f": definition}})
    assert info.value.path == path, str(info.value)


def test_document_shape_errors() -> None:
    for doc, path in [([], "document"), ({"flags": []}, "flags"), ({"flags": {}, "x": 1}, "x")]:
        with pytest.raises(FlagError) as info:
            compile_document(doc)
        assert info.value.path == path


def test_routes_select_flags_by_path_glob() -> None:
    flag = compile_flag("r", {"routes": ["/api/*/orders", "/checkout/**"]})
    assert flag.applies_to("/api/v1/orders")
    assert not flag.applies_to("/api/v1/x/orders")
    assert flag.applies_to("/checkout/a/b/c")
    assert not flag.applies_to("/other")
    assert compile_flag("all", {}).applies_to("/anything")


def test_lone_surrogates_in_keys_hash_as_bytes_never_crash() -> None:
    flag = compile_flag("s", THRESHOLD)
    key = "user-\ud800-x"  # possible from JSON ("\ud800"), e.g. a JWT claim or a keys file
    expected = mmh3.hash(f"s:{key}".encode("utf-8", "surrogatepass"), 0, signed=False) % 10000
    weights = [("control", 50), ("treatment_a", 25), ("treatment_b", 25)]
    names = [n for n, _ in weights]
    bounds = [5000, 7500, 10000]
    assert flag.evaluate({"key": key}).value == names[next(i for i, b in enumerate(bounds) if expected < b)]
    assert flag.evaluate({"key": "café"}).value == expected_variant("s", "café", weights)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(st.text(), st.text(alphabet=st.characters(codec="utf-8")), st.integers(), st.none()),
    st.one_of(st.none(), st.text(max_size=5)),
    st.sampled_from(["key", "country"]),
)
def test_the_inlined_picker_equals_bucketing_then_picking(key: Any, bucketing_key: Any, by: str) -> None:
    from proxy.engine.bucketing import make_bucketer, make_picker

    bucket_of = make_bucketer(by, "salt-x")
    picker = make_picker(by, "salt-x", lambda b: ("picked", b), "default", bucket_of)
    context = {"key": key, "bucketingKey": bucketing_key, "country": key}
    b = bucket_of(context)
    assert picker(context) == ("default" if b is None else ("picked", b))
