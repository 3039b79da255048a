"""SYNTHETIC data for the industry scenarios that no package ships real data for.

Both generators are small, documented physical/statistical models, drawn from a seeded NumPy
generator (this is data, not DP noise or key material). Every `Dataset` they return has
``synthetic=True`` and a name that starts with ``"synthetic_"``, so that result.json, the report
and the docs all say SYNTHETIC.

- `make_vehicle_faults`: telematics of vehicles; label "fault within the next 30 days", from a
  Weibull wear-out hazard with proportional-hazards covariates (Cox 1972).
- `make_machine_failures`: sensor readings of milling machines; label "machine failure", from the
  failure rules of the AI4I 2020 predictive-maintenance model (Matzka 2020, "Explainable
  Artificial Intelligence for Predictive Maintenance Applications", AI4I 2020).
"""

from __future__ import annotations

from typing import Final

import numpy as np

from veil.data.dataset import Dataset
from veil.data.scaling import FeatureBounds
from veil.errors import DataError

VEHICLE_FEATURES: Final[tuple[str, ...]] = (
    "age_years",
    "odometer_km",
    "monthly_km",
    "coolant_temp_c",
    "oil_pressure_kpa",
    "battery_crank_v",
    "vibration_rms_g",
    "dtc_count_30d",
    "towing_share",
    "ambient_temp_c",
)

#: Declared (lower, upper, centre) of each vehicle feature: physically plausible ranges of the
#: quantities (a 12 V battery, a thermostat-regulated engine, climate extremes) and, as centre,
#: the typical value of the generator's documented model (its mean at the mean age of 6 years);
#: chosen from the model, not from its draws. Every value of the shipped draw lies inside the
#: ranges (checked by tests/data/test_data_declared_bounds.py).
VEHICLE_BOUNDS: Final[tuple[tuple[float, float, float], ...]] = (
    (0.0, 12.0, 6.0),  # age_years: Uniform(0, 12)
    (0.0, 1_000_000.0, 86_400.0),  # odometer_km: 6 years · 12 months · 1200 km
    (0.0, 10_000.0, 1200.0),  # monthly_km: over 330 km a day is implausible; median 1200
    (70.0, 120.0, 93.6),  # coolant_temp_c: 90 + 0.12 · 12 + 9 / 13 + 0.25 · 6
    (100.0, 400.0, 262.6),  # oil_pressure_kpa: 300 − 6 · 6 − 0.4 · 3.6
    (7.0, 13.0, 10.1),  # battery_crank_v: 10.6 − 0.08 · 6
    (0.0, 0.6, 0.12),  # vibration_rms_g: 0.05 + 0.004 · 6 + 3e-7 · 86 400 + E|N(0, 0.02)|
    (0.0, 20.0, 0.5),  # dtc_count_30d: Poisson(0.2 + 3 · p_fault)
    (0.0, 1.0, 1 / 13),  # towing_share: a share; Beta(1, 12) has mean 1/13
    (-40.0, 50.0, 12.0),  # ambient_temp_c: climate extremes; Normal(12, 9)
)

# Weibull wear-out baseline of the fault hazard: shape k > 1 (faults become likelier with age),
# scale lambda in years for a vehicle with all covariates at their reference values.
_WEIBULL_SHAPE: Final[float] = 2.2
_WEIBULL_SCALE_YEARS: Final[float] = 9.0
_HORIZON_YEARS: Final[float] = 30 / 365.25


