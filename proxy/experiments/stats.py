"""The statistics of an experiment's results: conversion rates, uplift against the control, and the
sample ratio mismatch (SRM) check.

The formulas are a contract shared by the origins, the CLI and the web console (docs/experiments.md,
"Statistics"). Standard library only: the proxy carries no scipy. Values keep full float precision;
a statistic that is undefined (no users, a control rate of 0, a standard error of 0) is ``None``,
never NaN or infinity, so results serialise as JSON ``null``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

Variant = str | bool  # a multivariate flag's variant name, or a boolean flag's value

Z_95 = 1.959964  # the two-sided 95 % quantile of the standard normal
SRM_ALPHA = 0.001  # an SRM p-value below this is a mismatch

_SQRT2 = math.sqrt(2.0)
_EPSILON = sys.float_info.epsilon
_TINY = sys.float_info.min  # keeps Lentz's denominators off zero
_MAX_TERMS = 100_000

_COMPARISON = ("uplift", "ci_low", "ci_high", "p_value", "chance_to_win")


def normal_cdf(x: float) -> float:
    """Φ(x), the standard normal CDF, as ``0.5·erfc(-x/√2)``: precise far into the lower tail."""
    return 0.5 * math.erfc(-x / _SQRT2)


def chi2_sf(x: float, df: int) -> float:
    """P(χ²_df ≥ x): the regularized upper incomplete gamma function Q(df/2, x/2).

    Relative error about 1e-13 for the few degrees of freedom of an experiment, down to results of
    ~1e-300 (about 1e-10 at df = 100,000); 0.0 once the result is below the floats' range.
    """
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"degrees of freedom must be a whole number >= 1, got {df!r}")
    if math.isnan(x):
        raise ValueError("chi-square statistic is NaN")
    if x <= 0.0:
        return 1.0
    if math.isinf(x):
        return 0.0
    return _upper_gamma_q(df / 2.0, x / 2.0)


def _upper_gamma_q(a: float, x: float) -> float:
    """Q(a, x) for a > 0, x > 0: 1 - the series of P(a, x) below x = a + 1, else Q's continued fraction."""
    log_prefix = a * math.log(x) - x - math.lgamma(a)  # log(x^a e^-x / Γ(a))
    if x < a + 1.0:
        # P(a, x) = x^a e^-x / Γ(a+1) · Σ_n x^n / ((a+1)…(a+n)); here Q stays above ~0.08
        term = total = 1.0 / a
        denominator = a
        for _ in range(_MAX_TERMS):
            denominator += 1.0
            term *= x / denominator
            total += term
            if abs(term) < abs(total) * _EPSILON:
                return max(0.0, 1.0 - total * math.exp(log_prefix))
        raise ArithmeticError(f"incomplete gamma series did not converge (a={a}, x={x})")
    # Q(a, x) = x^a e^-x / Γ(a) · 1/(x+1-a - 1·(1-a)/(x+3-a - 2·(2-a)/(x+5-a - …))), modified Lentz
    b = x + 1.0 - a
    c = 1.0 / _TINY
    d = 1.0 / b
    fraction = d
    for i in range(1, _MAX_TERMS):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        if abs(d) < _TINY:
            d = _TINY
        c = b + an / c
        if abs(c) < _TINY:
            c = _TINY
        d = 1.0 / d
        step = d * c
        fraction *= step
        if abs(step - 1.0) < _EPSILON:
            return math.exp(log_prefix + math.log(fraction))
    raise ArithmeticError(f"incomplete gamma continued fraction did not converge (a={a}, x={x})")


def _count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a whole number >= 0, got {value!r}")
    return value


def _distinct(names: Sequence[Variant], what: str) -> None:
    seen: set[Variant] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"variant {name!r} appears twice in {what}")
        seen.add(name)


def _rate(users: int, conversions: int) -> float | None:
    return conversions / users if users else None


