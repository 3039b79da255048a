"""What the server and every client of a CKKS run agree on: parameters, bounds and precision.

The worst-case sum is bounded before anything is encrypted (every coordinate clipped to
`clip_range`, every weight capped at `max_weight`, every client selected); a run whose bound
times the scale could pass q/2 is refused (`OverflowRisk`), because CKKS wraps around without
a sign. The precision the server checks a decrypted sum against (`tolerance`) follows from the
ciphertext noise and the decryptors' flooding noise.

The encrypted vector is the `UpdateLayout` followed by `TAIL`: the fraction of the client's
coordinates that were clipped, 1.0 if its weight was capped (else 0.0), and the count slot
1.0. Every tail value lies in [0, 1], inside the capacity bound; the server learns only their
sums, so nothing per client travels in the clear.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from veil.privacy.he.ckks import CkksParams
from veil.privacy.secagg.layout import UpdateLayout

#: Tolerances are this many standard deviations of the flooding noise (a correct sum fails the
#: check with probability about 1e-15 per value).
_SIGMAS = 8.0

#: The slots after the layout, in order: Σ clipped fraction, Σ capped flag, Σ 1 (the count).
TAIL = ("clipped_fraction", "weight_capped", "count")


@dataclass(frozen=True)
class CkksSettings:
    """The CKKS settings of a run (its `[ckks]` section, `veil.assembly.secure_aggregation.ckks`)
    plus the scalars summed with the update and their bounds."""

    params: CkksParams = field(default_factory=CkksParams)
    decryptors: int = 2
    clip_range: float = 1.0
    max_weight: float = 1000.0
    flood_bits: int = 12
    sum_bounds: Mapping[str, float] = field(default_factory=dict)
    #: The fewest distinct members whose ciphertexts a decryptor adds up before it releases a
    #: sum (raised to `decryptors` if that is larger; never below 2). A decryptor takes it from
    #: its own settings, never from the server's request.
    min_members: int = 2

    def __post_init__(self) -> None:
        if self.min_members < 2:
            raise ValueError(f"min_members must be at least 2, got {self.min_members}")

    @property
    def quorum(self) -> int:
        """The fewest members a released sum may hold: max(min_members, decryptors)."""
        return max(self.min_members, self.decryptors)

    def vector_length(self, layout: UpdateLayout) -> int:
        """[w·Δ | w | sums | clipped | capped | 1]: the layout and the `TAIL` slots."""
        return layout.length + len(TAIL)

    def capacity_bound(self, n_clients: int) -> float:
        """The largest |value| any slot of a sum of `n_clients` contributions can reach."""
        weight = self.max_weight
        return n_clients * max(self.clip_range * weight, weight, 1.0, *self.sum_bounds.values())

    def check_capacity(self, n_clients: int) -> None:
        """OverflowRisk unless the sum of `n_clients` contributions stays below q/2."""
        self.params.check_capacity(
            self.capacity_bound(n_clients),
            f"the sum of {n_clients} clients' weighted updates (clip_range {self.clip_range:g} "
            f"× max_weight {self.max_weight:g} each)",
        )

    def flood_std(self, terms: int) -> float:
        """Standard deviation of the noise a decryptor adds to a sum of `terms` ciphertexts:
        2^flood_bits times the ciphertext noise."""
        return float(2.0**self.flood_bits * self.params.noise_std(max(terms, 1)))

    def release_step(self, terms: int) -> float:
        """The grid released values are rounded to: the power of two at or below the flood."""
        return float(2.0 ** math.floor(math.log2(self.flood_std(terms))))

    def tolerance(self, terms: int) -> float:
        """The largest error a correct decrypted value of a sum of `terms` may have."""
        noise = _SIGMAS * math.hypot(self.flood_std(terms), self.params.noise_std(terms))
        return noise + 2 * self.release_step(terms)

    def report(self) -> dict[str, object]:
        return {
            **self.params.to_dict(),
            "decryptors": self.decryptors,
            "quorum": self.quorum,
            "clip_range": self.clip_range,
            "max_weight": self.max_weight,
            "flood_bits": self.flood_bits,
        }
