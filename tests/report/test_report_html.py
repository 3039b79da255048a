"""`report.html`: sections and values for a plain and a DP run, self-contained, robust to NaN."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

import veil
from veil.cli import main
from veil.config import RunConfig
from veil.errors import UserError
from veil.report.html import REPORT_FILE, render_report, write_report
from veil.report.svg import bar_chart, line_chart

SECTIONS = (
    "summary",
    "data",
    "performance",
    "budget",
    "participation",
    "communication",
    "privacy",
    "audit",
    "configuration",
    "rounds",
)


def _config(name: str, **extra: Any) -> RunConfig:
    raw: dict[str, Any] = {
        "name": name,
        "seed": 3,
        "data": {
            "dataset": "breast_cancer",
            "partition": {"kind": "iid"},
            "validation_fraction": 0.0,
            "scaling": "bounds",
        },
        "model": {"name": "logistic"},
        "federation": {"clients": 3, "rounds": 2, "learning_rate": 0.5, "fraction_evaluate": 0.0},
        **extra,
    }
    return RunConfig.from_dict(raw)


def _no_external_loads(html: str) -> None:
    assert "http://" not in html and "https://" not in html
    assert not re.search(r"<(script|link|img|iframe)\b[^>]*\b(src|href)=", html)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("plain")
    veil.run(_config("report-plain <b>"), out)
    return out


@pytest.fixture(scope="module")
def private(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dp")
    privacy = {
        "unit": "record",
        "epsilon": 2.0,
        "delta": 1e-5,
        "noise_multiplier": "calibrate",
        "clip_norm": 1.0,
    }
    veil.run(_config("report-dp", privacy=privacy), out)
    return out


def test_run_writes_a_report_with_every_section(plain: Path) -> None:
    html = (plain / REPORT_FILE).read_text()
    result = json.loads((plain / "result.json").read_text())
    for anchor in SECTIONS:
        assert f'id="{anchor}"' in html, anchor
    assert result["run_id"] in html
    # The run's name is escaped, never markup.
    assert "report-plain &lt;b&gt;" in html and "report-plain <b>" not in html
    assert f"{result['final']['accuracy']:.4f}" in html
    assert "no differential privacy" in html
    assert "breast_cancer" in html and "real data" in html
    # Configuration from veil.db: the learning rate and the client count.
    assert "federation.learning_rate" in html and "federation.clients" in html
    assert html.count("<svg") >= 4
    _no_external_loads(html)


def test_dp_report_shows_epsilon_against_the_budget(private: Path) -> None:
    html = (private / REPORT_FILE).read_text()
    result = json.loads((private / "result.json").read_text())
    eps = result["privacy"]["epsilon"]
    assert 0 < eps <= 2.0
    assert f"{eps:.4f}" in html
    assert "budget ε = 2.000" in html  # the dashed budget line of the chart
    assert "ε spent per round against the budget" in html
    assert "dp-accounting PLD" in html
    assert "one record of one organisation" in html
    for org in result["privacy"]["per_organisation"]:
        assert org["name"] in html
    assert html.count('class="ref"') == 1
    _no_external_loads(html)


def test_cli_report_rewrites_the_report_and_prints_its_path(
    plain: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (plain / REPORT_FILE).unlink()
    assert main(["report", str(plain)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {plain / REPORT_FILE}"
    assert (plain / REPORT_FILE).is_file()


def test_report_of_a_folder_without_result_is_a_user_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(UserError, match=r"no result\.json"):
        write_report(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    assert "no result.json" in capsys.readouterr().err


def _result(rounds: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "run_id": "r1",
        "name": "edge",
        "mode": "simulation",
        "final": {"accuracy": math.nan, "loss": math.inf},
        "rounds": rounds,
        "privacy": {"aggregation": "plain"},
        "communication": {"bytes_up": 10, "bytes_down": 10},
        "timing": {"total_s": 1.0},
        **extra,
    }


def test_nan_and_null_metrics_do_not_break_the_report(tmp_path: Path) -> None:
    rounds = [
        {"round": 1, "clients": 2, "dropped": 1, "metrics": {"loss": math.nan, "accuracy": 0.5}},
        {"round": 2, "clients": 2, "dropped": 0, "metrics": {"loss": None, "accuracy": None}},
        {"round": 3, "clients": 2, "dropped": 0, "metrics": {"loss": 0.3, "accuracy": math.inf}},
    ]
    (tmp_path / "result.json").write_text(json.dumps(_result(rounds)))  # writes NaN, Infinity
    html = write_report(tmp_path).read_text()
    assert "n/a" in html
    assert ">nan<" not in html and ">NaN<" not in html and ">inf<" not in html
    assert 'id="rounds"' in html


def test_audit_section_shows_the_lower_bound(tmp_path: Path) -> None:
    audit = {
        "epsilon": 1.0,
        "delta": 1e-5,
        "epsilon_lower": 0.42,
        "confidence": 0.95,
        "canaries": {"best": {"correct": 40, "guesses": 50, "kind": "gradient"}},
        "exceeds_epsilon": False,
    }
    rounds = [{"round": 1, "clients": 2, "dropped": 0, "metrics": {"accuracy": 0.9}}]
    html = render_report(_result(rounds, audit=audit))
    assert "ε ≥ 0.420 at 95% confidence" in html
    assert "consistent" in html


def test_secure_aggregation_and_failures_are_listed() -> None:
    rounds = [
        {
            "round": 1,
            "clients": 2,
            "dropped": 1,
            "selected": 3,
            "metrics": {"accuracy": 0.8},
            "failures": [{"client": "bank-<3>", "reason": "timeout: no upload in 60 s"}],
            "failure_counts": {"timeout": 1},
            "aggregation": {"protocol": "secagg+", "recovered_dropouts": 1, "clipped": 4},
        }
    ]
    privacy = {"aggregation": "secagg", "secure_aggregation": {"protocol": "secagg+"}}
    html = render_report(_result(rounds, privacy=privacy))
    assert "bank-&lt;3&gt;" in html and "bank-<3>" not in html
    assert "1 dropouts recovered, 4 values clipped" in html
    assert "secure aggregation (masking)" in html
    assert "<td>timeout</td>" in html


def test_charts_leave_gaps_for_missing_points_and_escape_labels() -> None:
    svg = line_chart({"<acc>": [(1, 0.5), (2, None), (3, 0.7), (4, 0.8)]}, title="t & u")
    assert svg.count("<polyline") == 1  # (3, 4) joined; 1 stands alone
    assert svg.count("<circle") == 3
    assert "&lt;acc&gt;" in svg and "t &amp; u" in svg
    assert "no data" in line_chart({"a": [(1, math.nan)]}, title="empty")
    bars = bar_chart([1, 2], {"up": [1.0, 2.0], "down": [None, 1.0]}, title="b")
    assert bars.count("<rect") == 3 + 2  # three segments, two legend boxes
