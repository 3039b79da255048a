"""The one-run ε lower bound (Steinke, Nasr & Jagielski 2023) and its Clopper–Pearson core."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binom

from veil.privacy.audit.bounds import clopper_pearson_lower, epsilon_lower_bound, p_value


def test_known_values_of_the_one_run_bound() -> None:
    """m = 500 canaries, 100 guesses all right, δ = 1e-5: ε ≥ 3.4792 at 95 % and ≥ 3.0232 at
    99 %, the values that an independent audit with the paper's reference code reports
    (codedp-cpt-models, starcoder2-7b/base/audit_results.json); ours agree to 1e-6."""
    assert epsilon_lower_bound(500, 100, 100, delta=1e-5, confidence=0.95) == pytest.approx(
        3.4791953936, abs=1e-6
    )
    assert epsilon_lower_bound(500, 100, 100, delta=1e-5, confidence=0.99) == pytest.approx(
        3.0231975541, abs=1e-6
    )


def test_perfect_guesses_without_delta_have_a_closed_form() -> None:
    # δ = 0, v = r: P[Binomial(r, p) >= r] = p^r = α gives p = α^(1/r), ε = logit(p).
    for r in (10, 100, 1000):
        p = 0.05 ** (1 / r)
        expected = math.log(p / (1 - p))
        assert epsilon_lower_bound(r, r, r, delta=0, confidence=0.95) == pytest.approx(expected)


def test_clopper_pearson_limit_is_exact() -> None:
    for v, r in ((1, 10), (30, 50), (77, 100), (100, 100)):
        p = clopper_pearson_lower(v, r, 0.95)
        assert binom.sf(v - 1, r, p) == pytest.approx(0.05, rel=1e-6)  # P[B >= v] = α there
    assert clopper_pearson_lower(0, 10, 0.95) == 0.0


def test_the_bound_is_where_the_p_value_reaches_the_level() -> None:
    eps = epsilon_lower_bound(1000, 400, 300, delta=1e-5, confidence=0.95)
    assert 0 < eps < 2
    assert p_value(1000, 400, 300, eps, 1e-5) == pytest.approx(0.05, rel=1e-6)
    assert p_value(1000, 400, 300, eps * 0.99, 1e-5) < 0.05


def test_monotone_in_the_evidence() -> None:
    base = epsilon_lower_bound(1000, 200, 160, delta=1e-5, confidence=0.95)
    assert epsilon_lower_bound(1000, 200, 170, delta=1e-5, confidence=0.95) > base
    assert epsilon_lower_bound(1000, 200, 160, delta=1e-5, confidence=0.99) < base
    assert epsilon_lower_bound(1000, 200, 160, delta=0.0, confidence=0.95) > base
    assert epsilon_lower_bound(1000, 200, 160, delta=1e-3, confidence=0.95) < base


def test_chance_level_guesses_give_no_bound() -> None:
    assert epsilon_lower_bound(1000, 200, 100, delta=1e-5, confidence=0.95) == 0.0
    assert epsilon_lower_bound(1000, 0, 0, delta=1e-5, confidence=0.95) == 0.0
    assert p_value(10, 10, 0, 1.0, 0.0) == 1.0


@settings(max_examples=60, deadline=None)
@given(r=st.integers(1, 500), data=st.data())
def test_without_delta_the_bound_is_the_logit_of_clopper_pearson(
    r: int, data: st.DataObject
) -> None:
    v = data.draw(st.integers(0, r))
    p = clopper_pearson_lower(v, r, 0.95)
    expected = math.log(p / (1 - p)) if p > 0.5 else 0.0
    assert epsilon_lower_bound(r, r, v, delta=0, confidence=0.95) == pytest.approx(expected)


def test_validity_on_a_mechanism_that_is_exactly_epsilon_dp() -> None:
    """Randomized response with ε = 1 (each guess right with probability e/(1+e)) is exactly
    1-DP per canary; the 95 % lower bound may exceed 1 in at most 5 % of audits. Over 400
    seeded audits the observed rate must stay below 8 % (the binomial 99.9 % quantile of 400
    draws at 5 % is 33, i.e. 8.25 %)."""
    rng = np.random.default_rng(7)
    eps, m, audits = 1.0, 200, 400
    accuracy = math.exp(eps) / (1 + math.exp(eps))
    correct = rng.binomial(m, accuracy, size=audits)
    bounds = [epsilon_lower_bound(m, m, int(v), delta=0, confidence=0.95) for v in correct]
    assert np.mean(np.array(bounds) > eps) < 0.08
    assert np.median(bounds) > 0.3  # and the bound is informative, not trivially 0


def test_invalid_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="guesses"):
        epsilon_lower_bound(10, 20, 5, delta=0, confidence=0.95)
    with pytest.raises(ValueError, match="confidence"):
        clopper_pearson_lower(1, 2, 1.0)