def _comparison(p_t: float | None, n_t: int, p_c: float | None, n_c: int) -> dict[str, float | None]:
    """Uplift of a treatment over the control, its delta-method CI, p-value and chance to win."""
    result: dict[str, float | None] = dict.fromkeys(_COMPARISON)
    if p_t is None or p_c is None or p_c == 0.0:
        return result
    uplift = p_t / p_c - 1.0
    result["uplift"] = uplift
    variance = p_t * (1.0 - p_t) / (n_t * p_c**2) + p_t**2 * p_c * (1.0 - p_c) / (n_c * p_c**4)
    se = math.sqrt(variance)
    if not 0.0 < se < math.inf:
        return result
    z = uplift / se
    result["ci_low"] = uplift - Z_95 * se
    result["ci_high"] = uplift + Z_95 * se
    result["p_value"] = math.erfc(abs(z) / _SQRT2)  # = 2·(1 - Φ(|z|)), without losing tiny values
    result["chance_to_win"] = normal_cdf(z)
    return result


def variant_rows(arms: Sequence[tuple[Variant, int, int]]) -> list[dict[str, Any]]:
    """One row per arm ``(variant, users, conversions)``; the first arm is the control.

    The control row has ``variant``, ``users``, ``conversions`` and ``rate``; every other row adds
    ``uplift``, ``ci_low``, ``ci_high``, ``p_value`` and ``chance_to_win`` against the control.
    Conversions count converted users, so they cannot exceed the users (ValueError).
    """
    if not arms:
        raise ValueError("no arms: the first arm is the control")
    _distinct([name for name, _, _ in arms], "the arms")
    for name, users, conversions in arms:
        _count(users, f"users of {name!r}")
        _count(conversions, f"conversions of {name!r}")
        if conversions > users:
            raise ValueError(f"{name!r} has more conversions ({conversions}) than users ({users})")
    (control, n_c, x_c), *treatments = arms
    p_c = _rate(n_c, x_c)
    rows: list[dict[str, Any]] = [{"variant": control, "users": n_c, "conversions": x_c, "rate": p_c}]
    for name, n_t, x_t in treatments:
        p_t = _rate(n_t, x_t)
        row: dict[str, Any] = {"variant": name, "users": n_t, "conversions": x_t, "rate": p_t}
        row.update(_comparison(p_t, n_t, p_c, n_c))
        rows.append(row)
    return rows


def srm(observed: Sequence[tuple[Variant, int]], weights: Sequence[tuple[Variant, float]]) -> dict[str, Any]:
    """Chi-square goodness of fit of the users per variant against the flag's weights.

    Weights are normalised to sum 1; variants of weight 0 (and observed variants the weights do not
    name) are left out of the test, ``expected`` and ``observed``; a weighted variant nobody saw
    counts 0 users. ``p_value`` is ``None`` with fewer than 2 weighted variants or no users in them;
    ``mismatch`` is ``p_value < 0.001``.
    """
    _distinct([name for name, _ in observed], "the observed users")
    _distinct([name for name, _ in weights], "the weights")
    users = {name: _count(count, f"users of {name!r}") for name, count in observed}
    for name, weight in weights:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < math.inf:
            raise ValueError(f"weight of {name!r} must be a finite number >= 0, got {weight!r}")
    tested = [(name, float(weight)) for name, weight in weights if weight > 0]
    largest = max((weight for _, weight in tested), default=1.0)  # scaled first: no overflow in the sum
    total = math.fsum(weight / largest for _, weight in tested)
    expected = {name: (weight / largest) / total for name, weight in tested}
    counts = {name: users.get(name, 0) for name in expected}
    n = sum(counts.values())
    p_value: float | None = None
    if len(expected) >= 2 and n > 0:
        statistic = math.fsum(
            (counts[name] - n * share) ** 2 / (n * share) for name, share in expected.items()
        )
        p_value = chi2_sf(statistic, len(expected) - 1)
    return {
        "p_value": p_value,
        "mismatch": p_value is not None and p_value < SRM_ALPHA,
        "expected": expected,
        "observed": counts,
    }
