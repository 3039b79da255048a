"""What the server and every client of a SecAgg run agree on, and how each round is planned.

The server plans each round (`RoundParams`: the selected clients, the threshold, the graph
degree, the encoding) and announces it; every client re-derives what it can from its own copy of
the run's configuration and refuses a round that differs: another threshold than its own (the
threshold comes from the configuration, never from the server's announcement or the number of
clients it announces), another graph degree, modulus, encoding bounds or noise plan, or an
encoding that could overflow. The clients' signed views then make sure that they were all told
the same round (`veil.privacy.secagg.protocol`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from veil.privacy.secagg.distributed_dp import DistributedGaussian
from veil.privacy.secagg.errors import NotEnoughShares, ProtocolError
from veil.privacy.secagg.layout import UpdateLayout
from veil.privacy.secagg.protocol import RoundParams, active_threshold
from veil.privacy.secagg.quantize import FixedPoint

#: Reserved summed scalars: the fraction of a client's coordinates clipped to the declared
#: range, and whether its weight was capped. They are summed inside the masked vector, so the
#: server learns only their totals, never a client's own.
CLIPPED_FRACTION = "secagg/clipped_fraction"
WEIGHT_CAPPED = "secagg/weight_capped"
RESERVED_SUMS: Mapping[str, float] = {CLIPPED_FRACTION: 1.0, WEIGHT_CAPPED: 1.0}


@dataclass(frozen=True)
class DistributedNoise:
    """Client-level DP under SecAgg: every client clips its update to `clip_norm` (L2) and adds
    its share of discrete Gaussian noise of multiplier `noise_multiplier` (Kairouz et al. 2021)."""

    noise_multiplier: float
    clip_norm: float


@dataclass(frozen=True)
class SecAggSettings:
    """The SecAgg settings of a run (its `[secagg]` section,
    `veil.assembly.secure_aggregation.secagg`) plus what the run adds: scalars summed with the
    update and their bounds, and distributed DP noise when client-level DP is on."""

    clip_range: float = 1.0
    max_weight: float = 10_000.0
    modulus_bits: int = 32
    step: float | None = None
    threshold: int | None = None
    neighbours: int | None = None
    #: The largest round the run's configuration plans for (its selected clients); the
    #: default threshold is derived from it, never from a round's announcement.
    round_size: int = 2
    #: Scalars clients send only as sums (e.g. adaptive clipping's bit), with their bounds;
    #: the reserved clipping and weight-cap counters are always among them.
    sum_bounds: Mapping[str, float] = field(default_factory=lambda: dict(RESERVED_SUMS))
    distributed_dp: DistributedNoise | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "sum_bounds", {**self.sum_bounds, **RESERVED_SUMS})

    def check_layout(self, layout: UpdateLayout) -> None:
        """ValueError unless `layout` sums exactly these settings' scalars (build it with
        ``UpdateLayout.of(parameters, settings.sum_bounds)``)."""
        if set(layout.sum_keys) != set(self.sum_bounds):
            raise ValueError(
                f"the secure aggregation layout sums {list(layout.sum_keys)}, the settings "
                f"{sorted(self.sum_bounds)}: build it with UpdateLayout.of(parameters, "
                "settings.sum_bounds)"
            )

    @property
    def protocol(self) -> str:
        """ "secagg" (complete graph, Bonawitz et al.) or "secagg+" (Bell et al.)."""
        return "secagg" if self.neighbours is None else "secagg+"

    @property
    def round_threshold(self) -> int:
        """The Shamir threshold of every round: the configured one, else the smallest that
        withstands a malicious server (``⌊2|H|/3⌋ + 1``, `active_threshold`) for the largest
        share-holder set H of the planned round size: `round_size` clients in the complete
        graph, ``neighbours + 1`` (+1 for an odd degree) in SecAgg+."""
        if self.threshold is not None:
            return self.threshold
        k = self.neighbours
        largest = self.round_size if k is None else k + 1 + k % 2
        return max(2, active_threshold(largest))

    def binding(self) -> bytes:
        """The agreed parameters a round view binds beyond `RoundParams`' own fields: the
        encoding bounds, the summed scalars and the distributed-noise plan."""
        dp = self.distributed_dp
        return json.dumps(
            {
                "clip_range": float(self.clip_range).hex(),
                "max_weight": float(self.max_weight).hex(),
                "sum_bounds": {k: float(v).hex() for k, v in sorted(self.sum_bounds.items())},
                "distributed_dp": None
                if dp is None
                else [float(dp.noise_multiplier).hex(), float(dp.clip_norm).hex()],
            },
            sort_keys=True,
        ).encode()

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
            threshold=self.round_threshold,
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
        """The server's plan of one round. NotEnoughShares for fewer selected clients than the
        threshold; ProtocolError for a round the clients would refuse (more clients than the
        threshold withstands, see `RoundParams`)."""
        t = self.round_threshold
        if len(clients) < t:
            raise NotEnoughShares(
                f"round {round_} selected {len(clients)} clients, fewer than the secure "
                f"aggregation threshold {t}: nothing can be aggregated"
            )
        try:
            return RoundParams(
                run_id=run_id,
                round=round_,
                clients=clients,
                threshold=t,
                degree=self.neighbours,
                length=layout.length,
                fixed_point=self.fixed_point(layout, len(clients)),
                binding=self.binding(),
            )
        except ValueError as exc:
            raise ProtocolError(f"round {round_} of {len(clients)} clients: {exc}") from None

    def check_round(self, params: RoundParams, layout: UpdateLayout) -> None:
        """A client's check of the server's plan; ProtocolError naming what it refuses."""
        n = len(params.clients)
        expected = self.round_threshold
        if params.threshold != expected:
            raise ProtocolError(
                f"the server announces threshold {params.threshold}, this federation's "
                f"configuration says {expected}: refusing the round (the threshold comes from "
                "the configuration, never from the server)"
            )
        if params.binding != self.binding():
            raise ProtocolError(
                "the server's round binds other encoding bounds or another noise plan than "
                "this client's configuration: are both running the same configuration?"
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
            "length": params.length,
            "modulus_bits": params.fixed_point.modulus_bits,
            "step": params.fixed_point.step,
            "binding": params.binding.hex(),
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
            length=int(raw["length"]),
            fixed_point=FixedPoint(int(raw["modulus_bits"]), float(raw["step"])),
            binding=bytes.fromhex(raw["binding"]),
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise ProtocolError(f"malformed round announcement: {exc}") from None
