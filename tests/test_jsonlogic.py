"""JsonLogic operators as compiled closures, and the semver comparator."""

from __future__ import annotations

import operator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.engine.jsonlogic import LogicError, _ordered, compile_logic
from proxy.engine.semver import parse_semver

CTX = {
    "country": "US",
    "age": 30,
    "score": "7.5",
    "version": "v2.3.1",
    "user": {"plan": "pro", "tags": ["a", "b"], "org": {"id": 42}},
    "email": "ann@example.com",
    "empty": "",
    "flag": True,
}


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ({"var": "country"}, "US"),
        ({"var": "user.org.id"}, 42),
        ({"var": "user.tags.1"}, "b"),
        ({"var": ["nope", "fallback"]}, "fallback"),
        ({"var": "user.nope.deeper"}, None),
        ({"==": [{"var": "age"}, "30"]}, True),
        ({"==": [1, True]}, True),
        ({"==": [None, None]}, True),
        ({"==": [0, None]}, False),
        ({"===": [{"var": "age"}, "30"]}, False),
        ({"===": [{"var": "age"}, 30]}, True),
        ({"!==": [1, True]}, True),
        ({"!=": ["US", {"var": "country"}]}, False),
        ({"<": [{"var": "age"}, 31]}, True),
        ({"<": [1, {"var": "score"}, 8]}, True),
        ({"<": [1, {"var": "score"}, 7.5]}, False),
        ({"<=": [1, {"var": "score"}, 7.5]}, True),
        ({">": [{"var": "score"}, 7]}, True),
        ({">=": [{"var": "age"}, 30]}, True),
        ({">": [{"var": "missing"}, 0]}, False),
        ({"<": ["abc", "abd"]}, True),
        ({"in": ["US", ["US", "CA"]]}, True),
        ({"in": [{"var": "country"}, ["FR"]]}, False),
        ({"in": ["example", {"var": "email"}]}, True),
        ({"in": [1, "123"]}, False),
        ({"in": ["b", {"var": "user.tags"}]}, True),
        ({"and": [True, 1, "x"]}, "x"),
        ({"and": [True, 0, "x"]}, 0),
        ({"or": [False, "", "y"]}, "y"),
        ({"or": [False, []]}, []),
        ({"!": [{"var": "empty"}]}, True),
        ({"!": [[]]}, True),
        ({"!!": ["0"]}, True),
        ({"if": [{"==": [{"var": "country"}, "CA"]}, "ca", {"var": "flag"}, "flag", "other"]}, "flag"),
        ({"if": [False, 1]}, None),
        ({"missing": ["country", "nope", "user.plan", "empty"]}, ["nope", "empty"]),
        ({"missing_some": [1, ["nope", "country"]]}, []),
        ({"missing_some": [2, ["nope", "country"]]}, ["nope"]),
        ({"starts_with": [{"var": "email"}, "ann@"]}, True),
        ({"ends_with": [{"var": "email"}, "@example.com"]}, True),
        ({"ends_with": [{"var": "age"}, "0"]}, False),
        ({"sem_ver": [{"var": "version"}, ">=", "2.3.0"]}, True),
        ({"sem_ver": [{"var": "version"}, "<", "2.3.1"]}, False),
        ({"sem_ver": [{"var": "version"}, "^", "2.0.0"]}, True),
        ({"sem_ver": [{"var": "version"}, "~", "2.4.0"]}, False),
        ({"sem_ver": [{"var": "version"}, "!=", "2.3.1"]}, False),
        ({"sem_ver": [{"var": "missing"}, "=", "1.0.0"]}, False),
        ({"regex": [{"var": "email"}, "^[a-z]+@example\\.com$"]}, True),
        ({"regex": [{"var": "age"}, "3"]}, False),
        ([1, {"var": "country"}], [1, "US"]),
    ],
)
def test_operator(expr: Any, expected: Any) -> None:
    assert compile_logic(expr)(CTX) == expected


