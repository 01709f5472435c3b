"""proxy.experiments.stats against an independent oracle: scipy.stats and the formulas of
docs/experiments.md written out again here (the delta method in its relative-variance form), plus the
figures of the reference 14-day test as the issue states them.
"""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as scipy_stats

from proxy.experiments import stats
from proxy.experiments.stats import chi2_sf, normal_cdf, srm, variant_rows

Z_95 = 1.959964  # the contract's constant (docs/experiments.md)
COMPARISON = ("uplift", "ci_low", "ci_high", "p_value", "chance_to_win")
REFERENCE = [("control", 1412, 183), ("treatment_a", 1396, 232), ("treatment_b", 1392, 257)]
REFERENCE_USERS = [(name, users) for name, users, _ in REFERENCE]


def oracle(n_t: int, x_t: int, n_c: int, x_c: int) -> dict[str, float | None]:
    """A treatment's comparison with the control, from scipy.

    se² = (p_t/p_c)² · ((1-p_t)/(n_t·p_t) + (1-p_c)/(n_c·p_c)) is the delta method for a ratio of
    rates: algebraically the contract's p_t(1-p_t)/(n_t·p_c²) + p_t²·p_c(1-p_c)/(n_c·p_c⁴), written
    differently so that a slip in either shows.
    """
    undefined: dict[str, float | None] = dict.fromkeys(COMPARISON)
    if n_t == 0 or n_c == 0 or x_c == 0:
        return undefined
    p_t, p_c = x_t / n_t, x_c / n_c
    uplift = p_t / p_c - 1
    if x_t == 0:  # se = 0
        return {**undefined, "uplift": uplift}
    se = (p_t / p_c) * math.sqrt((1 - p_t) / (n_t * p_t) + (1 - p_c) / (n_c * p_c))
    if se == 0:
        return {**undefined, "uplift": uplift}
    z = uplift / se
    return {
        "uplift": uplift,
        "ci_low": uplift - Z_95 * se,
        "ci_high": uplift + Z_95 * se,
        "p_value": float(2 * scipy_stats.norm.sf(abs(z))),
        "chance_to_win": float(scipy_stats.norm.cdf(z)),
    }


def close(got: float | None, want: float | None, rel: float = 1e-9) -> bool:
    if got is None or want is None:
        return got is None and want is None
    return math.isclose(got, want, rel_tol=rel, abs_tol=1e-300)


def assert_matches(row: dict[str, Any], want: dict[str, float | None], rel: float = 1e-9) -> None:
    for field in COMPARISON:
        assert close(row[field], want[field], rel), (field, row[field], want[field])


def finite_or_none(value: Any) -> bool:
    return value is None or not isinstance(value, float) or math.isfinite(value)


# --- the reference test ------------------------------------------------------------------------------


def test_the_reference_table_as_the_issue_states_it() -> None:
    control, a, b = variant_rows(REFERENCE)
    assert control == {"variant": "control", "users": 1412, "conversions": 183, "rate": 183 / 1412}
    assert control["rate"] == pytest.approx(0.129603, abs=5e-7)
    assert a["rate"] == pytest.approx(0.166189, abs=5e-7)
    assert a["uplift"] == pytest.approx(0.28229, abs=5e-6)
    assert a["ci_low"] == pytest.approx(0.05263, abs=5e-6)
    assert a["ci_high"] == pytest.approx(0.51195, abs=5e-6)
    assert a["p_value"] == pytest.approx(0.01599, abs=5e-6)
    assert a["chance_to_win"] == pytest.approx(0.99200, abs=5e-6)
    assert round(b["uplift"], 3) == 0.425  # +42.5 %
    assert set(a) == set(b) == {"variant", "users", "conversions", "rate", *COMPARISON}


def test_the_reference_table_against_scipy() -> None:
    treatments = variant_rows(REFERENCE)[1:]
    _, n_c, x_c = REFERENCE[0]
    for row, (name, n_t, x_t) in zip(treatments, REFERENCE[1:], strict=True):
        assert (row["variant"], row["users"], row["conversions"], row["rate"]) == (name, n_t, x_t, x_t / n_t)
        assert_matches(row, oracle(n_t, x_t, n_c, x_c), rel=1e-12)


