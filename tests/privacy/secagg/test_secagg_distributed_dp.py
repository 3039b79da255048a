"""Distributed discrete Gaussian noise (Kairouz, Liu, Steinke 2021) for client-level DP under
SecAgg: the planned step keeps the noisy sum inside the modulus, and t clients' noise together
has the standard deviation the accountant charges."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pytest
from test_secagg_protocol import federation

from veil.errors import ConfigError
from veil.federation import FitResult, RoundContext, TrainingPlan
from veil.federation.messages import ProtocolInstruction
from veil.privacy.dp.client_level import ClipUpdate
from veil.privacy.secagg.aggregator import SecAggAggregator
from veil.privacy.secagg.distributed_dp import DistributedGaussian, tau
from veil.privacy.secagg.layout import MASKED, UpdateLayout
from veil.privacy.secagg.participant import SecAggParticipant
from veil.privacy.secagg.quantize import FixedPoint
from veil.privacy.secagg.roster import StaticRoster
from veil.privacy.secagg.settings import DistributedNoise, SecAggSettings


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


class InProcessChannel:
    """The round's protocol steps, delivered to the production participants in this process."""

    def __init__(self, participants: dict[str, SecAggParticipant]) -> None:
        self.participants = participants

    def exchange(self, stage: str, bodies: Mapping[str, bytes]) -> dict[str, bytes]:
        return {
            name: self.participants[name].handle(ProtocolInstruction("run", 1, stage, body))
            for name, body in bodies.items()
        }


@pytest.mark.parametrize(("n", "threshold"), [(4, 4), (6, None)], ids=["n=t=4", "n=6,t=5"])
def test_the_servers_unmasked_sum_carries_the_accounted_noise(
    n: int, threshold: int | None
) -> None:
    """End to end through the production SecAgg participants and aggregator: each client clips
    its update (`ClipUpdate`), encodes it and adds its share of the discrete Gaussian; the
    server unmasks the sum. That sum minus the plain sum of the clipped updates is noise of
    standard deviation z·Δ·γ·√(n/t) (z·Δ·γ, the accounted noise, for n = t survivors: no party
    ever holds the un-noised sum) and mean 0.

    The relative standard error of a sample std over d = 20 000 coordinates is 1/√(2d) = 0.5 %:
    the 5 % bound is ten of them. The stochastic rounding adds a variance of at most n/4 units²,
    a relative 1e-9 of the noise's.
    """
    d, z, clip = 20_000, 1.1, 0.5
    settings = SecAggSettings(
        round_size=n, threshold=threshold, distributed_dp=DistributedNoise(z, clip)
    )
    layout = UpdateLayout.of({"w": np.zeros(d, np.float32)}, settings.sum_bounds)
    fed = federation(n)
    roster = StaticRoster(fed.roster)
    participants = {
        name: SecAggParticipant(name, fed.identities[name], roster, settings, layout)
        for name in fed.names
    }
    context = RoundContext("run", 1, clients=tuple(fed.names))
    accumulator = SecAggAggregator(settings, layout).start(
        layout.reference_view(), context, InProcessChannel(participants)
    )
    assert accumulator.participants == sorted(fed.names)
    plan = TrainingPlan(epochs=1, batch_size=8, learning_rate=0.1, update_clip_norm=clip)
    rng = np.random.default_rng(5)  # the updates only; the noise is the clients' own
    clipped_sum = np.zeros(d)
    for i, name in enumerate(fed.names):
        update = {"w": (rng.standard_normal(d) * (0.1 + i) / math.sqrt(d)).astype(np.float32)}
        fit = FitResult(name, 1, update, weight=30.0, num_examples=30)
        clipped = ClipUpdate(report_unclipped=False).apply(fit, RoundContext("run", 1, plan))
        clipped_sum += clipped.update["w"]
        sealed = participants[name].seal(clipped, RoundContext("run", 1, plan))
        assert set(sealed.update) == {MASKED}  # only the masked vector leaves the client
        accumulator.add(sealed)
    aggregate = accumulator.finish()
    assert aggregate.count == n and aggregate.weight == pytest.approx(n, abs=0.01)
    t = settings.round_threshold
    assert t == (threshold or 5)
    noise = settings.noise(layout, n)
    assert noise is not None
    step = aggregate.report["step"]
    assert step == noise.fixed_point.step
    expected = z * noise.sensitivity * step * math.sqrt(n / t)
    residual = aggregate.total["w"].astype(np.float64) - clipped_sum
    assert np.std(residual) == pytest.approx(expected, rel=0.05)
    assert abs(np.mean(residual)) < 6 * expected / math.sqrt(d)
