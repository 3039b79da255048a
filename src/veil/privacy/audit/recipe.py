"""How an audit retrains a model the way the audited run did, with Veil's own trainers.

Shadow models (LiRA), canary runs and the attack experiments of the tests all train through a
`TrainingRecipe`: the run's local `TrainingPlan`, repeated for the run's rounds with its learning
rate decay, by `SGDTrainer` or, with record-level DP, by `DPSGDTrainer` with the run's noise
multiplier and clipping norm. Nothing here re-implements training; the recipe only chooses and
calls the trainers that a run uses.

`DPSGDMechanism.hazard_clipping_disabled` builds a deliberately broken DP-SGD (see
`unclipped_dpsgd_trainer`) whose accountant still reports the ε of the declared clipping norm:
the configuration that the canary audit must catch. Nothing outside audit tests and the audit
documentation should set it.

The trainers here accept a seeded source (``production=False``): an audit measures the
mechanism and never releases the models it retrains, so reproducible noise there cannot be
subtracted from anything published, and a seed makes an audit reproducible. A run's audit
draws from `AuditedRun.noise_source`, which refuses a seed when the run's `[privacy]` is in
production mode (`veil.privacy.dp.policy.random_source`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from veil.federation.messages import TrainingPlan
from veil.federation.training import LocalTrainer, SGDTrainer
from veil.privacy.dp.accountant import EpsilonReport, Neighbouring, report
from veil.privacy.dp.dpsgd import DPSGDTrainer, poisson_schedule
from veil.privacy.dp.randomness import RandomSource, SecureRandom
from veil.seeding import Purpose, torch_generator

__all__ = [
    "UNCLIPPED_NORM",
    "DPSGDMechanism",
    "TrainingRecipe",
    "unclipped_dpsgd_trainer",
]

#: The clipping norm of the broken trainer: far above any per-example gradient norm, so that
#: nothing is ever clipped.
UNCLIPPED_NORM = 1e9


@dataclass(frozen=True)
class DPSGDMechanism:
    """Record-level DP-SGD as a run declares it: σ, C, the δ reported with ε, the relation."""

    noise_multiplier: float
    clip_norm: float
    delta: float
    neighbouring: Neighbouring = "add_or_remove"
    #: HAZARD, audit tests only: per-example clipping is switched off (the noise keeps its
    #: declared standard deviation σ·C) while the accountant still assumes clipping to C.
    hazard_clipping_disabled: bool = False


def unclipped_dpsgd_trainer(
    noise_multiplier: float, clip_norm: float, source: RandomSource
) -> DPSGDTrainer:
    """DELIBERATELY BROKEN DP-SGD, for testing that the audit catches a missing clip.

    Veil's real `DPSGDTrainer` with clipping norm `UNCLIPPED_NORM` and noise multiplier
    σ·C/`UNCLIPPED_NORM`: the Gaussian noise has the declared standard deviation σ·C, but no
    per-example gradient is clipped, so one record can move the model without bound. No privacy
    guarantee holds for anything it trains.
    """
    return DPSGDTrainer(
        noise_multiplier=noise_multiplier * clip_norm / UNCLIPPED_NORM,
        clip_norm=UNCLIPPED_NORM,
        source=source,
        production=False,  # audit tests only, never released (module docstring)
    )


@dataclass(frozen=True)
class TrainingRecipe:
    """The run's local plan, repeated for `rounds` rounds with the learning rate multiplied by
    `learning_rate_decay` after each, with DP-SGD when `dp` is set (plain SGD otherwise)."""

    plan: TrainingPlan
    rounds: int = 1
    learning_rate_decay: float = 1.0
    dp: DPSGDMechanism | None = None

    def with_batch_size(self, batch_size: int) -> TrainingRecipe:
        """The same recipe with another (expected) batch size."""
        return replace(self, plan=replace(self.plan, batch_size=max(1, batch_size)))

    def trainer(self, source: RandomSource | None = None) -> LocalTrainer:
        """The trainer a client of the run would use; DP noise from `source` (default: the OS
        CSPRNG)."""
        if self.dp is None:
            return SGDTrainer()
        source = source if source is not None else SecureRandom()
        if self.dp.hazard_clipping_disabled:
            return unclipped_dpsgd_trainer(self.dp.noise_multiplier, self.dp.clip_norm, source)
        return DPSGDTrainer(
            noise_multiplier=self.dp.noise_multiplier,
            clip_norm=self.dp.clip_norm,
            source=source,
            production=False,  # an audit's models are never released (module docstring)
        )

    def train(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        seed: int,
        source: RandomSource | None = None,
        on_round: Callable[[], None] | None = None,
    ) -> None:
        """Train `model` in place for every round; `seed` drives shuffling, `source` DP noise;
        `on_round` is called after each round (progress)."""
        trainer = self.trainer(source)
        for round_ in range(1, self.rounds + 1):
            rate = self.plan.learning_rate * self.learning_rate_decay ** (round_ - 1)
            plan = replace(self.plan, learning_rate=rate)
            trainer.train(model, x, y, plan, torch_generator(seed, Purpose.LOCAL_TRAINING, round_))
            if on_round is not None:
                on_round()

    def mechanism(self, n_examples: int) -> dict[str, float] | None:
        """σ, C, q and the total steps of DP-SGD on `n_examples` records (None without DP)."""
        if self.dp is None:
            return None
        q, per_round = poisson_schedule(n_examples, self.plan.batch_size, self.plan.epochs)
        return {
            "noise_multiplier": self.dp.noise_multiplier,
            "clip_norm": self.dp.clip_norm,
            "sampling_rate": q,
            "steps": per_round * self.rounds,
        }

    def accounted(self, n_examples: int) -> EpsilonReport | None:
        """The accountant's ε for this recipe on `n_examples` records (None without DP).

        It depends on σ, q and the steps only: with `hazard_clipping_disabled` it is the ε the
        broken trainer claims, not one it has.
        """
        mechanism = self.mechanism(n_examples)
        if self.dp is None or mechanism is None or mechanism["steps"] == 0:
            return None
        return report(
            self.dp.noise_multiplier,
            mechanism["sampling_rate"],
            int(mechanism["steps"]),
            self.dp.delta,
            neighbouring=self.dp.neighbouring,
        )
