"""Regression runs end to end (issue 22): the diabetes example against the pooled-data
baseline, plain and under SecAgg; client-level DP, record-level DP, CKKS and a robust
aggregator on a regression target; what the console and `veil runs list` show; and the
classification-only settings a regression run refuses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

import veil
from support import EXAMPLES
from support import veil as veil_cli
from veil.config import RunConfig, load_config
from veil.errors import ConfigError
from veil.report.console import print_result
from veil.result import Baseline, Result


def _config(example: str, **changes: Any) -> RunConfig:
    """An example's config with `changes` merged into its sections (a dict) or top-level keys."""
    raw = load_config(EXAMPLES / f"{example}.toml").to_dict()
    for key, value in changes.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    if raw["model"].get("hidden") is None:
        raw["model"].pop("hidden", None)
    return RunConfig.from_dict(raw)


@pytest.fixture(scope="module")
def medical(tmp_path_factory: pytest.TempPathFactory) -> tuple[Result, Path]:
    out = tmp_path_factory.mktemp("medical-regression")
    return veil.run(EXAMPLES / "medical_regression.toml", out), out


def _r2_near_the_pooled_baseline(result: Result) -> None:
    baseline = result.centralized_baseline
    assert baseline is not None and baseline.accuracy is None
    pooled = (baseline.model_extra or {})["r2"]
    assert set(result.final) == {"loss", "mse", "mae", "r2"}
    # The federation is not worse than training on the pooled records by more than 0.05 R².
    assert result.final["r2"] >= pooled - 0.05, (result.final["r2"], pooled)
    assert result.final["r2"] > 0.35 and pooled > 0.35  # better than predicting the mean


def test_medical_regression_is_within_005_of_the_pooled_baseline(
    medical: tuple[Result, Path],
) -> None:
    result, out = medical
    _r2_near_the_pooled_baseline(result)
    assert result.classification is None
    for r in result.rounds:
        assert {"loss", "mse", "mae", "r2"} <= set(r.metrics)
        assert {"federated_loss", "federated_mse", "federated_mae", "federated_r2"} <= set(
            r.metrics
        )
    on_disk = json.loads((out / "result.json").read_text())
    assert "classification" not in on_disk and "accuracy" not in on_disk["centralized_baseline"]
    assert Result.model_validate(on_disk) == result


def test_medical_regression_under_secagg_matches(tmp_path: Path) -> None:
    result = veil.run(_config("medical_regression", secure_aggregation="secagg"), tmp_path)
    assert result.privacy.aggregation == "secagg"
    _r2_near_the_pooled_baseline(result)


def test_client_level_dp_example_reports_epsilon_and_r2(tmp_path: Path) -> None:
    veil.run(EXAMPLES / "linear_regression_dp.toml", tmp_path)
    on_disk = json.loads((tmp_path / "result.json").read_text())
    assert on_disk["privacy"]["unit"] == "client"
    assert 0 < on_disk["privacy"]["epsilon"] <= 5.0
    assert isinstance(on_disk["final"]["r2"], float)
    assert on_disk["centralized_baseline"]["outside_guarantee"] is True


def test_record_level_dp_sgd_trains_on_the_huber_loss(tmp_path: Path) -> None:
    config = _config(
        "medical_regression",
        model={"name": "linear", "loss": "huber", "huber_delta": 40.0, "hidden": None},
        data={"validation_fraction": 0.0},
        federation={"rounds": 4, "fraction_evaluate": 0.0, "centralized_baseline": False},
        privacy={"unit": "record", "epsilon": 8.0, "delta": 1e-5, "clip_norm": 1.0},
    )
    result = veil.run(config, tmp_path)
    assert result.privacy.unit == "record" and 0 < (result.privacy.epsilon or 0) <= 8.0
    # DP-SGD on the Huber loss moves the model: the test error falls from round 1.
    assert result.rounds[-1].metrics["mse"] < result.rounds[0].metrics["mse"]


def test_ckks_sums_a_regression_federation(tmp_path: Path) -> None:
    ckks = load_config(EXAMPLES / "medical_diagnosis_ckks.toml").to_dict()["ckks"]
    config = _config(
        "medical_regression",
        secure_aggregation="ckks",
        ckks=ckks,
        federation={"rounds": 3, "centralized_baseline": False},
    )
    result = veil.run(config, tmp_path)
    plain = veil.run(
        _config("medical_regression", federation={"rounds": 3, "centralized_baseline": False}),
        tmp_path / "plain",
    )
    assert result.privacy.aggregation == "ckks"
    assert result.final["r2"] == pytest.approx(plain.final["r2"], abs=0.02)


