"""The trees' building blocks against hand-computed values: bins, histograms, gains, splits."""

from __future__ import annotations

import numpy as np
import pytest

from veil.errors import DataError
from veil.trees.binning import equal_width_edges
from veil.trees.federated import histogram_sensitivity
from veil.trees.histograms import HistogramShape, node_histograms
from veil.trees.objectives import Objective
from veil.trees.split import SplitRule, best_split, leaf_weight, loss_change


def test_equal_width_edges_cut_the_declared_range_and_bin_like_xgboost_thresholds() -> None:
    edges = equal_width_edges([0.0, -1.0], [4.0, 1.0], 4)
    assert edges.cuts.tolist() == [[1.0, 2.0, 3.0], [-0.5, 0.0, 0.5]]
    x = np.array([[0.0, -1.0], [0.99, -0.5], [1.0, 0.49], [3.5, 1.0], [-7.0, 9.0]])
    assert edges.transform(x).tolist() == [[0, 0], [0, 1], [1, 2], [3, 3], [0, 3]]
    # "bin <= b" is exactly XGBoost's "x < threshold(b)".
    assert edges.threshold(0, 0) == 1.0
    for b in range(3):
        assert ((edges.transform(x)[:, 0] <= b) == (x[:, 0] < edges.threshold(0, b))).all()


def test_binning_refuses_bounds_it_cannot_use() -> None:
    with pytest.raises(DataError, match="lower < upper"):
        equal_width_edges([1.0], [1.0], 8)
    with pytest.raises(DataError, match="bins per feature"):
        equal_width_edges([0.0], [1.0], 1)
    with pytest.raises(DataError, match="NaN"):
        equal_width_edges([0.0], [1.0], 4).transform([[np.nan]])


def test_node_histograms_sum_g_and_h_per_slot_feature_and_bin() -> None:
    bins = np.array([[0, 1], [1, 1], [0, 0], [1, 0]], dtype=np.int32)
    node = np.array([[0], [0], [1], [-1]])  # the last row sits in a finished leaf
    g = np.array([[1.0], [2.0], [4.0], [8.0]])
    h = np.array([[0.1], [0.2], [0.4], [0.8]])
    out = node_histograms(bins, node, g, h, HistogramShape(2, 1, 2, 2))
    assert out.shape == (2, 1, 2, 2, 2)
    assert out[0, 0, 0].tolist() == [[1.0, 2.0], [0.0, 3.0]]  # slot 0, G: feature 0, feature 1
    assert out[1, 0, 0].tolist() == [[4.0, 0.0], [4.0, 0.0]]
    np.testing.assert_allclose(out[0, 0, 1], [[0.1, 0.2], [0.0, 0.3]])
    assert out[:, 0, 0].sum() == 2 * (1 + 2 + 4)  # each feature counts every active row once


def test_loss_change_and_leaf_weight_match_the_formulas_by_hand() -> None:
    # GL = -4, HL = 3, GR = 2, HR = 1, λ = 1: 16/4 + 4/2 - 4/5 = 5.2
    assert float(loss_change(-4.0, 3.0, 2.0, 1.0, 1.0)) == pytest.approx(5.2)
    rule = SplitRule(reg_lambda=1.0, learning_rate=0.5)
    assert leaf_weight(-4.0, 3.0, rule) == pytest.approx(0.5)  # -(-4)/(3+1) · 0.5


def test_best_split_picks_the_largest_allowed_loss_change() -> None:
    grad = np.array([[-4.0, 0.0, 2.0], [-1.0, -1.0, 0.0]])
    hess = np.array([[3.0, 0.0, 1.0], [2.0, 1.0, 1.0]])
    split = best_split(grad, hess, SplitRule(reg_lambda=1.0, min_child_weight=1.0))
    assert split is not None
    assert (split.feature, split.bin) == (0, 0)  # 5.2, the best of all candidates
    assert split.loss_change == pytest.approx(5.2)
    assert split.left == (-4.0, 3.0) and split.right == (2.0, 1.0)
    # A child lighter than min_child_weight is not allowed; gamma refuses small changes.
    assert best_split(grad, hess, SplitRule(reg_lambda=1.0, min_child_weight=3.5)) is None
    assert best_split(grad, hess, SplitRule(reg_lambda=1.0, gamma=6.0)) is None


def test_best_split_with_n_bins_splits_each_feature_only_within_its_own_bins() -> None:
    # Features binned to 1, 3 and 5 bins, zero-padded to 5 (SecureBoost's per-party bins):
    # the best split equals the best of each feature searched on its own, unpadded bins.
    rng = np.random.default_rng(3)
    n_bins = (1, 3, 5)
    rule = SplitRule(reg_lambda=0.0, min_child_weight=0.0)
    for _ in range(200):
        grad, hess = np.zeros((3, 5)), np.zeros((3, 5))
        for j, nb in enumerate(n_bins):
            grad[j, :nb] = rng.normal(size=nb)
            hess[j, :nb] = rng.uniform(0.0, 1.0, size=nb) * (rng.uniform(size=nb) < 0.7)
        split = best_split(grad, hess, rule, n_bins=n_bins)
        alone = [
            best_split(grad[j : j + 1, :nb], hess[j : j + 1, :nb], rule)
            for j, nb in enumerate(n_bins)
        ]
        candidates = [(s.loss_change, -j, s.bin) for j, s in enumerate(alone) if s is not None]
        if split is None:
            assert not candidates
            continue
        change, minus_feature, bin_ = max(candidates)
        assert (split.feature, split.bin) == (-minus_feature, bin_)
        assert split.bin < n_bins[split.feature] - 1
        assert split.loss_change == pytest.approx(change)
    with pytest.raises(ValueError, match="n_bins"):
        best_split(grad, hess, rule, n_bins=(1, 3))
    with pytest.raises(ValueError, match="n_bins"):
        best_split(grad, hess, rule, n_bins=(1, 3, 6))


def test_objectives_clip_gradients_and_hessians_to_their_declared_bounds() -> None:
    margin = np.array([[0.0], [50.0]])
    g, h = Objective("binary:logistic").gradients(margin, np.array([1.0, 0.0]))
    np.testing.assert_allclose(g[:, 0], [-0.5, 1.0])
    np.testing.assert_allclose(h[:, 0], [0.25, 0.0], atol=1e-12)
    g, h = Objective("reg:squarederror", gradient_clip=2.0).gradients(
        np.array([[0.0], [0.0]]), np.array([1.0, -5.0])
    )
    assert g[:, 0].tolist() == [-1.0, 2.0] and h[:, 0].tolist() == [1.0, 1.0]
    g, h = Objective("multi:softprob", n_groups=3).gradients(np.zeros((1, 3)), np.array([2.0]))
    np.testing.assert_allclose(g[0], [1 / 3, 1 / 3, -2 / 3])
    np.testing.assert_allclose(h[0], [4 / 9] * 3)
    # 3 features, 2 groups, |g| <= 1, h <= 1/2: sqrt(3 · 2 · (1 + 1/4))
    assert histogram_sensitivity(3, 2, 1.0, 0.5) == pytest.approx(np.sqrt(7.5))
