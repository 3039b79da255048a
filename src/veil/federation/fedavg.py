"""FedAvg and FedProx."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from veil.federation.messages import TrainingPlan
from veil.federation.pipeline import Aggregate
from veil.federation.strategy import PoissonSource, Strategy
from veil.tensors import NamedArrays


class FedAvg(Strategy):
    """Federated averaging (McMahan et al. 2017, "Communication-Efficient Learning of Deep
    Networks from Decentralized Data"): the new global model is the example-weighted mean of the
    clients' models, i.e. the global model plus the weighted mean update."""

    name = "fedavg"

    def update_global(self, parameters: NamedArrays, aggregate: Aggregate) -> NamedArrays:
        mean = aggregate.mean()
        return {name: parameters[name] + mean[name] for name in parameters}


class FedProx(FedAvg):
    """FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks"): FedAvg whose
    clients add the proximal term (mu/2)·||w - w_global||² to their local loss."""

    name = "fedprox"

    def __init__(
        self,
        *,
        mu: float,
        fraction_fit: float = 1.0,
        fraction_evaluate: float = 1.0,
        poisson_source: PoissonSource | None = None,
    ) -> None:
        super().__init__(
            fraction_fit=fraction_fit,
            fraction_evaluate=fraction_evaluate,
            poisson_source=poisson_source,
        )
        if mu <= 0:
            raise ValueError(f"FedProx needs mu > 0, got {mu}; use FedAvg for mu = 0")
        self.mu = mu

    def configure_fit(
        self, round_: int, clients: Sequence[str], rng: np.random.Generator, plan: TrainingPlan
    ) -> tuple[list[str], TrainingPlan]:
        selected, plan = super().configure_fit(round_, clients, rng, plan)
        return selected, TrainingPlan(**{**plan.__dict__, "proximal_mu": self.mu})
