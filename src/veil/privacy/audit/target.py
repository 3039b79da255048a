"""What an audit works on: a finished run rebuilt (its data, models, training recipe and the
settings that decide them), and what the server saw in round 1.

A run folder holds `result.json`, `veil.db` (the run store, which keeps the run's config) and
`checkpoint.safetensors` (the final global model, sealed when the run had a key file).
`veil.assembly.audit.load_run` rebuilds the data and the initial model from the config with the
run's own builders, so they are the run's records and weights, not a copy of the procedure.
This module reads the config only through `AuditedConfig` (the few settings it needs), and a
backend's flags through the secure-aggregation registry.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from torch import nn

from veil.assembly.secure_aggregation.registry import backend as secure_aggregation
from veil.data import FederatedData
from veil.errors import StoreError
from veil.federation import ClientRunner, TrainingPlan, UpdatePipeline
from veil.federation.messages import FitInstruction
from veil.models import set_parameters
from veil.privacy.audit.inversion import update_as_gradient
from veil.privacy.audit.recipe import DPSGDMechanism, TrainingRecipe
from veil.privacy.dp.client_level import ClipUpdate
from veil.privacy.dp.dpsgd import poisson_schedule
from veil.privacy.dp.policy import DpSettings, random_source
from veil.privacy.dp.randomness import RandomSource, SecureRandom
from veil.result import Result
from veil.seeding import Purpose, derive_seed
from veil.tensors import NamedArrays

__all__ = ["AuditedConfig", "AuditedRun", "ServerView"]


class AuditedFederation(Protocol):
    """The `[federation]` settings an audit reads."""

    @property
    def rounds(self) -> int:
        """Rounds the run planned."""

    @property
    def learning_rate_decay(self) -> float:
        """The per-round decay of the clients' learning rate."""

    @property
    def torch_threads(self) -> int:
        """Threads torch may use."""


class AuditedConfig(Protocol):
    """What an audit reads of a run's configuration (a `RunConfig` has these attributes)."""

    @property
    def seed(self) -> int:
        """The run's seed (each client's training seed derives from it)."""

    @property
    def secure_aggregation(self) -> str:
        """The secure-aggregation backend's name."""

    @property
    def federation(self) -> AuditedFederation:
        """The federation's settings."""

    @property
    def privacy(self) -> DpSettings | None:
        """The differential-privacy settings, if the run had any."""


def _no_model() -> nn.Module:
    raise StoreError("this audited run was given no model builder (load it with load_run)")


@dataclass(frozen=True)
class ServerView:
    """What the server held after round 1: one client's update (plain aggregation) or only the
    aggregate (secure aggregation), as an average gradient, and the records behind it."""

    description: str
    gradient: NamedArrays
    #: Records the attack tries to recover (the attacked client's) and how many records the
    #: observed gradient averages over (the attacked client's, or everyone's under SecAgg).
    x_true: np.ndarray
    n_examples: int
    client: str


