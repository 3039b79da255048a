"""Tests for `veil.data.build_federated_data`: no leakage, correct scaling, determinism."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from veil.data import (
    Dataset,
    FederatedData,
    build_federated_data,
    fit_scaler,
    load_dataset,
)
from veil.errors import DataError


def id_dataset(n: int = 600, seed: int = 0) -> Dataset:
    """Column 0 holds the row number, so every row can be identified after splitting."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(3, size=n, p=[0.6, 0.3, 0.1]).astype(np.int64)
    features = np.column_stack(
        [np.arange(n), rng.normal(10.0, 5.0, size=(n, 3)), labels * 2.0]
    ).astype(np.float32)
    return Dataset(
        name="ids",
        features=features,
        labels=labels,
        feature_names=("row", "a", "b", "c", "label_twice"),
        class_names=("x", "y", "z"),
    )


BASE: dict[str, Any] = {
    "n_clients": 5,
    "alpha": 0.5,
    "test_fraction": 0.2,
    "validation_fraction": 0.1,
    "seed": 7,
}


def build(dataset: Dataset, **overrides: Any) -> FederatedData:
    kwargs: dict[str, Any] = {**BASE, "partition": "iid", "scaling": "none", **overrides}
    return build_federated_data(dataset, **kwargs)


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "quantity"])
def test_test_set_and_clients_are_disjoint_and_cover_everything(partition: str) -> None:
    dataset = id_dataset()
    data = build(dataset, partition=partition)
    test_ids = data.x_test[:, 0].astype(np.int64)
    groups = [test_ids]
    for client in data.clients:
        groups.append(client.x_train[:, 0].astype(np.int64))
        groups.append(client.x_val[:, 0].astype(np.int64))
    all_ids = np.concatenate(groups)
    assert all_ids.size == dataset.n_examples, "no row used twice, none lost"
    np.testing.assert_array_equal(np.sort(all_ids), np.arange(dataset.n_examples))
    # rows keep their own labels
    np.testing.assert_array_equal(data.y_test, dataset.labels[test_ids])
    for client in data.clients:
        np.testing.assert_array_equal(
            client.y_train, dataset.labels[client.x_train[:, 0].astype(np.int64)]
        )
        assert client.y_train.size + client.y_val.size >= 2  # min_examples


def test_test_split_is_stratified_and_sized() -> None:
    dataset = id_dataset()
    data = build(dataset)
    assert data.y_test.size == round(0.2 * dataset.n_examples)
    overall = np.bincount(dataset.labels, minlength=3) / dataset.n_examples
    in_test = np.bincount(data.y_test, minlength=3) / data.y_test.size
    # largest-remainder apportionment: each class within one example of its exact share
    np.testing.assert_allclose(in_test, overall, atol=1.0 / data.y_test.size + 1e-12)


def test_federated_scaler_equals_pooled_train_scaler() -> None:
    dataset = id_dataset()
    raw = build(dataset, scaling="none")
    scaled = build(dataset, scaling="federated")
    pooled_x, pooled_y = raw.pooled_train()
    expected = fit_scaler(pooled_x)
    assert scaled.scaler is not None
    np.testing.assert_allclose(scaled.scaler.mean, expected.mean, rtol=1e-9)
    np.testing.assert_allclose(scaled.scaler.scale, expected.scale, rtol=1e-6)
    # the same scaler is applied to every client's train/val and to the test set
    np.testing.assert_allclose(scaled.x_test, expected.transform(raw.x_test), atol=1e-5)
    for raw_client, client in zip(raw.clients, scaled.clients, strict=True):
        np.testing.assert_allclose(
            client.x_train, expected.transform(raw_client.x_train), atol=1e-5
        )
        np.testing.assert_allclose(client.x_val, expected.transform(raw_client.x_val), atol=1e-5)
    # the scaler saw only training rows: validation and test rows change it
    with_everything = fit_scaler(
        np.concatenate([pooled_x, raw.x_test, *[c.x_val for c in raw.clients]])
    )
    assert not np.allclose(with_everything.mean, expected.mean, rtol=1e-6)
    pooled_scaled_x, pooled_scaled_y = scaled.pooled_train()
    np.testing.assert_array_equal(pooled_scaled_y, pooled_y)
    assert pooled_scaled_x.dtype == np.float32


def test_local_scaling_uses_only_each_clients_train_split() -> None:
    dataset = id_dataset()
    raw = build(dataset, scaling="none", partition="dirichlet")
    local = build(dataset, scaling="local", partition="dirichlet")
    for raw_client, client in zip(raw.clients, local.clients, strict=True):
        own = fit_scaler(raw_client.x_train)
        np.testing.assert_allclose(client.x_train, own.transform(raw_client.x_train), atol=1e-5)
        np.testing.assert_allclose(client.x_val, own.transform(raw_client.x_val), atol=1e-5)
    np.testing.assert_allclose(
        local.x_test, fit_scaler(raw.x_test).transform(raw.x_test), atol=1e-5
    )
    assert local.scaler is None


def test_same_seed_same_arrays_other_seed_other_arrays() -> None:
    dataset = id_dataset()
    first = build(dataset, partition="dirichlet", scaling="federated")
    second = build(dataset, partition="dirichlet", scaling="federated")
    np.testing.assert_array_equal(first.x_test, second.x_test)
    np.testing.assert_array_equal(first.y_test, second.y_test)
    for a, b in zip(first.clients, second.clients, strict=True):
        for field in ("x_train", "y_train", "x_val", "y_val"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    other = build(dataset, partition="dirichlet", scaling="federated", seed=8)
    assert not np.array_equal(first.y_test, other.y_test) or not np.array_equal(
        first.clients[0].y_train, other.clients[0].y_train
    )


def test_zero_validation_fraction_gives_empty_arrays_with_right_shapes() -> None:
    dataset = id_dataset()
    data = build(dataset, validation_fraction=0.0, scaling="federated")
    for client in data.clients:
        assert client.x_val.shape == (0, dataset.n_features)
        assert client.x_val.dtype == np.float32
        assert client.y_val.shape == (0,) and client.y_val.dtype == np.int64
        assert client.x_train.dtype == np.float32 and client.y_train.dtype == np.int64


def test_metadata_and_client_names() -> None:
    digits = load_dataset("digits")
    data = build(digits, n_clients=3)
    assert data.image_shape == (1, 8, 8)
    assert (data.n_features, data.n_classes) == (64, 10)
    assert data.dataset_name == "digits" and data.scaling == "none"
    assert [c.name for c in data.clients] == ["client-0", "client-1", "client-2"]
    named = build(digits, n_clients=2, client_names=["bank-a", "bank-b"])
    assert [c.name for c in named.clients] == ["bank-a", "bank-b"]
    with pytest.raises(DataError, match="2 client names given for 3 clients"):
        build(digits, n_clients=3, client_names=["bank-a", "bank-b"])


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"validation_fraction": 1.0}, "validation_fraction"),
        ({"n_clients": 0}, "at least 1"),
        ({"scaling": "minmax"}, "federated, local, none"),
        ({"partition": "shards"}, "iid, dirichlet, quantity"),
        ({"n_clients": 500, "partition": "iid"}, "500 clients"),
        ({"n_clients": 500, "partition": "quantity"}, "500 clients"),
    ],
)
def test_invalid_arguments_raise_data_error(overrides: dict[str, Any], fragment: str) -> None:
    with pytest.raises(DataError, match=fragment):
        build(id_dataset(), **overrides)
