"""SecureBoost's plaintext boosting (`veil.vertical.boosting`) against XGBoost itself: on columns
with few distinct values both search the same partitions, so they grow the same trees, and
`gamma` refuses a split exactly where XGBoost's `min_split_loss` does."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from veil.errors import ConfigError
from veil.vertical.boosting import BoostSettings, Histogram, best_split, train_plain


def _data(rows: int = 400) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    x = rng.integers(0, 5, size=(rows, 4)).astype(np.float64)  # 5 distinct values per column
    logit = 0.9 * x[:, 0] - 0.6 * x[:, 2] + 0.3 * x[:, 1] * x[:, 3] - 1.0
    y = (rng.uniform(size=rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float64)
    return x, y


def _xgboost(x: np.ndarray, y: np.ndarray, settings: BoostSettings) -> Any:
    xgb = pytest.importorskip("xgboost")
    params = {
        "objective": "binary:logistic",
        "tree_method": "hist",
        "max_depth": settings.max_depth,
        "max_bin": settings.bins,
        "eta": settings.learning_rate,
        "lambda": settings.reg_lambda,
        "gamma": settings.gamma,
        "min_child_weight": settings.min_child_weight,
        "base_score": 0.5,
        "nthread": 1,
    }
    return xgb.train(params, xgb.DMatrix(x, label=y), num_boost_round=settings.trees)


def test_plaintext_twin_grows_xgboosts_trees_on_few_distinct_values() -> None:
    x, y = _data()
    settings = BoostSettings(trees=4, max_depth=3, bins=16, learning_rate=0.3)
    ours = train_plain(x, y, settings)
    booster = _xgboost(x, y, settings)
    theirs = booster.predict(pytest.importorskip("xgboost").DMatrix(x), output_margin=True)
    np.testing.assert_allclose(ours.predict_margin(x), theirs, atol=1e-5)
    dumped = booster.get_dump(dump_format="json")
    assert [len(tree.nodes) for tree in ours.trees] == [_count(json.loads(d)) for d in dumped]


def _count(node: dict[str, Any]) -> int:
    return 1 + sum(_count(child) for child in node.get("children", []))


def test_gamma_refuses_a_split_where_xgboost_does() -> None:
    # A stump (depth 1: XGBoost's bottom-up pruning is then the same as refusing the split).
    x, y = _data()
    stump = BoostSettings(trees=1, max_depth=1, bins=16)
    root = json.loads(_xgboost(x, y, stump).save_raw("json"))
    change = root["learner"]["gradient_booster"]["model"]["trees"][0]["loss_changes"][0]
    assert change > 1.0
    for gamma, splits in ((0.9 * change, True), (1.1 * change, False)):
        settings = BoostSettings(trees=1, max_depth=1, bins=16, gamma=gamma)
        ours = len(train_plain(x, y, settings).trees[0].nodes)
        theirs = _count(json.loads(_xgboost(x, y, settings).get_dump(dump_format="json")[0]))
        assert ours == theirs == (3 if splits else 1)


def test_best_split_never_splits_a_feature_past_its_own_bins() -> None:
    # Feature 0 has 2 bins, feature 1 has 4; the histogram is padded to width 4.
    g = np.array([[-3.0, 3.0, 0.0, 0.0], [-1.0, -1.0, 1.0, 1.0]])
    h = np.array([[2.0, 2.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    split = best_split(Histogram(g, h, (2, 4)), BoostSettings(reg_lambda=1.0))
    assert split is not None and (split.feature, split.bin) == (0, 0)
    assert split.loss_change == pytest.approx(9 / 3 + 9 / 3 - 0)  # G_L²/(H_L+λ) + G_R²/(H_R+λ)
    assert best_split(Histogram(g[:, :1], h[:, :1], (1, 1)), BoostSettings()) is None


def test_settings_refuse_a_learning_rate_above_one() -> None:
    with pytest.raises(ConfigError, match="learning_rate"):
        BoostSettings(learning_rate=1.5)
