"""Client-level DP-FedAvg stages: clipping, the centred bit, noise, fixed denominator."""

from __future__ import annotations

import numpy as np
import pytest

from veil.federation import Aggregate, FitResult, RoundContext, TrainingPlan
from veil.privacy.dp.client_level import (
    UNCLIPPED,
    ClipUpdate,
    GaussianSumNoise,
    update_noise_multiplier,
)
from veil.privacy.dp.randomness import SeededRandom
from veil.tensors import l2_norm

PLAN = TrainingPlan(epochs=1, batch_size=8, learning_rate=0.1, update_clip_norm=1.0)


def result(scale: float) -> FitResult:
    update = {"w": np.full((3, 4), scale, np.float32), "b": np.full(2, scale, np.float32)}
    return FitResult("c", 1, update, weight=50.0, num_examples=50, metrics={"train_loss": 0.3})


@pytest.mark.parametrize("scale", [0.01, 0.2, 5.0])
def test_clip_update_bounds_the_norm_weights_one_and_centres_the_bit(scale: float) -> None:
    out = ClipUpdate().apply(result(scale), RoundContext("r", 1, PLAN))
    assert l2_norm(out.update) <= 1.0 + 1e-6
    assert out.weight == 1.0 and out.metrics == {}
    unclipped = l2_norm(result(scale).update) <= 1.0
    # Centred: one client moves the released sum by at most 1/2, the sensitivity the
    # accounting of Andrew et al. (z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2)) assumes.
    assert out.sums[UNCLIPPED] == (0.5 if unclipped else -0.5)


def test_clip_update_refuses_a_plan_without_a_norm() -> None:
    with pytest.raises(ValueError, match="clipping norm"):
        ClipUpdate().apply(result(1.0), RoundContext("r", 1, None))


def test_gaussian_sum_noise_scale_and_fixed_denominator() -> None:
    # 2000 parameters of pure noise: the sample std is within 5% of z·C (std error ~1.6%).
    stage = GaussianSumNoise(
        noise_multiplier=1.5,
        clip_norm=0.8,
        expected_clients=4.0,
        source=SeededRandom(0),
        production=False,
    )
    aggregate = Aggregate({"w": np.zeros(2000, np.float32)}, weight=3.0, count=3)
    out = stage.apply(aggregate, RoundContext("r", 1))
    assert out.weight == 4.0  # q·N, not the number of clients that answered
    assert np.std(out.total["w"]) == pytest.approx(1.5 * 0.8, rel=0.05)


def test_adaptive_clipping_moves_towards_the_quantile_and_keeps_the_accounted_noise() -> None:
    stage = GaussianSumNoise(
        noise_multiplier=1.0,
        clip_norm=1.0,
        expected_clients=100.0,
        source=SeededRandom(1),
        production=False,
        target_quantile=0.5,
        clip_count_stddev=5.0,
    )
    z_delta = stage.update_noise_multiplier
    assert (z_delta**-2 + (2 * 5.0) ** -2) ** -0.5 == pytest.approx(1.0)
    # All 100 clients unclipped (sum of +1/2): the fraction is ~1 > 0.5, so C shrinks.
    aggregate = Aggregate({"w": np.zeros(4, np.float32)}, 100.0, 100, sums={UNCLIPPED: 50.0})
    stage.apply(aggregate, RoundContext("r", 1))
    assert stage.clip_norm < 1.0 and stage.last_clip_norm == 1.0
    # All clipped (sum of −1/2): the fraction is ~0 < 0.5, so C grows again.
    before = stage.clip_norm
    aggregate = Aggregate({"w": np.zeros(4, np.float32)}, 100.0, 100, sums={UNCLIPPED: -50.0})
    stage.apply(aggregate, RoundContext("r", 2))
    assert stage.clip_norm > before


def test_too_little_count_noise_is_refused() -> None:
    with pytest.raises(ValueError, match="clip_count_stddev"):
        update_noise_multiplier(2.0, 0.5)
