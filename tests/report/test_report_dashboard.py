"""The dashboard's HTTP side: runs, rounds and the report's curves as JSON, read-only, loopback,
nothing secret; started on an empty folder, it shows runs as they appear."""

from __future__ import annotations

import json
import math
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import veil
from veil.config import RunConfig
from veil.errors import StoreError
from veil.report.dashboard import PAGE, make_server, serve_in_thread, url_of
from veil.report.html import REPORT_FILE
from veil.store import RunStore


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read()
            kind = response.headers["Content-Type"]
            return response.status, json.loads(body) if "json" in kind else body.decode()
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _dp_config(name: str = "dash-dp") -> RunConfig:
    return RunConfig.from_dict(
        {
            "name": name,
            "seed": 2,
            "data": {"dataset": "breast_cancer", "validation_fraction": 0.0, "scaling": "bounds"},
            "model": {"name": "logistic"},
            "federation": {"clients": 3, "rounds": 2, "fraction_evaluate": 0.0},
            "privacy": {"unit": "record", "epsilon": 2.0, "delta": 1e-5, "clip_norm": 1.0},
        }
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dash")
    veil.run(_dp_config(), out)
    return out


@pytest.fixture()
def base(run_dir: Path) -> Iterator[str]:
    server = make_server(run_dir, port=0)
    serve_in_thread(server)
    try:
        yield url_of(server)
    finally:
        server.shutdown()
        server.server_close()


def test_binds_loopback_by_default(run_dir: Path) -> None:
    server = make_server(run_dir, port=0)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.server_close()


def test_lists_runs_and_shows_rounds_with_epsilon(base: str, run_dir: Path) -> None:
    status, listing = _get(base + "api/runs")
    assert status == 200
    [summary] = listing["runs"]
    assert summary["name"] == "dash-dp" and summary["status"] == "finished"
    status, run = _get(base + f"api/runs/{summary['run_id']}")
    assert status == 200
    assert [r["round"] for r in run["rounds"]] == [1, 2]
    eps = [r["epsilon"] for r in run["rounds"]]
    assert 0 < eps[0] < eps[1] <= 2.0
    assert run["facts"]["epsilon_budget"] == 2.0 and run["facts"]["organisations"] == 3
    text = json.dumps(run)
    assert str(run_dir) not in text and "key_file" not in text


def test_is_read_only_and_404s(base: str) -> None:
    request = urllib.request.Request(base + "api/runs", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 405
    assert _get(base + "api/runs/nope")[0] == 404
    assert _get(base + "etc/passwd")[0] == 404


def test_page_loads_nothing_external(base: str) -> None:
    status, page = _get(base)
    assert status == 200 and page == PAGE
    assert "http://" not in page and "https://" not in page


def test_nan_metrics_become_null(tmp_path: Path) -> None:
    with RunStore(tmp_path / "veil.db") as store:
        store.start_run("r-nan", name="nan", mode="simulation", config={}, out_dir=None)
        store.record_round(
            "r-nan",
            {"round": 1, "clients": 1, "dropped": 0, "metrics": {"loss": math.nan}},
        )
    server = make_server(tmp_path, port=0)
    serve_in_thread(server)
    try:
        status, run = _get(url_of(server) + "api/runs/r-nan")
    finally:
        server.shutdown()
        server.server_close()
    assert status == 200 and run["rounds"][0]["metrics"] == {"loss": None}


def test_run_carries_the_reports_curves(base: str, run_dir: Path) -> None:
    [summary] = _get(base + "api/runs")[1]["runs"]
    assert summary["headline"]["key"] == "accuracy"
    assert summary["headline"]["value"] == pytest.approx(summary["final"]["accuracy"])
    run = _get(base + f"api/runs/{summary['run_id']}")[1]
    titles = [re.search(r'class="t">([^<]*)<', svg).group(1) for svg in run["charts"]]  # type: ignore[union-attr]
    assert titles == [
        "Accuracy per round",
        "Loss per round",
        "ε spent per round against the budget",
    ]
    assert all(svg.count("<circle") >= 2 for svg in run["charts"])  # a point per round
    assert "budget ε = 2.000" in run["charts"][2]
    # One plotting path: the report of the same run holds the very same SVG.
    report = (run_dir / REPORT_FILE).read_text()
    for svg in run["charts"]:
        assert svg in report


def test_starts_on_a_missing_folder_and_shows_runs_as_they_appear(tmp_path: Path) -> None:
    where = tmp_path / "runs"  # does not exist yet
    server = make_server(where, port=0)
    serve_in_thread(server)
    try:
        base = url_of(server)
        assert _get(base)[0] == 200
        assert _get(base + "api/runs") == (200, {"runs": []})
        where.mkdir()
        assert _get(base + "api/runs") == (200, {"runs": []})
        veil.run(_dp_config("appears"), where / "first")
        status, listing = _get(base + "api/runs")
        assert status == 200 and [r["name"] for r in listing["runs"]] == ["appears"]
        status, run = _get(base + f"api/runs/{listing['runs'][0]['run_id']}")
        assert status == 200 and [r["round"] for r in run["rounds"]] == [1, 2]
        assert len(run["charts"]) == 3 and "Loss per round" in run["charts"][1]
        assert run["headline"]["label"] == "accuracy"
    finally:
        server.shutdown()
        server.server_close()


def test_a_file_that_is_no_store_is_refused_at_once(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text("[data]\n")
    with pytest.raises(StoreError, match="pass a run folder"):
        make_server(config, port=0)


def test_a_regression_run_gets_r2_where_accuracy_would_be(tmp_path: Path) -> None:
    with RunStore(tmp_path / "veil.db") as store:
        store.start_run("r-reg", name="reg", mode="simulation", config={}, out_dir=None)
        for k in (1, 2):
            metrics = {"loss": 1.0 / k, "mse": 3000.0 / k, "mae": 50.0 / k, "r2": 0.2 * k}
            store.record_round(
                "r-reg", {"round": k, "clients": 4, "dropped": 0, "metrics": metrics}
            )
        store.finish_run("r-reg", status="finished", final={"r2": 0.4, "mse": 1500.0})
    server = make_server(tmp_path, port=0)
    serve_in_thread(server)
    try:
        [summary] = _get(url_of(server) + "api/runs")[1]["runs"]
        run = _get(url_of(server) + "api/runs/r-reg")[1]
    finally:
        server.shutdown()
        server.server_close()
    assert summary["headline"] == {"key": "r2", "label": "R²", "value": 0.4}
    assert run["headline"]["value"] == pytest.approx(0.4)
    titles = [re.search(r'class="t">([^<]*)<', svg).group(1) for svg in run["charts"]]  # type: ignore[union-attr]
    assert titles == ["R² per round", "MSE per round", "MAE per round", "Loss per round"]
