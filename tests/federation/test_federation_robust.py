"""Robust aggregators: each estimator against its definition, the accumulator's checks, and the
way strategies see the result (Aggregate.mean() is the robust estimate)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

from veil.federation import Aggregate, FitResult, RoundContext, UpdateRejected, WeightedSum
from veil.federation.pipeline import AggregationFailed
from veil.federation.robust import (
    REPORT_NAMES,
    CoordinateMedian,
    Krum,
    NormBound,
    RobustAggregator,
    TrimmedMean,
    coordinate_median,
    krum_scores,
    trimmed_mean,
)

SHAPES = {"w": (3, 2), "b": (2,)}
D = 8


def reference() -> dict[str, np.ndarray]:
    return {name: np.zeros(shape, np.float32) for name, shape in SHAPES.items()}


def unflat(row: np.ndarray) -> dict[str, np.ndarray]:
    return {"w": row[:6].reshape(3, 2).astype(np.float32), "b": row[6:].astype(np.float32)}


def flat(update: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([update["w"].ravel(), update["b"].ravel()])


def names(n: int) -> list[str]:
    return [f"c{i}" for i in range(n)]


def aggregate(
    aggregator: RobustAggregator | NormBound,
    rows: np.ndarray,
    weights: list[float] | None = None,
) -> Aggregate:
    clients = names(len(rows))
    acc = aggregator.start(reference(), RoundContext("run", 1, clients=tuple(clients)))
    for i, row in enumerate(rows):
        weight = 1.0 if weights is None else weights[i]
        acc.add(FitResult(clients[i], 1, unflat(row), weight, 10, sums={"s": 1.0}))
    return acc.finish()


matrices = st.integers(1, 9).flatmap(
    lambda n: hnp.arrays(
        np.float32, (n, D), elements=st.floats(-1e3, 1e3, width=32, allow_subnormal=False)
    )
)


@settings(max_examples=60, deadline=None)
@given(matrices)
def test_median_equals_numpy_median(rows: np.ndarray) -> None:
    np.testing.assert_array_equal(coordinate_median(rows), np.median(rows, axis=0))
    agg = aggregate(CoordinateMedian(), rows)
    assert agg.count == len(rows) and agg.weight == len(rows)
    # What strategies consume: the mean of the aggregate is the median (float32 rounding only).
    np.testing.assert_allclose(
        flat(agg.mean()), np.median(rows, axis=0), rtol=1e-6, atol=1e-6 * 1e3
    )
    assert agg.sums == {"s": float(len(rows))}
    assert agg.report["method"] == "median" and agg.report["updates"] == len(rows)


def test_median_in_column_blocks_matches_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = np.random.default_rng(0).normal(size=(7, 1000)).astype(np.float32)
    monkeypatch.setattr("veil.federation.robust._BLOCK_ENTRIES", 7 * 64)  # 16 blocks
    np.testing.assert_array_equal(coordinate_median(rows), np.median(rows, axis=0))


@settings(max_examples=60, deadline=None)
@given(matrices, st.sampled_from([0.0, 0.1, 0.2, 0.34, 0.49]))
def test_trimmed_mean_equals_scipy_trim_mean(rows: np.ndarray, fraction: float) -> None:
    expected = stats.trim_mean(rows.astype(np.float64), fraction, axis=0)
    trim = math.floor(fraction * len(rows))
    np.testing.assert_allclose(trimmed_mean(rows, trim), expected, rtol=1e-6, atol=1e-4)
    agg = aggregate(TrimmedMean(fraction), rows)
    np.testing.assert_allclose(flat(agg.mean()), expected, rtol=1e-5, atol=1e-3)
    assert agg.report["trimmed_per_side"] == trim


def test_trimmed_mean_refuses_to_trim_everything() -> None:
    with pytest.raises(ValueError, match="cannot trim"):
        trimmed_mean(np.zeros((4, 2), np.float32), 2)
    with pytest.raises(ValueError, match="trim_fraction"):
        TrimmedMean(0.5)


def brute_force_krum_scores(rows: np.ndarray, f: int) -> np.ndarray:
    n = len(rows)
    scores = []
    for i in range(n):
        d = sorted(
            float(np.sum((rows[i].astype(np.float64) - rows[j]) ** 2)) for j in range(n) if j != i
        )
        scores.append(sum(d[: n - f - 2]))
    return np.array(scores)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(0, 3).flatmap(
        lambda f: st.tuples(
            st.just(f),
            hnp.arrays(
                np.float32,
                st.tuples(st.integers(2 * f + 3, 2 * f + 8), st.just(D)),
                elements=st.floats(-100, 100, width=32, allow_subnormal=False),
            ),
        )
    )
)
def test_krum_scores_follow_the_definition(case: tuple[int, np.ndarray]) -> None:
    f, rows = case
    np.testing.assert_allclose(
        krum_scores(rows, f), brute_force_krum_scores(rows, f), rtol=1e-6, atol=1e-3
    )


def honest_and_byzantine(
    n_honest: int, n_byzantine: int, seed: int = 0
) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    honest = 1.0 + 0.1 * rng.normal(size=(n_honest, D))
    byzantine = -20.0 + 5.0 * rng.normal(size=(n_byzantine, D))
    rows = np.concatenate([honest, byzantine]).astype(np.float32)
    order = rng.permutation(len(rows))
    bad = [int(np.flatnonzero(order == i)[0]) for i in range(n_honest, len(rows))]
    return rows[order], sorted(bad)


def test_krum_picks_an_update_from_the_honest_cluster() -> None:
    rows, bad = honest_and_byzantine(7, 2)
    agg = aggregate(Krum(byzantine=2), rows)
    chosen = flat(agg.mean())
    distances = np.linalg.norm(rows - chosen, axis=1)
    picked = int(np.argmin(distances))
    assert distances[picked] < 1e-4  # Krum returns one of the updates ...
    assert picked not in bad  # ... an honest one
    assert agg.report["kept"] == 1 and agg.report["left_out"] == 8


def test_multi_krum_averages_the_honest_updates_only() -> None:
    rows, bad = honest_and_byzantine(8, 2, seed=3)
    agg = aggregate(Krum(byzantine=2, keep=None), rows)
    honest = [i for i in range(len(rows)) if i not in bad]
    # keep = n - f = 8: exactly the honest updates, averaged without their weights.
    np.testing.assert_allclose(flat(agg.mean()), rows[honest].mean(axis=0), rtol=1e-5)
    assert agg.report["kept"] == 8
    assert sorted(agg.report["left_out_clients"]) == sorted(f"c{i}" for i in bad)


def test_multi_krum_keep_is_capped_at_n_minus_f() -> None:
    rows, _ = honest_and_byzantine(6, 1)
    assert aggregate(Krum(byzantine=1, keep=100), rows).report["kept"] == 6


def test_krum_with_too_few_updates_fails_the_round() -> None:
    rows, _ = honest_and_byzantine(3, 1)  # n = 4 is not > 2f + 2 = 4
    with pytest.raises(AggregationFailed, match="at least 5 updates"):
        aggregate(Krum(byzantine=1), rows)
    with pytest.raises(ValueError, match=r"n > 2f \+ 2"):
        krum_scores(rows, 1)


def test_left_out_clients_are_named_up_to_a_limit() -> None:
    rows, _ = honest_and_byzantine(30, 12)
    report = aggregate(Krum(byzantine=12, keep=1), rows).report
    assert report["left_out"] == 41
    assert len(report["left_out_clients"]) == REPORT_NAMES


def test_robust_estimators_ignore_self_reported_weights() -> None:
    rows, _ = honest_and_byzantine(6, 1)
    weights = [1.0] * 6 + [1e9]
    for aggregator in (CoordinateMedian(), TrimmedMean(0.2), Krum(byzantine=1, keep=None)):
        plain = flat(aggregate(aggregator, rows).mean())
        inflated = flat(aggregate(aggregator, rows, weights).mean())
        np.testing.assert_array_equal(plain, inflated)


@settings(max_examples=30, deadline=None)
@given(st.integers(3, 11), st.floats(1e3, 1e30), st.randoms(use_true_random=False))
def test_median_stays_within_the_honest_range(n: int, magnitude: float, rnd) -> None:  # type: ignore[no-untyped-def]
    """With f < n/2 arbitrary updates, each coordinate of the median lies between the smallest
    and the largest honest value (Yin et al. 2018)."""
    f = (n - 1) // 2
    rng = np.random.default_rng(rnd.randrange(2**32))
    honest = rng.normal(size=(n - f, D)).astype(np.float32)
    attackers = (rng.choice([-1, 1], size=(f, D)) * magnitude).astype(np.float32)
    median = coordinate_median(np.concatenate([attackers, honest]))
    assert np.all(median >= honest.min(axis=0)) and np.all(median <= honest.max(axis=0))


def test_the_estimate_does_not_depend_on_arrival_order() -> None:
    rows, _ = honest_and_byzantine(6, 2)
    clients = names(len(rows))
    results = []
    for order in (range(len(rows)), reversed(range(len(rows)))):
        acc = Krum(byzantine=2, keep=None).start(
            reference(), RoundContext("run", 1, clients=tuple(clients))
        )
        for i in order:
            acc.add(FitResult(clients[i], 1, unflat(rows[i]), 1.0, 1))
        results.append(acc.finish())
    np.testing.assert_array_equal(flat(results[0].total), flat(results[1].total))
    assert results[0].report == results[1].report


def test_buffered_accumulator_refuses_bad_and_repeated_updates() -> None:
    acc = CoordinateMedian().start(reference(), RoundContext("run", 1, clients=("a", "b")))
    nan = unflat(np.full(D, np.nan, np.float32))
    with pytest.raises(UpdateRejected, match="NaN"):
        acc.add(FitResult("a", 1, nan, 1.0, 1))
    with pytest.raises(UpdateRejected, match="shape"):
        acc.add(FitResult("a", 1, {"w": np.zeros((2, 3), np.float32), "b": np.zeros(2)}, 1, 1))
    acc.add(FitResult("a", 1, unflat(np.ones(D, np.float32)), 1.0, 1))
    with pytest.raises(UpdateRejected, match="already"):
        acc.add(FitResult("a", 1, unflat(np.ones(D, np.float32)), 1.0, 1))
    with pytest.raises(UpdateRejected, match="not a participant"):
        acc.add(FitResult("z", 1, unflat(np.ones(D, np.float32)), 1.0, 1))
    agg = acc.finish()  # the one accepted update
    assert agg.count == 1
    np.testing.assert_allclose(flat(agg.mean()), np.ones(D))


def test_norm_bound_scales_large_updates_to_the_bound() -> None:
    rows = np.stack([np.full(D, 0.1), np.full(D, 10.0), np.full(D, -3.0)]).astype(np.float32)
    bound = 2.0
    for inner in (WeightedSum(), CoordinateMedian()):
        agg = aggregate(NormBound(inner, bound), rows)
        assert agg.report["norm_bounded"] == 2 and agg.report["max_update_norm"] == bound
    # With the weighted sum: the small update is unchanged, the others have norm exactly 2.
    agg = aggregate(NormBound(WeightedSum(), bound), rows)
    expected = (
        rows[0] + rows[1] / np.linalg.norm(rows[1]) * 2 + rows[2] / np.linalg.norm(rows[2]) * 2
    )
    np.testing.assert_allclose(flat(agg.total), expected, rtol=1e-5)
    assert NormBound(CoordinateMedian(), 1.0).name == "norm_bound+median"


def test_update_norms_are_reported() -> None:
    rows = np.stack([np.full(D, 1.0), np.full(D, 2.0), np.full(D, 4.0)]).astype(np.float32)
    report = aggregate(CoordinateMedian(), rows).report
    assert report["update_norm_median"] == pytest.approx(2 * math.sqrt(D))
    assert report["update_norm_max"] == pytest.approx(4 * math.sqrt(D))
