"""Regression data: the diabetes data set, a CSV regression target, and splits of a continuous
target (stratified by quantile bins; Dirichlet skew of the target)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_diabetes

from veil.data import FederatedData, build_federated_data, load_dataset
from veil.data.dataset import Dataset
from veil.data.federated import PartitionKind, _strata
from veil.errors import DataError


def _split(
    dataset: Dataset,
    partition: PartitionKind = "iid",
    alpha: float = 0.5,
    target_bounds: tuple[float, float] | None = None,
) -> FederatedData:
    return build_federated_data(
        dataset,
        n_clients=4,
        partition=partition,
        alpha=alpha,
        test_fraction=0.2,
        validation_fraction=0.2,
        scaling="bounds",
        seed=3,
        bounds=dataset.feature_bounds,
        target_bounds=target_bounds,
    )


def test_diabetes_is_the_real_raw_data_with_a_float_target() -> None:
    dataset = load_dataset("diabetes")
    raw = load_diabetes(scaled=False)
    assert dataset.task == "regression" and dataset.n_classes == 1 and dataset.class_names == ()
    assert dataset.features.shape == (442, 10) and dataset.labels.dtype == np.float32
    np.testing.assert_allclose(dataset.features, raw.data, rtol=1e-6)
    np.testing.assert_allclose(dataset.labels, raw.target)
    assert dataset.target_bounds == (0.0, 400.0)
    # The declared ranges hold every record (they are wider than the data).
    assert dataset.feature_bounds is not None
    assert dataset.feature_bounds.clamp(dataset.features) == pytest.approx(dataset.features)


def test_splits_of_a_continuous_target_span_its_range_and_keep_it_float() -> None:
    dataset = load_dataset("diabetes")
    fed = _split(dataset)
    assert fed.task == "regression" and fed.n_classes == 1 and fed.target_bounds == (0.0, 400.0)
    assert fed.y_test.dtype == np.float32 and fed.x_test.shape[0] == round(0.2 * 442)
    assert all(c.y_train.dtype == np.float32 for c in fed.clients)
    x, y = fed.pooled_train()
    assert y.dtype == np.float32 and x.shape[0] == y.shape[0]
    # Stratified by quantile bins: the test set's deciles track the whole data's.
    whole = np.quantile(dataset.labels, [0.1, 0.5, 0.9])
    assert np.quantile(fed.y_test, [0.1, 0.5, 0.9]) == pytest.approx(whole, rel=0.15)
    # Every example lands exactly once.
    every = np.concatenate([fed.y_test, *(np.r_[c.y_train, c.y_val] for c in fed.clients)])
    assert np.sort(every) == pytest.approx(np.sort(dataset.labels))


def test_dirichlet_on_a_regression_target_skews_the_target_across_clients() -> None:
    dataset = load_dataset("diabetes")
    skewed = _split(dataset, "dirichlet", alpha=0.1)
    even = _split(dataset, "dirichlet", alpha=1000.0)

    def spread(fed: FederatedData) -> float:
        return float(np.std([np.median(c.y_train) for c in fed.clients]))

    assert spread(skewed) > 2 * spread(even)


def test_strata_are_quantile_bins_of_a_float_target_and_classes_otherwise() -> None:
    y = np.arange(100, dtype=np.float32)
    bins = _strata(y)
    assert sorted(np.unique(bins)) == list(range(10))
    assert np.all(np.bincount(bins) == 10)
    assert np.all(_strata(np.arange(3, dtype=np.float32)) == 0)
    labels = np.array([0, 1, 1, 0])
    assert _strata(labels) is labels


def test_a_csv_target_loads_as_regression_when_asked(tmp_path: Path) -> None:
    frame = load_diabetes(as_frame=True).frame.rename(columns={"target": "progression"})
    path = tmp_path / "diabetes.csv"
    frame.to_csv(path, index=False)
    dataset = load_dataset("csv", path=path, target="progression", task="regression")
    assert dataset.task == "regression" and dataset.labels.dtype == np.float32
    np.testing.assert_allclose(dataset.labels, frame["progression"].to_numpy(), rtol=1e-6)
    assert "progression" not in dataset.feature_names and dataset.n_features == 10
    frame["progression"] = frame["progression"].astype(object)
    frame.loc[7, "progression"] = "thirty"
    frame.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"'progression'.*row 8: 'thirty' is not a finite number"):
        load_dataset("csv", path=path, target="progression", task="regression")
    frame.loc[7, "progression"] = None
    frame.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"row 8: the value is missing"):
        load_dataset("csv", path=path, target="progression", task="regression")


def test_a_built_in_data_set_keeps_its_own_task() -> None:
    with pytest.raises(DataError, match="'diabetes' is a regression data set"):
        load_dataset("diabetes", task="classification")
    with pytest.raises(DataError, match="'breast_cancer' is a classification data set"):
        load_dataset("breast_cancer", task="regression")


def test_the_dataset_contract_of_a_regression_target() -> None:
    x = np.zeros((3, 1), np.float32)
    with pytest.raises(ValueError, match="float32"):
        Dataset("t", x, np.zeros(3, np.int64), ("x",), (), task="regression")
    with pytest.raises(ValueError, match="NaN"):
        Dataset("t", x, np.array([0, np.nan, 1], np.float32), ("x",), (), task="regression")
    with pytest.raises(ValueError, match="no class names"):
        Dataset("t", x, np.zeros(3, np.float32), ("x",), ("a", "b"), task="regression")
    with pytest.raises(ValueError, match="regression target"):
        Dataset("t", x, np.array([0, 1, 0]), ("x",), ("a", "b"), target_bounds=(0.0, 1.0))


def test_config_target_bounds_override_the_data_sets() -> None:
    fed = _split(load_dataset("diabetes"), target_bounds=(10.0, 370.0))
    assert fed.target_bounds == (10.0, 370.0)
    with pytest.raises(DataError, match="regression target"):
        _split(load_dataset("breast_cancer"), target_bounds=(0.0, 1.0))
