"""Trees grown from summed histograms, exported as an XGBoost JSON model, predict like our own."""

from __future__ import annotations

import numpy as np
import pytest

from veil.trees.binning import equal_width_edges
from veil.trees.booster import Ensemble
from veil.trees.federated import BoostingPlan, FederatedBooster, TreeMember
from veil.trees.objectives import Objective, ObjectiveName
from veil.trees.secure_sum import ClearSum
from veil.trees.split import SplitRule

xgboost = pytest.importorskip("xgboost")


def _grown(name: ObjectiveName, groups: int) -> tuple[Ensemble, np.ndarray]:
    rng = np.random.default_rng(4)
    x = rng.uniform(-2, 2, size=(300, 5)).astype(np.float32)
    if name == "reg:squarederror":
        y = x[:, 0] * 2 + np.sin(x[:, 1]) + rng.normal(0, 0.1, 300)
    else:
        y = (
            np.digitize(x[:, 0] + 0.5 * x[:, 2], [-1.0, 1.0]) % groups
            if groups > 1
            else (x[:, 0] + x[:, 1] > 0)
        ).astype(np.float64)
    edges = equal_width_edges([-2.0] * 5, [2.0] * 5, 16)
    objective = Objective(name, groups, 3.0 if name == "reg:squarederror" else 1.0)
    members = [TreeMember(f"m{i}", x[i::3], y[i::3], edges, objective) for i in range(3)]
    plan = BoostingPlan(
        rounds=6, max_depth=3, rule=SplitRule(learning_rate=0.3), objective=objective
    )
    ensemble = FederatedBooster(members, plan, edges, ClearSum()).fit()
    test = rng.uniform(-2.5, 2.5, size=(200, 5)).astype(np.float32)
    return ensemble, test


@pytest.mark.parametrize(
    ("name", "groups"),
    [("binary:logistic", 1), ("multi:softprob", 3), ("reg:squarederror", 1)],
)
def test_the_xgboost_booster_predicts_like_the_ensemble(name: ObjectiveName, groups: int) -> None:
    ensemble, test = _grown(name, groups)
    assert len(ensemble.trees) == 6 * groups
    assert any(t.n_nodes > 1 for t in ensemble.trees)
    booster = ensemble.to_booster()
    matrix = xgboost.DMatrix(test)
    margin = np.asarray(booster.predict(matrix, output_margin=True)).reshape(len(test), -1)
    np.testing.assert_allclose(margin, ensemble.margin(test), atol=1e-6)
    predicted = np.asarray(booster.predict(matrix))
    ours = ensemble.predict(test)
    expected = ours[:, 1] if name == "binary:logistic" else ours
    np.testing.assert_allclose(predicted, expected, atol=1e-6)
    # The JSON model survives XGBoost's own save and load.
    again = xgboost.Booster()
    again.load_model(booster.save_raw("json"))
    np.testing.assert_allclose(again.predict(matrix), predicted, atol=0)