def make_vehicle_faults(n_examples: int = 4000, *, seed: int = 0) -> Dataset:
    """SYNTHETIC vehicle telematics with a "fault within 30 days" label.

    The model, per vehicle (one row = one month of telematics):

    - age ~ Uniform(0, 12) years; monthly mileage ~ LogNormal(ln 1200, 0.5) km; odometer =
      age · 12 · monthly mileage · LogNormal(0, 0.15).
    - ambient temperature ~ Normal(12, 9) °C; towing share ~ Beta(1, 12).
    - coolant temperature = 90 + 0.12 · ambient + 9 · towing + 0.25 · age + Normal(0, 2) °C
      (the thermostat holds ~90 °C; heat load and a fouling radiator raise it).
    - oil pressure = 300 − 6 · age − 0.4 · (coolant − 90) + Normal(0, 15) kPa (bearing wear and
      thinner hot oil lower it).
    - battery crank voltage = 10.6 − 0.08 · age − 0.02 · max(0, −ambient) + Normal(0, 0.25) V.
    - vibration RMS = 0.05 + 0.004 · age + 0.3e-6 · odometer + |Normal(0, 0.02)| g.
    - the fault hazard is Weibull(k = 2.2, λ = 9 years) in age, scaled by the proportional-hazards
      factor exp(β·z) with z the standardised deviations of coolant (β 0.6), oil pressure
      (−0.7), battery voltage (−0.5), vibration (0.6), mileage (0.3) and towing (0.3); the
      probability of a fault in the next 30 days is 1 − exp(−(H(age + 30 d) − H(age)) · exp(β·z)),
      H(t) = (t/λ)^k, and the label is drawn from it.
    - recent diagnostic trouble codes ~ Poisson(0.2 + 3 · that probability): a noisy early
      warning that the model may learn from.

    Returns a `Dataset` named ``"synthetic_vehicle_faults"`` with classes ``("ok", "fault")``,
    about 10–20 % faults. Raises `DataError` if ``n_examples < 100``.
    """
    if n_examples < 100:
        raise DataError(f"synthetic vehicle data needs at least 100 vehicles, got {n_examples}")
    rng = np.random.default_rng([seed, 1])
    n = n_examples
    age = rng.uniform(0.0, 12.0, n)
    monthly = rng.lognormal(np.log(1200.0), 0.5, n)
    odometer = age * 12.0 * monthly * rng.lognormal(0.0, 0.15, n)
    ambient = rng.normal(12.0, 9.0, n)
    towing = rng.beta(1.0, 12.0, n)
    coolant = 90.0 + 0.12 * ambient + 9.0 * towing + 0.25 * age + rng.normal(0.0, 2.0, n)
    oil = 300.0 - 6.0 * age - 0.4 * (coolant - 90.0) + rng.normal(0.0, 15.0, n)
    battery = 10.6 - 0.08 * age - 0.02 * np.maximum(0.0, -ambient) + rng.normal(0.0, 0.25, n)
    vibration = 0.05 + 0.004 * age + 0.3e-6 * odometer + np.abs(rng.normal(0.0, 0.02, n))

    def z(v: np.ndarray) -> np.ndarray:
        return np.asarray((v - v.mean()) / v.std())

    risk = np.exp(
        0.6 * z(coolant)
        - 0.7 * z(oil)
        - 0.5 * z(battery)
        + 0.6 * z(vibration)
        + 0.3 * z(monthly)
        + 0.3 * z(towing)
    )

    def cumulative(t: np.ndarray) -> np.ndarray:
        return np.asarray((t / _WEIBULL_SCALE_YEARS) ** _WEIBULL_SHAPE)

    # Monthly hazards are small; a scale factor brings the fault share to a trainable 10-20 %,
    # as a fleet-wide "fault" (any repair visit) is far more common than a breakdown.
    excess = (cumulative(age + _HORIZON_YEARS) - cumulative(age)) * risk * 5.0
    p_fault = 1.0 - np.exp(-excess)
    fault = rng.random(n) < p_fault
    dtc = rng.poisson(0.2 + 3.0 * p_fault)
    features = np.column_stack(
        [age, odometer, monthly, coolant, oil, battery, vibration, dtc, towing, ambient]
    ).astype(np.float32)
    return Dataset(
        name="synthetic_vehicle_faults",
        features=features,
        labels=fault.astype(np.int64),
        feature_names=VEHICLE_FEATURES,
        class_names=("ok", "fault"),
        synthetic=True,
        feature_bounds=FeatureBounds.from_values(
            [lo for lo, _, _ in VEHICLE_BOUNDS],
            [hi for _, hi, _ in VEHICLE_BOUNDS],
            len(VEHICLE_BOUNDS),
            source="physically plausible ranges, centred on the generator's model "
            "(veil.data.synthetic_industry.VEHICLE_BOUNDS)",
            centre=[c for _, _, c in VEHICLE_BOUNDS],
        ),
    )


MACHINE_FEATURES: Final[tuple[str, ...]] = (
    "quality=L",
    "quality=M",
    "quality=H",
    "air_temp_k",
    "process_temp_k",
    "rotational_speed_rpm",
    "torque_nm",
    "tool_wear_min",
)

