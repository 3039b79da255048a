"""Declared feature bounds: a fixed, public preprocessing that costs no privacy.

Under ``[privacy]`` data-dependent scaling (``"local"``, ``"federated"``) is refused: one added
record moves every other record's scaled inputs, and with them every other record's clipped
gradient. ``scaling = "bounds"`` clamps every value into public, declared per-feature ranges and
maps them by a fixed affine transform, so an added record, however extreme, changes no other
record's input and no other record's per-sample clipped gradient, bit for bit.

Data: scikit-learn's Wisconsin breast cancer records (real), with one SYNTHETIC extreme record
added where a test says so; and a small SYNTHETIC CSV for the config route.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import veil
from veil.assembly.data import federated_data as _federated_data
from veil.config import ModelConfig, RunConfig
from veil.data import (
    Dataset,
    FeatureBounds,
    FederatedData,
    Preprocessing,
    build_federated_data,
    declared_bounds,
    fit_scaler,
    load_dataset,
)
from veil.data.synthetic_industry import make_machine_failures, make_vehicle_faults
from veil.errors import ConfigError, DataError
from veil.models import build_model
from veil.privacy.dp.per_sample import PerSampleClipper

CLIP = 1.0
#: "mean area" of the breast cancer data; its declared range is [100, 3000].
AREA = 3
EXTREME = 1e30


def with_extreme_record(ds: Dataset, value: float = EXTREME) -> Dataset:
    """`ds` plus one record: a copy of record 0 whose mean area is `value` (SYNTHETIC)."""
    extra = ds.features[:1].copy()
    extra[0, AREA] = value
    return Dataset(
        name=ds.name,
        features=np.concatenate([ds.features, extra]),
        labels=np.concatenate([ds.labels, ds.labels[:1]]),
        feature_names=ds.feature_names,
        class_names=ds.class_names,
        feature_bounds=ds.feature_bounds,
    )


def within_image(x: np.ndarray, bounds: FeatureBounds) -> bool:
    """Whether every input lies in the image of the declared ranges under `bounds.scaler()`."""
    scaler = bounds.scaler()
    low = np.float32((bounds.lower - scaler.mean) / scaler.scale)
    high = np.float32((bounds.upper - scaler.mean) / scaler.scale)
    return bool(((x >= low) & (x <= high)).all())


def build(ds: Dataset, scaling: Any, **overrides: Any) -> FederatedData:
    kwargs: dict[str, Any] = {
        "n_clients": 3,
        "partition": "iid",
        "alpha": 1.0,
        "test_fraction": 0.2,
        "validation_fraction": 0.0,
        "scaling": scaling,
        "seed": 5,
        "bounds": ds.feature_bounds,
        **overrides,
    }
    return build_federated_data(ds, **kwargs)


def model_inputs(fed: FederatedData) -> collections.Counter[bytes]:
    """Every model input the split holds (train, validation and test rows), as a multiset."""
    arrays = [fed.x_test, *(c.x_train for c in fed.clients), *(c.x_val for c in fed.clients)]
    return collections.Counter(row.tobytes() for a in arrays for row in a)


def clipped_gradients(x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    """Each record's clipped gradient (norm <= C) as DP-SGD's clipper computes it, flattened.

    A record's contribution to a DP-SGD step is its clipped gradient; it is computed here on a
    batch of that record alone, so it is exactly its share of any step's clipped sum.
    """
    model = build_model(ModelConfig(name="logistic"), n_features=x.shape[1], n_classes=2, seed=3)
    clipper = PerSampleClipper(model)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(y)
    out = []
    for i in range(x.shape[0]):
        batch = clipper.clipped_sum(xt[i : i + 1], yt[i : i + 1], CLIP)
        out.append(torch.cat([g.flatten() for g in batch.grads.values()]).numpy().copy())
    return out


# --------------------------------------------------------------- the refusal under [privacy]


def dp_config(**data: Any) -> dict[str, Any]:
    return {
        "data": {"dataset": "breast_cancer", "validation_fraction": 0.0, **data},
        "model": {"name": "logistic"},
        "federation": {"clients": 3, "rounds": 1, "fraction_evaluate": 0.0},
        "privacy": {"unit": "record", "epsilon": 1.0, "delta": 1e-5},
    }


@pytest.mark.parametrize("scaling", ["local", "federated"])
def test_data_dependent_scaling_is_refused_under_privacy_with_what_to_set(scaling: str) -> None:
    with pytest.raises(ConfigError) as info:
        RunConfig.from_dict(dp_config(scaling=scaling))
    message = str(info.value)
    assert "\n" not in message
    assert f"data.scaling = '{scaling}'" in message
    assert "scaling = 'bounds'" in message and "feature_bounds" in message and "'none'" in message


@pytest.mark.parametrize("scaling", ["bounds", "none"])
def test_fixed_transforms_are_accepted_under_privacy(scaling: str) -> None:
    assert RunConfig.from_dict(dp_config(scaling=scaling)).data.scaling == scaling


def test_without_privacy_local_scaling_stays_available() -> None:
    raw = dp_config(scaling="local")
    del raw["privacy"]
    assert RunConfig.from_dict(raw).data.scaling == "local"


# ------------------------------------------------- one extreme record, the other records' gradients


def test_local_scaling_lets_one_extreme_record_move_every_other_clipped_gradient() -> None:
    """The auditor's finding, measured: with local scaling (a scaler fitted on the
    organisation's training records, as `build_federated_data` does) one added record with an
    extreme value shifts every other record's inputs, and so its clipped gradient."""
    ds = load_dataset("breast_cancer")
    x, y = ds.features[:120], ds.labels[:120]
    extreme = x[:1].copy()
    extreme[0, AREA] = 1e6
    before = Preprocessing(scaler=fit_scaler(x), kind="local")(x)
    after = Preprocessing(scaler=fit_scaler(np.concatenate([x, extreme])), kind="local")(x)
    changes = [
        a - b
        for a, b in zip(clipped_gradients(before, y), clipped_gradients(after, y), strict=True)
    ]
    assert min(float(np.linalg.norm(c)) for c in changes) > 0  # every other record moved
    # DP-SGD's sensitivity assumes one record moves a step's clipped sum by at most C; here the
    # other records' clipped sum moves by about 14 C (the auditor measured up to 9.9 C).
    assert float(np.linalg.norm(np.sum(changes, axis=0))) > 5 * CLIP


