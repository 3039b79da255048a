"""The audit sees what the run did: its canaries take the run's preprocessing (the declared
bounds clamp an extreme canary exactly as they clamp a training record) and its clipping path
(the run's `DPSGDTrainer` and clipping norm), and its membership figures come with confidence
intervals, in result.json and in the report.

Data: scikit-learn's Wisconsin breast cancer records (real); the extreme values and the scores
of the interval tests are SYNTHETIC, made here.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from rich.console import Console
from scipy.stats import binomtest

import veil
from veil.config import ModelConfig, RunConfig
from veil.data import Dataset, build_federated_data, load_dataset
from veil.federation.messages import TrainingPlan
from veil.models import build_model
from veil.privacy.audit import runner as audit_runner
from veil.privacy.audit.bounds import clopper_pearson_interval
from veil.privacy.audit.canaries import audit_with_canaries
from veil.privacy.audit.membership import attack_metrics, auc_interval
from veil.privacy.audit.recipe import TrainingRecipe
from veil.privacy.audit.runner import AuditSettings, audit_run
from veil.privacy.audit.target import AuditedRun
from veil.privacy.dp.dpsgd import DPSGDTrainer
from veil.report.audit import audit_table

#: "mean area" of the breast cancer data; declared range [100, 3000].
AREA = 3
SMALL = {"shadows": 2, "gradient_canaries": 100, "input_canaries": 20, "inversion_iterations": 5}


def dp_config() -> RunConfig:
    return RunConfig.from_dict(
        {
            "name": "audit-preprocessing",
            "seed": 3,
            "data": {"dataset": "breast_cancer", "scaling": "bounds", "validation_fraction": 0.0},
            "model": {"name": "logistic"},
            "federation": {
                "clients": 3,
                "rounds": 2,
                "batch_size": 32,
                "learning_rate": 0.5,
                "fraction_evaluate": 0.0,
            },
            "privacy": {
                "unit": "record",
                "epsilon": 1.0,
                "delta": 1e-5,
                "clip_norm": 0.7,
                "production": False,
                "noise_seed": 1,
            },
        }
    )


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bounds-dp-run")
    veil.run(dp_config(), out)
    return out


def clamped_like_training(value: float) -> np.float32:
    """The model input that the run's own data pipeline gives a training record whose mean area
    is `value`: one SYNTHETIC record added to the breast cancer data, split and scaled by
    `build_federated_data` with the run's declared bounds."""
    ds = load_dataset("breast_cancer")
    extra = ds.features[:1].copy()
    extra[0, AREA] = value
    neighbour = Dataset(
        name=ds.name,
        features=np.concatenate([ds.features, extra]),
        labels=np.concatenate([ds.labels, ds.labels[:1]]),
        feature_names=ds.feature_names,
        class_names=ds.class_names,
        feature_bounds=ds.feature_bounds,
    )
    fed = build_federated_data(
        neighbour,
        n_clients=1,
        partition="iid",
        alpha=1.0,
        test_fraction=0.05,
        validation_fraction=0.0,
        scaling="bounds",
        seed=0,
        bounds=ds.feature_bounds,
    )
    column = np.concatenate([fed.clients[0].x_train, fed.x_test])[:, AREA]
    return np.float32(column.max())


# ----------------------------------------------------------- canaries take the run's path


def test_canaries_are_clamped_by_the_declared_bounds_and_clipped_like_the_run(
    dp_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every held-out record gets an extreme mean area (1e30) before the audit draws its input
    canaries from them: the canaries the trainer receives carry exactly the value a training
    record with that extreme gets from the run's pipeline (clamped to the declared bound, then
    scaled), and they are trained by DP-SGD with the run's clipping norm."""
    load_run = audit_runner.load_run

    def with_extreme_pool(run_dir: Any, **kwargs: Any) -> AuditedRun:
        run = load_run(run_dir, **kwargs)
        assert run.fed.x_test_raw is not None
        raw = run.fed.x_test_raw.copy()
        raw[:, AREA] = 1e30
        return dataclasses.replace(run, fed=dataclasses.replace(run.fed, x_test_raw=raw))

    seen: list[tuple[float, torch.Tensor]] = []
    train = DPSGDTrainer.train

    def spy(self: DPSGDTrainer, model: Any, x: torch.Tensor, *args: Any) -> Any:
        seen.append((self.clip_norm, x.detach().clone()))
        return train(self, model, x, *args)

    monkeypatch.setattr(audit_runner, "load_run", with_extreme_pool)
    monkeypatch.setattr(DPSGDTrainer, "train", spy)
    section = audit_run(dp_run, AuditSettings(attacks=("canaries",), seed=4, **SMALL))

    canaries = section["canaries"]
    assert "clamped into the declared bounds" in canaries["preprocessing"]
    assert "raw held-out records" in canaries["preprocessing"]
    assert "clipping to C = 0.7" in canaries["trainer"]
    assert seen and all(clip == 0.7 for clip, _ in seen)  # the run's C, every round
    x = seen[0][1][:, :30].numpy()  # the base features of every training row
    expected = clamped_like_training(1e30)
    assert np.isfinite(expected) and expected == clamped_like_training(3000.0)
    canary_rows = x[:, AREA] == expected
    assert int(canary_rows.sum()) == canaries["included"]["input"] > 0
    # Nothing the trainer saw lies outside the image of the declared ranges.
    bounds = load_dataset("breast_cancer").feature_bounds
    assert bounds is not None
    scaler = bounds.scaler()
    assert (x <= np.float32((bounds.upper - scaler.mean) / scaler.scale)).all()
    assert (x >= np.float32((bounds.lower - scaler.mean) / scaler.scale)).all()


