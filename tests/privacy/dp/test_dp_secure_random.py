"""The production noise source, tested as it runs: `SecureRandom` (AES-CTR from the OS CSPRNG,
its own Box–Muller) and the discrete Gaussian that SecAgg's clients add (OpenDP's exact sampler).

Every test is statistical with a stated tolerance; with a correct source each fails with
probability below about 1e-6 (5 standard errors, or a p-value threshold of 1e-6), so a failure
means the source is wrong, not unlucky.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from veil.privacy.dp.randomness import SecureRandom, SeededRandom, require_secure
from veil.privacy.secagg.distributed_dp import DistributedGaussian
from veil.privacy.secagg.quantize import FixedPoint

N = 1_000_000
#: A test statistic more than this many standard errors from its expectation fails.
Z = 5.0
#: Goodness-of-fit tests fail below this p-value.
P_MIN = 1e-6


@pytest.fixture(scope="module")
def normals() -> np.ndarray:
    return SecureRandom().standard_normal(N)


def test_normal_mean_and_variance(normals: np.ndarray) -> None:
    assert normals.shape == (N,) and np.isfinite(normals).all()
    assert abs(normals.mean()) < Z / math.sqrt(N)
    # Var of the sample variance of N(0,1) is 2/N.
    assert abs(normals.var() - 1.0) < Z * math.sqrt(2 / N)


def test_normal_distribution_and_tails(normals: np.ndarray) -> None:
    assert stats.kstest(normals, "norm").pvalue > P_MIN
    # The tails Box–Muller must reach: |x| > 3 with probability 2·Φ(-3).
    p = 2 * stats.norm.sf(3)
    observed = np.mean(np.abs(normals) > 3)
    assert abs(observed - p) < Z * math.sqrt(p * (1 - p) / N)
    # P(|x| > 4) = 6.3e-5: about 63 such draws are expected, none with probability e^-63.
    assert np.abs(normals).max() > 4.0


def test_normals_are_uncorrelated(normals: np.ndarray) -> None:
    bound = Z / math.sqrt(N)
    # Neighbours in the output, and the two halves Box–Muller builds from one pair of uniforms.
    assert abs(np.corrcoef(normals[:-1], normals[1:])[0, 1]) < bound * math.sqrt(2)
    half = N // 2
    assert abs(np.corrcoef(normals[:half], normals[half:])[0, 1]) < bound * math.sqrt(2)
    # Squares too: Box–Muller's two outputs share a radius, which a wrong pairing would show.
    sq = normals**2
    assert abs(np.corrcoef(sq[:half], sq[half:])[0, 1]) < bound * math.sqrt(2) * 2


def test_two_sources_and_two_calls_differ() -> None:
    a, b = SecureRandom(), SecureRandom()
    assert not np.array_equal(a.standard_normal(1000), b.standard_normal(1000))
    assert not np.array_equal(a.standard_normal(1000), a.standard_normal(1000))


@pytest.mark.parametrize("draw", ["uniform", "uniform32"])
def test_uniforms(draw: str) -> None:
    u = getattr(SecureRandom(), draw)(N)
    assert u.min() >= 0.0 and u.max() < 1.0
    assert stats.kstest(u, "uniform").pvalue > P_MIN
    assert abs(u.mean() - 0.5) < Z * math.sqrt(1 / 12 / N)
    if draw == "uniform32":
        assert np.all(u * 2**32 == np.floor(u * 2**32))  # on the 2^-32 grid


def test_randbelow_is_uniform() -> None:
    source = SecureRandom()
    draws = np.array([source.randbelow(10) for _ in range(100_000)])
    assert draws.min() == 0 and draws.max() == 9
    assert stats.chisquare(np.bincount(draws, minlength=10)).pvalue > P_MIN


@pytest.mark.parametrize("sigma", [0.7, 3.0, 40.0])
def test_the_discrete_gaussian_secagg_clients_add(sigma: float) -> None:
    """N_Z(0, σ²) from OpenDP: integer, mean 0, variance σ² (the discrete Gaussian's variance is
    below σ² and within 1e-3 relative of it for σ ≥ 0.7; Canonne, Kamath, Steinke 2020, Cor. 9)."""
    plan = DistributedGaussian(1.0, 1.0, 100_000, FixedPoint(32, 1.0))
    threshold = 1
    scale = sigma / plan.client_stddev(threshold)
    noise = DistributedGaussian(scale, 1.0, 100_000, FixedPoint(32, 1.0)).noise(threshold)
    n = noise.size
    assert noise.dtype == np.int64
    assert abs(noise.mean()) < Z * sigma / math.sqrt(n)
    # Var of the sample variance ≈ 2σ⁴/n for a near-Gaussian.
    assert abs(noise.var() - sigma**2) < Z * sigma**2 * math.sqrt(2 / n) + 1e-3 * sigma**2
    # Shape: the probability mass at 0 is that of the discrete Gaussian.
    support = np.arange(-int(12 * sigma) - 2, int(12 * sigma) + 3)
    weights = np.exp(-(support**2) / (2 * sigma**2))
    p0 = weights[support == 0][0] / weights.sum()
    assert abs(np.mean(noise == 0) - p0) < Z * math.sqrt(p0 * (1 - p0) / n)


def test_seeded_sources_are_refused_in_production() -> None:
    from veil.errors import ConfigError

    with pytest.raises(ConfigError, match="seeded random source is refused"):
        require_secure(SeededRandom(1), production=True, what="DP-SGD noise")
    require_secure(SecureRandom(), production=True, what="DP-SGD noise")
    require_secure(SeededRandom(1), production=False, what="DP-SGD noise")