def test_with_declared_bounds_one_extreme_record_moves_no_other_record_bit_for_bit() -> None:
    """Two data sets that differ by one record with an extreme value, the same declared-bounds
    preprocessing (`scaling = "bounds"` with the schema's public ranges): every other record's
    model input, and its per-sample clipped gradient, is bit-identical; the extreme record
    itself is clamped to its feature's declared upper bound."""
    ds = load_dataset("breast_cancer")
    neighbour = with_extreme_record(ds)
    fed, fed_plus = build(ds, "bounds"), build(neighbour, "bounds")
    inputs, inputs_plus = model_inputs(fed), model_inputs(fed_plus)
    added = inputs_plus - inputs
    assert inputs_plus - added == inputs  # every other record's input is unchanged
    assert sum(added.values()) == 1  # and exactly one input is new: the extreme record's
    (extreme_row,) = [np.frombuffer(row, dtype=np.float32) for row in added]
    at_bound = ds.features[:1].copy()
    at_bound[0, AREA] = 3000.0  # the declared upper bound of mean area
    np.testing.assert_array_equal(extreme_row, fed.clients[0].preprocessing(at_bound)[0])
    assert ds.feature_bounds is not None and within_image(extreme_row, ds.feature_bounds)

    # The other records' per-sample clipped gradients, record by record, in both worlds.
    others = sorted(inputs)
    x = np.stack([np.frombuffer(r, dtype=np.float32) for r in others])
    x_plus = np.stack([np.frombuffer(r, dtype=np.float32) for r in sorted(inputs_plus - added)])
    labels = np.zeros(len(others), dtype=np.int64)  # any labels: the same in both worlds
    for g, g_plus in zip(
        clipped_gradients(x, labels), clipped_gradients(x_plus, labels), strict=True
    ):
        assert g.tobytes() == g_plus.tobytes()


