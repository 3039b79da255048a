"""DP statistics: integer outputs, the noise distribution, clamping, federation, validation.

OpenDP cannot be seeded, so these tests check distributions. Each variance check compares the
sample variance s² of n releases with the stated variance σ² and allows five standard errors of
s², SE = sqrt((μ₄ − σ⁴) / n), with μ₄ the exact fourth central moment of the noise (computed from
its probability mass function): a false failure has probability below 1e-6.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from veil.errors import UserError
from veil.privacy.dp.queries import (
    QuerySpec,
    _calibrate,
    _measurement,
    answer,
    noise_variance,
    partial_aggregate,
    query_csv,
    read_column,
    release,
)

DRAWS = 4000


def _moments(mechanism: str, scale: float) -> tuple[float, float]:
    """Variance and fourth central moment of the integer noise, from its mass function."""
    support = np.arange(-80 * math.ceil(scale), 80 * math.ceil(scale) + 1, dtype=np.float64)
    if mechanism == "laplace":
        weights = np.exp(-np.abs(support) / scale)
    else:
        weights = np.exp(-(support**2) / (2 * scale**2))
    weights /= weights.sum()
    return float((support**2 * weights).sum()), float((support**4 * weights).sum())


def _assert_variance(draws: npt.NDArray[np.float64], mechanism: str, scale: float) -> None:
    var, mu4 = _moments(mechanism, scale)
    assert noise_variance(mechanism, scale) == pytest.approx(var, rel=1e-9)  # type: ignore[arg-type]
    se = math.sqrt((mu4 - var**2) / draws.size)
    assert abs(draws.var(ddof=1) - var) < 5 * se, (draws.var(ddof=1), var, se)


def _values(n: int = 1000) -> npt.NDArray[np.float64]:
    return np.random.default_rng(7).normal(50, 10, n)


def test_count_sum_and_histogram_are_integers() -> None:
    x = _values()
    for spec in (
        QuerySpec("count", "x", 0, 100, epsilon=1.0),
        QuerySpec("sum", "x", 0, 100, epsilon=1.0),
        QuerySpec("count", "x", 0, 100, epsilon=1.0, delta=1e-6, mechanism="gaussian"),
    ):
        value = answer(x, spec).value
        assert isinstance(value, int), (spec, value)
    hist = answer(x, QuerySpec("histogram", "x", 0, 100, epsilon=1.0, bins=7)).value
    assert isinstance(hist, list) and len(hist) == 7
    assert all(isinstance(v, int) for v in hist)


def test_a_scaled_sum_lies_on_the_declared_grid() -> None:
    spec = QuerySpec("sum", "x", -1.5, 2.5, epsilon=1.0, scale_decimals=2)
    for _ in range(20):
        result = answer(np.array([0.123, 1.456, -0.789]), spec)
        assert isinstance(result.value, float)
        assert result.value * 100 == pytest.approx(round(result.value * 100), abs=1e-6)
    assert result.details["sensitivity"] == pytest.approx(2.5)
    # rounded to 2 decimals and summed as integers: 12 + 146 - 79 = 79 hundredths
    assert partial_aggregate(np.array([0.123, 1.456, -0.789]), spec).total == 79


@pytest.mark.parametrize(
    ("mechanism", "delta", "epsilon"),
    [("laplace", 0.0, 0.5), ("gaussian", 1e-6, 1.0)],
)
def test_empirical_noise_variance_matches_the_stated_one(
    mechanism: Any, delta: float, epsilon: float
) -> None:
    x = _values()
    spec = QuerySpec("count", "x", 0, 100, epsilon=epsilon, delta=delta, mechanism=mechanism)
    partial = partial_aggregate(x, spec)
    results = [release([partial], spec) for _ in range(DRAWS)]
    draws = np.array([r.value for r in results], dtype=np.float64) - x.size
    scale = results[0].noise_scale
    if mechanism == "laplace":
        assert scale == pytest.approx(1 / epsilon)  # Δ/ε with Δ = 1
    else:
        # Discrete Gaussian calibrated by OpenDP for (1, 1e-6): σ ≈ 4.53 for sensitivity 1.
        assert 4.4 < scale < 4.7
    assert results[0].details["noise_variance"] == pytest.approx(_moments(mechanism, scale)[0])
    _assert_variance(draws, mechanism, scale)
    assert abs(draws.mean()) < 5 * math.sqrt(_moments(mechanism, scale)[0] / DRAWS)


def test_the_calibrated_scale_meets_the_target_by_opendps_own_map() -> None:
    for shape, d_in in (("scalar", 1), ("scalar", 100), ("vector", 1), ("select", 3)):
        scale = _calibrate(shape, "gaussian", d_in, 0.5, 1e-7)
        measurement = _measurement(shape, "gaussian", scale, 1e-7)  # type: ignore[arg-type]
        eps, delta = measurement.map(d_in)  # type: ignore[no-untyped-call]
        assert eps <= 0.5 and delta <= 1e-7
        assert eps > 0.49  # and no more noise than needed
        scale = _calibrate(shape, "laplace", d_in, 0.5, 0.0)
        measurement = _measurement(shape, "laplace", scale, 0.0)  # type: ignore[arg-type]
        assert measurement.map(d_in) <= 0.5  # type: ignore[no-untyped-call]


def test_histogram_noise_is_independent_per_bin_with_the_stated_variance() -> None:
    spec = QuerySpec("histogram", "x", 0, 1, epsilon=1.0, delta=1e-5, mechanism="gaussian", bins=4)
    x = np.array([0.1, 0.1, 0.3, 0.6, 0.9, 0.95])
    partial = partial_aggregate(x, spec)
    assert partial.counts == (2, 1, 1, 2)
    draws = np.array([release([partial], spec).value for _ in range(1000)], dtype=np.float64)
    noise = (draws - np.array(partial.counts)).ravel()  # 4000 draws
    _assert_variance(noise, "gaussian", release([partial], spec).noise_scale)


def test_the_mean_is_close_to_the_true_mean_for_large_epsilon() -> None:
    x = _values(2000)
    result = answer(x, QuerySpec("mean", "x", 0, 100, epsilon=50.0))
    assert isinstance(result.value, float)
    assert abs(result.value - x.mean()) < 0.05
    assert "half" in result.details["budget_split"]
    assert result.details["noisy_count"] == pytest.approx(2000, abs=2)


def test_values_are_clamped_to_the_declared_bounds() -> None:
    x = np.array([-50.0, 5.0, 200.0, np.nan])
    assert partial_aggregate(x, QuerySpec("sum", "x", 0, 10, epsilon=1.0)).total == 15
    assert partial_aggregate(x, QuerySpec("count", "x", 0, 10, epsilon=1.0)).count == 3  # NaN
    hist = partial_aggregate(x, QuerySpec("histogram", "x", 0, 10, epsilon=1.0, bins=2))
    assert hist.counts == (1, 2)  # -50 -> 0 (first bin); 200 -> 10 (last bin)
    result = answer(x, QuerySpec("sum", "x", 0, 10, epsilon=1e4))
    assert result.value == 15  # ε so large the noise is almost surely 0
    assert result.details["sensitivity"] == 10


def test_federated_release_equals_a_single_release_on_pooled_data() -> None:
    rng = np.random.default_rng(3)
    orgs = [rng.uniform(0, 10, n) for n in (300, 500, 200)]
    pooled = np.concatenate(orgs)
    spec = QuerySpec("sum", "x", 0, 10, epsilon=1.0)
    partials = [partial_aggregate(o, spec) for o in orgs]
    pooled_partial = partial_aggregate(pooled, spec)
    truth = pooled_partial.total
    assert sum(p.total for p in partials) == truth
    assert sum(p.count for p in partials) == pooled_partial.count

    federated = np.array([release(partials, spec).value for _ in range(DRAWS)], dtype=np.float64)
    single = np.array([release([pooled_partial], spec).value for _ in range(DRAWS)], float)
    scale = release(partials, spec).noise_scale
    assert scale == release([pooled_partial], spec).noise_scale == 10.0  # Δ/ε, one noise
    var = _moments("laplace", scale)[0]
    # Same mean: the difference of two sample means has standard error sqrt(2 var / n).
    assert abs(federated.mean() - single.mean()) < 5 * math.sqrt(2 * var / DRAWS)
    assert abs(federated.mean() - truth) < 5 * math.sqrt(var / DRAWS)
    # Noise added once: the variance is the single-release variance, not three times it.
    _assert_variance(federated - truth, "laplace", scale)
    assert federated.var() < 1.5 * var


def test_partials_of_a_different_query_are_refused() -> None:
    partial = partial_aggregate(np.arange(5.0), QuerySpec("sum", "x", 0, 10, epsilon=1.0))
    with pytest.raises(UserError, match="different query"):
        release([partial], QuerySpec("sum", "x", 0, 20, epsilon=1.0))
    with pytest.raises(UserError, match="different query"):
        release([partial], QuerySpec("count", "x", 0, 10, epsilon=1.0))
    with pytest.raises(UserError, match="at least one"):
        release([], QuerySpec("count", "x", 0, 10, epsilon=1.0))


@pytest.mark.parametrize("mechanism", ["laplace", "gaussian"])
def test_a_quantile_with_large_epsilon_lands_near_the_true_quantile(mechanism: Any) -> None:
    x = np.random.default_rng(11).uniform(0, 100, 1000)
    delta = 1e-6 if mechanism == "gaussian" else 0.0
    spec = QuerySpec(
        "quantile", "x", 0, 100, epsilon=20.0, delta=delta, mechanism=mechanism, bins=101,
        quantile=0.25,
    )  # fmt: skip
    for _ in range(5):
        result = answer(x, spec)
        assert isinstance(result.value, float)
        assert abs(result.value - np.quantile(x, 0.25)) <= 2.0
    assert result.details["score_sensitivity"] == 3  # α = 1/4: max(1, 3)


def test_quantile_partials_from_organisations_add_up() -> None:
    spec = QuerySpec("quantile", "x", 0, 10, epsilon=1.0, bins=11, quantile=0.5)
    a, b = np.array([1.0, 2.0, 2.0]), np.array([5.0, 9.0])
    pa, pb, pooled = (partial_aggregate(v, spec) for v in (a, b, np.concatenate([a, b])))
    assert tuple(x + y for x, y in zip(pa.counts, pb.counts, strict=True)) == pooled.counts
    assert pooled.counts[2] == 1 and pooled.counts_le[2] == 3  # below / at-or-below 2.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lower": 5, "upper": 5}, "lower bound must be below"),
        ({"lower": 0, "upper": float("inf")}, "finite"),
        ({"epsilon": 0.0}, "ε must be a positive"),
        ({"epsilon": -1.0}, "ε must be a positive"),
        ({"mechanism": "gaussian"}, "gaussian mechanism needs δ"),
        ({"delta": 1e-6}, "laplace mechanism is pure"),
        ({"kind": "histogram"}, "needs the number of bins"),
        ({"kind": "quantile", "bins": 10}, "needs a quantile in"),
        ({"kind": "quantile", "quantile": 0.5}, "needs the number of candidates"),
        ({"kind": "quantile", "quantile": 1.0, "bins": 10}, "needs a quantile in"),
        ({"kind": "histogram", "bins": 0}, "bins must be in"),
        ({"bins": 3}, "bins applies to"),
        ({"kind": "sum", "lower": -0.2, "upper": 0.2}, "round to the same integer"),
        ({"scale_decimals": 2}, "decimals applies to"),
        ({"kind": "median"}, "unknown query kind"),
        ({"mechanism": "uniform"}, "unknown mechanism"),
    ],
)
def test_invalid_specs_are_refused_with_clear_messages(kwargs: Any, message: str) -> None:
    base: dict[str, Any] = {"kind": "count", "column": "x", "lower": 0, "upper": 10}
    base["epsilon"] = 1.0
    with pytest.raises(UserError, match=message):
        QuerySpec(**{**base, **kwargs})


def test_query_csv_reads_one_column_and_explains_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "people.csv"
    path.write_text("name,age\nann,30\nbob,\ncid,50\n")
    assert read_column(path, "age").tolist() == [30.0, 50.0]
    result = query_csv(path, QuerySpec("count", "age", 0, 100, epsilon=1e4))
    assert result.value == 2
    with pytest.raises(UserError, match=r"no column 'height'.*name, age"):
        read_column(path, "height")
    with pytest.raises(UserError, match=r"'name' of .* is not numeric: row 1"):
        read_column(path, "name")
    with pytest.raises(UserError, match="no CSV file"):
        read_column(tmp_path / "missing.csv", "age")
