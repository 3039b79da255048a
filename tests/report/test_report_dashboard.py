"""The dashboard's HTTP side: runs and rounds as JSON, read-only, loopback, nothing secret."""

from __future__ import annotations

import json
import math
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
from veil.store import RunStore


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read()
            kind = response.headers["Content-Type"]
            return response.status, json.loads(body) if "json" in kind else body.decode()
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dash")
    config = RunConfig.from_dict(
        {
            "name": "dash-dp",
            "seed": 2,
            "data": {"dataset": "breast_cancer", "validation_fraction": 0.0, "scaling": "bounds"},
            "model": {"name": "logistic"},
            "federation": {"clients": 3, "rounds": 2, "fraction_evaluate": 0.0},
            "privacy": {"unit": "record", "epsilon": 2.0, "delta": 1e-5, "clip_norm": 1.0},
        }
    )
    veil.run(config, out)
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


def test_without_a_store_says_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="pass a run folder"):
        make_server(tmp_path, port=0)