def test_the_training_arrays_are_the_clients_preprocessing_of_the_raw_records() -> None:
    """What the clients train on is exactly `client.preprocessing` of their raw records, so
    anything that reuses it (the audit's canaries) takes the run's path."""
    ds = load_dataset("breast_cancer")
    raw = build(ds, "none", bounds=None)
    for kind in ("bounds", "none", "local"):
        fed = build(ds, kind)
        for before, after in zip(raw.clients, fed.clients, strict=True):
            assert after.preprocessing.kind == kind
            np.testing.assert_array_equal(after.x_train, after.preprocessing(before.x_train))
        np.testing.assert_array_equal(fed.x_test_raw, raw.x_test)


def test_declared_bounds_clamp_an_extreme_value_whatever_the_scaling() -> None:
    ds = with_extreme_record(load_dataset("breast_cancer"))
    for scaling in ("none", "local", "bounds"):
        fed = build(ds, scaling, n_clients=1, test_fraction=0.05)
        pooled = np.concatenate([fed.clients[0].x_train, fed.x_test])
        assert np.isfinite(pooled).all()
    raw = build(ds, "none", n_clients=1, test_fraction=0.05)
    pooled = np.concatenate([raw.clients[0].x_train, raw.x_test])
    assert pooled[:, AREA].max() == 3000.0  # clamped to the declared upper bound, exactly


def test_scaling_none_without_bounds_keeps_raw_values() -> None:
    ds = with_extreme_record(load_dataset("breast_cancer"), 1e25)
    raw = build(ds, "none", n_clients=1, test_fraction=0.05, bounds=None)
    pooled = np.concatenate([raw.clients[0].x_train, raw.x_test])
    assert pooled[:, AREA].max() == np.float32(1e25)


# ------------------------------------------------------------------------- where bounds come from


@pytest.mark.parametrize(
    "dataset",
    [
        "breast_cancer",
        "digits",
        "synthetic_logistic",
        "synthetic_vehicle_faults",
        "synthetic_machine_failures",
    ],
)
def test_schema_bounds_hold_every_shipped_record_and_say_where_they_come_from(
    dataset: str,
) -> None:
    ds = load_dataset(dataset)
    bounds = ds.feature_bounds
    assert bounds is not None and bounds.source
    assert bounds.n_features == ds.n_features
    assert (ds.features >= bounds.lower).all() and (ds.features <= bounds.upper).all()
    # So clamping leaves the shipped data as it is.
    np.testing.assert_array_equal(bounds.clamp(ds.features), ds.features.astype(np.float64))


def test_digits_bounds_are_the_pixel_format_and_the_generators_draws_fit_theirs() -> None:
    digits = load_dataset("digits").feature_bounds
    assert digits is not None
    assert (digits.lower == 0).all() and (digits.upper == 16).all()
    for ds in (make_vehicle_faults(seed=3), make_machine_failures(seed=3)):
        b = ds.feature_bounds
        assert b is not None and (ds.features >= b.lower).all() and (ds.features <= b.upper).all()


def test_breast_cancer_bounds_lie_outside_its_documented_ranges() -> None:
    """The schema's ranges are scikit-learn's printed ranges rounded outward: strictly wider."""
    from sklearn.datasets import load_breast_cancer

    ds = load_dataset("breast_cancer")
    bounds = ds.feature_bounds
    assert bounds is not None
    assert "documentation" in bounds.source
    assert "Summary Statistics" in load_breast_cancer().DESCR
    data_min, data_max = ds.features.min(axis=0), ds.features.max(axis=0)
    assert ((bounds.lower < data_min) | (bounds.lower == 0)).all()
    assert (bounds.upper > data_max).all()
    assert ((bounds.lower <= bounds.centres) & (bounds.centres <= bounds.upper)).all()


