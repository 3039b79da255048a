"""The `veil` command as a real process: exit codes, one-line errors, run listing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def veil(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "veil.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


def small_config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "small.toml"
    path.write_text(
        'name = "small"\nseed = 1\n[data]\ndataset = "breast_cancer"\n'
        f"[federation]\nclients = 3\nrounds = 2\n{extra}"
    )
    return path


def test_run_writes_result_prints_tables_and_lists(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = veil("run", str(small_config(tmp_path)), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "Summary" in proc.stdout and "final accuracy" in proc.stdout
    assert "round" in proc.stdout
    result = json.loads((out / "result.json").read_text())
    assert result["mode"] == "simulation" and len(result["rounds"]) == 2

    listed = veil("runs", "list", str(out))
    assert listed.returncode == 0, listed.stderr
    assert result["run_id"] in listed.stdout

    shown = veil("runs", "show", result["run_id"], "--store", str(out), "--json")
    assert shown.returncode == 0, shown.stderr
    payload = json.loads(shown.stdout)
    assert payload["summary"]["run_id"] == result["run_id"]
    assert [r["round"] for r in payload["rounds"]] == [1, 2]


def test_quiet_prints_nothing(tmp_path: Path) -> None:
    proc = veil("run", str(small_config(tmp_path)), "--out", str(tmp_path / "o"), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert (tmp_path / "o" / "result.json").is_file()


def test_invalid_config_exits_2_with_one_line(tmp_path: Path) -> None:
    config = small_config(tmp_path, "fraction_fit = 2.0\n")
    proc = veil("run", str(config), "--out", str(tmp_path / "o"), "--quiet")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "federation.fraction_fit = 2.0" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o" / "result.json").exists()


def test_missing_dataset_file_names_the_path(tmp_path: Path) -> None:
    config = tmp_path / "csv.toml"
    config.write_text(
        '[data]\ndataset = "csv"\npath = "missing/patients.csv"\ntarget = "y"\n'
        "[federation]\nclients = 2\nrounds = 1\n"
    )
    proc = veil("run", str(config), "--quiet")
    assert proc.returncode == 2
    assert "missing/patients.csv" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_unknown_run_exits_2(tmp_path: Path) -> None:
    proc = veil("run", str(small_config(tmp_path)), "--out", str(tmp_path / "o"), "--quiet")
    assert proc.returncode == 0
    proc = veil("runs", "show", "no-such-run", "--store", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert "no run 'no-such-run'" in proc.stderr


def test_runs_list_without_a_store_exits_2(tmp_path: Path) -> None:
    proc = veil("runs", "list", str(tmp_path / "nothing"))
    assert proc.returncode == 2
    assert "no run store" in proc.stderr
