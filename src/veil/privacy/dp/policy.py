"""From a `[privacy]` section to running, accounted mechanisms.

`RecordLevelPrivacy` gives each organisation its own DP-SGD trainer and accountant (in cross-silo
FL each silo's records are protected by its own DP-SGD); `ClientLevelPrivacy` gives the update
pipeline its clipping and noising stages and the strategy its Poisson sampler. Both calibrate σ
through the accountant before the run, refuse to start when the target cannot be met, compose
what actually ran after every round, and report ε per round (never decreasing) and the privacy
record of `result.json`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from veil.config import PrivacyConfig
from veil.errors import ConfigError
from veil.federation import ClientStage, RoundRecord, ServerStage, Strategy, TrainingPlan
from veil.privacy.dp.accountant import (
    Accountant,
    EpsilonReport,
    calibrate_noise_multiplier,
    report,
)
from veil.privacy.dp.client_level import ClipUpdate, GaussianSumNoise
from veil.privacy.dp.dpsgd import DPSGDTrainer, poisson_schedule
from veil.privacy.dp.randomness import RandomSource, SecureRandom, SeededRandom, require_secure
from veil.seeding import Purpose, derive_seed
from veil.tensors import NamedArrays

#: Relative slack when checking a fixed σ against the target (floating-point noise only).
_SLACK = 1e-9


@dataclass(frozen=True)
class Charge:
    """One ledger charge that a run makes before it starts."""

    dataset_id: str
    epsilon: float
    delta: float
    parameters: dict[str, Any]


def random_source(config: PrivacyConfig, *keys: int) -> RandomSource:
    """The noise source for one component: secure unless a test set `noise_seed`."""
    source: RandomSource
    if config.noise_seed is None:
        source = SecureRandom()
    else:
        source = SeededRandom(derive_seed(config.noise_seed, Purpose.LOCAL_TRAINING, *keys))
    require_secure(source, production=config.production, what="[privacy]")
    return source


def _noise_multiplier(
    config: PrivacyConfig, *, sampling_rate: float, steps: int, who: str
) -> float:
    if config.noise_multiplier == "calibrate":
        try:
            return calibrate_noise_multiplier(
                config.epsilon,
                config.delta,
                sampling_rate,
                steps,
                neighbouring=config.neighbouring,
            )
        except ConfigError as exc:
            raise ConfigError(f"privacy: {who}: {str(exc).removeprefix('privacy: ')}") from None
    sigma = float(config.noise_multiplier)
    achieved = report(sigma, sampling_rate, steps, config.delta, neighbouring=config.neighbouring)
    if achieved.epsilon > config.epsilon * (1 + _SLACK):
        needed = calibrate_noise_multiplier(
            config.epsilon, config.delta, sampling_rate, steps, neighbouring=config.neighbouring
        )
        raise ConfigError(
            f"privacy: {who}: noise_multiplier = {sigma} gives ε = {achieved.epsilon:.3f} over "
            f"{steps} steps at sampling rate {sampling_rate:.4g}, above the target "
            f"ε = {config.epsilon} by {achieved.epsilon - config.epsilon:.3f}; use "
            f'noise_multiplier >= {needed:.4f} (or "calibrate"), fewer rounds or epochs, '
            "or a larger target"
        )
    return sigma


def _report(config: PrivacyConfig, sigma: float, q: float, steps: int) -> EpsilonReport:
    """ε (PLD) and the RDP cross-check for `steps` subsampled-Gaussian steps under `config`."""
    return report(sigma, q, steps, config.delta, neighbouring=config.neighbouring)


@dataclass
class _Organisation:
    name: str
    n_examples: int
    sampling_rate: float
    steps_per_round: int
    planned_steps: int
    noise_multiplier: float
    accountant: Accountant
    steps: int = 0
    epsilon: float = 0.0


class _Observer:
    """Shared no-op verbs of a `ServerObserver`."""

    def on_round_start(self, round_: int, selected: int) -> None:
        pass

    def on_client_done(self, round_: int, client: str) -> None:
        pass


@dataclass
class RecordLevelPrivacy(_Observer):
    """DP-SGD on every organisation, each accounted on its own (unit = "record")."""

    config: PrivacyConfig
    organisations: dict[str, _Organisation] = field(default_factory=dict)
    epsilon: float = 0.0

    @classmethod
    def plan(
        cls,
        config: PrivacyConfig,
        *,
        clients: Sequence[tuple[str, int]],
        training: TrainingPlan,
        rounds: int,
    ) -> RecordLevelPrivacy:
        """Calibrate σ per organisation for the whole run; refuse if a target cannot be met."""
        policy = cls(config)
        for name, n in clients:
            q, per_round = poisson_schedule(n, training.batch_size, training.epochs)
            total = per_round * rounds
            sigma = _noise_multiplier(config, sampling_rate=q, steps=total, who=name)
            policy.organisations[name] = _Organisation(
                name=name,
                n_examples=n,
                sampling_rate=q,
                steps_per_round=per_round,
                planned_steps=total,
                noise_multiplier=sigma,
                accountant=Accountant("pld", neighbouring=config.neighbouring),
            )
        return policy

    def trainer(self, name: str, index: int) -> DPSGDTrainer:
        org = self.organisations[name]
        return DPSGDTrainer(
            noise_multiplier=org.noise_multiplier,
            clip_norm=self.config.clip_norm,
            source=random_source(self.config, index),
        )

    def on_round_end(
        self, record: RoundRecord, parameters: NamedArrays, strategy: Strategy
    ) -> None:
        for name in record.selected_clients:
            org = self.organisations[name]
            if org.steps_per_round:
                org.accountant.compose_subsampled_gaussian(
                    org.noise_multiplier, org.sampling_rate, org.steps_per_round
                )
                org.steps += org.steps_per_round
                org.epsilon = max(org.epsilon, org.accountant.epsilon(self.config.delta))
        self.epsilon = max([self.epsilon, *(o.epsilon for o in self.organisations.values())])
        record.epsilon = self.epsilon

    def charges(self, dataset_id: str) -> list[Charge]:
        """What each organisation's ledger is charged before the run: its full planned ε."""
        return [
            Charge(
                f"{dataset_id}/{org.name}",
                _report(
                    self.config, org.noise_multiplier, org.sampling_rate, org.planned_steps
                ).epsilon,
                self.config.delta,
                self._mechanism(org, org.planned_steps),
            )
            for org in self.organisations.values()
        ]

    def _mechanism(self, org: _Organisation, steps: int) -> dict[str, Any]:
        return {
            "noise_multiplier": org.noise_multiplier,
            "clip_norm": self.config.clip_norm,
            "sampling_rate": org.sampling_rate,
            "steps": steps,
        }

    def privacy_record(self, aggregation: str) -> dict[str, Any]:
        """The `privacy` object of result.json: ε is the largest organisation's."""
        per_org = []
        for org in self.organisations.values():
            rep = _report(self.config, org.noise_multiplier, org.sampling_rate, org.steps)
            per_org.append(
                {
                    "name": org.name,
                    "epsilon": org.epsilon,
                    "epsilon_rdp": rep.epsilon_rdp,
                    "examples": org.n_examples,
                    "mechanism": self._mechanism(org, org.steps),
                }
            )
        worst = max(per_org, key=lambda o: (o["epsilon"], o["name"]))
        return {
            "unit": "record",
            "epsilon": self.epsilon,
            "delta": self.config.delta,
            "accountant": Accountant("pld", neighbouring=self.config.neighbouring).describe(),
            "neighbouring": self.config.neighbouring,
            "aggregation": aggregation,
            "attestation": None,
            "mechanism": worst["mechanism"],
            "epsilon_rdp": worst["epsilon_rdp"],
            "target": {"epsilon": self.config.epsilon, "delta": self.config.delta},
            "per_organisation": per_org,
        }


