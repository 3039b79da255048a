"""Client-level DP measured as it runs: the noise the server adds is the noise the accountant
charges for.

`ClientLevelPrivacy.plan` calibrates σ for a target ε and builds the stages a run uses: the
clients' `ClipUpdate` and the server's `GaussianSumNoise`, with the production noise source
(`SecureRandom`, production mode). Clients' updates go through those stages; what the server
releases minus the sum of the clipped updates is the noise, and its standard deviation must be
the accounted z·C (or z_Δ·C with adaptive clipping, whose released count carries the rest). A
server that added half the noise while reporting the same ε fails here.

Tolerances: the sample standard deviation of m normal draws has a relative standard error of
1/√(2m); every bound below is at least 6 of those, so a correct mechanism fails with probability
below 1e-8.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from veil.config import PrivacyConfig
from veil.federation import Aggregate, FitResult, RoundContext, TrainingPlan
from veil.privacy.dp.accountant import report
from veil.privacy.dp.client_level import UNCLIPPED
from veil.privacy.dp.policy import ClientLevelPrivacy
from veil.privacy.dp.randomness import SecureRandom

#: Update coordinates: the relative standard error of the measured std is 1/√(2·D) = 0.16 %.
D = 200_000
CLIENTS = 20
PLAN = TrainingPlan(epochs=1, batch_size=8, learning_rate=0.1)


def policy(**privacy: object) -> ClientLevelPrivacy:
    config = PrivacyConfig(unit="client", epsilon=4.0, delta=1e-5, clip_norm=0.7, **privacy)  # type: ignore[arg-type]
    assert config.production and config.noise_seed is None
    return ClientLevelPrivacy.plan(config, n_clients=200, fraction_fit=0.1, rounds=30)


def released_noise(dp: ClientLevelPrivacy) -> tuple[np.ndarray, float]:
    """One round through the run's stages: `CLIENTS` updates clipped by the clients' stage,
    summed, released by the server's stage; returns the released sum minus the clipped sum, and
    the clipping norm the round used."""
    [server] = dp.server_stages
    [clip] = dp.client_stages
    plan = server.configure_plan(PLAN)  # type: ignore[attr-defined]
    assert plan.update_clip_norm is not None
    rng = np.random.default_rng(0)  # the updates only; the noise is the production source's
    total = np.zeros(D, np.float64)
    sums = 0.0
    for i in range(CLIENTS):
        scale = 10.0 if i % 2 else 0.001  # half of them far above the clipping norm
        update = {"w": (rng.standard_normal(D) * scale / math.sqrt(D)).astype(np.float32)}
        clipped = clip.apply(
            FitResult(f"c{i}", 1, update, weight=50.0, num_examples=50),
            RoundContext("run", 1, plan),
        )
        assert clipped.weight == 1.0
        assert float(np.linalg.norm(clipped.update["w"])) <= plan.update_clip_norm * (1 + 1e-6)
        total += clipped.update["w"]
        sums += clipped.sums.get(UNCLIPPED, 0.0)
    aggregate = Aggregate(
        {"w": total.astype(np.float32)},
        weight=float(CLIENTS),
        count=CLIENTS,
        sums={UNCLIPPED: sums},
    )
    released = server.apply(aggregate, RoundContext("run", 1))
    assert released.weight == pytest.approx(0.1 * 200)  # q·N, not the clients that answered
    return released.total["w"].astype(np.float64) - total, plan.update_clip_norm


def test_the_released_noise_is_what_the_accountant_charges_for() -> None:
    dp = policy()
    assert isinstance(dp.server_stage.source, SecureRandom)
    noise, clip_norm = released_noise(dp)
    accounted = dp.privacy_record("plain")["mechanism"]["noise_multiplier"]
    assert accounted == dp.noise_multiplier
    # The accountant's ε for that σ meets the target, and not by a wide margin (calibrated).
    assert 3.9 < report(accounted, 0.1, 30, 1e-5).epsilon <= 4.0 + 1e-9
    expected = accounted * clip_norm
    assert np.std(noise) == pytest.approx(expected, rel=6 / math.sqrt(2 * D))
    assert abs(np.mean(noise)) < 6 * expected / math.sqrt(D)


def test_with_adaptive_clipping_update_and_count_noise_compose_to_the_accounted_sigma() -> None:
    dp = policy(target_quantile=0.5, clip_count_stddev=2.0)
    stage = dp.server_stage
    z = dp.noise_multiplier
    z_update = stage.update_noise_multiplier
    assert z_update > z  # the count's release takes part of the budget
    assert (z_update**-2 + (2 * stage.count_stddev) ** -2) ** -0.5 == pytest.approx(z)
    noise, clip_norm = released_noise(dp)
    assert np.std(noise) == pytest.approx(z_update * clip_norm, rel=6 / math.sqrt(2 * D))
    # The count noise, read back from each round's move of C: C' = C·exp(−η(b̃ − γ)) with
    # b̃ = (Σ bits + noise)/(qN) + ½, here for an empty round (Σ bits = 0).
    rounds = 4000
    draws = np.empty(rounds)
    for i in range(rounds):
        before = stage.clip_norm
        stage.apply(Aggregate({"w": np.zeros(1, np.float32)}, 0.0, 0), RoundContext("run", i))
        fraction = 0.5 - math.log(stage.clip_norm / before) / stage.clip_learning_rate
        draws[i] = (fraction - 0.5) * stage.expected_clients
        stage.clip_norm = before
    assert np.std(draws) == pytest.approx(stage.count_stddev, rel=6 / math.sqrt(2 * rounds))
