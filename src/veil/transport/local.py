"""In-process simulation: many clients on one machine, without one OS process each.

Clients run one after another through a single model instance, so memory grows with the data, not
with the number of clients. Optional simulated dropout and stragglers (`veil.transport.simulated`)
make a selected client return nothing. With a `VectorisedTrainer` (chosen by the composition root
for runs it supports), the round's clients train together in one batched computation, with the
results of the per-client loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence

from torch import nn

from veil.errors import VeilError
from veil.federation.client import ClientRunner
from veil.federation.messages import (
    ClientFailure,
    EvaluateInstruction,
    EvaluateResult,
    FitInstruction,
    FitResult,
    ProtocolInstruction,
    ProtocolReply,
)
from veil.federation.vectorised import VectorisedTrainer
from veil.transport.simulated import SimulatedFaults, Stragglers

_log = logging.getLogger("veil.simulation")


class LocalTransport:
    """A `ClientGateway` that calls `ClientRunner`s in the server's own process."""

    def __init__(
        self,
        runners: Mapping[str, ClientRunner],
        model_factory: Callable[[], nn.Module],
        *,
        dropout: float = 0.0,
        seed: int = 0,
        stragglers: Stragglers | None = None,
        vectorised: VectorisedTrainer | None = None,
    ) -> None:
        """`vectorised` trains the clients it can of each round together (None: one by one)."""
        self.runners = dict(runners)
        self.vectorised = vectorised
        self.faults = SimulatedFaults(
            list(self.runners),
            seed=seed,
            dropout=dropout,
            stragglers=stragglers,
            examples=lambda name: self.runners[name].num_train_examples,
        )
        self._model = model_factory()

    def fit(
        self, clients: Sequence[str], instruction: FitInstruction
    ) -> Iterator[FitResult | ClientFailure]:
        epochs = instruction.plan.epochs
        runners = [self._runner(name) for name in clients]
        reasons = [self.faults.failure(name, instruction.round, epochs=epochs) for name in clients]
        trained: dict[str, FitResult] = {}
        if self.vectorised is not None:
            together = [
                name
                for name, reason in zip(clients, reasons, strict=True)
                if reason is None and self.vectorised.eligible(name, instruction)
            ]
            trained = self.vectorised.fit(together, instruction)
        for name, runner, reason in zip(clients, runners, reasons, strict=True):
            if reason is not None:
                yield ClientFailure(name, instruction.round, reason)
                continue
            try:
                done = trained.get(name)
                yield runner.fit(self._model, instruction) if done is None else done
            except VeilError as exc:
                _log.warning("client %s refused to train: %s", name, exc)
                yield ClientFailure(name, instruction.round, f"refused fit: {exc}")

    def evaluate(
        self, clients: Sequence[str], instruction: EvaluateInstruction
    ) -> Iterator[EvaluateResult | ClientFailure]:
        for name in clients:
            yield self._runner(name).evaluate(self._model, instruction)

    def exchange(
        self, instructions: Mapping[str, ProtocolInstruction]
    ) -> Iterator[ProtocolReply | ClientFailure]:
        """A protocol step; a client that refuses it (a `VeilError`) fails like a dropout, as
        a client process would, and the refusal is logged."""
        for name, instruction in instructions.items():
            try:
                yield self._runner(name).handle(instruction)
            except VeilError as exc:
                _log.warning("client %s refused %s: %s", name, instruction.stage, exc)
                yield ClientFailure(name, instruction.round, f"refused: {exc}")

    def _runner(self, name: str) -> ClientRunner:
        try:
            return self.runners[name]
        except KeyError:
            raise ValueError(f"unknown client '{name}'") from None