#: Declared (lower, upper, centre) of each machine feature: one-hot columns in [0, 1];
#: temperatures around the generator's 300 K air (σ 2 K) and 310 K process temperature (σ 1 K
#: on top); a spindle below 3000 rpm (model: 1538 rpm); torque below 100 Nm (model: 40 Nm);
#: tool wear below 260 min (a tool is changed after at most 253 min, and a process adds at most
#: 5; about half a tool life on average).
MACHINE_BOUNDS: Final[tuple[tuple[float, float, float], ...]] = (
    (0.0, 1.0, 0.5),
    (0.0, 1.0, 0.5),
    (0.0, 1.0, 0.5),
    (290.0, 310.0, 300.0),  # air_temp_k
    (295.0, 325.0, 310.0),  # process_temp_k
    (0.0, 3000.0, 1538.0),  # rotational_speed_rpm
    (0.0, 100.0, 40.0),  # torque_nm
    (0.0, 260.0, 113.0),  # tool_wear_min
)
_QUALITY_SHARE: Final[tuple[float, float, float]] = (0.5, 0.3, 0.2)  # L, M, H
_QUALITY_WEAR_MIN: Final[tuple[int, int, int]] = (2, 3, 5)  # tool wear added per process
_OVERSTRAIN_MIN_NM: Final[tuple[float, float, float]] = (11_000.0, 12_000.0, 13_000.0)


def make_machine_failures(n_examples: int = 5000, *, seed: int = 0) -> Dataset:
    """SYNTHETIC milling-machine readings with a "machine failure" label (AI4I 2020 model).

    One row = one machining process, after Matzka (2020):

    - product quality L/M/H with shares 50/30/20 % (one-hot).
    - air temperature: a random walk around 300 K (σ 2 K), process temperature = air + 10 K +
      Normal(0, 1) K (the cutting heat).
    - torque ~ Normal(40, 10) Nm clipped at 3 Nm; rotational speed ~ Normal(1538, 179) rpm with
      correlation −0.88 to torque (a drive near constant power); tool wear grows by 2/3/5 min
      per process for L/M/H and resets at a tool change (after 200–253 min).
    - failure if any of: tool wear failure (wear between 200 and 240 min, with probability
      ~ 1/20 per process in that window); heat-dissipation failure (process − air < 8.6 K and
      speed < 1380 rpm); power failure (torque · ω < 3500 W or > 9000 W); overstrain failure
      (wear · torque > 11 000 / 12 000 / 13 000 min·Nm for L/M/H); random failure (0.1 %).

    Returns a `Dataset` named ``"synthetic_machine_failures"`` with classes ``("ok",
    "failure")``; failures are rare (~3–5 %), so watch AUC next to accuracy. Raises `DataError`
    if ``n_examples < 100``.
    """
    if n_examples < 100:
        raise DataError(f"synthetic machine data needs at least 100 processes, got {n_examples}")
    rng = np.random.default_rng([seed, 2])
    n = n_examples
    quality = rng.choice(3, size=n, p=_QUALITY_SHARE)
    walk = np.cumsum(rng.normal(0.0, 0.05, n))
    air = 300.0 + 2.0 * (walk - walk.mean()) / max(float(walk.std()), 1e-9)
    process = air + 10.0 + rng.normal(0.0, 1.0, n)
    torque = np.maximum(3.0, rng.normal(40.0, 10.0, n))
    # The drive runs near constant power: speed falls as torque rises (AI4I's correlation -0.88).
    z_torque = (torque - 40.0) / 10.0
    speed = 1538.0 + 179.0 * (-0.88 * z_torque + np.sqrt(1 - 0.88**2) * rng.normal(0.0, 1.0, n))
    wear = np.empty(n)
    current, limit = 0.0, rng.uniform(200.0, 253.0)
    for i in range(n):
        current += _QUALITY_WEAR_MIN[quality[i]]
        if current > limit:
            current, limit = 0.0, rng.uniform(200.0, 253.0)
        wear[i] = current
    power = torque * speed * 2 * np.pi / 60.0
    twf = (wear >= 200) & (wear <= 240) & (rng.random(n) < 0.05)
    hdf = (process - air < 8.6) & (speed < 1380)
    pwf = (power < 3500) | (power > 9000)
    osf = wear * torque > np.asarray(_OVERSTRAIN_MIN_NM)[quality]
    rnf = rng.random(n) < 0.001
    failure = twf | hdf | pwf | osf | rnf
    features = np.column_stack([np.eye(3)[quality], air, process, speed, torque, wear]).astype(
        np.float32
    )
    return Dataset(
        name="synthetic_machine_failures",
        features=features,
        labels=failure.astype(np.int64),
        feature_names=MACHINE_FEATURES,
        class_names=("ok", "failure"),
        synthetic=True,
        feature_bounds=FeatureBounds.from_values(
            [lo for lo, _, _ in MACHINE_BOUNDS],
            [hi for _, hi, _ in MACHINE_BOUNDS],
            len(MACHINE_BOUNDS),
            source="the AI4I 2020 model's ranges and typical values "
            "(veil.data.synthetic_industry.MACHINE_BOUNDS)",
            centre=[c for _, _, c in MACHINE_BOUNDS],
        ),
    )