def test_the_contract_constant_is_the_normal_975_quantile() -> None:
    assert stats.Z_95 == Z_95
    assert abs(Z_95 - float(scipy_stats.norm.ppf(0.975))) < 1e-6


def test_the_oracle_tells_the_contract_from_its_usual_look_alikes() -> None:
    """These checks can fail: a neighbouring formula moves the reference figures past the tolerance."""
    _, n_c, x_c = REFERENCE[0]
    _, n_t, x_t = REFERENCE[1]
    p_c, p_t = x_c / n_c, x_t / n_t
    row = variant_rows(REFERENCE[:2])[1]
    uplift = p_t / p_c - 1
    look_alikes = {
        # the standard error of the absolute difference, divided by the control rate
        "difference": math.sqrt(p_t * (1 - p_t) / n_t + p_c * (1 - p_c) / n_c) / p_c,
        # the control's variance term left out
        "treatment only": math.sqrt(p_t * (1 - p_t) / (n_t * p_c**2)),
        # p_c³ for p_c⁴ in the second term
        "one power short": math.sqrt(
            p_t * (1 - p_t) / (n_t * p_c**2) + p_t**2 * p_c * (1 - p_c) / (n_c * p_c**3)
        ),
    }
    for name, se in look_alikes.items():
        assert not close(row["ci_low"], uplift - Z_95 * se, rel=1e-6), name
        assert not close(row["p_value"], float(2 * scipy_stats.norm.sf(uplift / se)), rel=1e-6), name
    one_sided = float(scipy_stats.norm.sf(abs(row["uplift"]) / ((row["ci_high"] - row["uplift"]) / Z_95)))
    assert not close(row["p_value"], one_sided, rel=1e-6)


def test_srm_of_the_reference_split_against_a_50_25_25_flag() -> None:
    result = srm(REFERENCE_USERS, [("control", 50), ("treatment_a", 25), ("treatment_b", 25)])
    want = scipy_stats.chisquare([1412, 1396, 1392], [2100, 1050, 1050]).pvalue
    assert result["p_value"] == pytest.approx(float(want), rel=1e-11)
    assert 1e-99 < result["p_value"] < 1e-97  # p ≈ 1e-98
    assert result["mismatch"] is True
    assert result["expected"] == {"control": 0.5, "treatment_a": 0.25, "treatment_b": 0.25}
    assert result["observed"] == {"control": 1412, "treatment_a": 1396, "treatment_b": 1392}


def test_srm_of_the_reference_split_against_equal_weights() -> None:
    result = srm(REFERENCE_USERS, [("control", 1), ("treatment_a", 1), ("treatment_b", 1)])
    want = scipy_stats.chisquare([1412, 1396, 1392]).pvalue
    assert result["p_value"] == pytest.approx(float(want), rel=1e-12)
    assert result["p_value"] == pytest.approx(0.923, abs=5e-4)
    assert result["mismatch"] is False
    assert result["expected"] == pytest.approx({"control": 1 / 3, "treatment_a": 1 / 3, "treatment_b": 1 / 3})


# --- undefined statistics are None ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arms", "defined"),
    [
        ([("c", 0, 0), ("t", 10, 3)], set()),  # no control users
        ([("c", 10, 3), ("t", 0, 0)], set()),  # no treatment users
        ([("c", 10, 0), ("t", 10, 3)], set()),  # p_c = 0
        ([("c", 10, 3), ("t", 10, 0)], {"uplift"}),  # p_t = 0: se = 0
        ([("c", 10, 10), ("t", 10, 10)], {"uplift"}),  # both 1: se = 0
        ([("c", 10, 3), ("t", 10, 10)], set(COMPARISON)),  # p_t = 1 alone still varies through p_c
    ],
)
def test_undefined_statistics_are_none(arms: list[tuple[str, int, int]], defined: set[str]) -> None:
    control, row = variant_rows(arms)
    assert {field for field in COMPARISON if row[field] is not None} == defined
    assert (control["rate"] is None) == (arms[0][1] == 0)
    assert (row["rate"] is None) == (arms[1][1] == 0)
    json.dumps([control, row], allow_nan=False)


