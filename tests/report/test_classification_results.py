"""Per-class results of the final model: macro/weighted F1, per-class precision, recall and
one-vs-rest AUC, the confusion matrix, and for binary tasks ROC and calibration curves, in
result.json and in report.html; an older result.json without them still reads and renders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, f1_score, roc_auc_score

import veil
from veil.assembly.data import federated_data
from veil.assembly.model import model as build_run_model
from veil.config import RunConfig
from veil.federation.training import as_tensors
from veil.models import set_parameters
from veil.report.html import REPORT_FILE, render_report, write_report
from veil.report.svg import unit_curve
from veil.result import Result
from veil.store import load_checkpoint


def _config(dataset: str, clients: int) -> RunConfig:
    return RunConfig.from_dict(
        {
            "seed": 11,
            "data": {"dataset": dataset},
            "model": {"name": "logistic"},
            "federation": {"clients": clients, "rounds": 2, "learning_rate": 0.1},
        }
    )


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunConfig, Path]:
    config = _config("digits", 4)
    out = tmp_path_factory.mktemp("digits")
    veil.run(config, out)
    return config, out


@pytest.fixture(scope="module")
def breast_cancer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("breast_cancer")
    veil.run(_config("breast_cancer", 3), out)
    return out


def _final_predictions(config: RunConfig, out: Path) -> tuple[np.ndarray, np.ndarray, Any]:
    """The test labels, the saved final model's predictions and its class probabilities,
    recomputed outside the run from the checkpoint and the seeded partition."""
    fed = federated_data(config)
    model = build_run_model(config, fed)
    set_parameters(model, load_checkpoint(out / "checkpoint.safetensors").parameters)
    x, y = as_tensors(fed.x_test, fed.y_test)
    model.train(False)
    logits = model(x).detach()
    return y.numpy(), logits.argmax(dim=1).numpy(), logits.softmax(dim=1).numpy()


def test_multiclass_result_matches_sklearn_on_the_final_model(
    digits: tuple[RunConfig, Path],
) -> None:
    config, out = digits
    raw = json.loads((out / "result.json").read_text())
    result = Result.model_validate(raw)
    summary = result.classification
    assert summary is not None
    labels, predicted, probs = _final_predictions(config, out)

    matrix = np.array(summary.confusion_matrix)
    assert matrix.shape == (10, 10)
    assert matrix.sum() == labels.size
    assert (matrix == confusion_matrix(labels, predicted, labels=list(range(10)))).all()
    assert np.trace(matrix) / matrix.sum() == pytest.approx(result.final["accuracy"], abs=1e-6)
    assert summary.macro_f1 == pytest.approx(f1_score(labels, predicted, average="macro"))
    assert summary.weighted_f1 == pytest.approx(f1_score(labels, predicted, average="weighted"))
    assert result.final["macro_f1"] == summary.macro_f1
    assert result.final["weighted_f1"] == summary.weighted_f1
    # Row sums are the supports; each class's recall is its diagonal over its row.
    for k, cls in enumerate(summary.classes):
        assert cls.support == matrix[k].sum()
        assert cls.recall == pytest.approx(matrix[k, k] / matrix[k].sum())
        assert cls.auc == pytest.approx(roc_auc_score(labels == k, probs[:, k]), abs=1e-6)
    assert summary.auc_ovr_macro is not None and 0.5 < summary.auc_ovr_macro <= 1.0
    # Curves are for two-class tasks only.
    assert summary.roc is None and summary.calibration is None
    assert "roc" not in raw["classification"] or raw["classification"]["roc"] is None


def test_binary_result_has_auc_roc_and_calibration(breast_cancer: Path) -> None:
    result = Result.model_validate_json((breast_cancer / "result.json").read_text())
    summary = result.classification
    assert summary is not None and summary.roc and summary.calibration
    assert 0.0 <= result.final["auc"] <= 1.0
    assert summary.classes[1].auc == pytest.approx(result.final["auc"])
    assert len(summary.roc) <= 50
    fpr = [p.fpr for p in summary.roc]
    tpr = [p.tpr for p in summary.roc]
    assert fpr == sorted(fpr) and tpr == sorted(tpr)
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    # Trapezoid area under the kept points stays close to the exact AUC.
    assert float(np.trapezoid(tpr, fpr)) == pytest.approx(result.final["auc"], abs=0.02)
    assert sum(b.count for b in summary.calibration) == sum(c.support for c in summary.classes)
    assert all(0.0 <= b.predicted <= 1.0 and 0.0 <= b.observed <= 1.0 for b in summary.calibration)


def test_report_shows_matrix_per_class_table_and_binary_curves(
    digits: tuple[RunConfig, Path], breast_cancer: Path
) -> None:
    multiclass = write_report(digits[1]).read_text()
    assert 'id="classification"' in multiclass
    assert "Confusion matrix" in multiclass and "macro F1" in multiclass
    summary = json.loads((digits[1] / "result.json").read_text())["classification"]
    first_row = "".join(f'<td class="n">{v}</td>' for v in summary["confusion_matrix"][0])
    assert first_row in multiclass
    assert "ROC curve" not in multiclass  # ten classes: no binary curves

    binary = write_report(breast_cancer).read_text()
    assert 'aria-label="ROC curve (held-out test set)"' in binary
    assert 'aria-label="Calibration (reliability) curve"' in binary
    assert (breast_cancer / REPORT_FILE).is_file()


def test_old_result_without_classification_validates_and_renders(breast_cancer: Path) -> None:
    raw = json.loads((breast_cancer / "result.json").read_text())
    del raw["classification"]
    for key in ("macro_f1", "weighted_f1"):
        del raw["final"][key]
    old = Result.model_validate(raw)
    assert old.classification is None
    assert "classification" not in json.loads(old.to_json())
    page = render_report(raw)
    assert 'id="classification"' not in page and 'id="performance"' in page
    # A damaged section (wrong types) still renders instead of failing the report.
    page = render_report({**raw, "classification": {"classes": [None, 3], "roc": "x"}})
    assert "<html" in page


def test_unit_curve_skips_non_finite_points_and_escapes_labels() -> None:
    svg = unit_curve(
        {"<b>": [(0.0, 0.0), (float("nan"), 0.5), (0.5, None), (1.0, 1.0)]},
        title="t & u",
        x_label="x",
        y_label="y",
        diagonal="chance",
    )
    assert svg.count("<circle") == 2 and "<b>" not in svg and "&lt;b&gt;" in svg
    assert 'class="diag"' in svg
    assert "no data" in unit_curve({"a": [(float("inf"), 0.1)]}, title="t", x_label="", y_label="")