@dataclass
class ClientLevelPrivacy(_Observer):
    """DP-FedAvg with Poisson client sampling (unit = "client")."""

    config: PrivacyConfig
    sampling_rate: float
    rounds: int
    noise_multiplier: float
    server_stage: GaussianSumNoise
    sampler: RandomSource
    accountant: Accountant
    steps: int = 0
    epsilon: float = 0.0

    @classmethod
    def plan(
        cls,
        config: PrivacyConfig,
        *,
        n_clients: int,
        fraction_fit: float,
        rounds: int,
        distributed: bool = False,
    ) -> ClientLevelPrivacy:
        """DP-FedAvg for the run; with `distributed` (secure aggregation) the clients add the
        noise (distributed discrete Gaussian) and the server only fixes the denominator."""
        sigma = _noise_multiplier(
            config, sampling_rate=fraction_fit, steps=rounds, who="the federation"
        )
        expected = fraction_fit * n_clients
        try:
            stage = GaussianSumNoise(
                noise_multiplier=sigma,
                clip_norm=config.clip_norm,
                expected_clients=expected,
                source=random_source(config, 0),
                target_quantile=config.target_quantile,
                clip_learning_rate=config.clip_learning_rate,
                clip_count_stddev=config.clip_count_stddev,
                distributed=distributed,
            )
        except ValueError as exc:
            raise ConfigError(f"privacy: {exc}") from None
        return cls(
            config=config,
            sampling_rate=fraction_fit,
            rounds=rounds,
            noise_multiplier=sigma,
            server_stage=stage,
            sampler=random_source(config, 1),
            accountant=Accountant("pld", neighbouring=config.neighbouring),
        )

    @property
    def distributed(self) -> bool:
        return self.server_stage.distributed

    @property
    def client_stages(self) -> list[ClientStage]:
        return [ClipUpdate(report_unclipped=self.config.target_quantile is not None)]

    @property
    def server_stages(self) -> list[ServerStage]:
        return [self.server_stage]

    def on_round_end(
        self, record: RoundRecord, parameters: NamedArrays, strategy: Strategy
    ) -> None:
        # Every round is composed, released or not: conservative and data-independent.
        self.accountant.compose_subsampled_gaussian(self.noise_multiplier, self.sampling_rate, 1)
        self.steps += 1
        self.epsilon = max(self.epsilon, self.accountant.epsilon(self.config.delta))
        record.epsilon = self.epsilon
        record.metrics["clip_norm"] = self.server_stage.last_clip_norm

    def charges(self, dataset_id: str) -> list[Charge]:
        eps = _report(self.config, self.noise_multiplier, self.sampling_rate, self.rounds).epsilon
        return [Charge(dataset_id, eps, self.config.delta, self._mechanism(self.rounds))]

    def _mechanism(self, steps: int) -> dict[str, Any]:
        return {
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": self.server_stage.clip_history[-1],
            "sampling_rate": self.sampling_rate,
            "steps": steps,
            "adaptive_clipping": self.config.target_quantile is not None,
            "update_noise_multiplier": self.server_stage.update_noise_multiplier,
            "noise": "distributed discrete Gaussian (Kairouz et al. 2021), added by the clients"
            if self.distributed
            else "Gaussian, added by the server",
        }

    def privacy_record(self, aggregation: str) -> dict[str, Any]:
        rep = _report(self.config, self.noise_multiplier, self.sampling_rate, self.steps)
        return {
            "unit": "client",
            "epsilon": self.epsilon,
            "delta": self.config.delta,
            "accountant": self.accountant.describe(),
            "neighbouring": self.config.neighbouring,
            "aggregation": aggregation,
            "attestation": None,
            "mechanism": self._mechanism(self.steps),
            "epsilon_rdp": rep.epsilon_rdp,
            "target": {"epsilon": self.config.epsilon, "delta": self.config.delta},
        }
