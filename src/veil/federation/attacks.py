"""Simulated malicious clients, to test defences such as robust aggregation.

A fixed set of clients, drawn once from the run's seed (`malicious_clients`), misbehaves in every
round it is selected; the others are honest. Model-poisoning attacks replace the update a
malicious client sends (`ModelPoisoning`, a client stage that runs after every other client stage,
as a malicious client would skip clipping); data poisoning changes what it trains on
(`LabelFlipTrainer`, a wrapper of its local trainer). Everything is deterministic from the seed,
so a run with an attack is as reproducible as one without.

- `sign_flip`: sends −s·Δ (s = `scale`, default 1). Li, Xu, Chen, Giannakis, Ling 2019, "RSA:
  Byzantine-Robust Stochastic Aggregation Methods for Distributed Learning from Heterogeneous
  Datasets".
- `scale`: sends s·Δ (default 10), a boosted update. Bagdasaryan, Veit, Hua, Estrin, Shmatikov
  2020, "How To Backdoor Federated Learning".
- `gaussian`: sends N(0, s²) noise in place of Δ (default s = 1). Blanchard, El Mhamdi,
  Guerraoui, Stainer 2017, "Machine Learning with Adversaries: Byzantine Tolerant Gradient
  Descent".
- `label_flip`: an honest update trained on labels y → C − 1 − y. Tolpegin, Truex, Gursoy, Liu
  2020, "Data Poisoning Attacks Against Federated Learning Systems".

These are simulations for testing: the Gaussian attack's noise comes from a seeded generator on
purpose (it protects nobody).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Literal

import numpy as np
import torch
from torch import nn

from veil.federation.messages import FitResult, TrainingPlan
from veil.federation.pipeline import RoundContext
from veil.federation.training import LocalTrainer, TrainStats
from veil.seeding import Purpose, numpy_rng
from veil.selection import count_of

AttackKind = Literal["sign_flip", "scale", "gaussian", "label_flip"]
ModelAttack = Literal["sign_flip", "scale", "gaussian"]

#: `scale` of each attack when the config does not set it.
DEFAULT_SCALE: dict[str, float] = {"sign_flip": 1.0, "scale": 10.0, "gaussian": 1.0}


def malicious_clients(clients: Sequence[str], fraction: float, seed: int) -> dict[str, int]:
    """The malicious clients, ⌊fraction · n⌋ of them drawn without replacement from the run's
    seed, each with its index in `clients` (the key of its own random stream)."""
    count = count_of(fraction, len(clients))
    chosen = numpy_rng(seed, Purpose.ATTACK).choice(len(clients), size=count, replace=False)
    return {clients[int(i)]: int(i) for i in sorted(chosen)}


class ModelPoisoning:
    """Client stage: malicious clients replace their update; honest clients pass through.

    `malicious` maps each malicious client to its index (for its own seeded noise stream).
    """

    def __init__(
        self, kind: ModelAttack, malicious: dict[str, int], *, scale: float, seed: int
    ) -> None:
        if kind not in DEFAULT_SCALE:
            raise ValueError(f"unknown model-poisoning attack {kind!r}")
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.kind = kind
        self.malicious = dict(malicious)
        self.scale = scale
        self.seed = seed
        self.name = f"attack:{kind}"

    def apply(self, result: FitResult, context: RoundContext) -> FitResult:
        index = self.malicious.get(result.client)
        if index is None:
            return result
        if self.kind == "gaussian":
            rng = numpy_rng(self.seed, Purpose.ATTACK, context.round, index)
            update = {
                k: (rng.standard_normal(a.shape) * self.scale).astype(np.float32)
                for k, a in result.update.items()
            }
        else:
            factor = np.float32(-self.scale if self.kind == "sign_flip" else self.scale)
            update = {k: a * factor for k, a in result.update.items()}
        return replace(result, update=update)


class LabelFlipTrainer:
    """A malicious client's trainer: the honest `inner` trainer on labels y → C − 1 − y."""

    def __init__(self, inner: LocalTrainer, n_classes: int) -> None:
        if n_classes < 2:
            raise ValueError(f"label flipping needs at least 2 classes, got {n_classes}")
        self.inner = inner
        self.n_classes = n_classes
        self.name = f"label_flip+{inner.name}"

    def train(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        plan: TrainingPlan,
        generator: torch.Generator,
    ) -> TrainStats:
        return self.inner.train(model, x, self.n_classes - 1 - y, plan, generator)
