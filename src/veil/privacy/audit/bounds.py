"""From canary guesses to an empirical ε lower bound (Steinke, Nasr & Jagielski 2023).

One-run auditing ("Privacy Auditing with One (1) Training Run", Steinke, Nasr & Jagielski,
NeurIPS 2023, arXiv:2305.08846): m canaries are each included in the training data
independently with probability 1/2; after training, the auditor guesses "in" or "out" for r of
them (abstaining on the rest) and counts its correct guesses v. The paper's main theorem, in its
(ε, δ) form, states that if training is (ε, δ)-DP with respect to each canary, then for every v

    P[W ≥ v] ≤ f(v) + 2mδ · max_{i = 1..v} (f(v − i) − f(v)) / i,
    f(v) = P[Binomial(r, e^ε / (1 + e^ε)) ≥ v],

where W counts the correct guesses (f(v − i) − f(v) = P[v − i ≤ Binomial < v]). The right-hand
side is therefore a p-value for the hypothesis "the mechanism is (ε, δ)-DP" (`p_value`), and the
largest ε that this p-value rejects at level 1 − confidence is a lower bound on the true ε that
holds with that confidence (`epsilon_lower_bound`); the paper's appendix gives the same
computation as a p-value plus a bisection.

With δ = 0 the bound is the one-sided Clopper–Pearson lower confidence limit p̂ of the guessing
accuracy (`clopper_pearson_lower`, Clopper & Pearson 1934), mapped through ε = log(p̂/(1 − p̂)):
P[Binomial(r, p) ≥ v] ≤ α exactly when p ≤ p̂. The δ term only raises the p-value, so the δ > 0
bound lies in [0, that ε] and is found there by root finding.

A lower bound is evidence, not proof: it says that a mechanism with a smaller ε would have produced
this many correct guesses with probability below 1 − confidence. A small lower bound does not show
that the mechanism is private.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import brentq
from scipy.stats import beta, binom

__all__ = [
    "clopper_pearson_interval",
    "clopper_pearson_lower",
    "epsilon_lower_bound",
    "p_value",
]


def _check_counts(m: int, r: int, v: int) -> None:
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct <= guesses <= canaries, got v={v}, r={r}, m={m}")


def clopper_pearson_lower(successes: int, trials: int, confidence: float) -> float:
    """The one-sided Clopper–Pearson lower confidence limit of a binomial success probability.

    The largest p with P[Binomial(trials, p) ≥ successes] ≤ 1 − confidence, i.e. the
    (1 − confidence) quantile of Beta(successes, trials − successes + 1); 0 for no successes.
    """
    if not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials, got {successes} of {trials}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if successes == 0:
        return 0.0
    return float(beta.ppf(1.0 - confidence, successes, trials - successes + 1))


def clopper_pearson_interval(successes: int, trials: int, confidence: float) -> tuple[float, float]:
    """The two-sided Clopper–Pearson ("exact") confidence interval of a binomial proportion.

    Each side has error (1 − confidence)/2: the lower limit is the (1 − confidence)/2 quantile of
    Beta(successes, trials − successes + 1) (0 for no successes), the upper limit the
    (1 + confidence)/2 quantile of Beta(successes + 1, trials − successes) (1 when all succeed).
    Its coverage is at least `confidence` for every true proportion. No trials give (0, 1).
    """
    if not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials, got {successes} of {trials}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if trials == 0:
        return 0.0, 1.0
    tail = (1.0 - confidence) / 2.0
    lower = 0.0 if successes == 0 else float(beta.ppf(tail, successes, trials - successes + 1))
    upper = (
        1.0
        if successes == trials
        else float(beta.ppf(1.0 - tail, successes + 1, trials - successes))
    )
    return lower, upper


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P-value of v or more correct guesses out of r (m canaries) under "(ε, δ)-DP".

    The right-hand side of Steinke et al. 2023's main theorem (see the module docstring), capped
    at 1.
    """
    _check_counts(m, r, v)
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and 0 <= delta <= 1, got {epsilon}, {delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of ε-DP randomized response
    tail = float(binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    # (f(v - i) - f(v)) / i = P[v - i <= Binomial < v] / i, maximised over i = 1..v.
    below = binom.pmf(np.arange(v - 1, -1, -1), r, q)
    alpha = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(tail + 2.0 * m * delta * alpha, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, *, delta: float, confidence: float) -> float:
    """The largest ε that v correct guesses out of r (m canaries) reject at `confidence`.

    With probability at least `confidence` over the canaries' inclusion and the training
    randomness, the mechanism is not (ε', δ)-DP for any ε' below the returned value. Returns 0
    when even ε = 0 is not rejected (e.g. no better than chance).
    """
    _check_counts(m, r, v)
    if not 0 <= delta <= 1:
        raise ValueError(f"delta must lie in [0, 1], got {delta}")
    if r == 0:
        return 0.0
    accuracy = clopper_pearson_lower(v, r, confidence)
    if accuracy <= 0.5:
        return 0.0
    # The δ = 0 bound: p_value(ε) = 1 − confidence exactly at ε = logit(accuracy).
    upper = math.log(accuracy / (1.0 - accuracy)) if accuracy < 1 else math.inf
    if delta == 0:
        return upper
    alpha = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0

    def excess(epsilon: float) -> float:
        return p_value(m, r, v, epsilon, delta) - alpha

    if excess(upper) <= 0:  # the δ term vanished to rounding
        return upper
    return float(brentq(excess, 0.0, upper, xtol=1e-9, rtol=1e-12))