def test_a_boolean_flag_keeps_its_variants_as_json_booleans() -> None:
    rows = variant_rows([(False, 100, 10), (True, 100, 20)])
    assert [row["variant"] for row in rows] == [False, True]
    result = srm([(False, 100), (True, 100)], [(False, 50), (True, 50)])
    assert json.loads(json.dumps(result))["observed"] == {"false": 100, "true": 100}


@pytest.mark.parametrize(
    "arms",
    [
        [],
        [("c", 10, 11), ("t", 10, 1)],
        [("c", -1, 0), ("t", 10, 1)],
        [("c", 10, -1), ("t", 10, 1)],
        [("c", 10, 1), ("c", 10, 1)],
        [("c", True, 0), ("t", 10, 1)],
        [("c", 10.0, 1), ("t", 10, 1)],
    ],
)
def test_variant_rows_refuses_impossible_counts(arms: list[tuple[str, Any, Any]]) -> None:
    with pytest.raises(ValueError):
        variant_rows(arms)


def test_srm_skips_zero_weights_and_needs_two_weighted_variants() -> None:
    result = srm([("a", 500), ("b", 520), ("off", 7)], [("a", 1), ("b", 1), ("off", 0)])
    assert result["expected"] == {"a": 0.5, "b": 0.5}
    assert result["observed"] == {"a": 500, "b": 520}
    assert result["p_value"] == pytest.approx(float(scipy_stats.chisquare([500, 520]).pvalue), rel=1e-12)
    alone = srm([("a", 500), ("b", 3)], [("a", 100), ("b", 0)])
    assert (alone["p_value"], alone["mismatch"], alone["expected"]) == (None, False, {"a": 1.0})
    nobody = srm([], [("a", 1), ("b", 1)])
    assert (nobody["p_value"], nobody["mismatch"], nobody["observed"]) == (None, False, {"a": 0, "b": 0})
    unseen = srm([("a", 90)], [("a", 1), ("b", 1)])  # a weighted variant nobody saw counts 0
    assert unseen["observed"] == {"a": 90, "b": 0} and unseen["mismatch"] is True


@pytest.mark.parametrize(
    ("observed", "weights"),
    [
        ([("a", -1), ("b", 1)], [("a", 1), ("b", 1)]),
        ([("a", 1), ("b", 1)], [("a", -1), ("b", 1)]),
        ([("a", 1), ("b", 1)], [("a", math.nan), ("b", 1)]),
        ([("a", 1), ("b", 1)], [("a", math.inf), ("b", 1)]),
        ([("a", 1), ("a", 1)], [("a", 1), ("b", 1)]),
        ([("a", 1), ("b", 1)], [("a", 1), ("a", 1)]),
    ],
)
def test_srm_refuses_impossible_inputs(
    observed: list[tuple[str, Any]], weights: list[tuple[str, Any]]
) -> None:
    with pytest.raises(ValueError):
        srm(observed, weights)


# --- properties against scipy ---------------------------------------------------------------------------


@st.composite
def arm(draw: st.DrawFn, max_users: int = 10_000_000) -> tuple[int, int]:
    users = draw(st.one_of(st.integers(0, 50), st.integers(0, max_users)))
    conversions = draw(st.one_of(st.sampled_from([0, users]), st.integers(0, users)))
    return users, conversions


@settings(max_examples=600, deadline=None, database=None)
@given(control=arm(), treatment=arm())
def test_rows_match_scipy_and_are_null_exactly_when_undefined(
    control: tuple[int, int], treatment: tuple[int, int]
) -> None:
    (n_c, x_c), (n_t, x_t) = control, treatment
    rows = variant_rows([("control", n_c, x_c), ("treatment", n_t, x_t)])
    json.dumps(rows, allow_nan=False)  # never NaN or infinity
    assert all(finite_or_none(value) for row in rows for value in row.values())
    assert rows[0]["rate"] == (x_c / n_c if n_c else None)
    assert rows[1]["rate"] == (x_t / n_t if n_t else None)
    row = rows[1]
    assert_matches(row, oracle(n_t, x_t, n_c, x_c))
    undefined_uplift = n_t == 0 or n_c == 0 or x_c == 0
    zero_se = x_t == 0 or (x_t == n_t and x_c == n_c)
    assert (row["uplift"] is None) == undefined_uplift
    for field in COMPARISON[1:]:
        assert (row[field] is None) == (undefined_uplift or zero_se), field
    if row["p_value"] is not None:
        assert 0.0 <= row["p_value"] <= 1.0 and 0.0 <= row["chance_to_win"] <= 1.0
        assert row["ci_low"] < row["uplift"] < row["ci_high"]