def test_trimmed_mean_withstands_an_attacker_on_a_regression_federation(tmp_path: Path) -> None:
    attacked = {
        "federation": {"clients": 6, "centralized_baseline": False},
        "attack": {"kind": "sign_flip", "fraction": 0.2, "scale": 10.0},
    }
    robust = veil.run(
        _config(
            "medical_regression",
            robust={"method": "trimmed_mean", "trim_fraction": 0.2},
            **attacked,
        ),
        tmp_path / "robust",
    )
    plain = veil.run(_config("medical_regression", **attacked), tmp_path / "plain")
    assert "aggregate:trimmed_mean" in robust.pipeline
    assert robust.final["r2"] > 0.3
    assert plain.final["mse"] > 100 * robust.final["mse"]  # FedAvg alone is wrecked


def test_console_and_runs_list_show_r2(
    medical: tuple[Result, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    result, out = medical
    console = Console(width=200, record=True)
    print_result(result, console)
    text = console.export_text()
    assert "test R²" in text and "centralized baseline R²" in text
    assert "accuracy" not in text
    capsys.readouterr()
    assert veil_cli("runs", "list", str(out)) == 0
    listed = capsys.readouterr().out
    assert result.run_id in listed and f"R² {result.final['r2']:.4f}" in listed


def test_old_baselines_stay_readable() -> None:
    assert Baseline.model_validate({"accuracy": 0.9}).accuracy == 0.9
    regression = Baseline.model_validate({"loss": 0.5, "mse": 2500.0, "mae": 40.0, "r2": 0.5})
    assert regression.accuracy is None
    assert "accuracy" not in json.loads(regression.model_dump_json())


def test_audit_refuses_a_regression_run(medical: tuple[Result, Path]) -> None:
    _, out = medical
    with pytest.raises(ConfigError, match="veil audit measures classifiers"):
        veil_cli("audit", str(out))


REGRESSION = {"dataset": "diabetes"}
CLASSES = {"dataset": "breast_cancer"}


@pytest.mark.parametrize(
    "data, model, extra, message",
    [
        (CLASSES, {"loss": "huber"}, {}, "loss = 'huber' is a regression loss"),
        (CLASSES, {"name": "linear"}, {}, "name = 'linear' is linear regression"),
        (REGRESSION, {"name": "logistic"}, {}, "use name = 'linear' (linear regression)"),
        (REGRESSION, {"loss": "cross_entropy"}, {}, "'cross_entropy' is for classification"),
        (REGRESSION, {"huber_delta": 2.0}, {}, "huber_delta applies to loss = 'huber'"),
        (
            REGRESSION,
            {},
            {"attack": {"kind": "label_flip", "fraction": 0.25}},
            "'label_flip' flips class labels",
        ),
        ({**REGRESSION, "task": "classification"}, {}, {}, "is a regression data set"),
        ({**CLASSES, "target_bounds": {"lower": 0, "upper": 1}}, {}, {}, "target_bounds apply"),
    ],
)
def test_a_setting_that_does_not_fit_the_task_is_one_config_error(
    data: dict[str, Any], model: dict[str, Any], extra: dict[str, Any], message: str
) -> None:
    raw = {"data": data, "model": model, "federation": {"clients": 4, "rounds": 2}, **extra}
    with pytest.raises(ConfigError) as info:
        RunConfig.from_dict(raw)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_a_deployment_trains_the_same_regression_as_the_simulation(tmp_path: Path) -> None:
    """Real processes on loopback: the members' data files carry the task and the target
    bounds, so each member trains and scores as the simulation does."""
    short = {"federation": {"rounds": 3, "centralized_baseline": False}}
    simulated = veil.run(_config("medical_regression", **short), tmp_path / "simulated")
    deployed = veil.run(
        _config("medical_regression", mode="deployment", **short), tmp_path / "deployed"
    )
    assert deployed.mode == "deployment"
    assert deployed.final["r2"] == pytest.approx(simulated.final["r2"], abs=1e-5)
    assert deployed.rounds[-1].metrics["federated_r2"] == pytest.approx(
        simulated.rounds[-1].metrics["federated_r2"], abs=1e-5
    )


def test_a_csv_target_trains_as_regression_with_task_and_target_bounds(tmp_path: Path) -> None:
    from sklearn.datasets import load_diabetes

    frame = load_diabetes(as_frame=True, scaled=False).frame
    frame.rename(columns={"target": "progression"}).to_csv(tmp_path / "clinics.csv", index=False)
    config = tmp_path / "clinics.toml"
    config.write_text(
        'seed = 7\n[data]\ndataset = "csv"\npath = "clinics.csv"\ntarget = "progression"\n'
        'task = "regression"\ntarget_bounds = {lower = 0, upper = 400}\n'
        '[model]\nname = "linear"\n'
        "[federation]\nclients = 4\nrounds = 10\nlearning_rate = 0.01\nmomentum = 0.9\n"
        "batch_size = 16\n"
    )
    result = veil.run(load_config(config), tmp_path / "out")
    assert result.classification is None
    assert result.final["r2"] > 0.35
