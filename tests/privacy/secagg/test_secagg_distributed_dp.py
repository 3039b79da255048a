"""Distributed discrete Gaussian noise (Kairouz, Liu, Steinke 2021) for client-level DP under
SecAgg: the planned step keeps the noisy sum inside the modulus, and t clients' noise together
has the standard deviation the accountant charges."""

from __future__ import annotations

import math

import numpy as np
import pytest

from veil.errors import ConfigError
from veil.privacy.secagg.distributed_dp import DistributedGaussian, tau
from veil.privacy.secagg.quantize import FixedPoint


def plan(**overrides: float) -> DistributedGaussian:
    settings: dict[str, float] = dict(
        noise_multiplier=1.1, clip_norm=0.5, dimension=2000, n_clients=10, threshold=6,
        modulus_bits=32,
    )  # fmt: skip
    settings.update(overrides)
    return DistributedGaussian.plan(**settings)  # type: ignore[arg-type]


def test_planned_step_keeps_noisy_sum_inside_the_modulus() -> None:
    g = plan()
    units = g.clip_norm / g.fixed_point.step
    total_sigma = g.client_stddev(6) * math.sqrt(10)
    assert 10 * (units + 1) + 12 * total_sigma < 2**31
    # ... and is fine enough that rounding is a small part of the sensitivity.
    assert math.sqrt(g.dimension) < 0.01 * units
    g.fixed_point.check_capacity(10, g.clip_norm)


def test_noise_of_threshold_clients_has_the_accounted_stddev() -> None:
    g = plan(dimension=20_000)
    t = 6
    total = sum(g.noise(t) for _ in range(t))
    expected = g.noise_multiplier * g.sensitivity
    # The standard error of a sample std over 20 000 draws is 0.5 %: 3 % is six of them.
    assert np.std(total) == pytest.approx(expected, rel=0.03)
    assert abs(float(np.mean(total))) < 5 * expected / math.sqrt(20_000)
    assert total.dtype == np.int64


def test_one_clients_noise_has_its_share_of_the_variance() -> None:
    g = plan(dimension=20_000)
    draws = g.noise(4)
    assert np.std(draws) == pytest.approx(g.client_stddev(4), rel=0.03)
    assert np.array_equal(draws, np.round(draws))


def test_tau_is_negligible_for_planned_noise_and_not_for_tiny_noise() -> None:
    g = plan()
    assert tau(10, g.client_stddev(6)) * g.dimension < 1e-12
    assert tau(10, 0.3) > 1e-3
    assert tau(1, 0.3) == 0


def test_too_small_a_modulus_is_refused_with_advice() -> None:
    with pytest.raises(ConfigError, match=r"raise \[secagg\]\.modulus_bits"):
        plan(modulus_bits=16, dimension=1_000_000)


def test_a_client_refuses_a_step_that_could_overflow() -> None:
    g = plan()
    finer = DistributedGaussian(
        noise_multiplier=g.noise_multiplier,
        clip_norm=g.clip_norm,
        dimension=g.dimension,
        fixed_point=FixedPoint(32, g.fixed_point.step / 100),
    )
    with pytest.raises(ConfigError, match="finer than"):
        finer.check(10, 6)
    g.check(10, 6)
