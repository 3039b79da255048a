"""Gradient-boosting runs end to end (`veil run`): German credit under SecAgg against XGBoost,
DP on the histograms with ε recomputed independently, the other objectives, config refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

import veil
from support import EXAMPLES
from veil.assembly.tree_result import TREE_MODEL_FILE
from veil.config import RunConfig, load_config
from veil.errors import ConfigError
from veil.report.html import REPORT_FILE

pytest.importorskip("xgboost")


def _config(**changes: Any) -> RunConfig:
    raw = load_config(EXAMPLES / "credit_trees.toml").to_dict()
    for section, values in changes.items():
        raw[section] = {**raw.get(section, {}), **values}
    return RunConfig.from_dict(raw)


def test_four_banks_under_secagg_match_centralised_xgboost_on_german_credit(
    tmp_path: Path,
) -> None:
    result = veil.run(EXAMPLES / "credit_trees.toml", tmp_path)
    assert result.status == "finished" and len(result.rounds) == 50
    baseline = result.centralized_baseline
    assert baseline is not None
    extra = baseline.model_extra or {}
    auc = result.final["auc"]
    # XGBoost hist with the same depth, rounds, max_bin, λ and η on the pooled data...
    assert abs(auc - extra["auc"]) <= 0.01
    # ...and on the pooled data cut into the same bins: the same trees, to rounding.
    assert abs(auc - extra["same_bins_auc"]) <= 1e-3
    assert auc > 0.7
    assert result.privacy.aggregation == "secagg"
    assert result.privacy.secure_aggregation is not None
    last = result.rounds[-1].aggregation
    assert last["protocol"] == "secagg" and last["survivors"] == 4 and last["clipped"] == 0
    assert last["levels"] == 3
    assert (tmp_path / "result.json").is_file() and (tmp_path / REPORT_FILE).is_file()
    # The trained ensemble is in the run folder as an XGBoost model.
    import numpy as np
    import xgboost
    from sklearn.metrics import roc_auc_score

    from veil.assembly.data import federated_data

    booster = xgboost.Booster()
    booster.load_model(str(tmp_path / TREE_MODEL_FILE))
    assert booster.num_boosted_rounds() == 50
    fed = federated_data(load_config(EXAMPLES / "credit_trees.toml"))  # the same seeded split
    scores = booster.predict(xgboost.DMatrix(np.asarray(fed.x_test, np.float32)))
    assert roc_auc_score(fed.y_test, scores) == pytest.approx(auc, abs=1e-6)


def test_dp_on_the_histograms_reports_an_epsilon_an_independent_accountant_recomputes(
    tmp_path: Path,
) -> None:
    config = _config(
        model={"trees": {"max_depth": 2, "noise_multiplier": 4.0, "delta": 1e-5}},
        federation={"rounds": 5, "centralized_baseline": False},
    )
    result = veil.run(config, tmp_path)
    privacy = result.privacy
    assert privacy.unit == "record" and privacy.epsilon is not None
    extra = privacy.model_extra or {}
    releases = extra["histogram_dp"]["releases"]
    assert 5 <= releases <= 10  # at most max_depth sums per tree
    assert extra["histogram_dp"]["sensitivity"] == pytest.approx(math.sqrt(26 * (1.0 + 0.25**2)))
    assert result.rounds[-1].epsilon == pytest.approx(privacy.epsilon)
    # An accountant other than the run's (prv-accountant) recomputes it from result.json.
    from veil.commands.privacy import verify_record

    verdict = verify_record(json.loads((tmp_path / "result.json").read_text()))
    assert verdict.claims and verdict.ok
    assert verdict.checks[-1].recomputed == pytest.approx(privacy.epsilon, abs=0.02)
    # ...and by hand: `releases` Gaussian mechanisms of noise multiplier 4 with dp-accounting.
    import dp_accounting

    accountant = dp_accounting.pld.PLDAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(4.0), releases)
    assert accountant.get_epsilon(1e-5) == pytest.approx(privacy.epsilon, rel=0.01)


@pytest.mark.parametrize(
    ("dataset", "aggregation", "metric", "floor"),
    [("diabetes", "secagg", "r2", 0.3), ("digits", "plain", "accuracy", 0.85)],
)
def test_regression_and_multiclass_trees_run_and_learn(
    dataset: str, aggregation: str, metric: str, floor: float
) -> None:
    config = RunConfig.from_dict(
        {
            "secure_aggregation": aggregation,
            "data": {"dataset": dataset, "scaling": "none"},
            "model": {"name": "gradient_boosting", "trees": {"max_bins": 16, "max_depth": 3}},
            "federation": {"clients": 3, "rounds": 8, "centralized_baseline": True},
        }
    )
    result = veil.run(config)
    assert result.final[metric] > floor
    baseline = (
        (result.centralized_baseline.model_extra or {}) if result.centralized_baseline else {}
    )
    xgb = baseline.get(metric, getattr(result.centralized_baseline, metric, None))
    assert xgb is not None and abs(result.final[metric] - xgb) < 0.05


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"data": {"scaling": "local"}}, "scaling = 'none'"),
        ({"secure_aggregation": "ckks"}, "'secagg' or 'plain'"),
        ({"model": {"trees": {"n_trees": 7}}}, "n_trees = 7"),
        ({"secagg": {"clip_range": 2.0}}, "clip_range and max_weight"),
        ({"model": {"loss": "huber"}}, "huber"),
    ],
)
def test_configurations_trees_cannot_run_are_refused(changes: dict[str, Any], message: str) -> None:
    raw = load_config(EXAMPLES / "credit_trees.toml").to_dict()
    for key, value in changes.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict(raw)


def test_lambda_is_the_config_key_and_survives_a_round_trip() -> None:
    config = _config(model={"trees": {"lambda": 2.5}})
    assert config.model.tree_settings().reg_lambda == 2.5
    assert RunConfig.from_dict(config.to_dict()).model.tree_settings().reg_lambda == 2.5
