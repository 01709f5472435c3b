"""Property: ``explain`` (admin, CLI) tells the same story as the hot-path ``evaluate``.

Random native flag documents, valid by construction, and random contexts (odd attribute types
included): both must serve the same outcome, and explain's reason must fit the definition.
"""

from __future__ import annotations

import json
import string
from typing import Any

from hypothesis import event, given, settings
from hypothesis import strategies as st

from proxy.engine import Context, Flag, Served, compile_flag, make_bucketer, with_override
from proxy.engine.jsonlogic import compile_logic, truthy

ATTRS = ("country", "plan", "version", "age")
WORDS = ("NZ", "US", "FR", "pro", "free", "", "0", "1.2.0", "2.0.0-beta.1", "v1.10")
VERSIONS = ("1.0.0", "1.2.0", "2.0.0-beta.1", "2")
FAST = settings(max_examples=250, deadline=None, database=None)

# --- contexts -------------------------------------------------------------------------------------

constants = st.one_of(
    st.sampled_from(WORDS), st.integers(-5, 50), st.floats(-10, 100), st.booleans(), st.none()
)
scalars = st.one_of(constants, st.sampled_from([float("nan"), float("inf")]))  # contexts can hold anything
odd_values = st.one_of(
    scalars,
    st.lists(st.sampled_from(["NZ", "pro", 1, None]), max_size=3),
    st.dictionaries(st.sampled_from(["a", "b"]), st.integers(0, 3), max_size=2),
)
keys = st.one_of(
    st.text(string.ascii_letters + string.digits + "-", max_size=8),
    st.text(st.characters(exclude_categories=()), max_size=4),
    st.sampled_from(["user-1", "é", "\ud800x"]),  # non-ASCII, and a lone surrogate
    odd_values,
)
contexts = st.fixed_dictionaries(
    {},
    optional={"key": keys, "bucketingKey": keys, **{a: odd_values for a in ATTRS}},
)

# --- conditions -----------------------------------------------------------------------------------

var = st.sampled_from((*ATTRS, "key")).map(lambda a: {"var": a})
numbers = st.one_of(st.integers(-5, 50), st.floats(-10, 100))
leaves = st.one_of(
    st.booleans(),
    var,
    st.tuples(st.sampled_from(["==", "!=", "===", "!=="]), var, constants).map(
        lambda t: {t[0]: [t[1], t[2]]}
    ),
    st.tuples(var, st.lists(st.sampled_from(WORDS), max_size=3)).map(lambda t: {"in": list(t)}),
    st.tuples(st.sampled_from(["N", "pr", "1."]), var).map(lambda t: {"in": list(t)}),
    st.tuples(st.sampled_from(["<", "<=", ">", ">="]), var, numbers).map(lambda t: {t[0]: [t[1], t[2]]}),
    st.tuples(numbers, var, numbers).map(lambda t: {"<": list(t)}),  # between
    st.tuples(var, st.sampled_from(["N", "pr", "1.", ""])).map(lambda t: {"starts_with": list(t)}),
    st.tuples(var, st.sampled_from(["=", "!=", "<", ">=", "^", "~"]), st.sampled_from(VERSIONS)).map(
        lambda t: {"sem_ver": list(t)}
    ),
    st.lists(st.sampled_from(ATTRS), min_size=1, max_size=2).map(lambda names: {"missing": names}),
)
conditions = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, min_size=1, max_size=3).map(lambda cs: {"and": cs}),
        st.lists(inner, min_size=1, max_size=3).map(lambda cs: {"or": cs}),
        inner.map(lambda c: {"!": c}),
    ),
    max_leaves=4,
)

# --- documents ------------------------------------------------------------------------------------

flag_keys = st.text(string.ascii_lowercase + "-_", min_size=1, max_size=10)
percentages = st.one_of(st.integers(0, 100), st.floats(0, 100), st.sampled_from([0, 0.005, 99.995, 100]))
json_values = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text()
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=5,
)


@st.composite
def common(draw: st.DrawFn) -> dict[str, Any]:
    """Fields both kinds of flag share."""
    out: dict[str, Any] = {}
    if draw(st.integers(0, 3)) == 0:
        out["enabled"] = draw(st.booleans())  # absent means true
    if draw(st.booleans()):
        out["salt"] = draw(st.text(max_size=6))
    if draw(st.booleans()):
        out["bucketBy"] = draw(st.sampled_from(("key", *ATTRS)))
    return out


@st.composite
def boolean_flags(draw: st.DrawFn) -> dict[str, Any]:
    definition = draw(common())
    if draw(st.booleans()):
        definition["percentage"] = draw(percentages)
    if draw(st.integers(0, 3)):  # mostly with rules
        outcome = st.one_of(
            st.booleans().map(lambda v: {"value": v}), percentages.map(lambda p: {"percentage": p})
        )
        rules = st.tuples(conditions, outcome).map(lambda t: {"if": t[0], **t[1]})
        definition["rules"] = draw(st.lists(rules, max_size=4))
    return definition