def test_dynamic_operands_are_evaluated_per_call() -> None:
    f = compile_logic({"regex": [{"var": "s"}, {"var": "p"}]})
    assert f({"s": "abc", "p": "b"}) is True
    assert f({"s": "abc", "p": "("}) is False  # a bad runtime pattern is simply false
    g = compile_logic({"sem_ver": [{"var": "a"}, ">", {"var": "b"}]})
    assert g({"a": "1.10.0", "b": "1.9.9"}) is True
    assert g({"a": "1.10.0", "b": "garbage"}) is False


@pytest.mark.parametrize(
    ("expr", "where"),
    [
        ({"nope": [1]}, "if.nope"),
        ({"==": [1, 2, 3]}, "if.=="),
        ({"<": [1]}, "if.<"),
        ({"and": [{"or": [{"bogus": 1}]}]}, "if.and[0].or[0].bogus"),
        ({"a": 1, "b": 2}, "if"),
        ({"regex": ["x", 5]}, "if.regex[1]"),
        ({"sem_ver": ["1.0.0", {"var": "op"}, "1.0.0"]}, "if.sem_ver[1]"),
    ],
)
def test_malformed_expressions_are_rejected_at_compile_time(expr: Any, where: str) -> None:
    with pytest.raises(LogicError) as info:
        compile_logic(expr)
    assert info.value.path == where


def test_deep_nesting_is_rejected_not_a_recursion_error() -> None:
    expr: Any = True
    for _ in range(500):
        expr = {"!": [expr]}
    with pytest.raises(LogicError):
        compile_logic(expr)


@pytest.mark.parametrize(
    ("lower", "higher"),
    [
        ("1.0.0-alpha", "1.0.0-alpha.1"),
        ("1.0.0-alpha.1", "1.0.0-alpha.beta"),
        ("1.0.0-beta.2", "1.0.0-beta.11"),
        ("1.0.0-rc.1", "1.0.0"),
        ("1.9.0", "1.10.0"),
        ("v1", "1.0.1"),
    ],
)
def test_semver_precedence(lower: str, higher: str) -> None:
    a, b = parse_semver(lower), parse_semver(higher)
    assert a is not None and b is not None
    assert a.key() < b.key()


def test_semver_build_metadata_ignored_and_bad_input() -> None:
    assert parse_semver("1.2.3+build.5") == parse_semver("1.2.3")
    for bad in ("", "1.2.3.4", "01.2.3", "x", None, [], "1.2.3-"):
        assert parse_semver(bad) is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=2)
    ),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(expr=json_values, ctx=st.dictionaries(st.text(max_size=4), json_values, max_size=4))
def test_compiler_fuzz_never_raises_anything_but_logic_error(expr: Any, ctx: dict[str, Any]) -> None:
    try:
        f = compile_logic(expr)
    except LogicError:
        return
    f(ctx)  # evaluating a compiled expression never raises


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.text(max_size=6),
        st.from_regex(r"\s*[+-]?\d{0,4}(\.\d*)?([eE][+-]?\d)?\s*", fullmatch=True),
        st.sampled_from(["nan", "inf", " 1_0 ", "", " ", "\u2003 5", "0\x1f"]),
    ),
    st.one_of(st.integers(-1000, 1000), st.floats(allow_nan=False)),
)
def test_ordering_a_string_against_a_number_coerces_like_the_general_path(
    value: str, constant: float
) -> None:
    """The fast path for ``{"<": [{"var": "key"}, 1000]}`` agrees with JsonLogic's coercion."""

    for op, compare in (("<", operator.lt), ("<=", operator.le), (">", operator.gt), (">=", operator.ge)):
        pair = _ordered(value, constant)
        expected = pair is not None and compare(pair[0], pair[1])
        assert compile_logic({op: [{"var": "x"}, constant]})({"x": value}) is expected, (op, value, constant)
