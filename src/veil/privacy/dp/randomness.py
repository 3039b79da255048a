"""Where DP noise gets its randomness: the operating system's CSPRNG, or (tests only) a seed.

Noise that protects people must not be predictable: an attacker who can reproduce the generator's
state can subtract the noise. `SecureRandom` draws its bits from a CSPRNG keyed by `os.urandom`
(getrandom(2) on Linux). `SeededRandom` is reproducible and exists for tests; `require_secure`
refuses it wherever `production` is set.

Every component that draws DP noise or DP sampling from a `RandomSource` calls `require_secure`
before it draws (when it is built; `train_split` on entry), with `production` defaulting to true,
so that one built by hand with a seeded source and nothing else said is refused: `DPSGDTrainer`,
`GaussianSumNoise` (client level), `train_split` (vertical split learning) and `SecAggParticipant`
(the stochastic rounding under distributed DP). `veil.privacy.dp.policy.random_source`, which
builds every source of a run (the client-level Poisson sampler included), checks the `[privacy]`
configuration too, and the policy passes its `production` to the components. Not checked, on
purpose: the audit's retraining (`veil.privacy.audit.recipe`: a measurement, never released; a
run's audit draws through `random_source`), compression's stochastic rounding (post-processing of
an update that is already clipped and noised), and draws that never take a `RandomSource`: the
SecAgg clients' discrete Gaussian noise (OpenDP, OS CSPRNG), `veil query` (OpenDP) and the CKKS
release's flooding noise (keyed by a secret only the clients hold).
"""

from __future__ import annotations

import math
import secrets
from typing import Protocol

import numpy as np
import numpy.typing as npt

from veil.crypto.drbg import SecureByteStream
from veil.errors import ConfigError

_TWO_PI = 2.0 * math.pi
_2_POW_MINUS_32 = 2.0**-32
_2_POW_53 = float(1 << 53)


class RandomSource(Protocol):
    """The randomness a mechanism may use."""

    #: True for a reproducible (test) source.
    seeded: bool

    def randbelow(self, n: int) -> int:
        """A uniform integer in [0, n), exactly (for discrete samplers)."""
        ...

    def standard_normal(self, size: int) -> npt.NDArray[np.float64]:
        """`size` independent N(0, 1) draws."""
        ...

    def uniform(self, size: int) -> npt.NDArray[np.float64]:
        """`size` independent uniform draws in [0, 1) (53-bit resolution)."""
        ...

    def uniform32(self, size: int) -> npt.NDArray[np.float64]:
        """`size` independent uniform draws in [0, 1) on the grid k·2⁻³² (32-bit resolution:
        half the random bytes, enough for stochastic rounding)."""
        ...


class SecureRandom:
    """Cryptographically secure randomness: AES-256-CTR keyed and re-keyed from the OS CSPRNG
    (`veil.crypto.drbg.SecureByteStream`); exact integers from `secrets`.

    Gaussian draws use the Box–Muller transform on 53-bit uniforms; the uniforms exclude 0 so
    the logarithm is finite and the tails reach about 8.6σ.
    """

    seeded = False

    def __init__(self) -> None:
        self._stream = SecureByteStream()

    def _bytes(self, n: int) -> bytes:
        return self._stream.read(n)

    def randbelow(self, n: int) -> int:
        return secrets.randbelow(n)

    def uniform(self, size: int) -> npt.NDArray[np.float64]:
        raw = np.frombuffer(self._bytes(8 * size), dtype=np.uint64)
        return (raw >> np.uint64(11)).astype(np.float64) / _2_POW_53

    def uniform32(self, size: int) -> npt.NDArray[np.float64]:
        raw = np.frombuffer(self._bytes(4 * size), dtype=np.uint32)
        out = raw.astype(np.float64)
        out *= _2_POW_MINUS_32
        return out

    def standard_normal(self, size: int) -> npt.NDArray[np.float64]:
        pairs = (size + 1) // 2
        raw = np.frombuffer(self._bytes(16 * pairs), dtype=np.uint64).reshape(2, pairs)
        u1 = ((raw[0] >> np.uint64(11)).astype(np.float64) + 1.0) / _2_POW_53  # (0, 1]
        u2 = (raw[1] >> np.uint64(11)).astype(np.float64) / _2_POW_53  # [0, 1)
        radius = np.sqrt(-2.0 * np.log(u1))
        angle = _TWO_PI * u2
        out = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])
        return out[:size]


class SeededRandom:
    """A reproducible source for tests. Never use it for a release: see `require_secure`."""

    seeded = True

    def __init__(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)

    def randbelow(self, n: int) -> int:
        if n <= 0:
            raise ValueError("n must be positive")
        if n < 2**63:
            return int(self._rng.integers(0, n))
        # Arbitrary precision: rejection sampling on random bits.
        bits = n.bit_length()
        while True:
            value = int.from_bytes(self._rng.bytes((bits + 7) // 8), "little") >> (
                (8 - bits % 8) % 8
            )
            if value < n:
                return value

    def standard_normal(self, size: int) -> npt.NDArray[np.float64]:
        return self._rng.standard_normal(size)

    def uniform(self, size: int) -> npt.NDArray[np.float64]:
        return self._rng.random(size)

    def uniform32(self, size: int) -> npt.NDArray[np.float64]:
        draws = self._rng.integers(0, 1 << 32, size, dtype=np.uint64).astype(np.float64)
        draws *= _2_POW_MINUS_32
        return draws


def require_secure(source: RandomSource, *, production: bool, what: str) -> None:
    """Refuse a seeded source in production mode, naming what would have used it."""
    if production and source.seeded:
        raise ConfigError(
            f"{what}: a seeded random source is refused in production mode, because seeded noise "
            "can be reproduced and removed; drop the noise seed, or set production = false "
            "for a test run"
        )