@st.composite
def variant_flags(draw: st.DrawFn) -> dict[str, Any]:
    definition = draw(common())
    names = draw(st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=5, unique=True))
    variants: dict[str, Any] = {}
    for name in names:
        spec: dict[str, Any] = {}
        if draw(st.integers(0, 4)):  # mostly weighted; an absent weight is 0
            spec["weight"] = draw(st.integers(0, 100))
        if draw(st.booleans()):
            spec["config"] = draw(json_values)
        variants[name] = spec
    definition["variants"] = variants
    if draw(st.booleans()):
        definition["defaultVariant"] = draw(st.sampled_from(names))
    if draw(st.integers(0, 3)):  # mostly with rules
        rollout = st.dictionaries(st.sampled_from(names), st.integers(0, 100), min_size=1).map(
            lambda weights: weights if any(weights.values()) else {**weights, next(iter(weights)): 1}
        )
        outcome = st.one_of(
            st.sampled_from(names).map(lambda n: {"variant": n}), rollout.map(lambda r: {"rollout": r})
        )
        rules = st.tuples(conditions, outcome).map(lambda t: {"if": t[0], **t[1]})
        definition["rules"] = draw(st.lists(rules, max_size=4))
    if not any(spec.get("weight", 0) for spec in variants.values()):
        definition.setdefault("rules", [])  # all weights zero is valid only with rules (even none)
    return definition


# --- the property ---------------------------------------------------------------------------------


def same(a: Served, b: Served) -> bool:
    return (type(a.value), a.value, a.config, a.has_config) == (
        type(b.value),
        b.value,
        b.config,
        b.has_config,
    )


def matches(rule: dict[str, Any], ctx: Context) -> bool:
    return truthy(compile_logic(rule["if"])(ctx))


def check(key: str, definition: dict[str, Any], flag: Flag, ctx: Context) -> None:
    served = flag.evaluate(ctx)
    explained, why = flag.explain(ctx)
    assert same(served, explained), (served, explained, why)
    assert any(explained is s for s in flag.served), "explain must serve a declared (pre-encoded) outcome"
    json.dumps(why)  # the reason is shown as JSON

    reason = why["reason"]
    event(reason)  # --hypothesis-show-statistics: every reason should be exercised
    rules = definition.get("rules", [])
    bucket = make_bucketer(definition.get("bucketBy", "key"), definition.get("salt", key))(ctx)
    boolean = "variants" not in definition
    assert (reason == "disabled") == (definition.get("enabled", True) is False), why
    if reason == "disabled":
        assert explained is flag.default
        return

    if reason == "rule":
        index = why["rule"]
        assert 0 <= index < len(rules), why
        assert matches(rules[index], ctx)
        assert not any(matches(r, ctx) for r in rules[:index]), "the first matching rule wins"
        rule = rules[index]
        if "value" in rule or "variant" in rule:
            assert "bucket" not in why
            assert explained.value == rule.get("value", rule.get("variant"))
        elif bucket is None:  # a rollout or percentage with nothing to bucket by: said so
            assert "bucket" not in why and explained is flag.default and why["unbucketed"] is True
        else:
            assert why["bucket"] == bucket
            if "percentage" in rule:
                assert explained.value is (bucket < round(rule["percentage"] * 100))
            else:
                assert rule["rollout"].get(explained.value, 0) > 0
        return

    assert reason in {"split", "default", "fallthrough"}, why
    assert not any(matches(r, ctx) for r in rules), "a matching rule must be reported"
    if boolean:
        weighted = {True, False} if 0 < round(definition.get("percentage", 100) * 100) < 10_000 else set()
    else:
        weighted = {n for n, spec in definition["variants"].items() if spec.get("weight", 0) > 0}
    if reason == "split":
        assert bucket is not None and why["bucket"] == bucket and len(weighted) > 1
        assert explained.value in weighted
    elif reason == "default":
        assert bucket is None and len(weighted) > 1 and explained is flag.default
    else:
        assert len(weighted) <= 1, "fallthrough without a bucket only when one outcome is possible"


@FAST
@given(key=flag_keys, definition=boolean_flags(), ctxs=st.lists(contexts, min_size=1, max_size=4))
def test_boolean_flags_explain_what_they_evaluate(
    key: str, definition: dict[str, Any], ctxs: list[dict[str, Any]]
) -> None:
    flag = compile_flag(key, definition)
    for ctx in ctxs:
        check(key, definition, flag, ctx)


@FAST
@given(key=flag_keys, definition=variant_flags(), ctxs=st.lists(contexts, min_size=1, max_size=4))
def test_variant_flags_explain_what_they_evaluate(
    key: str, definition: dict[str, Any], ctxs: list[dict[str, Any]]
) -> None:
    flag = compile_flag(key, definition)
    for ctx in ctxs:
        check(key, definition, flag, ctx)


@settings(max_examples=200, deadline=None, database=None)
@given(
    key=flag_keys,
    definition=st.one_of(boolean_flags(), variant_flags()),
    kill=st.booleans(),
    promote=st.one_of(st.none(), st.booleans(), st.text(min_size=1, max_size=6)),
    declared=st.one_of(st.none(), st.integers(0, 4)),
    ctxs=st.lists(contexts, min_size=1, max_size=3),
)
def test_overrides_explain_what_they_evaluate(
    key: str,
    definition: dict[str, Any],
    kill: bool,
    promote: Any,
    declared: int | None,
    ctxs: list[dict[str, Any]],
) -> None:
    flag = compile_flag(key, definition)
    if declared is not None:  # often promote an outcome that exists
        promote = flag.served[declared % len(flag.served)].value
    overridden = with_override(flag, {"kill": kill, "promote": promote})
    target = flag.default if kill else flag.outcome(promote)
    if target is None:
        assert overridden is flag, "promoting an unknown outcome leaves the flag as defined"
        return
    for ctx in ctxs:
        served = overridden.evaluate(ctx)
        explained, why = overridden.explain(ctx)
        assert served is explained is target
        assert why == {"reason": "killed" if kill else "promoted"}
        why["reason"] = "tampered"  # each call gets its own reason
        assert overridden.explain(ctx)[1]["reason"] != "tampered"
