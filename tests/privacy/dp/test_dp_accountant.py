"""Tests of the DP accountant (PLD primary, RDP cross-check) over dp-accounting."""

from __future__ import annotations

import itertools
import math
import re
from typing import Any

import pytest

from veil.errors import ConfigError
from veil.privacy.dp.accountant import (
    MIN_NOISE_MULTIPLIER,
    Accountant,
    EpsilonReport,
    calibrate_noise_multiplier,
    dpsgd_epsilon,
    epsilon_per_round,
    report,
)

DELTA = 1e-5


# --------------------------------------------------------------------------- reference value


@pytest.fixture(scope="module")
def reference() -> EpsilonReport:
    """q = 0.01, σ = 1, T = 1000, δ = 1e-5: the standard DP-SGD example (ε ≈ 1.83 by PLD)."""
    return report(1.0, 0.01, 1000, DELTA)


def test_pld_matches_published_value(reference: EpsilonReport) -> None:
    assert reference.epsilon == pytest.approx(1.83, rel=0.02)


def test_rdp_is_looser_but_close(reference: EpsilonReport) -> None:
    assert reference.epsilon_rdp >= reference.epsilon
    assert reference.epsilon_rdp <= 1.3 * reference.epsilon


def test_report_fields(reference: EpsilonReport) -> None:
    assert reference.delta == DELTA
    assert reference.neighbouring == "add_or_remove"
    assert reference.accountant == "dp-accounting PLD (add_or_remove)"


def test_dpsgd_epsilon_agrees_with_accountant(reference: EpsilonReport) -> None:
    assert dpsgd_epsilon(1.0, 0.01, 1000, DELTA, kind="rdp") == pytest.approx(
        reference.epsilon_rdp, rel=1e-12
    )
    acc = Accountant("rdp")
    for _ in range(10):
        acc.compose_subsampled_gaussian(1.0, 0.01, 100)
    assert acc.steps == 1000
    assert acc.epsilon(DELTA) == pytest.approx(reference.epsilon_rdp, rel=1e-9)


# --------------------------------------------------------------------------- basic properties


@pytest.mark.parametrize("kind", ["pld", "rdp"])
def test_zero_steps_is_zero(kind: Any) -> None:
    assert dpsgd_epsilon(1.0, 0.01, 0, DELTA, kind=kind) == 0.0
    acc = Accountant(kind)
    assert acc.steps == 0
    assert acc.epsilon(DELTA) == 0.0
    acc.compose_subsampled_gaussian(1.0, 0.5, count=0)
    assert acc.epsilon(DELTA) == 0.0
    assert epsilon_per_round(1.0, 0.01, [0, 0], DELTA, kind=kind) == [0.0, 0.0]


@pytest.mark.parametrize("kind", ["pld", "rdp"])
def test_epsilon_never_negative(kind: Any) -> None:
    # Huge noise, tiny sampling rate: ε is ~0 and must not come out as -0.0 or slightly negative.
    for sigma, q, steps in [(1e3, 1e-4, 1), (50.0, 1e-3, 3), (1e3, 1.0, 1)]:
        eps = dpsgd_epsilon(sigma, q, steps, DELTA, kind=kind)
        assert eps >= 0.0
        assert math.copysign(1.0, eps) == 1.0  # not -0.0


def test_epsilon_non_decreasing_over_rounds() -> None:
    rounds = epsilon_per_round(1.0, 0.02, [4] * 15, DELTA)
    assert len(rounds) == 15
    assert rounds[0] > 0
    assert all(b >= a for a, b in itertools.pairwise(rounds))
    assert rounds[-1] > rounds[0] * 1.5  # it really grows
    # Incremental composition equals accounting all the steps at once.
    assert rounds[-1] == pytest.approx(dpsgd_epsilon(1.0, 0.02, 60, DELTA), rel=1e-6)


def test_epsilon_per_round_rdp_and_uneven_rounds() -> None:
    rounds = epsilon_per_round(1.1, 0.01, [3, 0, 7, 10], DELTA, kind="rdp")
    assert rounds[1] == rounds[0]
    assert rounds[0] < rounds[2] < rounds[3]
    assert rounds[3] == pytest.approx(dpsgd_epsilon(1.1, 0.01, 20, DELTA, kind="rdp"), rel=1e-9)


