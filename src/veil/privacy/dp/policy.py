"""From differential-privacy settings to running, accounted mechanisms.

`RecordLevelPrivacy` gives each organisation its own DP-SGD trainer and accountant (in cross-silo
FL each silo's records are protected by its own DP-SGD); `ClientLevelPrivacy` gives the update
pipeline its clipping and noising stages and the strategy its Poisson sampler. Both calibrate σ
through the accountant before the run, refuse to start when the target cannot be met, compose
what actually ran after every round, and report ε per round (never decreasing) and the privacy
record of `result.json`.

The privacy record is recomputable: it carries each accountant's `state()` (the composed
dp-accounting `DpEvent`s, one per round, as JSON), and with distributed DP (client level under
SecAgg) every round's encoding step γ, dimension d, threshold t, clients n, per-client noise σ_c
and Kairouz et al.'s τ. It states the neighbouring relation the figures hold for: the record
publishes each organisation's size (record level) or the federation's (client level), which
tells a data set with one unit more or fewer apart, so the add-or-remove figures are stated for
*zero-out* neighbours (one unit replaced by a null one that contributes nothing; Kairouz,
McMahan, Song, Thakkar, Thakurta, Xu 2021), for which they are exact, or for replacement.

Both survive a crash: `state()` is the account after the last round as JSON data (the settings
it was kept for and each accountant's composed events), which the run writes into its
checkpoint; `restore()` checks it against the policy the configuration gives now, refuses a
mismatch in one line, and continues the same account. Randomness after a resume is fresh: the
default source is a new CSPRNG; a seeded (test) source folds the round the run resumes at into
its seed, so it never replays the draws of a round whose results were released.

The policies take their settings as any object with the attributes of `DpSettings` (a run's
`[privacy]` section is one; `veil.assembly.privacy` builds the policy of a run from it): the
mechanisms do not know the config file.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from veil.errors import ConfigError, StoreError
from veil.federation import ClientStage, RoundRecord, ServerStage, Strategy, TrainingPlan
from veil.privacy.dp.accountant import (
    Accountant,
    EpsilonReport,
    Neighbouring,
    calibrate_noise_multiplier,
    report,
)
from veil.privacy.dp.client_level import ClipUpdate, GaussianSumNoise
from veil.privacy.dp.dpsgd import DPSGDTrainer, poisson_schedule
from veil.privacy.dp.randomness import RandomSource, SecureRandom, SeededRandom, require_secure
from veil.privacy.secagg.distributed_dp import DistributedGaussian, tau
from veil.privacy.secagg.quantize import FixedPoint
from veil.seeding import Purpose, derive_seed
from veil.tensors import NamedArrays

if TYPE_CHECKING:
    import torch

#: Relative slack when checking a fixed σ against the target (floating-point noise only).
_SLACK = 1e-9

#: Version of the privacy state (`state()`) a checkpoint carries.
STATE_VERSION = 1

#: Folded, with the round a run resumes at, into a seeded source's keys after a resume.
_RESUMED = 0x7265_7375


class DpSettings(Protocol):
    """The differential-privacy settings a policy reads (the attributes of `[privacy]`)."""

    @property
    def epsilon(self) -> float:
        """The target ε."""

    @property
    def delta(self) -> float:
        """The target δ."""

    @property
    def noise_multiplier(self) -> float | Literal["calibrate"]:
        """σ in units of the clipping norm, or "calibrate" for the smallest that meets ε."""

    @property
    def clip_norm(self) -> float:
        """C: the per-example gradient (record) or per-client update (client) norm bound."""

    @property
    def target_quantile(self) -> float | None:
        """Client level: adapt C towards this quantile of update norms (None: fixed C)."""

    @property
    def clip_learning_rate(self) -> float:
        """Client level: the step of adaptive clipping."""

    @property
    def clip_count_stddev(self) -> float | None:
        """Client level: noise on the unclipped count (None: expected clients / 20)."""

    @property
    def neighbouring(self) -> Neighbouring:
        """The neighbouring relation the accountant composes for."""

    @property
    def production(self) -> bool:
        """Whether seeded noise is refused (tests only turn it off)."""

    @property
    def noise_seed(self) -> int | None:
        """Tests only: the seed of the noise and sampling randomness."""


@dataclass(frozen=True)
class Charge:
    """One ledger charge that a run makes before it starts."""

    dataset_id: str
    epsilon: float
    delta: float
    parameters: dict[str, Any]


#: How client-level DP's two sources are named in a refusal (each is checked on its own).
_NOISE = "[privacy] the server's noise on the sum"
_SAMPLING = "[privacy] the Poisson sampling of clients"


def random_source(
    config: DpSettings, *keys: int, resumed_at: int | None = None, what: str = "[privacy]"
) -> RandomSource:
    """The noise source for one component (`what`, named in a refusal): secure unless a test
    set `noise_seed`.

    A secure source is keyed from the OS CSPRNG, so it is fresh in every process. A seeded one
    is derived from the seed and `keys`; in a run resumed at round `resumed_at` also from that
    round, so it does not replay the draws the first process made from the start. A seeded one
    in production mode is refused (`require_secure`).
    """
    source: RandomSource
    if config.noise_seed is None:
        source = SecureRandom()
    else:
        if resumed_at is not None:
            keys = (*keys, _RESUMED, resumed_at)
        source = SeededRandom(derive_seed(config.noise_seed, Purpose.LOCAL_TRAINING, *keys))
    require_secure(source, production=config.production, what=what)
    return source


def _noise_multiplier(config: DpSettings, *, sampling_rate: float, steps: int, who: str) -> float:
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


def stated_neighbouring(config: DpSettings) -> str:
    """The neighbouring relation a run's figures are stated for in its record.

    The record publishes sizes (each organisation's records, the number of organisations, how
    many took part in each round), and those tell a data set with one unit more or fewer apart;
    so "add_or_remove" accounting is stated for zero-out neighbours (the unit is replaced by a
    null one that contributes nothing, sizes unchanged), whose ε it is exactly. Replacement
    keeps the sizes too and is stated as it is.
    """
    return "zero_out" if config.neighbouring == "add_or_remove" else config.neighbouring


def _report(config: DpSettings, sigma: float, q: float, steps: int) -> EpsilonReport:
    """ε (PLD) and the RDP cross-check for `steps` subsampled-Gaussian steps under `config`."""
    return report(sigma, q, steps, config.delta, neighbouring=config.neighbouring)


# --------------------------------------------------------------------------- resume


def _settings(config: DpSettings, rounds: int) -> dict[str, Any]:
    """What an account was kept for, as far as the configuration decides it."""
    return {
        "delta": config.delta,
        "neighbouring": config.neighbouring,
        "target_epsilon": config.epsilon,
        "clip_norm": config.clip_norm,
        "rounds": rounds,
    }


def _mismatch(what: str, saved: object, now: object) -> ConfigError:
    return ConfigError(
        f"cannot resume: the checkpoint's privacy account was kept for {what} = {saved!r}, but "
        f"the configuration now gives {now!r}; resume with the configuration the run started "
        "with, or start a new run"
    )


def _same(what: str, saved: object, now: object) -> None:
    """Refuse unless a saved setting equals the current one (floats to 1e-9, relative)."""
    numbers = [isinstance(v, float | int) and not isinstance(v, bool) for v in (saved, now)]
    if all(numbers):
        assert isinstance(saved, float | int) and isinstance(now, float | int)
        if math.isclose(saved, now, rel_tol=1e-9, abs_tol=0.0):
            return
    elif saved == now and type(saved) is type(now):
        return
    raise _mismatch(what, saved, now)


def _unreadable(detail: str) -> StoreError:
    return StoreError(f"cannot resume: the checkpoint's privacy account is unreadable ({detail})")


def _check_header(
    state: Mapping[str, Any], *, unit: str, round_: int, settings: Mapping[str, Any]
) -> None:
    """The parts of a saved account every unit shares: version, unit, round and settings."""
    if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
        version = state.get("version") if isinstance(state, Mapping) else None
        raise _unreadable(f"version {version!r}, expected {STATE_VERSION}")
    _same("privacy.unit", state.get("unit"), unit)
    if state.get("round") != round_:
        raise _unreadable(f"it is for round {state.get('round')!r}, the checkpoint for {round_}")
    names = {
        "delta": "privacy.delta",
        "neighbouring": "privacy.neighbouring",
        "target_epsilon": "privacy.epsilon",
        "clip_norm": "privacy.clip_norm",
        "rounds": "federation.rounds",
    }
    for key, now in settings.items():
        _same(names[key], state.get(key), now)


def _accountant(data: Any, config: DpSettings, steps: Any, who: str) -> Accountant:
    """A saved accountant, composed again; it must be the kind the policy keeps."""
    try:
        accountant = Accountant.from_state(data)
    except ValueError as exc:
        raise _unreadable(f"{who}: {exc}") from None
    if accountant.kind != "pld":
        raise _unreadable(f"{who}: a {accountant.kind} accountant, expected pld")
    _same("privacy.neighbouring", accountant.neighbouring, config.neighbouring)
    if accountant.steps != steps:
        raise _unreadable(f"{who}: {accountant.steps} steps composed, {steps!r} recorded")
    return accountant


def _number(state: Mapping[str, Any], key: str, who: str) -> float:
    value = state.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise _unreadable(f"{who}: {key} = {value!r}")
    return float(value)


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

    config: DpSettings
    organisations: dict[str, _Organisation] = field(default_factory=dict)
    epsilon: float = 0.0
    #: The rounds the run plans (σ is calibrated for all of them).
    rounds: int = 0
    #: The last round composed.
    last_round: int = 0
    #: The round a resumed run started at (None: not resumed).
    resumed_at: int | None = None

    @classmethod
    def plan(
        cls,
        config: DpSettings,
        *,
        clients: Sequence[tuple[str, int]],
        training: TrainingPlan,
        rounds: int,
    ) -> RecordLevelPrivacy:
        """Calibrate σ per organisation for the whole run; refuse if a target cannot be met."""
        policy = cls(config, rounds=rounds)
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

    def trainer(
        self,
        name: str,
        index: int,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> DPSGDTrainer:
        """Organisation `name`'s DP-SGD trainer, clipping the gradients of the per-example
        `loss` (default cross-entropy)."""
        org = self.organisations[name]
        return DPSGDTrainer(
            loss=loss,
            noise_multiplier=org.noise_multiplier,
            clip_norm=self.config.clip_norm,
            source=random_source(
                self.config, index, resumed_at=self.resumed_at, what="[privacy] DP-SGD noise"
            ),
            production=self.config.production,
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
        self.last_round = record.round

    def state(self) -> dict[str, Any]:
        """The account after the last round, as JSON data: what it was kept for, and each
        organisation's mechanism, steps, ε and accountant (its composed events)."""
        return {
            "version": STATE_VERSION,
            "unit": "record",
            "round": self.last_round,
            **_settings(self.config, self.rounds),
            "epsilon": self.epsilon,
            "organisations": [
                {
                    "name": org.name,
                    "examples": org.n_examples,
                    "sampling_rate": org.sampling_rate,
                    "steps_per_round": org.steps_per_round,
                    "planned_steps": org.planned_steps,
                    "noise_multiplier": org.noise_multiplier,
                    "steps": org.steps,
                    "epsilon": org.epsilon,
                    "accountant": org.accountant.state(),
                }
                for org in self.organisations.values()
            ],
        }

    def restore(self, state: Mapping[str, Any], *, round_: int) -> None:
        """Continue the account `state()` saved after `round_`; refuse (one line) if it was
        kept for another configuration. Call it before building the trainers: they then draw
        fresh randomness (see `random_source`)."""
        _check_header(
            state, unit="record", round_=round_, settings=_settings(self.config, self.rounds)
        )
        saved = state.get("organisations")
        if not isinstance(saved, list) or not all(isinstance(o, Mapping) for o in saved):
            raise _unreadable("no list of organisations")
        _same("the organisations", [o.get("name") for o in saved], list(self.organisations))
        restored = []
        for entry in saved:
            org = self.organisations[entry["name"]]
            for key, now in (
                ("examples", org.n_examples),
                ("sampling_rate", org.sampling_rate),
                ("steps_per_round", org.steps_per_round),
                ("planned_steps", org.planned_steps),
                ("noise_multiplier", org.noise_multiplier),
            ):
                _same(f"{org.name}'s {key}", entry.get(key), now)
            accountant = _accountant(
                entry.get("accountant"), self.config, entry.get("steps"), org.name
            )
            epsilon = max(
                _number(entry, "epsilon", org.name), accountant.epsilon(self.config.delta)
            )
            restored.append((org, accountant, epsilon))
        for org, accountant, epsilon in restored:
            org.accountant, org.steps, org.epsilon = accountant, accountant.steps, epsilon
        self.epsilon = max(
            [
                _number(state, "epsilon", "the run"),
                *(o.epsilon for o in self.organisations.values()),
            ]
        )
        self.last_round = round_
        self.resumed_at = round_ + 1

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

    def privacy_record(self, aggregation: str, *, dimension: int | None = None) -> dict[str, Any]:
        """The `privacy` object of result.json: ε is the largest organisation's; each
        organisation's `accounting` is its accountant's `state()` (one DpEvent per round)."""
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
                    "accounting": org.accountant.state(),
                }
            )
        worst = max(per_org, key=lambda o: (o["epsilon"], o["name"]))
        return {
            "unit": "record",
            "epsilon": self.epsilon,
            "delta": self.config.delta,
            "accountant": Accountant("pld", neighbouring=self.config.neighbouring).describe(),
            "neighbouring": stated_neighbouring(self.config),
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

    config: DpSettings
    sampling_rate: float
    rounds: int
    noise_multiplier: float
    server_stage: GaussianSumNoise
    sampler: RandomSource
    accountant: Accountant
    steps: int = 0
    epsilon: float = 0.0
    #: The last round composed.
    last_round: int = 0
    #: Distributed DP: what each round's secure aggregation reported (`_distributed_round`).
    distributed_rounds: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def plan(
        cls,
        config: DpSettings,
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
                source=random_source(config, 0, what=_NOISE),
                target_quantile=config.target_quantile,
                clip_learning_rate=config.clip_learning_rate,
                clip_count_stddev=config.clip_count_stddev,
                distributed=distributed,
                production=config.production,
            )
        except ValueError as exc:
            raise ConfigError(f"privacy: {exc}") from None
        return cls(
            config=config,
            sampling_rate=fraction_fit,
            rounds=rounds,
            noise_multiplier=sigma,
            server_stage=stage,
            sampler=random_source(config, 1, what=_SAMPLING),
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
        if self.distributed:
            self.distributed_rounds.append(_distributed_round(record))
        self.last_round = record.round

    def _mechanism_settings(self) -> dict[str, Any]:
        stage = self.server_stage
        return {
            "noise_multiplier": self.noise_multiplier,
            "sampling_rate": self.sampling_rate,
            "expected_clients": stage.expected_clients,
            "target_quantile": stage.target_quantile,
            "clip_learning_rate": stage.clip_learning_rate,
            "clip_count_stddev": stage.count_stddev,
            "distributed": stage.distributed,
        }

    def state(self) -> dict[str, Any]:
        """The account after the last round, as JSON data: what it was kept for, steps, ε,
        the accountant (its composed events) and the adaptive clipping norm."""
        stage = self.server_stage
        return {
            "version": STATE_VERSION,
            "unit": "client",
            "round": self.last_round,
            **_settings(self.config, self.rounds),
            **self._mechanism_settings(),
            "steps": self.steps,
            "epsilon": self.epsilon,
            "accountant": self.accountant.state(),
            "clipping": {
                "clip_norm": stage.clip_norm,
                "last_clip_norm": stage.last_clip_norm,
                "history": list(stage.clip_history),
            },
            "distributed_rounds": [dict(r) for r in self.distributed_rounds],
        }

    def restore(self, state: Mapping[str, Any], *, round_: int) -> None:
        """Continue the account `state()` saved after `round_`; refuse (one line) if it was
        kept for another configuration. The noise and the client sampler get fresh sources
        (see `random_source`): call it before the strategy takes `sampler`."""
        _check_header(
            state, unit="client", round_=round_, settings=_settings(self.config, self.rounds)
        )
        for key, now in self._mechanism_settings().items():
            _same(f"the federation's {key}", state.get(key), now)
        if state.get("steps") != round_:
            raise _unreadable(f"{state.get('steps')!r} rounds composed after round {round_}")
        accountant = _accountant(state.get("accountant"), self.config, round_, "the federation")
        clipping = state.get("clipping")
        if not isinstance(clipping, Mapping):
            raise _unreadable(f"clipping = {clipping!r}")
        clip_norm = _number(clipping, "clip_norm", "clipping")
        last_clip_norm = _number(clipping, "last_clip_norm", "clipping")
        try:
            history = [float(c) for c in clipping["history"]]
        except (KeyError, TypeError, ValueError):
            raise _unreadable(f"clipping = {clipping!r}") from None
        distributed = state.get("distributed_rounds", [])  # absent from older checkpoints
        if not isinstance(distributed, list) or not all(
            isinstance(r, Mapping) for r in distributed
        ):
            raise _unreadable(f"distributed_rounds = {distributed!r}")
        self.accountant, self.steps = accountant, round_
        self.distributed_rounds = [dict(r) for r in distributed]
        self.epsilon = max(
            _number(state, "epsilon", "the federation"), accountant.epsilon(self.config.delta)
        )
        stage = self.server_stage
        stage.clip_norm, stage.last_clip_norm, stage.clip_history = (
            clip_norm,
            last_clip_norm,
            history,
        )
        stage.source = random_source(self.config, 0, resumed_at=round_ + 1, what=_NOISE)
        self.sampler = random_source(self.config, 1, resumed_at=round_ + 1, what=_SAMPLING)
        self.last_round = round_

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

    def privacy_record(self, aggregation: str, *, dimension: int | None = None) -> dict[str, Any]:
        """The `privacy` object of result.json; `accounting` is the accountant's `state()` (one
        DpEvent per round). With distributed DP, `dimension` is the number of update
        coordinates d each client encodes, and `distributed_dp` lists every round's
        parameters (Kairouz, Liu, Steinke 2021)."""
        rep = _report(self.config, self.noise_multiplier, self.sampling_rate, self.steps)
        record: dict[str, Any] = {
            "unit": "client",
            "epsilon": self.epsilon,
            "delta": self.config.delta,
            "accountant": self.accountant.describe(),
            "neighbouring": stated_neighbouring(self.config),
            "aggregation": aggregation,
            "attestation": None,
            "mechanism": self._mechanism(self.steps),
            "epsilon_rdp": rep.epsilon_rdp,
            "target": {"epsilon": self.config.epsilon, "delta": self.config.delta},
            "accounting": self.accountant.state(),
        }
        if self.distributed and dimension is not None:
            record["distributed_dp"] = self._distributed_record(dimension)
        return record

    def _distributed_record(self, dimension: int) -> dict[str, Any]:
        """Everything Kairouz et al.'s bound needs, per round: γ (`step`), d, t, n, σ_c, τ and
        the modulus. `clients` is n, the clients selected (the most noise shares a sum can
        hold, for τ); `survivors` those whose masked update was summed (t or more, or none
        when the round's sum was not unmasked: then nothing was released)."""
        z, clip = self.noise_multiplier, self.config.clip_norm
        rounds = []
        for entry in self.distributed_rounds:
            row = dict(entry)
            step, threshold = entry.get("step"), entry.get("threshold")
            bits, clients = entry.get("modulus_bits"), entry.get("clients")
            if (
                isinstance(step, int | float)
                and isinstance(threshold, int)
                and isinstance(bits, int)
                and isinstance(clients, int)
            ):
                noise = DistributedGaussian(z, clip, dimension, FixedPoint(bits, float(step)))
                sigma_c = noise.client_stddev(threshold)
                row |= {
                    "sensitivity": noise.sensitivity,
                    "client_stddev": sigma_c,
                    "tau": tau(clients, sigma_c),
                }
            rounds.append(row)
        return {
            "mechanism": "distributed discrete Gaussian (Kairouz, Liu, Steinke 2021)",
            "noise_multiplier": z,
            "clip_norm": clip,
            "dimension": dimension,
            "rounds": rounds,
        }


#: A run's differential-privacy policy: per record (DP-SGD) or per client (DP-FedAvg).
PrivacyPolicy = RecordLevelPrivacy | ClientLevelPrivacy


def _distributed_round(record: RoundRecord) -> dict[str, Any]:
    """What a distributed-DP round's secure aggregation reported: the clients selected, the
    threshold, the modulus and the encoding step the round used, and the survivors whose noisy
    updates were summed (none when the sum was not unmasked)."""
    report = record.aggregation
    row: dict[str, Any] = {"round": record.round, "clients": record.selected}
    for key in ("threshold", "modulus_bits", "step"):
        if isinstance(report.get(key), int | float):
            row[key] = report[key]
    survivors = report.get("survivors")
    row["survivors"] = int(survivors) if isinstance(survivors, int) and "error" not in report else 0
    return row