@settings(max_examples=600, deadline=None, database=None)
@given(
    df=st.integers(1, 20),
    x=st.one_of(
        st.floats(1e-12, 1.0),
        st.floats(1.0, 100.0),
        st.floats(100.0, 1300.0),  # the far tail: sf down to ~1e-270
    ),
)
def test_chi2_sf_agrees_with_scipy(df: int, x: float) -> None:
    want = float(scipy_stats.chi2.sf(x, df))
    got = chi2_sf(x, df)
    assert math.isfinite(got) and 0.0 <= got <= 1.0
    if want >= 1e-300:
        assert math.isclose(got, want, rel_tol=1e-11), (got, want)
    else:
        assert got < 1e-290


@pytest.mark.parametrize("df", range(1, 21))
@pytest.mark.parametrize("p", [0.5, 1e-3, 1e-10, 1e-50, 1e-100, 1e-200, 1e-250, 1e-300])
def test_chi2_sf_in_the_tails(df: int, p: float) -> None:
    x = float(scipy_stats.chi2.isf(p, df))
    assert chi2_sf(x, df) == pytest.approx(float(scipy_stats.chi2.sf(x, df)), rel=1e-11)


def test_chi2_sf_edges() -> None:
    assert chi2_sf(0.0, 3) == 1.0 and chi2_sf(-1.0, 1) == 1.0 and chi2_sf(math.inf, 2) == 0.0
    assert chi2_sf(1e6, 2) == 0.0  # below the floats' range
    assert chi2_sf(1e-300, 1) == pytest.approx(float(scipy_stats.chi2.sf(1e-300, 1)), rel=1e-12)
    for bad_df in (0, -1, True, 1.5):
        with pytest.raises(ValueError):
            chi2_sf(1.0, bad_df)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        chi2_sf(math.nan, 1)


@settings(max_examples=300, deadline=None, database=None)
@given(x=st.one_of(st.floats(-40.0, 40.0), st.floats(-1e3, 1e3)))
def test_normal_cdf_agrees_with_scipy(x: float) -> None:
    assert close(normal_cdf(x), float(scipy_stats.norm.cdf(x)), rel=1e-12)


@settings(max_examples=400, deadline=None, database=None)
@given(
    variants=st.lists(
        st.tuples(st.integers(0, 2_000_000), st.one_of(st.just(0.0), st.floats(0.01, 1000.0))),
        min_size=1,
        max_size=8,
    )
)
def test_srm_matches_scipy_chisquare(variants: list[tuple[int, float]]) -> None:
    names = [f"v{i}" for i in range(len(variants))]
    result = srm(
        [(name, users) for name, (users, _) in zip(names, variants, strict=True)],
        [(name, weight) for name, (_, weight) in zip(names, variants, strict=True)],
    )
    json.dumps(result, allow_nan=False)
    tested = [
        (name, users, weight) for name, (users, weight) in zip(names, variants, strict=True) if weight > 0
    ]
    total_weight = sum(weight for _, _, weight in tested)
    assert result["expected"] == pytest.approx({name: weight / total_weight for name, _, weight in tested})
    assert result["observed"] == {name: users for name, users, _ in tested}
    n = sum(users for _, users, _ in tested)
    if len(tested) < 2 or n == 0:
        assert (result["p_value"], result["mismatch"]) == (None, False)
        return
    observed = [users for _, users, _ in tested]
    expected = [n * weight / total_weight for _, _, weight in tested]
    want = float(scipy_stats.chisquare(observed, expected).pvalue)
    assert close(result["p_value"], want, rel=1e-9), (result["p_value"], want)
    assert result["mismatch"] == (result["p_value"] < 0.001)


# --- what it may import ---------------------------------------------------------------------------------


def test_stats_imports_the_standard_library_only() -> None:
    """The proxy ships without scipy: the statistics are plain ``math``."""
    tree = ast.parse(Path(stats.__file__).read_text(encoding="utf-8"))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "math", "sys", "collections.abc", "typing"}, imported