@pytest.mark.parametrize("kind", ["pld", "rdp"])
def test_epsilon_non_increasing_in_sigma(kind: Any) -> None:
    eps = [dpsgd_epsilon(s, 0.02, 30, DELTA, kind=kind) for s in (0.8, 1.0, 1.5, 3.0)]
    assert all(b < a for a, b in itertools.pairwise(eps))


def test_tiny_sigma_is_unbounded_under_pld_only() -> None:
    sigma = MIN_NOISE_MULTIPLIER / 2
    assert dpsgd_epsilon(sigma, 0.01, 10, DELTA) == math.inf
    rdp = dpsgd_epsilon(sigma, 0.01, 10, DELTA, kind="rdp")
    assert math.isfinite(rdp)
    assert rdp > 10
    # 10 000 plain Gaussians at σ = 1 compose to one at σ = 0.01: refused by PLD, not computed.
    pld = Accountant()
    pld.compose_gaussian(1.0, count=10_000)
    assert pld.epsilon(DELTA) == math.inf
    rdp_acc = Accountant("rdp")
    rdp_acc.compose_gaussian(1.0, count=10_000)
    assert 1e3 < rdp_acc.epsilon(DELTA) < math.inf


# --------------------------------------------------------------------------- neighbouring relation


@pytest.mark.parametrize("kind", ["pld", "rdp"])
def test_replace_costs_more_than_add_or_remove(kind: Any) -> None:
    add = dpsgd_epsilon(1.0, 0.01, 100, DELTA, kind=kind)
    rep = dpsgd_epsilon(1.0, 0.01, 100, DELTA, kind=kind, neighbouring="replace")
    assert rep > add * 1.05


def test_replace_rdp_bound_is_above_pld() -> None:
    rep = report(1.0, 0.01, 100, DELTA, neighbouring="replace")
    assert rep.neighbouring == "replace"
    assert rep.accountant == "dp-accounting PLD (replace)"
    assert rep.epsilon_rdp >= rep.epsilon


@pytest.mark.parametrize("kind", ["pld", "rdp"])
def test_replace_plain_gaussian_is_sensitivity_two(kind: Any) -> None:
    # Without subsampling, swapping a unit moves the sum by 2C: the same as σ/2 under add/remove.
    rep = Accountant(kind, neighbouring="replace")
    rep.compose_gaussian(4.0, count=3)
    add = Accountant(kind)
    add.compose_gaussian(2.0, count=3)
    assert rep.epsilon(DELTA) == pytest.approx(add.epsilon(DELTA), rel=1e-3)


def test_accountant_records_kind_and_relation() -> None:
    acc = Accountant("rdp", neighbouring="replace")
    assert acc.kind == "rdp"
    assert acc.neighbouring == "replace"
    assert acc.describe() == "dp-accounting RDP (replace)"
    assert Accountant().describe() == "dp-accounting PLD (add_or_remove)"


# --------------------------------------------------------------------------- sampling rate 1


@pytest.mark.parametrize("kind", ["pld", "rdp"])
@pytest.mark.parametrize("neighbouring", ["add_or_remove", "replace"])
def test_sampling_rate_one_is_plain_gaussian(kind: Any, neighbouring: Any) -> None:
    sub = Accountant(kind, neighbouring=neighbouring)
    sub.compose_subsampled_gaussian(6.0, 1.0, count=4)
    plain = Accountant(kind, neighbouring=neighbouring)
    plain.compose_gaussian(6.0, count=4)
    assert sub.steps == plain.steps == 4
    assert sub.epsilon(DELTA) == plain.epsilon(DELTA)
    assert plain.epsilon(DELTA) > 0


@pytest.mark.parametrize("kind", ["pld", "rdp"])
def test_subsampling_amplifies(kind: Any) -> None:
    plain = dpsgd_epsilon(3.0, 1.0, 20, DELTA, kind=kind)
    assert dpsgd_epsilon(3.0, 0.1, 20, DELTA, kind=kind) < plain / 2


def test_plain_gaussian_composition_matches_one_gaussian() -> None:
    # T Gaussians with multiplier σ compose exactly to one Gaussian with σ/√T.
    many = Accountant("rdp")
    many.compose_gaussian(2.0, count=16)
    one = Accountant("rdp")
    one.compose_gaussian(0.5)
    assert many.epsilon(DELTA) == pytest.approx(one.epsilon(DELTA), rel=1e-9)
    pld = Accountant("pld")
    pld.compose_gaussian(2.0, count=16)
    assert pld.epsilon(DELTA) <= many.epsilon(DELTA)


