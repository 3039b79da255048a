"""Tests for local and federated standardisation in `veil.data.scaling`."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from veil.data import FeatureStatistics, feature_statistics, fit_scaler, scaler_from_statistics
from veil.errors import DataError


@st.composite
def client_matrices(draw: st.DrawFn) -> list[np.ndarray]:
    """1-5 clients' float32 matrices with a shared width; some may be empty, not all.

    Values are multiples of 1/4 in [-1000, 1000], so a feature is either exactly constant or
    has a standard deviation far above the constant-feature tolerance.
    """
    d = draw(st.integers(1, 5))
    sizes = draw(st.lists(st.integers(0, 20), min_size=1, max_size=5).filter(lambda s: sum(s) > 0))
    return [
        draw(arrays(np.int64, (n, d), elements=st.integers(-4000, 4000))).astype(np.float32) / 4
        for n in sizes
    ]


@settings(max_examples=100, deadline=None)
@given(client_matrices())
def test_federated_scaler_equals_scaler_fit_on_pooled_data(parts: list[np.ndarray]) -> None:
    pooled = fit_scaler(np.concatenate(parts))
    combined = scaler_from_statistics([feature_statistics(p) for p in parts])
    # Tolerance: the mean agrees to float64 rounding; the scale goes through
    # E[x^2] - E[x]^2, whose cancellation costs a few digits for values up to 1000.
    np.testing.assert_allclose(combined.mean, pooled.mean, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(combined.scale, pooled.scale, rtol=1e-6, atol=1e-9)


@settings(max_examples=50, deadline=None)
@given(client_matrices())
def test_adding_statistics_equals_statistics_of_concatenation(parts: list[np.ndarray]) -> None:
    total = sum((feature_statistics(p) for p in parts[1:]), start=feature_statistics(parts[0]))
    direct = feature_statistics(np.concatenate(parts))
    assert total.count == direct.count == sum(p.shape[0] for p in parts)
    np.testing.assert_allclose(total.total, direct.total, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(total.total_sq, direct.total_sq, rtol=1e-12, atol=1e-9)


def test_transform_standardises_and_returns_float32() -> None:
    rng = np.random.default_rng(0)
    x = (rng.normal(5.0, 3.0, size=(500, 4)) * [1, 10, 100, 1000]).astype(np.float32)
    scaled = fit_scaler(x).transform(x)
    assert scaled.dtype == np.float32
    np.testing.assert_allclose(scaled.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(scaled.std(axis=0), 1.0, atol=1e-5)


def test_constant_features_get_scale_one_in_both_paths() -> None:
    # Column 0 is constant near zero, column 1 is a large constant (where E[x^2] - E[x]^2
    # suffers cancellation), column 2 varies.
    x = np.column_stack(
        [np.full(50, 3.0), np.full(50, 123456.7), np.arange(50, dtype=np.float64)]
    ).astype(np.float32)
    local = fit_scaler(x)
    federated = scaler_from_statistics([feature_statistics(x[:20]), feature_statistics(x[20:])])
    for scaler in (local, federated):
        np.testing.assert_array_equal(scaler.scale[:2], [1.0, 1.0])
        assert scaler.scale[2] == pytest.approx(np.arange(50).std())
        transformed = scaler.transform(x)
        assert np.isfinite(transformed).all()
        np.testing.assert_allclose(transformed[:, :2], 0.0, atol=1e-3)


def test_statistics_are_float64_and_empty_clients_are_allowed() -> None:
    stats = feature_statistics(np.empty((0, 3), dtype=np.float32))
    assert stats.count == 0
    assert stats.total.dtype == np.float64 and stats.total_sq.dtype == np.float64
    np.testing.assert_array_equal(stats.total, 0.0)


def test_errors_for_no_rows_and_mismatched_widths() -> None:
    with pytest.raises(DataError):
        scaler_from_statistics([])
    with pytest.raises(DataError):
        scaler_from_statistics([feature_statistics(np.empty((0, 2)))])
    with pytest.raises(DataError):
        fit_scaler(np.empty((0, 2)))
    a = FeatureStatistics(count=1, total=np.zeros(2), total_sq=np.zeros(2))
    b = FeatureStatistics(count=1, total=np.zeros(3), total_sq=np.zeros(3))
    with pytest.raises(ValueError, match="features"):
        _ = a + b
    with pytest.raises(ValueError):
        fit_scaler(np.ones((4, 2))).transform(np.ones((4, 3)))