def test_scaling_bounds_maps_the_range_by_the_declared_centre_and_half_width() -> None:
    """(x - centre) / ((upper - lower) / 6): the range read as six standard deviations."""
    bounds = FeatureBounds.from_values([0.0, -2.0], [10.0, 2.0], 2, centre=[2.0, 0.0])
    prep = Preprocessing(bounds=bounds, scaler=bounds.scaler(), kind="bounds")
    x = np.array([[0.0, -2.0], [2.0, 0.0], [10.0, 2.0], [1e30, -1e30]])
    expected = [[-1.2, -3.0], [0.0, 0.0], [4.8, 3.0], [4.8, -3.0]]
    np.testing.assert_allclose(prep(x), expected, rtol=1e-6)
    midpoint = FeatureBounds.from_values(0.0, 4.0, 2)
    np.testing.assert_array_equal(midpoint.scaler().transform(np.array([[0.0, 4.0]])), [[-3, 3]])


def test_config_bounds_override_the_schema_and_a_number_applies_to_every_feature() -> None:
    ds = load_dataset("breast_cancer")
    assert declared_bounds(ds) is ds.feature_bounds
    own = declared_bounds(ds, 0.0, 10_000.0)
    assert own is not None and own.n_features == 30 and "config" in own.source
    with pytest.raises(DataError, match="2 values for 30 features"):
        declared_bounds(ds, [0.0, 0.0], 1.0)
    with pytest.raises(DataError, match="both lower and upper"):
        declared_bounds(ds, 0.0, None)


def test_scaling_bounds_without_declared_bounds_says_what_to_set() -> None:
    ds = load_dataset("german_credit")
    assert ds.feature_bounds is None  # its codebook gives no ranges for amount, duration, age
    with pytest.raises(DataError) as info:
        build(ds, "bounds")
    assert "[data] feature_bounds = {lower = [...], upper = [...]}" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("bounds", "fragment"),
    [
        ({"lower": 1.0, "upper": 1.0}, "is not below upper"),
        ({"lower": [0.0, 0.0], "upper": [1.0, 1.0, 1.0]}, "give one per feature"),
        ({"lower": 0.0, "upper": 1.0, "centre": 2.0}, "centre 2 lies outside"),
        ({"lower": 0.0}, "feature_bounds.upper"),
        ({"lower": 0.0, "upper": float("inf")}, "finite"),
    ],
)
def test_invalid_feature_bounds_in_the_config_are_one_line(
    bounds: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        RunConfig.from_dict(dp_config(scaling="bounds", feature_bounds=bounds))
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_a_dp_run_on_a_csv_with_an_extreme_value_trains_on_clamped_inputs(tmp_path: Path) -> None:
    """The config route: a CSV (breast cancer records with one value replaced by 1e30, written
    here) declares its bounds in [data]; the run clamps before DP-SGD sees the value."""
    ds = load_dataset("breast_cancer")
    frame = {f"f{j}": ds.features[:, j].astype(np.float64) for j in range(ds.n_features)}
    frame["f3"][7] = 1e30
    frame["label"] = ds.labels
    import pandas as pd

    csv = tmp_path / "records.csv"
    pd.DataFrame(frame).to_csv(csv, index=False)
    assert ds.feature_bounds is not None
    data = {
        "dataset": "csv",
        "path": str(csv),
        "target": "label",
        "validation_fraction": 0.0,
        "scaling": "bounds",
        "feature_bounds": {
            "lower": ds.feature_bounds.lower.tolist(),
            "upper": ds.feature_bounds.upper.tolist(),
            "centre": ds.feature_bounds.centres.tolist(),
        },
    }
    raw = dp_config(**data)
    raw["privacy"].update(production=False, noise_seed=0)
    config = RunConfig.from_dict(raw)
    fed = _federated_data(config)
    pooled = np.concatenate([*(c.x_train for c in fed.clients), fed.x_test])
    # Every input, the extreme one too, lies within the image of the declared ranges.
    assert within_image(pooled, ds.feature_bounds)
    assert pooled[:, 3].max() == np.float32((3000.0 - ds.feature_bounds.centres[3]) / (2900.0 / 6))
    result = veil.run(config)
    assert result.privacy.epsilon is not None and result.privacy.epsilon <= 1.0
    assert result.final["accuracy"] > 0.6
