"""Releasing a decrypted CKKS sum: noise flooding and rounding before it leaves a decryptor.

Li and Micciancio (2021, "On the Security of Homomorphic Encryption on Approximate Numbers")
show that a CKKS decryption is not just the message: it is message plus the ciphertext's
noise, and whoever holds the ciphertext and sees the decrypted values can re-encode them, solve
a linear system and recover the secret key. In a federation the server holds every client's
ciphertext, so one unprotected release would let it decrypt every update of the run.

Before a decryptor answers, it adds Gaussian noise whose standard deviation is 2^flood_bits
times the estimated ciphertext noise, then rounds to a grid of that size. The attacker then
faces a noisy (learning-with-errors-like) system instead of an exact one. The noise is drawn
from AES-256-CTR keyed by HKDF of a release key that only the clients hold, bound to the run,
the round and the digest of the member set whose uploads the decryptor added
(`veil.privacy.he.wire.member_set_digest`): every honest decryptor of the quorum adds the same
ciphertexts and releases the same values (so the server learns nothing by averaging their
answers), and a decryptor answers one decryption per round.

Residual risk (docs/homomorphic-encryption.md): the flooding factor 2^flood_bits gives a
per-value statistical distance of about 2^-flood_bits, not the 2^-128 a proof of IND-CPA-D
security would want; that would cost more precision than a 60-bit data prime can give.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from veil.crypto.sealed_box import derive_key
from veil.privacy.dp.randomness import SecureRandom
from veil.privacy.secagg.masking import expand_mask


class _KeyedStream(SecureRandom):
    """A one-shot deterministic stream for one release: AES-256-CTR under a derived key.
    Deterministic on purpose (see the module docstring); never used twice."""

    def __init__(self, seed: bytes) -> None:
        self._seed = seed
        self._spent = False

    def _bytes(self, n: int) -> bytes:
        if self._spent:
            raise RuntimeError("a release stream is used once")
        self._spent = True
        return expand_mask(self._seed, (n + 7) // 8, np.uint64).tobytes()[:n]


def flood_and_round(
    values: npt.NDArray[np.float64],
    *,
    release_key: bytes,
    run_id: str,
    round_: int,
    digest: bytes,
    std: float,
    step: float,
) -> npt.NDArray[np.float64]:
    """`values` plus Gaussian noise of `std` (keyed, see the module docstring), rounded to
    multiples of `step`."""
    seed = derive_key(release_key, "ckks-release", run_id, round_, digest)
    noise = _KeyedStream(seed).standard_normal(values.size)
    flooded = values + std * noise
    return np.round(flooded / step) * step
