"""Distributed DP: every client adds part of the noise in the integer domain, under SecAgg.

Kairouz, Liu, Steinke 2021, "The Distributed Discrete Gaussian Mechanism for Federated Learning
with Secure Aggregation". With client-level DP and secure aggregation together, no party ever
holds the un-noised sum: each client clips its update to L2 norm C, encodes it with step γ
(stochastic rounding moves each coordinate by less than one unit, so the encoded vector's norm is
at most Δ = C/γ + √d in integer units), and adds discrete Gaussian noise N_Z(0, σ_c²) to every
coordinate with σ_c = z·Δ / √t, where t is the round's SecAgg threshold. The server can unmask
only a sum of at least t clients, whose noise has variance ≥ t·σ_c² = (z·Δ)²: the noise the
accountant charges for a Gaussian mechanism with multiplier z.

The sum of discrete Gaussians is not exactly a discrete Gaussian; Kairouz et al. (Theorem 1 and
Proposition 14) bound the difference by τ = 10·Σ_{k=1}^{n-1} exp(−2π²σ_c²·k/(k+1)). `tau` computes
it; `plan` refuses settings where τ·d is not negligible (it is astronomically small for the σ_c of
thousands of integer units that these settings produce).

Noise comes from OpenDP's exact discrete Gaussian sampler (Canonne, Kamath, Steinke 2020), which
draws from the operating system's CSPRNG; about 20 µs per coordinate, so this suits the tabular
and small image models rather than transformer-sized updates.

Residual trust: a client that colludes with the server can subtract its own noise from the sum,
so the guarantee against a coalition of the server and m clients is that of (t − m)·σ_c².
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np
import numpy.typing as npt
import opendp.prelude as dp

from veil.errors import ConfigError
from veil.privacy.secagg.quantize import FixedPoint

#: Standard deviations of the summed noise kept clear of the modulus.
_TAIL_SIGMAS = 12.0
#: Largest accepted τ·d (the divergence between the noise sum and a discrete Gaussian).
_MAX_TAU_D = 1e-12


@dataclass(frozen=True)
class DistributedGaussian:
    """The per-round distributed discrete Gaussian: encoding step and each client's noise.

    Contract: `fixed_point.step` is γ; a client with threshold `threshold` adds N_Z(0, σ_c²) with
    σ_c = `client_stddev(threshold)` to each of the `dimension` update coordinates.
    """

    noise_multiplier: float
    clip_norm: float
    dimension: int
    fixed_point: FixedPoint

    @property
    def sensitivity(self) -> float:
        """Δ = C/γ + √d: the L2 norm of one client's encoded update, in integer units."""
        return self.clip_norm / self.fixed_point.step + math.sqrt(self.dimension)

    def client_stddev(self, threshold: int) -> float:
        """σ_c = z·Δ/√t: t survivors together carry noise of standard deviation z·Δ."""
        if threshold < 1:
            raise ValueError(f"threshold must be >= 1, got {threshold}")
        return self.noise_multiplier * self.sensitivity / math.sqrt(threshold)

    @classmethod
    def plan(
        cls,
        *,
        noise_multiplier: float,
        clip_norm: float,
        dimension: int,
        n_clients: int,
        threshold: int,
        modulus_bits: int,
    ) -> DistributedGaussian:
        """The finest step γ for which the sum of `n_clients` clipped updates and their noise
        stays inside the signed range of Z_{2^k} (with 12 standard deviations of tail).

        ConfigError if no step fits (too few modulus bits) or if τ·d is not negligible.
        """
        if min(noise_multiplier, clip_norm) <= 0 or dimension < 1 or n_clients < 1:
            raise ValueError("noise_multiplier, clip_norm, dimension and n_clients must be > 0")
        half = float(1 << (modulus_bits - 1))
        # With u = C/γ: n·(u + 1) + T·z·(u + √d)·√(n/t) < 2^(k-1); solve for the largest u.
        spread = _TAIL_SIGMAS * noise_multiplier * math.sqrt(n_clients / threshold)
        root_d = math.sqrt(dimension)
        units = (half * 0.99 - n_clients - spread * root_d) / (n_clients + spread)
        if units < 10 * root_d:
            raise ConfigError(
                f"distributed DP: a {modulus_bits}-bit modulus cannot hold {n_clients} clients' "
                f"updates of {dimension} values with noise multiplier {noise_multiplier} "
                "without a step so coarse that rounding would dominate the noise; raise "
                "[secagg].modulus_bits"
            )
        planned = cls(
            noise_multiplier=noise_multiplier,
            clip_norm=clip_norm,
            dimension=dimension,
            fixed_point=FixedPoint(modulus_bits, clip_norm / units),
        )
        planned.fixed_point.check_capacity(n_clients, clip_norm)
        if tau(n_clients, planned.client_stddev(threshold)) * dimension > _MAX_TAU_D:
            raise ConfigError(
                "distributed DP: the per-client noise is too small for the sum of discrete "
                "Gaussians to be accounted as one; raise the noise multiplier"
            )
        return planned

    def check(self, n_clients: int, threshold: int) -> None:
        """A client's check of a step chosen by the server: ConfigError unless the sum cannot
        wrap and τ·d is negligible (the server cannot weaken the noise by its choice)."""
        expected = DistributedGaussian.plan(
            noise_multiplier=self.noise_multiplier,
            clip_norm=self.clip_norm,
            dimension=self.dimension,
            n_clients=n_clients,
            threshold=threshold,
            modulus_bits=self.fixed_point.modulus_bits,
        )
        if self.fixed_point.step < expected.fixed_point.step * (1 - 1e-9):
            raise ConfigError(
                f"distributed DP: step {self.fixed_point.step:g} is finer than the "
                f"{expected.fixed_point.step:g} that keeps the noisy sum inside the modulus"
            )

    def noise(self, threshold: int) -> npt.NDArray[np.int64]:
        """This client's share of the noise: `dimension` draws of N_Z(0, σ_c²), from OpenDP's
        exact sampler and the operating system's CSPRNG."""
        sigma = self.client_stddev(threshold)
        zeros = np.zeros(self.dimension, np.int64)
        return np.asarray(_sampler(sigma)(zeros), dtype=np.int64)


def tau(n_clients: int, sigma: float) -> float:
    """τ = 10·Σ_{k=1}^{n−1} exp(−2π²σ²·k/(k+1)) of Kairouz et al. (0 for one client)."""
    return 10.0 * sum(
        math.exp(-2 * math.pi**2 * sigma**2 * k / (k + 1)) for k in range(1, n_clients)
    )


@cache
def _sampler(sigma: float) -> dp.Measurement:
    dp.enable_features("contrib")
    space = dp.vector_domain(dp.atom_domain(T="i64")), dp.l2_distance(T="i64")
    return dp.m.make_gaussian(*space, scale=sigma)
