"""A continuous target given as a classification target is refused, not trained as hundreds
of classes: the message names the column, its count of distinct values and `max_classes`, and
says it may be a regression target."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sklearn.datasets import load_diabetes

from veil.assembly.data import federated_data
from veil.config import load_config
from veil.data import load_dataset
from veil.errors import DataError


@pytest.fixture
def diabetes_csv(tmp_path: Path) -> tuple[Path, int]:
    """scikit-learn's diabetes data (442 patients; target: disease progression, continuous) as
    a CSV whose column 'progression' is the target; with its number of distinct targets."""
    frame = load_diabetes(as_frame=True).frame.rename(columns={"target": "progression"})
    path = tmp_path / "diabetes.csv"
    frame.to_csv(path, index=False)
    return path, int(frame["progression"].nunique())


def test_a_continuous_target_is_refused_with_the_hint(diabetes_csv: tuple[Path, int]) -> None:
    path, distinct = diabetes_csv
    assert distinct > 100
    with pytest.raises(DataError) as info:
        load_dataset("csv", path=path, target="progression")
    message = str(info.value)
    assert f"target column 'progression' of data file '{path}' has {distinct} distinct" in message
    assert "more than max_classes = 100" in message
    assert "may be a regression target" in message
    assert "[data] task = 'regression'" in message


def test_max_classes_is_the_declared_limit(diabetes_csv: tuple[Path, int]) -> None:
    path, distinct = diabetes_csv
    with pytest.raises(DataError, match=f"more than max_classes = {distinct - 1}:"):
        load_dataset("csv", path=path, target="progression", max_classes=distinct - 1)
    # At the limit the column loads, one class per distinct value.
    dataset = load_dataset("csv", path=path, target="progression", max_classes=distinct)
    assert len(dataset.class_names) == distinct
    # A real class column of the same file is untouched by the limit.
    assert load_dataset("csv", path=path, target="sex").class_names.__len__() == 2


def test_veil_run_refuses_it_in_one_line_and_trains_nothing(
    tmp_path: Path, diabetes_csv: tuple[Path, int]
) -> None:
    path, distinct = diabetes_csv
    config = tmp_path / "diabetes.toml"
    config.write_text(
        f'[data]\ndataset = "csv"\npath = "{path.name}"\ntarget = "progression"\n'
        "[federation]\nclients = 4\nrounds = 2\n"
    )
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "veil.cli", "run", str(config), "--out", str(out), "--quiet"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "'progression'" in lines[0] and f"{distinct} distinct values" in lines[0]
    assert "max_classes = 100" in lines[0] and "regression target" in lines[0]
    assert not (out / "result.json").exists()


def test_the_config_key_sets_the_limit(tmp_path: Path, diabetes_csv: tuple[Path, int]) -> None:
    path, distinct = diabetes_csv
    config = tmp_path / "diabetes.toml"
    config.write_text(
        f'[data]\ndataset = "csv"\npath = "{path.name}"\ntarget = "progression"\n'
        f"max_classes = {distinct - 1}\n[federation]\nclients = 2\nrounds = 1\n"
    )
    with pytest.raises(DataError, match=f"more than max_classes = {distinct - 1}:"):
        federated_data(load_config(config))
