"""SecAgg+ degree and threshold from the round size, dropout rate and corruption rate."""

from __future__ import annotations

import math

import pytest
from scipy.stats import hypergeom

from veil.assembly.secure_aggregation.secagg import settings_from_config
from veil.config import RunConfig
from veil.errors import UserError
from veil.privacy.secagg.parameters import secagg_plus_parameters


def _log2_union_tail(n: int, bad: int, degree: int, at_least: int) -> float:
    """An independent restatement of the bound: n · P[Hypergeometric ≥ at_least]."""
    p = hypergeom(n - 1, bad, degree).sf(at_least - 1) if at_least > 0 else 1.0
    return math.log2(n) + (math.log2(p) if p > 0 else -math.inf)


@pytest.mark.parametrize("n", [20, 50, 100, 400, 1000])
@pytest.mark.parametrize(("dropout", "corruption"), [(0.05, 0.05), (0.1, 0.1), (0.2, 0.02)])
def test_the_chosen_graph_meets_both_bounds_and_is_the_sparsest(
    n: int, dropout: float, corruption: float
) -> None:
    chosen = secagg_plus_parameters(n, dropout, corruption)
    if chosen.degree is None:
        return
    k, t = chosen.degree, chosen.threshold
    holders = k + 1
    assert k % 2 == 0 and 2 <= k < n - 1
    assert 3 * t > 2 * holders and t <= holders  # the protocol's own active-security bound
    bad, gone = math.floor(corruption * n), math.ceil(dropout * n)
    assert _log2_union_tail(n, bad, k, 2 * t - holders - 1) <= -40
    assert _log2_union_tail(n, gone, k, holders - t) <= -20
    # No sparser even degree has a threshold that meets both bounds.
    for smaller in range(2, k, 2):
        for u in range(2 * (smaller + 1) // 3 + 1, smaller + 2):
            ok_privacy = _log2_union_tail(n, bad, smaller, 2 * u - smaller - 2) <= -40
            ok_rounds = _log2_union_tail(n, gone, smaller, smaller + 1 - u) <= -20
            assert not (ok_privacy and ok_rounds), (smaller, u)


def test_more_corruption_or_dropout_needs_a_denser_graph() -> None:
    low = secagg_plus_parameters(1000, 0.05, 0.05).degree
    more_corrupt = secagg_plus_parameters(1000, 0.05, 0.15).degree
    more_dropout = secagg_plus_parameters(1000, 0.2, 0.05).degree
    assert low is not None and more_corrupt is not None and more_dropout is not None
    assert more_corrupt > low and more_dropout > low
    # Polylogarithmic: ten times the clients costs far less than ten times the degree.
    assert secagg_plus_parameters(10_000, 0.05, 0.05).degree < 2 * low  # type: ignore[operator]


def test_small_federations_and_bad_rates() -> None:
    assert secagg_plus_parameters(5, 0.2, 0.2).degree is None  # the complete graph
    with pytest.raises(ValueError, match="corruption_rate"):
        secagg_plus_parameters(100, 0.1, 0.4)
    with pytest.raises(ValueError, match="dropout_rate"):
        secagg_plus_parameters(100, 1.0, 0.1)


def _config(**secagg: object) -> RunConfig:
    return RunConfig.from_dict(
        {
            "secure_aggregation": "secagg",
            "data": {"dataset": "breast_cancer", "scaling": "local"},
            "model": {"name": "logistic"},
            "federation": {"clients": 40, "rounds": 1},
            "secagg": secagg,
        }
    )


def test_auto_in_the_config_takes_both_from_the_rates() -> None:
    cfg = _config(neighbours="auto", dropout_rate=0.1, corruption_rate=0.05)
    settings = settings_from_config(cfg.secagg, round_size=40)
    expected = secagg_plus_parameters(40, 0.1, 0.05)
    assert (settings.neighbours, settings.round_threshold) == (
        expected.degree,
        expected.threshold,
    )
    with pytest.raises(UserError, match="chooses the threshold"):
        _config(neighbours="auto", threshold=9)
