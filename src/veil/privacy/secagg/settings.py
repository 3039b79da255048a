"""What the server and every client of a SecAgg run agree on, and how each round is planned.

The server plans each round (`RoundParams`: the selected clients, the threshold, the neighbour
graph, the encoding) and announces it; every client re-derives what it can from its own copy of
the settings and refuses a round that would weaken it: a lower threshold than its own, another
graph degree, another modulus, or an encoding that could overflow. So a curious server cannot
talk a client into revealing more than the settings allow.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from veil.config import SecAggConfig
from veil.privacy.secagg.distributed_dp import DistributedGaussian
from veil.privacy.secagg.errors import ProtocolError
from veil.privacy.secagg.layout import UpdateLayout
from veil.privacy.secagg.protocol import RoundParams, majority_threshold
from veil.privacy.secagg.quantize import FixedPoint

_GRAPH_SEED_BYTES = 32


@dataclass(frozen=True)
class DistributedNoise:
    """Client-level DP under SecAgg: every client clips its update to `clip_norm` (L2) and adds
    its share of discrete Gaussian noise of multiplier `noise_multiplier` (Kairouz et al. 2021)."""

    noise_multiplier: float
    clip_norm: float


@dataclass(frozen=True)
class SecAggSettings:
    """The `[secagg]` settings plus what the run adds: scalars summed with the update and
    their bounds, and distributed DP noise when client-level DP is on."""

    clip_range: float = 1.0
    max_weight: float = 10_000.0
    modulus_bits: int = 32
    step: float | None = None
    threshold: int | None = None
    neighbours: int | None = None
    #: Scalars clients send only as sums (e.g. adaptive clipping's bit), with their bounds.
    sum_bounds: Mapping[str, float] = field(default_factory=dict)
    distributed_dp: DistributedNoise | None = None

    @property
    def protocol(self) -> str:
        """ "secagg" (complete graph, Bonawitz et al.) or "secagg+" (Bell et al.)."""
        return "secagg" if self.neighbours is None else "secagg+"

    def threshold_for(self, n_clients: int) -> int:
        """The Shamir threshold for a round of `n_clients`: the configured one, else a majority
        of the largest neighbourhood."""
        if self.threshold is not None:
            return self.threshold
        return max(2, majority_threshold(n_clients, self.neighbours))

    def noise(self, layout: UpdateLayout, n_clients: int) -> DistributedGaussian | None:
        """The round's distributed DP plan, if client-level DP is on."""
        dp = self.distributed_dp
        if dp is None:
            return None
        return DistributedGaussian.plan(
            noise_multiplier=dp.noise_multiplier,
            clip_norm=dp.clip_norm,
            dimension=layout.parameter_count,
            n_clients=n_clients,
            threshold=self.threshold_for(n_clients),
            modulus_bits=self.modulus_bits,
        )

    def capacity_bound(self) -> float:
        """The largest magnitude any encoded entry may have (before the sum)."""
        if self.distributed_dp is not None:
            return max(self.distributed_dp.clip_norm, 1.0, *self.sum_bounds.values())
        weight = self.max_weight
        return max(self.clip_range * weight, weight, *self.sum_bounds.values())

    def fixed_point(self, layout: UpdateLayout, n_clients: int) -> FixedPoint:
        """The round's encoding: the configured step (checked), or the finest that cannot
        overflow; under distributed DP the step leaves room for the noise too."""
        noise = self.noise(layout, n_clients)
        if noise is not None:
            return noise.fixed_point
        if self.step is None:
            return FixedPoint.fit(n_clients, self.capacity_bound(), self.modulus_bits)
        fixed = FixedPoint(self.modulus_bits, self.step)
        fixed.check_capacity(n_clients, self.capacity_bound())
        return fixed

    def plan_round(
        self, run_id: str, round_: int, clients: tuple[str, ...], layout: UpdateLayout
    ) -> RoundParams:
        """The server's plan of one round (fresh graph seed)."""
        return RoundParams(
            run_id=run_id,
            round=round_,
            clients=clients,
            threshold=self.threshold_for(len(clients)),
            degree=self.neighbours,
            graph_seed=os.urandom(_GRAPH_SEED_BYTES),
            length=layout.length,
            fixed_point=self.fixed_point(layout, len(clients)),
        )

    def check_round(self, params: RoundParams, layout: UpdateLayout) -> None:
        """A client's check of the server's plan; ProtocolError naming what it refuses."""
        n = len(params.clients)
        expected = self.threshold_for(n)
        if params.threshold < expected:
            raise ProtocolError(
                f"the server asks for threshold {params.threshold}, below this client's "
                f"{expected}: refusing a round in which fewer clients could unmask"
            )
        if params.degree != self.neighbours:
            raise ProtocolError(
                f"the server's neighbour graph has degree {params.degree}, this client's "
                f"settings say {self.neighbours}"
            )
        if params.length != layout.length:
            raise ProtocolError(
                f"the server expects vectors of {params.length} entries, this client's model "
                f"gives {layout.length}: are both running the same model and settings?"
            )
        fixed = params.fixed_point
        if fixed.modulus_bits != self.modulus_bits:
            raise ProtocolError(
                f"the server uses a {fixed.modulus_bits}-bit modulus, this client "
                f"{self.modulus_bits}"
            )
        noise = self.noise(layout, n)
        if noise is not None:
            DistributedGaussian(
                noise.noise_multiplier, noise.clip_norm, noise.dimension, fixed
            ).check(n, params.threshold)
        else:
            fixed.check_capacity(n, self.capacity_bound())


def params_to_bytes(params: RoundParams) -> bytes:
    """The server's announcement of a round (JSON; floats round-trip exactly)."""
    return json.dumps(
        {
            "run_id": params.run_id,
            "round": params.round,
            "clients": list(params.clients),
            "threshold": params.threshold,
            "degree": params.degree,
            "graph_seed": params.graph_seed.hex(),
            "length": params.length,
            "modulus_bits": params.fixed_point.modulus_bits,
            "step": params.fixed_point.step,
        },
        sort_keys=True,
    ).encode()


def params_from_bytes(data: bytes) -> RoundParams:
    """Parse an announcement; ProtocolError for anything malformed."""
    try:
        raw = json.loads(data)
        return RoundParams(
            run_id=str(raw["run_id"]),
            round=int(raw["round"]),
            clients=tuple(str(c) for c in raw["clients"]),
            threshold=int(raw["threshold"]),
            degree=None if raw["degree"] is None else int(raw["degree"]),
            graph_seed=bytes.fromhex(raw["graph_seed"]),
            length=int(raw["length"]),
            fixed_point=FixedPoint(int(raw["modulus_bits"]), float(raw["step"])),
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise ProtocolError(f"malformed round announcement: {exc}") from None


def settings_from_config(
    config: SecAggConfig | None,
    *,
    distributed_dp: DistributedNoise | None = None,
    modulus_bits: int | None = None,
) -> SecAggSettings:
    """The settings of a run's `[secagg]` section (defaults when it is absent); `modulus_bits`
    overrides the section's (int8 compression narrows the ring)."""
    c = config or SecAggConfig()
    return SecAggSettings(
        clip_range=c.clip_range,
        max_weight=c.max_weight,
        modulus_bits=c.modulus_bits if modulus_bits is None else modulus_bits,
        step=c.step,
        threshold=c.threshold,
        neighbours=c.neighbours,
        distributed_dp=distributed_dp,
    )