# --------------------------------------------------------------------------- calibration


def test_calibrate_meets_target_and_is_nearly_smallest() -> None:
    target, q, steps, tol = 1.0, 0.05, 50, 0.005
    sigma = calibrate_noise_multiplier(target, DELTA, q, steps, tolerance=tol)
    assert dpsgd_epsilon(sigma, q, steps, DELTA) <= target
    assert dpsgd_epsilon(sigma * (1 - 2 * tol), q, steps, DELTA) > target


def test_calibrate_rdp_and_replace() -> None:
    target, q, steps, tol = 3.0, 0.05, 100, 0.005
    for kind, neighbouring in [("rdp", "add_or_remove"), ("rdp", "replace")]:
        sigma = calibrate_noise_multiplier(
            target, DELTA, q, steps, kind=kind, neighbouring=neighbouring, tolerance=tol
        )
        eps = dpsgd_epsilon(sigma, q, steps, DELTA, kind=kind, neighbouring=neighbouring)
        assert eps <= target
        below = dpsgd_epsilon(
            sigma * (1 - 2 * tol), q, steps, DELTA, kind=kind, neighbouring=neighbouring
        )
        assert below > target


def test_calibrate_impossible_target_raises_with_numbers() -> None:
    # Without subsampling, 1000 steps at σ = 1000 still cost ε ≈ 0.097 at δ = 1e-5.
    with pytest.raises(ConfigError) as info:
        calibrate_noise_multiplier(0.01, DELTA, 1.0, 1000)
    message = str(info.value)
    achievable = dpsgd_epsilon(1e3, 1.0, 1000, DELTA)
    assert f"{achievable:.4g}" in message
    assert "fewer steps" in message
    assert "sampling rate" in message
    assert re.search(r"larger|at least", message)


def test_calibrate_validates() -> None:
    with pytest.raises(ValueError, match="target_epsilon"):
        calibrate_noise_multiplier(0.0, DELTA, 0.01, 100)
    with pytest.raises(ValueError, match="steps"):
        calibrate_noise_multiplier(1.0, DELTA, 0.01, 0)
    with pytest.raises(ValueError, match="tolerance"):
        calibrate_noise_multiplier(1.0, DELTA, 0.01, 100, tolerance=0.0)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"noise_multiplier": 0.0}, r"noise_multiplier.*0\.0"),
        ({"noise_multiplier": -1.0}, r"noise_multiplier.*-1\.0"),
        ({"noise_multiplier": math.nan}, "noise_multiplier"),
        ({"sampling_rate": 0.0}, r"sampling_rate.*0\.0"),
        ({"sampling_rate": 1.5}, r"sampling_rate.*1\.5"),
        ({"steps": -1}, r"steps.*-1"),
        ({"steps": 2.5}, r"steps.*2\.5"),
        ({"delta": 0.0}, r"delta.*0\.0"),
        ({"delta": 1.0}, r"delta.*1\.0"),
    ],
)
def test_argument_validation(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {
        "noise_multiplier": 1.0,
        "sampling_rate": 0.01,
        "steps": 10,
        "delta": DELTA,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        dpsgd_epsilon(**args)


def test_accountant_validation() -> None:
    with pytest.raises(ValueError, match="kind"):
        Accountant("moments")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="neighbouring"):
        Accountant(neighbouring="swap")  # type: ignore[arg-type]
    acc = Accountant()
    with pytest.raises(ValueError, match="count"):
        acc.compose_gaussian(1.0, count=-2)
    with pytest.raises(ValueError, match="noise_multiplier"):
        acc.compose_subsampled_gaussian(0.0, 0.1)
    with pytest.raises(ValueError, match="sampling_rate"):
        acc.compose_subsampled_gaussian(1.0, -0.1)
    with pytest.raises(ValueError, match="delta"):
        acc.epsilon(2.0)
    with pytest.raises(ValueError, match=r"steps_per_round\[1\]"):
        epsilon_per_round(1.0, 0.1, [1, -1], DELTA)
    assert acc.steps == 0  # nothing was composed by the failed calls


@pytest.mark.slow
def test_hundred_rounds_incremental_equals_one_shot(reference: EpsilonReport) -> None:
    rounds = epsilon_per_round(1.0, 0.01, [10] * 100, DELTA)
    assert all(b >= a for a, b in itertools.pairwise(rounds))
    assert rounds[-1] == pytest.approx(reference.epsilon, rel=1e-6)