@dataclass(frozen=True)
class AuditedRun:
    """A finished run, rebuilt for auditing."""

    path: Path
    result: Result
    config: AuditedConfig
    fed: FederatedData
    final: NamedArrays
    initial: NamedArrays
    plan: TrainingPlan
    #: A fresh model of the run's architecture (random weights).
    build_model: Callable[[], nn.Module] = _no_model

    def model(self, parameters: NamedArrays | None = None) -> nn.Module:
        """The run's model with `parameters` (default: the final global model)."""
        model = self.build_model()
        set_parameters(model, self.final if parameters is None else parameters)
        return model

    def fresh_model(self) -> nn.Module:
        """The run's model with its initial weights (the global model of round 1)."""
        return self.model(self.initial)

    @property
    def unit(self) -> str | None:
        return self.result.privacy.unit

    def organisation(self) -> tuple[int, dict[str, Any] | None]:
        """The audited organisation: with record-level DP the one with the largest ε (its
        index and privacy record), else the client with the most training records."""
        extra = self.result.privacy.model_extra or {}
        orgs = extra.get("per_organisation") if self.unit == "record" else None
        names = [c.name for c in self.fed.clients]
        if orgs:
            worst = max(orgs, key=lambda o: (o["epsilon"], o["name"]))
            return names.index(worst["name"]), worst
        sizes = [c.n_train for c in self.fed.clients]
        return int(np.argmax(sizes)), None

    def recipe(self, organisation: dict[str, Any] | None = None) -> TrainingRecipe:
        """How the run trained: its plan and rounds, with record-level DP-SGD as recorded.

        With `organisation` (a record-level privacy record) the rounds are those that
        organisation trained (its steps over its steps per round); otherwise the run's rounds.
        """
        p = self.config.privacy
        dp = None
        rounds = self.config.federation.rounds
        if self.unit == "record" and p is not None:
            recorded = self.result.privacy.mechanism
            mech = (organisation or {}).get("mechanism") or (
                recorded.model_dump() if recorded is not None else None
            )
            if mech is None:
                raise StoreError(f"'{self.path}': result.json has no DP-SGD mechanism to audit")
            dp = DPSGDMechanism(
                noise_multiplier=float(mech["noise_multiplier"]),
                clip_norm=float(mech["clip_norm"]),
                delta=p.delta,
                neighbouring=p.neighbouring,
            )
            if organisation is not None:
                n = int(organisation["examples"])
                per_round = poisson_schedule(n, self.plan.batch_size, self.plan.epochs)[1]
                rounds = int(mech["steps"]) // per_round if per_round else 0
        return TrainingRecipe(
            plan=self.plan,
            rounds=max(rounds, 1),
            learning_rate_decay=self.config.federation.learning_rate_decay,
            dp=dp,
        )

    def noise_source(self, *keys: int) -> RandomSource:
        """DP noise for retraining: from the run's test seed when it had one (with `keys` to
        tell the uses apart), else from the OS CSPRNG."""
        if self.config.privacy is not None:
            return random_source(self.config.privacy, *keys)
        return SecureRandom()

    def client_recipe(self, index: int) -> TrainingRecipe:
        """How client `index` trained: with record-level DP, with its own DP-SGD mechanism."""
        extra = self.result.privacy.model_extra or {}
        name = self.fed.clients[index].name
        orgs = {o["name"]: o for o in extra.get("per_organisation", [])}
        return self.recipe(orgs.get(name))

    def server_view(self) -> ServerView:
        """Round 1 as the server saw it, recomputed with the run's clients, seeds, trainers and
        (for test runs with a noise seed) noise: with plain aggregation the update of the client
        with the fewest records; with secure aggregation (SecAgg, CKKS, TEE) only the aggregate
        of all clients' updates (under SecAgg with client-level DP, with the noise that the
        clients add)."""
        p = self.config.privacy
        client_level = self.unit == "client" and p is not None
        plan = replace(self.plan, update_clip_norm=p.clip_norm) if p and client_level else self.plan
        pipeline = UpdatePipeline(
            client_stages=[ClipUpdate(report_unclipped=False)] if client_level else []
        )
        sizes = [c.n_train for c in self.fed.clients]
        smallest = int(np.argmin(sizes))
        aggregation = self.config.secure_aggregation
        # Under SecAgg, CKKS or a TEE aggregator the server learns only the aggregate; under
        # SecAgg with client-level DP the clients add the noise.
        backend = secure_aggregation(aggregation)
        sum_only = backend.hides_updates
        indices = list(range(len(sizes))) if sum_only else [smallest]
        updates: list[tuple[NamedArrays, float, int]] = []
        for index in indices:
            client = self.fed.clients[index]
            recipe = self.client_recipe(index)
            runner = ClientRunner(
                client.name,
                client,
                n_classes=self.fed.n_classes,
                pipeline=pipeline,
                seed=derive_seed(self.config.seed, Purpose.LOCAL_TRAINING, index),
                # The run's trainers draw their noise from random_source(privacy, index).
                trainer=recipe.trainer(self.noise_source(index)) if recipe.dp else None,
            )
            fit = runner.fit(
                self.fresh_model(), FitInstruction(self.result.run_id, 1, self.initial, plan)
            )
            if not isinstance(fit.update, dict):
                raise TypeError("a round-1 update without secure aggregation is plain arrays")
            updates.append((fit.update, fit.weight, _steps(recipe, client.n_train)))
        total_weight = sum(w for _, w, _ in updates)
        mean = {
            name: np.sum([u[name] * np.float32(w / total_weight) for u, w, _ in updates], axis=0)
            for name in self.initial
        }
        mech = self.result.privacy.mechanism
        if backend.distributed_noise and client_level and mech is not None:
            # The clients' distributed discrete Gaussian adds up to noise of std σ·C on the sum.
            std = mech.noise_multiplier * mech.clip_norm / total_weight
            source = self.noise_source(10_007)
            mean = {
                name: arr + (source.standard_normal(arr.size) * std).reshape(arr.shape)
                for name, arr in mean.items()
            }
        steps = max(s for _, _, s in updates)
        target = self.fed.clients[smallest]
        if sum_only:
            what = f"the sum of {len(updates)} clients' round-1 updates ({aggregation})"
        else:
            what = f"the round-1 update of client {target.name} (plain aggregation)"
        if self.unit == "record":
            what += ", trained with DP-SGD"
        elif client_level:
            if backend.distributed_noise:
                what += ", clipped and noised by the clients"
            elif not sum_only:
                what += ", clipped (the server adds the noise after seeing it)"
            else:
                what += ", clipped"
        return ServerView(
            description=what,
            gradient=update_as_gradient(
                {k: np.asarray(v, dtype=np.float32) for k, v in mean.items()},
                self.plan.learning_rate,
                steps,
            ),
            x_true=target.x_train,
            n_examples=sum(self.fed.clients[i].n_train for i in indices),
            client=target.name,
        )


def _steps(recipe: TrainingRecipe, n: int) -> int:
    plan = recipe.plan
    if recipe.dp is not None:
        return max(poisson_schedule(n, plan.batch_size, plan.epochs)[1], 1)
    return plan.epochs * math.ceil(n / plan.batch_size)