def test_input_canaries_pass_through_the_given_preprocessing(dp_run: Path) -> None:
    run = audit_runner.load_run(dp_run)
    client = run.fed.clients[0]
    assert run.fed.x_test_raw is not None
    pool = run.fed.x_test_raw.copy()
    pool[::2, AREA] = 1e30  # SYNTHETIC extreme values in half the pool
    recipe = TrainingRecipe(TrainingPlan(epochs=1, batch_size=32, learning_rate=0.1))
    kwargs: dict[str, Any] = {
        "n_classes": 2,
        "recipe": recipe,
        "gradient_canaries": 0,
        "input_canaries": 40,
    }

    def fresh() -> torch.nn.Module:
        return build_model(ModelConfig(name="logistic"), n_features=30, n_classes=2, seed=0)

    audit = audit_with_canaries(
        fresh,
        client.x_train,
        client.y_train,
        rng=np.random.default_rng(0),
        input_pool=(pool, run.fed.y_test),
        preprocess=client.preprocessing,
        **kwargs,
    )
    pick = np.random.default_rng(0).choice(pool.shape[0], 40, replace=False)
    np.testing.assert_array_equal(audit.inputs["input"], client.preprocessing(pool[pick]))
    assert np.isfinite(audit.inputs["input"]).all()
    assert audit.inputs["input"][:, AREA].max() == clamped_like_training(3000.0)  # clamped
    # Without `preprocess` the pool is taken as model inputs, unchanged (the earlier behaviour).
    plain = audit_with_canaries(
        fresh,
        client.x_train,
        client.y_train,
        rng=np.random.default_rng(0),
        input_pool=(run.fed.x_test, run.fed.y_test),
        **kwargs,
    )
    np.testing.assert_array_equal(plain.inputs["input"], run.fed.x_test[pick])


# ------------------------------------------------------ confidence intervals of membership figures


@pytest.mark.parametrize(("k", "n"), [(0, 114), (1, 114), (5, 455), (455, 455), (3, 7)])
def test_clopper_pearson_interval_is_scipys_exact_interval(k: int, n: int) -> None:
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    low, high = clopper_pearson_interval(k, n, 0.95)
    assert low == pytest.approx(ci.low, abs=1e-12) and high == pytest.approx(ci.high, abs=1e-12)


def test_auc_interval_is_delongs_with_ties() -> None:
    """Against DeLong's structural components computed pair by pair (SYNTHETIC scores with
    ties)."""
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=300) + np.r_[np.full(120, 0.4), np.zeros(180)], 1)
    member = np.r_[np.ones(120, bool), np.zeros(180, bool)]
    pos, neg = scores[member], scores[~member]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    se = np.sqrt(v10.var(ddof=1) / pos.size + v01.var(ddof=1) / neg.size)
    low, high = auc_interval(scores, member, 0.95)
    assert low == pytest.approx(psi.mean() - 1.959963984540054 * se, abs=1e-12)
    assert high == pytest.approx(psi.mean() + 1.959963984540054 * se, abs=1e-12)


def test_attack_metrics_carry_intervals_for_every_figure() -> None:
    rng = np.random.default_rng(1)
    member = np.r_[np.ones(455, bool), np.zeros(114, bool)]
    scores = rng.normal(size=569) + 0.3 * member  # a weak SYNTHETIC attack
    m = attack_metrics(scores, member, confidence=0.9)
    assert m.confidence == 0.9
    for value, (low, high) in (
        (m.auc, m.auc_interval),
        (m.tpr_at_1_percent_fpr, m.tpr_at_1_percent_fpr_interval),
        (m.tpr_at_0_1_percent_fpr, m.tpr_at_0_1_percent_fpr_interval),
        (m.fpr_at_1_percent, m.fpr_at_1_percent_interval),
        (m.fpr_at_0_1_percent, m.fpr_at_0_1_percent_interval),
    ):
        assert 0 <= low <= value <= high <= 1
    # With 114 non-members "0.1 % FPR" means no false positive, whose true rate may be ~2 %.
    assert m.fpr_at_0_1_percent == 0
    assert m.fpr_at_0_1_percent_interval[1] == pytest.approx(1 - 0.05 ** (1 / 114))
    tp = round(m.tpr_at_1_percent_fpr * 455)
    assert m.tpr_at_1_percent_fpr_interval == clopper_pearson_interval(tp, 455, 0.9)
    as_json = json.loads(json.dumps(m.to_dict()))
    assert as_json["auc_interval"] == list(m.auc_interval) and "DeLong" in as_json["intervals"]


def test_the_audit_records_the_intervals_in_result_json_and_the_report(dp_run: Path) -> None:
    section = audit_run(dp_run, AuditSettings(attacks=("membership",), seed=2, **SMALL))
    stored = json.loads((dp_run / "result.json").read_text())["audit"]["membership"]
    assert stored == json.loads(json.dumps(section["membership"]))
    assert stored["confidence"] == 0.95
    for attack in ("loss_threshold", "lira"):
        m = stored[attack]
        for key in ("auc", "tpr_at_1_percent_fpr", "tpr_at_0_1_percent_fpr"):
            low, high = m[f"{key}_interval"]
            assert 0 <= low <= m[key] <= high <= 1
        assert high - low > 0  # a finite sample never pins a TPR down
    console = Console(width=200, record=True)
    console.print(audit_table(section))
    text = console.export_text()
    auc = stored["loss_threshold"]["auc"]
    low, high = stored["loss_threshold"]["auc_interval"]
    assert f"AUC {auc:.3f} [{low:.3f}, {high:.3f}]" in text
    assert "confidence intervals" in text and "DeLong" in text and "Clopper-Pearson" in text
