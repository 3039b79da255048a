"""One secure sum of the members' histogram vectors through Veil's SecAgg protocol objects.

`SecureSum` holds the same objects the `secagg` backend uses for a federation: one
`SecAggParticipant` per member (its identity key, the roster of its peers' keys, the run's
`SecAggSettings`) and the coordinator's `SecAggAggregator`, connected by an in-process channel
(the members run in this process, as in a simulation). Every call of `SecureSum.run` is one full
SecAgg round: fresh key agreement, shares, masking, consistency check and unmasking, so no mask
is ever used twice. The coordinator receives one masked vector of residues mod 2^k per member
(`on_upload` sees exactly these) and learns only the decoded sum.

Every entry is encoded in fixed point with the bound `SecAggSettings.clip_range` (a member's
entries lie within it by construction; one outside is clipped and counted in the round's report).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from veil.crypto.identity import IdentityKey
from veil.federation.messages import FitResult, ProtocolInstruction
from veil.federation.pipeline import RoundContext
from veil.privacy.dp.randomness import RandomSource
from veil.privacy.secagg.aggregator import SecAggAggregator
from veil.privacy.secagg.layout import UpdateLayout
from veil.privacy.secagg.participant import SecAggParticipant
from veil.privacy.secagg.roster import StaticRoster
from veil.privacy.secagg.settings import SecAggSettings

__all__ = ["HISTOGRAMS", "ClearSum", "SecureSum", "SumResult", "Upload"]

#: The name of the one vector a member contributes.
HISTOGRAMS = "trees/histograms"

#: What the coordinator receives from one member: (member, SecAgg round, upload).
Upload = Callable[[str, int, Mapping[str, npt.NDArray[Any]]], None]


@dataclass
class SumResult:
    """A secure sum: the decoded total, the aggregator's report, bytes moved."""

    total: npt.NDArray[np.float64]
    report: dict[str, Any] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0


class _Channel:
    """The round's protocol messages, delivered to the participants in this process."""

    def __init__(self, participants: Mapping[str, SecAggParticipant], run_id: str, round_: int):
        self.participants, self.run_id, self.round = participants, run_id, round_
        self.bytes_up = 0
        self.bytes_down = 0

    def exchange(self, stage: str, bodies: Mapping[str, bytes]) -> dict[str, bytes]:
        replies = {}
        for client, body in bodies.items():
            self.bytes_down += len(body)
            instruction = ProtocolInstruction(self.run_id, self.round, stage, body)
            replies[client] = self.participants[client].handle(instruction)
            self.bytes_up += len(replies[client])
        return replies


class SecureSum:
    """Sums vectors of `length` floats over `members` with SecAgg (see the module docstring).

    `settings` are the run's SecAgg settings with ``max_weight = 1`` (each member contributes
    weight 1) and `clip_range` the bound of every entry; CapacityError (a UserError) when the
    sum of the members' encoded vectors could overflow the modulus. `random` draws the
    members' stochastic rounding (default a fresh `SecureRandom` each); a seeded source needs
    ``production=False`` (tests).
    """

    def __init__(
        self,
        run_id: str,
        members: Sequence[str],
        length: int,
        settings: SecAggSettings,
        *,
        on_upload: Upload | None = None,
        random: Callable[[str], RandomSource] | None = None,
        production: bool = True,
    ) -> None:
        self.run_id = run_id
        self.reference = {HISTOGRAMS: np.zeros(length, dtype=np.float32)}
        self.layout = UpdateLayout.of(self.reference, settings.sum_bounds)
        settings.fixed_point(self.layout, len(members))  # refuses an encoding that could wrap
        self.settings = settings
        self.aggregator = SecAggAggregator(settings, self.layout)
        identities = {m: IdentityKey.generate() for m in members}
        roster = StaticRoster({m: k.public_key() for m, k in identities.items()})
        self.participants = {
            m: SecAggParticipant(
                m,
                identities[m],
                roster,
                settings,
                self.layout,
                random=random(m) if random is not None else None,
                production=production,
            )
            for m in members
        }
        self.on_upload = on_upload

    def run(self, round_: int, vectors: Mapping[str, npt.NDArray[np.float64]]) -> SumResult:
        """One SecAgg round over the members that give a vector; the decoded sum.
        AggregationFailed when the round cannot be unmasked."""
        channel = _Channel(self.participants, self.run_id, round_)
        context = RoundContext(self.run_id, round_, clients=tuple(sorted(vectors)))
        accumulator = self.aggregator.start(self.reference, context, channel)
        upload_bytes = 0
        for member in accumulator.participants:
            fit = FitResult(
                client=member,
                round=round_,
                update={HISTOGRAMS: np.asarray(vectors[member], dtype=np.float32)},
                weight=1.0,
                num_examples=0,
            )
            sealed = self.participants[member].seal(fit, RoundContext(self.run_id, round_))
            if self.on_upload is not None:
                self.on_upload(member, round_, sealed.update)
            upload_bytes += sealed.nbytes
            accumulator.add(sealed)
        aggregate = accumulator.finish()
        return SumResult(
            total=aggregate.total[HISTOGRAMS].astype(np.float64),
            report=dict(aggregate.report),
            bytes_up=channel.bytes_up + upload_bytes,
            bytes_down=channel.bytes_down,
        )


class ClearSum:
    """The sum in the clear (`secure_aggregation = "plain"`): the coordinator sees every
    member's histograms. For comparison and tests; `on_upload` sees the plain vectors."""

    def __init__(self, on_upload: Upload | None = None) -> None:
        self.on_upload = on_upload

    def run(self, round_: int, vectors: Mapping[str, npt.NDArray[np.float64]]) -> SumResult:
        total: npt.NDArray[np.float64] | None = None
        up = 0
        for member in sorted(vectors):
            vector = np.asarray(vectors[member], dtype=np.float64)
            if self.on_upload is not None:
                self.on_upload(member, round_, {HISTOGRAMS: vector})
            total = vector.copy() if total is None else total + vector
            up += vector.nbytes
        if total is None:
            raise ValueError("a sum needs at least one member's vector")
        return SumResult(total=total, report={"protocol": "plain"}, bytes_up=up)
