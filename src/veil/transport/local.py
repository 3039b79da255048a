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
from veil.federation.pipeline import StackedUpdates
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
        yield from self.fit_stacked(clients, instruction)[1]

    def fit_stacked(
        self, clients: Sequence[str], instruction: FitInstruction
    ) -> tuple[list[StackedUpdates], Iterator[FitResult | ClientFailure]]:
        """`fit`, with the clients trained together also handed over as stacks: (the stacks,
        the replies as `fit` yields them, in `clients` order). A stacked client's reply is its
        stack's result object itself, so a plain aggregator told of the stacks first
        (`Accumulator.expect`) can check and sum them at once. The vectorised training runs
        at this call; the others train as the replies are read."""
        epochs = instruction.plan.epochs
        for name in clients:
            self._runner(name)  # ValueError for an unknown client, before any training
        reasons = [self.faults.failure(name, instruction.round, epochs=epochs) for name in clients]
        stacks: list[StackedUpdates] = []
        if self.vectorised is not None:
            together = [
                name
                for name, reason in zip(clients, reasons, strict=True)
                if reason is None and self.vectorised.eligible(name, instruction)
            ]
            stacks = self.vectorised.fit_stacked(together, instruction) if together else []
        trained = {result.client: result for stack in stacks for result in stack.results}
        return stacks, self._replies(clients, reasons, trained, instruction)

    def _replies(
        self,
        clients: Sequence[str],
        reasons: list[str | None],
        trained: Mapping[str, FitResult],
        instruction: FitInstruction,
    ) -> Iterator[FitResult | ClientFailure]:
        """Each client's reply in order: its failure, its batched result, or its own fit."""
        for name, reason in zip(clients, reasons, strict=True):
            if reason is not None:
                yield ClientFailure(name, instruction.round, reason)
                continue
            try:
                done = trained.get(name)
                yield self.runners[name].fit(self._model, instruction) if done is None else done
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
