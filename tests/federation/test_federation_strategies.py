"""Tests for the strategies: FedAvg, FedProx, FedOpt (Reddi et al. 2021) and client sampling."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from veil.federation import Aggregate, FedAvg, FedOpt, FedProx, TrainingPlan

PLAN = TrainingPlan(epochs=2, batch_size=16, learning_rate=0.1, momentum=0.5, weight_decay=1e-4)
CLIENTS = [f"client-{i:02d}" for i in range(20)]


def params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.normal(size=(4, 3)).astype(np.float32),
        "b": rng.normal(size=(3,)).astype(np.float32),
    }


def aggregate_of(mean: dict[str, np.ndarray], weight: float = 4.0) -> Aggregate:
    """An aggregate whose weighted mean is `mean` (total = mean · weight)."""
    total = {k: (v * np.float32(weight)).astype(np.float32) for k, v in mean.items()}
    return Aggregate(total=total, weight=weight, count=2)


# --- FedAvg / FedProx ------------------------------------------------------------------------


def test_fedavg_adds_weighted_mean_update() -> None:
    x = params(0)
    total = {"w": np.full((4, 3), 6.0, np.float32), "b": np.array([3.0, -3.0, 0.0], np.float32)}
    new = FedAvg().update_global(x, Aggregate(total=total, weight=3.0, count=2))
    np.testing.assert_allclose(new["w"], x["w"] + 2.0, rtol=1e-6)
    np.testing.assert_allclose(new["b"], x["b"] + np.array([1.0, -1.0, 0.0]), rtol=1e-6)
    assert set(new) == set(x)
    assert new["w"].dtype == np.float32


def test_fedavg_is_stateless() -> None:
    strategy = FedAvg()
    assert strategy.state() == {}
    strategy.load_state({})
    with pytest.raises(ValueError, match="no state"):
        strategy.load_state({"m/w": np.zeros(1, np.float32)})


def test_fedavg_passes_plan_unchanged() -> None:
    _, plan = FedAvg().configure_fit(1, CLIENTS, np.random.default_rng(0), PLAN)
    assert plan == PLAN


def test_fedprox_puts_mu_in_plan() -> None:
    selected, plan = FedProx(mu=0.25).configure_fit(1, CLIENTS, np.random.default_rng(0), PLAN)
    assert plan.proximal_mu == 0.25
    # Everything else in the plan is preserved.
    assert plan == TrainingPlan(**{**PLAN.__dict__, "proximal_mu": 0.25})
    assert selected == CLIENTS


@pytest.mark.parametrize("mu", [0.0, -0.1])
def test_fedprox_refuses_nonpositive_mu(mu: float) -> None:
    with pytest.raises(ValueError, match="mu"):
        FedProx(mu=mu)


def test_fedprox_steps_like_fedavg() -> None:
    x, delta = params(0), params(1)
    a = FedAvg().update_global(x, aggregate_of(delta))
    b = FedProx(mu=1.0).update_global(x, aggregate_of(delta))
    for k in x:
        np.testing.assert_array_equal(a[k], b[k])


# --- FedOpt ----------------------------------------------------------------------------------


def reddi_reference(
    variant: str,
    x0: dict[str, np.ndarray],
    deltas: list[dict[str, np.ndarray]],
    *,
    eta: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> list[dict[str, np.ndarray]]:
    """Reddi et al. 2021, Algorithm 2, in float64: the iterates after each server step."""
    x = {k: v.astype(np.float64) for k, v in x0.items()}
    m = {k: np.zeros_like(v) for k, v in x.items()}
    v = {k: np.full_like(a, tau**2) for k, a in x.items()}
    out = []
    for delta in deltas:
        for k in x:
            d = delta[k].astype(np.float64)
            m[k] = beta1 * m[k] + (1 - beta1) * d
            if variant == "fedadagrad":
                v[k] = v[k] + d**2
            elif variant == "fedadam":
                v[k] = beta2 * v[k] + (1 - beta2) * d**2
            else:  # fedyogi
                v[k] = v[k] - (1 - beta2) * d**2 * np.sign(v[k] - d**2)
            x[k] = x[k] + eta * m[k] / (np.sqrt(v[k]) + tau)
        out.append({k: a.copy() for k, a in x.items()})
    return out


HYPER = {"eta": 0.05, "beta1": 0.8, "beta2": 0.95, "tau": 1e-2}


def _deltas(n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(42)
    return [
        {k: (0.1 * rng.normal(size=v.shape)).astype(np.float32) for k, v in params().items()}
        for _ in range(n)
    ]


@pytest.mark.parametrize("variant", ["fedadagrad", "fedadam", "fedyogi"])
def test_fedopt_matches_reddi_algorithm_2(variant: str) -> None:
    x0 = params(0)
    deltas = _deltas(2)
    expected = reddi_reference(variant, x0, deltas, **HYPER)
    strategy = FedOpt(
        variant,  # type: ignore[arg-type]
        server_learning_rate=HYPER["eta"],
        beta1=HYPER["beta1"],
        beta2=HYPER["beta2"],
        tau=HYPER["tau"],
    )
    assert strategy.name == variant
    x = x0
    for step, delta in enumerate(deltas):
        x = strategy.update_global(x, aggregate_of(delta))
        for k in x:
            assert x[k].dtype == np.float32
            # Float32 implementation vs float64 reference: a few float32 ulps of |x| ≈ 1.
            np.testing.assert_allclose(
                x[k], expected[step][k], rtol=1e-5, atol=1e-6, err_msg=f"step {step}, {k}"
            )
        # The step actually moved the parameters.
        assert not np.allclose(x["w"], (x0 if step == 0 else expected[step - 1])["w"])


def test_fedopt_variants_differ() -> None:
    x0, deltas = params(0), _deltas(3)
    finals = {}
    for variant in ("fedadagrad", "fedadam", "fedyogi"):
        strategy = FedOpt(variant, server_learning_rate=0.05)  # type: ignore[arg-type]
        x = x0
        for d in deltas:
            x = strategy.update_global(x, aggregate_of(d))
        finals[variant] = x["w"]
    assert not np.allclose(finals["fedadagrad"], finals["fedadam"])
    assert not np.allclose(finals["fedadam"], finals["fedyogi"])


def test_fedopt_refuses_unknown_variant() -> None:
    with pytest.raises(ValueError, match="variant"):
        FedOpt("fedsgd")  # type: ignore[arg-type]


@pytest.mark.parametrize("variant", ["fedadagrad", "fedadam", "fedyogi"])
def test_fedopt_state_round_trip_continues_identically(variant: str) -> None:
    x0, deltas = params(0), _deltas(4)

    uninterrupted = FedOpt(variant, **_kw())  # type: ignore[arg-type]
    x_full = x0
    for d in deltas:
        x_full = uninterrupted.update_global(x_full, aggregate_of(d))

    first = FedOpt(variant, **_kw())  # type: ignore[arg-type]
    x = x0
    for d in deltas[:2]:
        x = first.update_global(x, aggregate_of(d))
    x_after_two = x
    saved = {k: a.copy() for k, a in first.state().items()}
    assert sorted(saved) == ["m/b", "m/w", "v/b", "v/w"]

    resumed = FedOpt(variant, **_kw())  # type: ignore[arg-type]
    resumed.load_state(saved)
    for d in deltas[2:]:
        x = resumed.update_global(x, aggregate_of(d))
    for k in x_full:
        np.testing.assert_array_equal(x[k], x_full[k])

    # Without the state, a fresh optimiser would not have continued the same way.
    fresh = FedOpt(variant, **_kw())  # type: ignore[arg-type]
    x_fresh = x_after_two
    for d in deltas[2:]:
        x_fresh = fresh.update_global(x_fresh, aggregate_of(d))
    assert not np.array_equal(x_fresh["w"], x_full["w"])


def test_fedopt_state_is_a_snapshot() -> None:
    strategy = FedOpt("fedadam", **_kw())
    strategy.update_global(params(0), aggregate_of(_deltas(1)[0]))
    state = strategy.state()
    before = {k: a.copy() for k, a in state.items()}
    strategy.update_global(params(0), aggregate_of(_deltas(2)[1]))
    for k in before:
        np.testing.assert_array_equal(state[k], before[k])


def test_fedopt_refuses_inconsistent_state() -> None:
    with pytest.raises(ValueError, match="inconsistent"):
        FedOpt("fedadam").load_state({"m/w": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match="inconsistent"):
        FedOpt("fedadam").load_state(
            {"m/w": np.zeros(2, np.float32), "v/w": np.zeros(2, np.float32), "x": np.zeros(1)}
        )


def _kw() -> dict[str, float]:
    return {
        "server_learning_rate": HYPER["eta"],
        "beta1": HYPER["beta1"],
        "beta2": HYPER["beta2"],
        "tau": HYPER["tau"],
    }


# --- client sampling -------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.25, 0.33, 0.5, 0.9, 0.99])
def test_configure_fit_samples_ceil_fraction_distinct_clients(fraction: float) -> None:
    selected, _ = FedAvg(fraction_fit=fraction).configure_fit(
        1, CLIENTS, np.random.default_rng(5), PLAN
    )
    assert len(selected) == math.ceil(Fraction(str(fraction)) * len(CLIENTS))
    assert len(set(selected)) == len(selected)
    assert set(selected) <= set(CLIENTS)


def test_configure_fit_sample_size_is_exact_for_decimal_fractions() -> None:
    clients = [f"c{i}" for i in range(100)]
    selected, _ = FedAvg(fraction_fit=0.07).configure_fit(
        1, clients, np.random.default_rng(0), PLAN
    )
    assert len(selected) == 7


def test_configure_fit_selects_at_least_one() -> None:
    selected, _ = FedAvg(fraction_fit=0.01).configure_fit(
        1, CLIENTS, np.random.default_rng(0), PLAN
    )
    assert len(selected) == 1


def test_configure_fit_is_deterministic_for_the_same_seed() -> None:
    strategy = FedAvg(fraction_fit=0.3)
    runs = [strategy.configure_fit(1, CLIENTS, np.random.default_rng(s), PLAN)[0] for s in range(8)]
    again = [
        strategy.configure_fit(1, CLIENTS, np.random.default_rng(s), PLAN)[0] for s in range(8)
    ]
    assert runs == again
    # Different seeds do not all give the same selection.
    assert len({tuple(r) for r in runs}) > 1


def test_configure_fit_with_fraction_one_selects_everyone_in_order() -> None:
    selected, _ = FedAvg(fraction_fit=1.0).configure_fit(1, CLIENTS, np.random.default_rng(0), PLAN)
    assert selected == CLIENTS


def test_configure_evaluate_fraction_zero_selects_nobody() -> None:
    assert (
        FedAvg(fraction_evaluate=0.0).configure_evaluate(1, CLIENTS, np.random.default_rng(0)) == []
    )


def test_configure_evaluate_samples_fraction() -> None:
    chosen = FedAvg(fraction_evaluate=0.5).configure_evaluate(1, CLIENTS, np.random.default_rng(3))
    assert len(chosen) == 10
    assert len(set(chosen)) == 10
    assert FedAvg().configure_evaluate(1, CLIENTS, np.random.default_rng(3)) == CLIENTS


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fraction_fit": 0.0},
        {"fraction_fit": 1.5},
        {"fraction_evaluate": -0.1},
        {"fraction_evaluate": 1.1},
    ],
)
def test_fractions_out_of_range_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="fraction"):
        FedAvg(**kwargs)
