"""Strategies: small objects with a few verbs (after Flower's strategies).

A strategy chooses who takes part in a round and how the global model moves given the round's
aggregate. It never sees individual updates, so it works unchanged whatever privacy stages run in
the update pipeline.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

from veil.federation.messages import TrainingPlan
from veil.federation.pipeline import Aggregate
from veil.selection import sample_size
from veil.tensors import NamedArrays


class PoissonSource(Protocol):
    """Uniform draws for Poisson client sampling (a `veil.privacy.dp.randomness.RandomSource`)."""

    def uniform(self, size: int) -> npt.NDArray[np.float64]: ...


class Strategy(ABC):
    """Base class: uniform sampling without replacement, and the verbs a server calls."""

    name: str = "strategy"

    def __init__(
        self,
        *,
        fraction_fit: float = 1.0,
        fraction_evaluate: float = 1.0,
        poisson_source: PoissonSource | None = None,
    ) -> None:
        if not 0 < fraction_fit <= 1:
            raise ValueError(f"fraction_fit must be in (0, 1], got {fraction_fit}")
        if not 0 <= fraction_evaluate <= 1:
            raise ValueError(f"fraction_evaluate must be in [0, 1], got {fraction_evaluate}")
        self.fraction_fit = fraction_fit
        self.fraction_evaluate = fraction_evaluate
        #: With a source, clients are Poisson-sampled (each independently with probability
        #: fraction_fit), as client-level DP accounting assumes; otherwise exactly
        #: ceil(fraction_fit · n) clients are drawn without replacement.
        self.poisson_source = poisson_source

    def configure_fit(
        self, round_: int, clients: Sequence[str], rng: np.random.Generator, plan: TrainingPlan
    ) -> tuple[list[str], TrainingPlan]:
        """The clients that train in this round, and the plan they follow."""
        if self.poisson_source is not None and self.fraction_fit < 1:
            draws = self.poisson_source.uniform(len(clients))
            return [c for c, u in zip(clients, draws, strict=True) if u < self.fraction_fit], plan
        return _sample(clients, self.fraction_fit, rng), plan

    def configure_evaluate(
        self, round_: int, clients: Sequence[str], rng: np.random.Generator
    ) -> list[str]:
        """The clients that evaluate the global model on their own data in this round."""
        if self.fraction_evaluate == 0:
            return []
        return _sample(clients, self.fraction_evaluate, rng)

    @abstractmethod
    def update_global(self, parameters: NamedArrays, aggregate: Aggregate) -> NamedArrays:
        """The next global parameters from the current ones and the round's aggregate."""

    def state(self) -> NamedArrays:
        """Server-side state to checkpoint (e.g. optimiser moments); empty if stateless."""
        return {}

    def load_state(self, state: NamedArrays) -> None:
        """Restore what `state` returned."""
        if state:
            raise ValueError(f"{self.name} keeps no state, but a checkpoint holds {sorted(state)}")


def _sample(clients: Sequence[str], fraction: float, rng: np.random.Generator) -> list[str]:
    k = sample_size(fraction, len(clients))
    if k >= len(clients):
        return list(clients)
    chosen = np.sort(rng.choice(len(clients), size=k, replace=False))
    return [clients[i] for i in chosen]
