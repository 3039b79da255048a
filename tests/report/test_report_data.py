"""The report's Data section (organisations, rows, files, the data contract's hash, escaped) and
a regression run's report (R², MSE, MAE and loss curves instead of accuracy)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from veil.report.curves import metric_groups
from veil.report.html import render_report, write_report
from veil.result import (
    Baseline,
    Communication,
    DataRecord,
    OrganisationData,
    PrivacyRecord,
    Result,
    RoundResult,
    Timing,
)

SCHEMA_HASH = "sha256:" + "0123456789abcdef" * 4


def _result(**extra: Any) -> Result:
    rounds = [
        RoundResult(
            round=k,
            clients=3,
            dropped=0,
            metrics={"loss": 3000.0 / k, "mse": 6000.0 / k, "mae": 60.0 / k, "r2": 0.1 * k},
        )
        for k in (1, 2, 3)
    ]
    return Result(
        run_id="20260101-000000-reg",
        name="clinics",
        mode="simulation",
        final={"loss": 1000.0, "mse": 2000.0, "mae": 20.0, "r2": 0.3},
        rounds=rounds,
        privacy=PrivacyRecord(),
        communication=Communication(bytes_up=100, bytes_down=100),
        timing=Timing(total_s=1.0),
        clients=3,
        dataset={"name": "diabetes", "synthetic": False},
        **extra,
    )


def _data() -> DataRecord:
    return DataRecord(
        dataset="diabetes",
        task="regression",
        schema_hash=SCHEMA_HASH,
        schema_file="schema.toml",
        organisations=[
            OrganisationData(name="clinic_a", rows=120, validation_rows=10, file="clinic_a.csv"),
            OrganisationData(name="<b>clinic&b</b>", rows=95, file="b<i>.parquet"),
            OrganisationData(name="clinic_c", rows=101),
        ],
        test_rows=88,
        test_file="held_out.csv",
    )


def _section(html: str, anchor: str) -> str:
    match = re.search(rf'<section id="{anchor}">.*?</section>', html, re.S)
    assert match, f"no {anchor} section"
    return match.group(0)


def test_data_section_shows_organisations_rows_files_and_the_schema_hash() -> None:
    html = render_report(json.loads(_result(data=_data()).to_json()))
    data = _section(html, "data")
    for shown in ("clinic_a", "120", "10", "clinic_a.csv", "clinic_c", "101", "held_out.csv"):
        assert shown in data, shown
    assert "88 rows" in data and "schema.toml" in data and "regression" in data
    assert "<td>316</td>" in data.replace(' class="n"', "")  # 120 + 95 + 101 training rows
    # The full hash in the tooltip, a short form on the page.
    assert f'title="{SCHEMA_HASH}"' in data and "sha256:0123456789ab…" in data
    # Names from a config are text, never markup.
    assert "&lt;b&gt;clinic&amp;b&lt;/b&gt;" in data and "<b>clinic" not in html
    assert "b&lt;i&gt;.parquet" in data and "<i>" not in html
    # The organisations are who trained, also in the summary.
    assert "clinic_a, &lt;b&gt;clinic&amp;b&lt;/b&gt;, clinic_c" in _section(html, "summary")


def test_an_older_result_gets_what_it_recorded_and_none_without_data() -> None:
    old = json.loads(_result().to_json())
    assert "data" not in old
    data = _section(render_report(old), "data")
    assert "diabetes" in data and "predates the data record" in data
    del old["dataset"], old["clients"]
    assert 'id="data"' not in render_report(old)


def test_a_regression_report_draws_r2_error_and_loss(tmp_path: Path) -> None:
    # The pooled baseline of a regression has no accuracy.
    baseline = Baseline.model_validate({"r2": 0.35, "mse": 1900.0, "mae": 19.0, "loss": 950.0})
    result = _result(data=_data(), centralized_baseline=baseline)
    assert "accuracy" not in json.loads(result.to_json())["centralized_baseline"]
    (tmp_path / "result.json").write_text(result.to_json())
    html = write_report(tmp_path).read_text()
    performance = _section(html, "performance")
    titles = re.findall(r'class="t">([^<]*)<', performance)
    # MSE and MAE apart: their scales differ by orders of magnitude.
    assert titles == ["R² per round", "MSE per round", "MAE per round", "Loss per round"]
    charts = re.findall(r"<svg.*?</svg>", performance, re.S)
    assert all(svg.count("<circle") == 3 for svg in charts)  # one point per round each
    assert "final R²" in performance and "0.3000" in performance
    assert "pooled-data baseline R²" in performance and "0.3500" in performance
    assert "Accuracy per round" not in html
    assert "(pooled-data baseline: R² 0.3500)" in _section(html, "summary")


def test_metric_names_decide_the_charts() -> None:
    classifier = metric_groups(
        ["accuracy", "auc", "loss", "train_loss", "federated_accuracy", "macro_f1", "odd"]
    )
    assert [(g.title, g.keys) for g in classifier] == [
        ("Accuracy per round", ("accuracy", "auc", "federated_accuracy", "macro_f1")),
        ("Loss per round", ("loss", "train_loss")),
    ]
    regression = metric_groups(["r2", "federated_mse", "mse", "mae", "loss"])
    assert [(g.title, g.keys) for g in regression] == [
        ("R² per round", ("r2",)),
        ("MSE per round", ("federated_mse", "mse")),
        ("MAE per round", ("mae",)),
        ("Loss per round", ("loss",)),
    ]
    assert [g.title for g in metric_groups([])] == ["Accuracy per round", "Loss per round"]
