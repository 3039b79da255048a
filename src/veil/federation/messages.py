"""What the server and the clients say to each other, independent of how it is carried.

Transports carry these messages; they import this module, never the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from veil.tensors import NamedArrays, Payload, total_bytes


@dataclass(frozen=True)
class TrainingPlan:
    """How a client trains locally in one round (the same for every client of the round)."""

    epochs: int
    batch_size: int
    learning_rate: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    #: FedProx: weight of the proximal term (mu/2)·||w - w_global||²; 0 disables it.
    proximal_mu: float = 0.0
    #: Client-level DP: the norm each client clips its whole update to (None: no clipping).
    update_clip_norm: float | None = None
    #: SHA-256 of the frozen base the update applies to (`models.frozen_fingerprint`; None for
    #: a model that trains every parameter): a client with another base refuses the round.
    base_model: str | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self}")
        if min(self.learning_rate, self.momentum, self.weight_decay, self.proximal_mu) < 0:
            raise ValueError(f"learning rate, momentum, weight decay and mu must be >= 0: {self}")


@dataclass(frozen=True)
class FitInstruction:
    """Server → client: train from these global parameters."""

    run_id: str
    round: int
    parameters: NamedArrays
    plan: TrainingPlan

    @property
    def nbytes(self) -> int:
        return total_bytes(self.parameters)


@dataclass
class FitResult:
    """Client → server: the update (local minus global parameters) and its weight.

    `update` is what the client pipeline produced: a plain difference, or later a clipped, noised,
    quantised or masked one. `weight` is the aggregation weight (the number of training examples).
    """

    client: str
    round: int
    update: Payload
    weight: float
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    #: Scalars the server may learn only as a sum over clients (e.g. adaptive clipping's
    #: "was my update unclipped" bit); they travel with the update through the aggregator.
    sums: dict[str, float] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return total_bytes(self.update) + 8 * len(self.sums)


@dataclass(frozen=True)
class EvaluateInstruction:
    """Server → client: evaluate these parameters on your validation data."""

    run_id: str
    round: int
    parameters: NamedArrays

    @property
    def nbytes(self) -> int:
        return total_bytes(self.parameters)


@dataclass(frozen=True)
class EvaluateResult:
    """Client → server: metrics of the global model on the client's own validation data."""

    client: str
    round: int
    num_examples: int
    metrics: dict[str, float]


@dataclass(frozen=True)
class ProtocolInstruction:
    """Server → one client: a step of a multi-message aggregation protocol (e.g. SecAgg's key
    advertisement). `stage` names the protocol and the step, `body` is that step's message in
    the protocol's own safe encoding (never pickle)."""

    run_id: str
    round: int
    stage: str
    body: bytes

    @property
    def nbytes(self) -> int:
        return len(self.body)


@dataclass(frozen=True)
class ProtocolReply:
    """Client → server: the answer to a `ProtocolInstruction`."""

    client: str
    round: int
    stage: str
    body: bytes

    @property
    def nbytes(self) -> int:
        return len(self.body)


@dataclass(frozen=True)
class ClientFailure:
    """A selected client that returned nothing this round (dropped out, crashed, too late)."""

    client: str
    round: int
    reason: str
