"""SYNTHETIC industry data: labelled as such, deterministic per seed, and following its model."""

from __future__ import annotations

import numpy as np
import pytest

from veil.data import load_dataset
from veil.data.synthetic_industry import (
    MACHINE_FEATURES,
    VEHICLE_FEATURES,
    make_machine_failures,
    make_vehicle_faults,
)
from veil.errors import DataError


@pytest.mark.parametrize("name", ["synthetic_vehicle_faults", "synthetic_machine_failures"])
def test_registered_and_labelled_synthetic(name: str) -> None:
    dataset = load_dataset(name)
    assert dataset.synthetic and dataset.name == name
    assert dataset.n_classes == 2


def test_generators_are_deterministic_per_seed() -> None:
    for make in (make_vehicle_faults, make_machine_failures):
        a, b, c = make(500, seed=1), make(500, seed=1), make(500, seed=2)
        np.testing.assert_array_equal(a.features, b.features)
        assert not np.array_equal(a.features, c.features)
    with pytest.raises(DataError, match="at least 100"):
        make_vehicle_faults(10)


def test_vehicle_faults_follow_the_wear_out_hazard() -> None:
    d = make_vehicle_faults(20_000, seed=3)
    col = {n: d.features[:, i] for i, n in enumerate(VEHICLE_FEATURES)}
    assert 0.10 <= d.labels.mean() <= 0.30
    # Weibull shape > 1: old vehicles fail more often than new ones.
    old, new = col["age_years"] > 9, col["age_years"] < 3
    assert d.labels[old].mean() > 2 * d.labels[new].mean()
    # Physics of the covariates: oil pressure falls and vibration rises with age.
    assert np.corrcoef(col["age_years"], col["oil_pressure_kpa"])[0, 1] < -0.5
    assert np.corrcoef(col["age_years"], col["vibration_rms_g"])[0, 1] > 0.5


def test_machine_failures_follow_the_ai4i_rules() -> None:
    d = make_machine_failures(20_000, seed=4)
    col = {n: d.features[:, i] for i, n in enumerate(MACHINE_FEATURES)}
    assert 0.01 <= d.labels.mean() <= 0.10
    assert np.all(col["quality=L"] + col["quality=M"] + col["quality=H"] == 1)
    power = col["torque_nm"] * col["rotational_speed_rpm"] * 2 * np.pi / 60
    # Deterministic rules: every power or heat-dissipation violation is a failure.
    assert np.all(d.labels[(power < 3500) | (power > 9000)] == 1)
    heat = (col["process_temp_k"] - col["air_temp_k"] < 8.6) & (col["rotational_speed_rpm"] < 1380)
    assert np.all(d.labels[heat] == 1)
    assert np.all(col["tool_wear_min"] <= 253)
    assert np.corrcoef(col["torque_nm"], col["rotational_speed_rpm"])[0, 1] < -0.8
