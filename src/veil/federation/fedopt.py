"""Adaptive server optimisers: FedAdagrad, FedAdam and FedYogi.

Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR), Algorithm 2: the weighted mean update
Δ is a pseudo-gradient; the server keeps first and second moments m and v and steps
x ← x + η · m / (√v + τ).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from veil.federation.pipeline import Aggregate
from veil.federation.strategy import PoissonSource, Strategy
from veil.tensors import NamedArrays

Variant = Literal["fedadagrad", "fedadam", "fedyogi"]


class FedOpt(Strategy):
    """One server optimiser of Reddi et al. 2021, selected by `variant`."""

    def __init__(
        self,
        variant: Variant,
        *,
        server_learning_rate: float = 0.01,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        fraction_fit: float = 1.0,
        fraction_evaluate: float = 1.0,
        poisson_source: PoissonSource | None = None,
    ) -> None:
        super().__init__(
            fraction_fit=fraction_fit,
            fraction_evaluate=fraction_evaluate,
            poisson_source=poisson_source,
        )
        if variant not in ("fedadagrad", "fedadam", "fedyogi"):
            raise ValueError(f"unknown variant {variant!r}: use fedadagrad, fedadam or fedyogi")
        self.name = variant
        self.variant = variant
        self.eta = server_learning_rate
        self.beta1 = beta1
        self.beta2 = beta2
        self.tau = tau
        self._m: NamedArrays = {}
        self._v: NamedArrays = {}

    def update_global(self, parameters: NamedArrays, aggregate: Aggregate) -> NamedArrays:
        delta = aggregate.mean()
        if self._m and (
            set(self._m) != set(parameters)
            or any(self._m[k].shape != a.shape for k, a in parameters.items())
        ):
            raise ValueError(
                f"{self.name} optimiser state does not match the model's parameters "
                "(a checkpoint from another model?); start without that state"
            )
        if not self._m:
            self._m = {k: np.zeros_like(a) for k, a in parameters.items()}
            # Reddi et al. initialise v to τ² so that the first steps are not huge.
            self._v = {k: np.full_like(a, self.tau**2) for k, a in parameters.items()}
        b1, b2 = np.float32(self.beta1), np.float32(self.beta2)
        new: NamedArrays = {}
        for name, x in parameters.items():
            d = delta[name]
            m = self._m[name] = b1 * self._m[name] + (1 - b1) * d
            d2 = d * d
            v = self._v[name]
            if self.variant == "fedadagrad":
                v = v + d2
            elif self.variant == "fedadam":
                v = b2 * v + (1 - b2) * d2
            else:
                v = v - (1 - b2) * d2 * np.sign(v - d2)
            self._v[name] = v
            new[name] = (x + np.float32(self.eta) * m / (np.sqrt(v) + np.float32(self.tau))).astype(
                np.float32
            )
        return new

    def state(self) -> NamedArrays:
        return {
            **{f"m/{k}": a for k, a in self._m.items()},
            **{f"v/{k}": a for k, a in self._v.items()},
        }

    def load_state(self, state: NamedArrays) -> None:
        self._m = {k[2:]: a.copy() for k, a in state.items() if k.startswith("m/")}
        self._v = {k[2:]: a.copy() for k, a in state.items() if k.startswith("v/")}
        if set(self._m) != set(self._v) or len(self._m) + len(self._v) != len(state):
            raise ValueError("checkpointed optimiser state is inconsistent (m and v differ)")
