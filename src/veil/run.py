"""`veil.run`: one federated run from a config, wired to a transport, a run store and a result.

This is the Python API behind `veil run`; the CLI is a thin layer over it.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from veil.atomic import writing
from veil.builders import attack as build_attack
from veil.builders import ray_settings, robust_aggregator, stragglers
from veil.config import (
    TEXT_DATASETS,
    FedAvgConfig,
    FedOptConfig,
    FedProxConfig,
    RunConfig,
    load_config,
)
from veil.crypto.envelope import load_key_file
from veil.crypto.identity import IdentityKey
from veil.data import FederatedData, build_federated_data, declared_bounds, load_dataset
from veil.data.text import load_text_dataset
from veil.errors import ConfigError, StoreError, VeilError
from veil.federation import (
    ClientRunner,
    FedAvg,
    FederatedServer,
    FedOpt,
    FedProx,
    RoundRecord,
    ServerObserver,
    Strategy,
    TrainingPlan,
    UpdatePipeline,
    WeightedSum,
)
from veil.federation.compression import (
    DecompressingAggregator,
    compression_stage,
    secagg_modulus_bits,
    update_compressor,
)
from veil.federation.compression import upload_reference as compressed_reference
from veil.federation.pipeline import Aggregator
from veil.federation.server import ClientGateway, Evaluator
from veil.federation.strategy import PoissonSource
from veil.federation.training import LocalTrainer, as_tensors, evaluate, train_epochs
from veil.models import build_model, get_parameters, set_parameters
from veil.models.parameters import frozen_fingerprint, parameter_counts
from veil.models.transformer import SequenceClassifier, load_tokenizer
from veil.privacy.dp.ledger import TOLERANCE, BudgetExceeded, PrivacyLedger
from veil.privacy.dp.policy import ClientLevelPrivacy, RecordLevelPrivacy
from veil.privacy.he.federation import CkksFederation, ckks_federation
from veil.privacy.he.federation import reference as ckks_reference
from veil.privacy.he.keys import PublicKeySet
from veil.privacy.secagg.aggregator import SecAggAggregator
from veil.privacy.secagg.layout import UpdateLayout, masked_reference
from veil.privacy.secagg.participant import SecAggParticipant
from veil.privacy.secagg.quantize import FixedPoint
from veil.privacy.secagg.roster import StaticRoster
from veil.privacy.secagg.settings import DistributedNoise, SecAggSettings, settings_from_config
from veil.privacy.tee.federation import TeeFederation, tee_federation
from veil.privacy.tee.sealed import checkpoint_sealing_key
from veil.report.html import write_report
from veil.result import (
    Baseline,
    Communication,
    PrivacyRecord,
    Result,
    RoundResult,
    Timing,
    compact_failures,
)
from veil.seeding import Purpose, derive_seed, torch_generator
from veil.selection import sample_size
from veil.store import (
    DB_NAME,
    Checkpoint,
    RunStore,
    atomic_write_text,
    load_checkpoint,
    save_checkpoint,
)
from veil.store.lock import run_directory
from veil.tensors import NamedArrays, total_bytes
from veil.transport import LocalTransport
from veil.transport.ray import RayTransport

RESULT_FILE = "result.json"
CHECKPOINT_FILE = "checkpoint.safetensors"


def run(
    config: RunConfig | str | Path,
    out_dir: str | Path | None = None,
    *,
    observers: Sequence[ServerObserver] = (),
    resume: bool = False,
    stop: Callable[[], bool] | None = None,
) -> Result:
    """Run one federation to completion and return its `Result`.

    `config` is a `RunConfig` or the path of a TOML file. With `out_dir`, the run writes
    `out_dir/result.json`, records its rounds in `out_dir/veil.db` as they finish, and checkpoints
    the global model after every round. `observers` receive round events (e.g. a progress bar).
    With `resume`, a run that crashed or was interrupted continues from `out_dir`'s checkpoint,
    privacy account included (see `_run`). When `stop` (e.g. a `veil.lifecycle.StopRequest`)
    returns True before a round, the run ends there: the result has status "interrupted" and
    the rounds finished so far, and the store marks the run interrupted.

    A full disk or a refused write raises `DiskFullError` / `WritePermissionError` naming the
    file; a `KeyboardInterrupt` marks the run interrupted, any other error failed.
    """
    if not isinstance(config, RunConfig):
        config = load_config(config)
    key = load_key_file(config.checkpoint.key_file) if config.checkpoint.key_file else None
    with _torch_threads(config.federation.torch_threads):
        if out_dir is None:
            return _run(config, None, observers, resume=resume, checkpoint_key=key, stop=stop)
        with run_directory(out_dir):  # one run per folder
            return _run(config, out_dir, observers, resume=resume, checkpoint_key=key, stop=stop)


#: Builds the gateway to real clients: (run id, initial parameters) -> gateway.
GatewayFactory = Callable[[str, NamedArrays], ClientGateway]


def _run(
    config: RunConfig,
    out_dir: str | Path | None,
    observers: Sequence[ServerObserver],
    *,
    fed: FederatedData | None = None,
    gateway_factory: GatewayFactory | None = None,
    resume: bool = False,
    checkpoint_key: bytes | None = None,
    ckks_keys: PublicKeySet | None = None,
    tee_tls_key: bytes | None = None,
    stop: Callable[[], bool] | None = None,
) -> Result:
    """One run. Simulation builds the data and an in-process transport; a deployment server
    passes `fed` (test data and client names only) and a factory for its network gateway
    (and, under CKKS, the key ceremony's public key set; under TEE, its certificate's key).

    With `resume`, the run continues from `out_dir`'s checkpoint: same run id, parameters and
    strategy state, from the round after the checkpointed one; rounds already in the run store
    are kept, and a round redone after a crash replaces its row, so none is lost or counted
    twice. Under DP it continues the checkpoint's privacy account (refused if the configuration
    no longer matches it), draws fresh randomness, and reuses the ledger charges the run made
    when it started instead of charging again.

    With `stop`, the run ends before the first round that starts after it returns True: status
    "interrupted" in the result and the store, the finished rounds kept, no pooled baseline,
    the ledger's charges left unreleased (a resume reuses them).
    """
    started = time.perf_counter()
    out = Path(out_dir) if out_dir is not None else None
    if checkpoint_key is not None and config.secure_aggregation == "tee":
        # Sealed to the aggregator: another code or aggregation config cannot open them.
        checkpoint_key = checkpoint_sealing_key(checkpoint_key, config)
    checkpoint: Checkpoint | None = None
    if resume:
        if out is None:
            raise StoreError("resuming needs the run folder that holds the checkpoint")
        checkpoint = load_checkpoint(out / CHECKPOINT_FILE, key=checkpoint_key)
    run_id = checkpoint.run_id if checkpoint else new_run_id()

    fed = fed if fed is not None else _federated_data(config)
    plan = _training_plan(config)
    model = _model(config, fed, seed=derive_seed(config.seed, Purpose.MODEL_INIT))
    initial = get_parameters(model)
    plan = replace(plan, base_model=frozen_fingerprint(model))
    start_round = 1
    if checkpoint is not None:
        initial, start_round = checkpoint.parameters, checkpoint.round + 1

    privacy = _privacy_policy(config, fed, plan)
    if checkpoint is not None:
        assert out is not None
        _restore_privacy(privacy, checkpoint, out / CHECKPOINT_FILE)
    secure = _secure_aggregation(
        config,
        privacy,
        initial,
        [c.name for c in fed.clients],
        ckks_keys=ckks_keys,
        tee_tls_key=tee_tls_key,
    )
    attack = build_attack(config, [c.name for c in fed.clients])
    compress = compression_stage(config)
    pipeline = UpdatePipeline(
        client_stages=[
            *(privacy.client_stages if isinstance(privacy, ClientLevelPrivacy) else []),
            *(attack.client_stages() if attack else []),
            *([compress] if compress else []),
        ],
        aggregator=_aggregator(config, secure),
        server_stages=privacy.server_stages if isinstance(privacy, ClientLevelPrivacy) else [],
    )

    def trainer(name: str, index: int) -> LocalTrainer | None:
        honest = privacy.trainer(name, index) if isinstance(privacy, RecordLevelPrivacy) else None
        return attack.trainer(name, honest, fed.n_classes) if attack else honest

    runners = {
        client.name: ClientRunner(
            client.name,
            client,
            n_classes=fed.n_classes,
            pipeline=pipeline,
            seed=derive_seed(config.seed, Purpose.LOCAL_TRAINING, index),
            trainer=trainer(client.name, index),
            protocol=secure.participant(client.name) if secure else None,
        )
        for index, client in enumerate(fed.clients)
    }
    gateway: ClientGateway
    if gateway_factory is None and config.mode == "ray":
        gateway = RayTransport(
            runners,
            partial(
                build_model,
                config.model,
                n_features=fed.n_features,
                n_classes=fed.n_classes,
                image_shape=fed.image_shape,
            ),
            settings=ray_settings(config.ray, torch_threads=config.federation.torch_threads),
            dropout=config.federation.simulated_dropout,
            seed=config.seed,
            stragglers=stragglers(config),
        )
    elif gateway_factory is None:
        gateway = LocalTransport(
            runners,
            lambda: _model(config, fed),
            dropout=config.federation.simulated_dropout,
            seed=config.seed,
            stragglers=stragglers(config),
        )
    else:
        gateway = gateway_factory(run_id, initial)
    recorder = _Recorder(
        run_id, None, out / CHECKPOINT_FILE if out else None, checkpoint_key, privacy=privacy
    )
    strategy = build_strategy(
        config,
        poisson_source=privacy.sampler if isinstance(privacy, ClientLevelPrivacy) else None,
    )
    if checkpoint is not None:
        strategy.load_state(checkpoint.strategy_state)
    server = FederatedServer(
        run_id=run_id,
        clients=list(runners),
        parameters=initial,
        strategy=strategy,
        gateway=gateway,
        plan=plan,
        pipeline=pipeline,
        min_clients=config.federation.min_clients,
        learning_rate_decay=config.federation.learning_rate_decay,
        evaluate_every=config.federation.evaluate_every,
        evaluator=_test_evaluator(config, fed),
        observers=[*([privacy] if privacy else []), recorder, *observers],
        seed=config.seed,
    )
    # Everything that can refuse the run has run by now: only then touch the run folder.
    with _ledger_writes(config):
        charges = _charge_ledger(
            config, privacy, run_id, earlier=_ledger_entries(checkpoint) if checkpoint else None
        )
    recorder.ledger = charges
    store = RunStore(out / DB_NAME) if out is not None else None
    recorder.store = store
    earlier: list[RoundResult] = []
    if store is not None and checkpoint is not None:
        store.resume_run(run_id)
        if checkpoint.round_result is not None:
            # The process may have died after the checkpoint and before the round's row.
            store.record_round(run_id, checkpoint.round_result)
        earlier = [
            RoundResult.model_validate(r)
            for r in store.get_run(run_id)[2]
            if r["round"] < start_round
        ]
    elif store is not None:
        store.start_run(
            run_id,
            name=config.name,
            mode=config.mode,
            config=config.to_dict(),
            out_dir=str(out.resolve()) if out else None,
        )
    try:
        records = server.run(config.federation.rounds, start_round=start_round, stop=stop)
        last = records[-1].round if records else start_round - 1
        interrupted = last < config.federation.rounds
        rounds = [*earlier, *(_round_result(r) for r in records)]
        final = _test_evaluator(config, fed)(server.parameters)
        baseline = (
            _centralized_baseline(config, fed, initial)
            if config.federation.centralized_baseline
            and gateway_factory is None
            and not interrupted
            else None
        )
        result = Result(
            run_id=run_id,
            name=config.name,
            mode=config.mode,
            status="interrupted" if interrupted else "finished",
            rounds_planned=config.federation.rounds,
            interrupted_by=getattr(stop, "signal_name", None) if interrupted else None,
            final=final,
            centralized_baseline=_baseline(config, baseline),
            rounds=rounds,
            privacy=_privacy_record(config, privacy, secure),
            communication=_communication(
                rounds, model, upload_reference(config, initial, privacy), config
            ),
            timing=Timing(total_s=time.perf_counter() - started),
            pipeline=pipeline.describe(),
            strategy=server.strategy.name,
            clients=len(runners),
            dataset={"name": fed.dataset_name, "synthetic": fed.synthetic},
            **({"attack": attack.describe()} if attack else {}),
        )
        if out is not None:
            atomic_write_text(out / RESULT_FILE, result.to_json())
        if not interrupted:
            with _ledger_writes(config):
                _mark_released(config, charges)
        if store is not None:
            store.finish_run(run_id, status=result.status, final=final)
    except BaseException as exc:
        if store is not None:
            # Interrupted (Ctrl-C, a second signal) or failed; the checkpoint and the rows of
            # the finished rounds stay, for --resume. The store may be what failed (disk
            # full): then the original error is what the user needs to see.
            status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            with suppress(VeilError, sqlite3.Error):
                store.finish_run(run_id, status=status, final=None)
        raise
    finally:
        if isinstance(gateway, RayTransport):
            gateway.close()
        if store is not None:
            store.close()
    if out is not None:
        write_report(out)
    return result


def _ledger_writes(config: RunConfig) -> AbstractContextManager[None]:
    """Names a full disk or a refused write of the privacy ledger (`veil.atomic.writing`)."""
    ledger = config.privacy.ledger if config.privacy is not None else None
    return writing(ledger) if ledger is not None else nullcontext()


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def new_run_id() -> str:
    """A sortable, unique run id: UTC time plus 6 random hex digits."""
    return f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def build_strategy(config: RunConfig, *, poisson_source: PoissonSource | None = None) -> Strategy:
    """The strategy object that `config.strategy` describes."""
    s = config.strategy
    fractions = config.federation.fraction_fit, config.federation.fraction_evaluate
    if isinstance(s, FedProxConfig):
        return FedProx(
            mu=s.mu,
            fraction_fit=fractions[0],
            fraction_evaluate=fractions[1],
            poisson_source=poisson_source,
        )
    if isinstance(s, FedOptConfig):
        return FedOpt(
            s.name,
            server_learning_rate=s.server_learning_rate,
            beta1=s.beta1,
            beta2=s.beta2,
            tau=s.tau,
            fraction_fit=fractions[0],
            fraction_evaluate=fractions[1],
            poisson_source=poisson_source,
        )
    assert isinstance(s, FedAvgConfig)
    return FedAvg(
        fraction_fit=fractions[0], fraction_evaluate=fractions[1], poisson_source=poisson_source
    )


PrivacyPolicy = RecordLevelPrivacy | ClientLevelPrivacy


def _privacy_policy(
    config: RunConfig, fed: FederatedData, plan: TrainingPlan
) -> PrivacyPolicy | None:
    p = config.privacy
    if p is None:
        return None
    if p.unit == "record":
        return RecordLevelPrivacy.plan(
            p,
            clients=[(c.name, c.n_train) for c in fed.clients],
            training=plan,
            rounds=config.federation.rounds,
        )
    return ClientLevelPrivacy.plan(
        p,
        n_clients=len(fed.clients),
        fraction_fit=config.federation.fraction_fit,
        rounds=config.federation.rounds,
        distributed=config.secure_aggregation == "secagg",
    )


def _aggregator(
    config: RunConfig, secure: _SecureAggregation | CkksFederation | TeeFederation | None
) -> Aggregator:
    """The run's aggregator; under TEE the plain or robust rule runs behind attestation; with
    compressed uploads each one is decompressed before it is summed."""
    if isinstance(secure, TeeFederation):
        return secure.aggregator(robust_aggregator(config.robust, WeightedSum()))
    aggregator = robust_aggregator(config.robust, secure.aggregator if secure else WeightedSum())
    compressor = update_compressor(config)
    return aggregator if compressor is None else DecompressingAggregator(aggregator, compressor)


@dataclass
class _SecureAggregation:
    """A simulation's SecAgg: the server's aggregator and each client's participant, with
    identity keys generated for the run (standing in for the federation's PKI)."""

    aggregator: SecAggAggregator
    settings: SecAggSettings
    layout: UpdateLayout
    identities: dict[str, IdentityKey]

    def participant(self, name: str) -> SecAggParticipant:
        roster = StaticRoster({n: k.public_key() for n, k in self.identities.items()})
        return SecAggParticipant(name, self.identities[name], roster, self.settings, self.layout)


def _secure_aggregation(
    config: RunConfig,
    privacy: PrivacyPolicy | None,
    initial: NamedArrays,
    clients: list[str],
    *,
    ckks_keys: PublicKeySet | None = None,
    tee_tls_key: bytes | None = None,
) -> _SecureAggregation | CkksFederation | TeeFederation | None:
    if config.secure_aggregation == "tee":
        return tee_federation(config, tls_public_key=tee_tls_key)
    if config.secure_aggregation == "ckks":
        # A deployment server passes the ceremony's public keys; a simulation makes its own.
        return ckks_federation(config.ckks, initial, clients, keys=ckks_keys)
    settings = secagg_settings(config, privacy)
    if settings is None:
        return None
    layout = UpdateLayout.of(initial, settings.sum_bounds)
    # Refuse an encoding that could overflow before anything starts (every client selected is
    # the worst case, also under Poisson sampling).
    settings.fixed_point(layout, len(clients))
    return _SecureAggregation(
        aggregator=SecAggAggregator(settings, layout),
        settings=settings,
        layout=layout,
        identities={name: IdentityKey.generate() for name in clients},
    )


def secagg_settings(config: RunConfig, privacy: PrivacyPolicy | None) -> SecAggSettings | None:
    """The run's SecAgg settings (None without secure aggregation); with client-level DP the
    clients add the noise (distributed discrete Gaussian)."""
    if config.secure_aggregation != "secagg":
        return None
    noise = None
    if isinstance(privacy, ClientLevelPrivacy):
        noise = DistributedNoise(privacy.noise_multiplier, privacy.config.clip_norm)
    return settings_from_config(
        config.secagg,
        round_size=planned_round_size(config, poisson=isinstance(privacy, ClientLevelPrivacy)),
        distributed_dp=noise,
        modulus_bits=secagg_modulus_bits(config),
    )


def planned_round_size(config: RunConfig, *, poisson: bool) -> int:
    """The most clients a round of this configuration selects, for SecAgg's threshold: the
    fraction's count, or under Poisson sampling (client-level DP) the 99.9 % quantile of
    Binomial(clients, fraction_fit)."""
    fed = config.federation
    if not poisson or fed.fraction_fit >= 1:
        return sample_size(fed.fraction_fit, fed.clients)
    from scipy.stats import binom

    return max(2, int(binom.ppf(0.999, fed.clients, fed.fraction_fit)))


def upload_reference(
    config: RunConfig, initial: NamedArrays, privacy: PrivacyPolicy | None
) -> dict[str, np.ndarray]:
    """What each client's upload must look like: the parameters, their compressed form, one
    masked vector, or one vector of CKKS ciphertext frames."""
    if config.secure_aggregation == "ckks":
        return ckks_reference(config.ckks, initial)
    settings = secagg_settings(config, privacy)
    if settings is None:
        return compressed_reference(update_compressor(config), initial)
    layout = UpdateLayout.of(initial, settings.sum_bounds)
    return masked_reference(layout, FixedPoint(settings.modulus_bits, 1.0).dtype)


def _privacy_record(
    config: RunConfig,
    privacy: PrivacyPolicy | None,
    secure: _SecureAggregation | CkksFederation | TeeFederation | None,
) -> PrivacyRecord:
    record = (
        PrivacyRecord.model_validate(
            privacy.privacy_record(
                config.secure_aggregation,
                dimension=secure.layout.parameter_count
                if isinstance(secure, _SecureAggregation)
                else None,
            )
        )
        if privacy
        else PrivacyRecord(aggregation=config.secure_aggregation)
    )
    if isinstance(secure, TeeFederation):
        record.attestation = secure.description()
        record.tee = secure.record()  # type: ignore[attr-defined]
    elif isinstance(secure, CkksFederation):
        record.homomorphic_encryption = secure.record(config.mode)  # type: ignore[attr-defined]
    elif secure is not None:
        s = secure.settings
        record.secure_aggregation = {  # type: ignore[attr-defined]
            "protocol": s.protocol,
            "threshold": s.round_threshold,
            "neighbours": s.neighbours,
            "modulus_bits": s.modulus_bits,
            "clip_range": None if s.distributed_dp else s.clip_range,
            "max_weight": None if s.distributed_dp else s.max_weight,
            "identities": "node certificates signed by the federation's CA"
            if config.mode == "deployment"
            else "generated per run (simulation)",
        }
    return record


def _restore_privacy(privacy: PrivacyPolicy | None, checkpoint: Checkpoint, path: Path) -> None:
    """Continue the checkpoint's privacy account; refuse (one line) a checkpoint whose account
    does not fit the configuration, or a DP run from a checkpoint that has none."""
    state = checkpoint.privacy
    if privacy is None:
        if state is not None:
            raise ConfigError(
                f"cannot resume from '{path}': it holds a differential-privacy account but the "
                "configuration has no [privacy]; resume with the configuration the run started "
                "with"
            )
        return
    account = state.get("account") if state is not None else None
    if not isinstance(account, Mapping):
        raise ConfigError(
            f"cannot resume from '{path}': it holds no privacy account (written by a run "
            "without [privacy] or by an older Veil), so the run's ε cannot be continued; start "
            "a new run"
        )
    privacy.restore(account, round_=checkpoint.round)


def _ledger_entries(checkpoint: Checkpoint) -> list[dict[str, Any]]:
    """The ledger charges a checkpointed run made when it started."""
    entries = (checkpoint.privacy or {}).get("ledger", [])
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def _charge_ledger(
    config: RunConfig,
    privacy: PrivacyPolicy | None,
    run_id: str,
    *,
    earlier: Sequence[Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Charge every planned ε before the run starts (all budgets checked first); returns the
    charges as ``{"dataset_id", "charge_id"}``, which the checkpoints carry.

    A resumed run passes the charges its checkpoint holds (`earlier`): each one the ledger
    still holds for this run, covering what is planned, is reused rather than charged again;
    whatever is not covered is charged now, so a resume neither double-charges nor leaves the
    run uncounted.
    """
    p = config.privacy
    if p is None or privacy is None or p.ledger is None:
        return []
    planned = privacy.charges(p.dataset_id or config.name)
    with PrivacyLedger(p.ledger) as ledger:
        kept: list[dict[str, Any]] = []
        charges = []
        for c in planned:
            reused = _reusable_charge(ledger, c.dataset_id, c.epsilon, c.delta, run_id, earlier)
            if reused is None:
                charges.append(c)
            else:
                kept.append({"dataset_id": c.dataset_id, "charge_id": reused})
        for c in charges:
            budget = ledger.budget(c.dataset_id)
            if c.epsilon > budget.epsilon_remaining + TOLERANCE or (
                c.delta > budget.delta_remaining + TOLERANCE
            ):
                raise BudgetExceeded(
                    c.dataset_id,
                    requested=(c.epsilon, c.delta),
                    remaining=(budget.epsilon_remaining, budget.delta_remaining),
                )
        return kept + [
            {
                "dataset_id": c.dataset_id,
                "charge_id": ledger.charge(
                    c.dataset_id,
                    epsilon=c.epsilon,
                    delta=c.delta,
                    who=config.name,
                    what=_charge_what(run_id),
                    mechanism="dp-sgd" if p.unit == "record" else "dp-fedavg",
                    parameters=c.parameters,
                ).id,
            }
            for c in charges
        ]


def _charge_what(run_id: str) -> str:
    return f"federated training run {run_id}"


def _reusable_charge(
    ledger: PrivacyLedger,
    dataset_id: str,
    epsilon: float,
    delta: float,
    run_id: str,
    earlier: Sequence[Mapping[str, Any]] | None,
) -> int | None:
    """The id of a charge this run made before a crash that covers (ε, δ) for `dataset_id`."""
    ids = {e.get("charge_id") for e in earlier or () if e.get("dataset_id") == dataset_id}
    for charge in ledger.charges(dataset_id) if ids else ():
        if (
            charge.id in ids
            and charge.what == _charge_what(run_id)
            and charge.epsilon + TOLERANCE >= epsilon
            and charge.delta + TOLERANCE >= delta
        ):
            return charge.id
    return None


def _mark_released(config: RunConfig, charges: Sequence[Mapping[str, Any]]) -> None:
    if charges and config.privacy is not None and config.privacy.ledger is not None:
        with PrivacyLedger(config.privacy.ledger) as ledger:
            for charge in charges:
                ledger.mark_released(int(charge["charge_id"]))


def _federated_data(config: RunConfig) -> FederatedData:
    d = config.data
    if d.dataset in TEXT_DATASETS:
        tokenizer = load_tokenizer(config.model.model_dir)
        dataset = load_text_dataset(d.dataset, tokenizer, config.model.max_length)
    else:
        dataset = load_dataset(d.dataset, path=d.path, target=d.target)
    declared = d.feature_bounds
    return build_federated_data(
        dataset,
        n_clients=config.federation.clients,
        partition=d.partition.kind,
        alpha=d.partition.alpha,
        test_fraction=d.test_fraction,
        validation_fraction=d.validation_fraction,
        scaling=d.scaling,
        seed=derive_seed(config.seed, Purpose.PARTITION),
        min_examples=d.partition.min_examples,
        # Public bounds (the config's, else the schema's) clamp every value before scaling.
        bounds=declared_bounds(
            dataset,
            declared.lower if declared else None,
            declared.upper if declared else None,
            declared.centre if declared else None,
        ),
    )


def _model(config: RunConfig, fed: FederatedData, seed: int | None = None) -> nn.Module:
    return build_model(
        config.model,
        n_features=fed.n_features,
        n_classes=fed.n_classes,
        image_shape=fed.image_shape,
        seed=seed,
    )


def _training_plan(config: RunConfig) -> TrainingPlan:
    f = config.federation
    return TrainingPlan(
        epochs=f.local_epochs,
        batch_size=f.batch_size,
        learning_rate=f.learning_rate,
        momentum=f.momentum,
        weight_decay=f.weight_decay,
    )


def _test_evaluator(config: RunConfig, fed: FederatedData) -> Evaluator:
    model = _model(config, fed)
    x, y = as_tensors(fed.x_test, fed.y_test)

    def evaluate_on_test(parameters: NamedArrays) -> dict[str, float]:
        set_parameters(model, parameters)
        return evaluate(model, x, y, fed.n_classes)

    return evaluate_on_test


def _baseline(config: RunConfig, metrics: dict[str, float] | None) -> Baseline | None:
    """The pooled baseline's record; under [privacy] marked as outside the guarantee: it is
    trained on the pooled records without DP, so its metrics are not private."""
    if not metrics:
        return None
    if config.privacy is None:
        return Baseline(**metrics)
    return Baseline(**metrics, outside_guarantee=True)


def _centralized_baseline(
    config: RunConfig, fed: FederatedData, initial: NamedArrays
) -> dict[str, float]:
    """The same model, initial weights and epoch budget, trained on the pooled training data;
    for a transformer also a linear probe (the head alone on the frozen pretrained encoder)."""
    baseline = _train_pooled(config, fed, initial)
    if config.model.name == "transformer":
        probe = _train_pooled(config, fed, initial, head_only=True)
        baseline |= {f"linear_probe_{k}": v for k, v in probe.items()}
    return baseline


def _train_pooled(
    config: RunConfig, fed: FederatedData, initial: NamedArrays, *, head_only: bool = False
) -> dict[str, float]:
    model = _model(config, fed)
    set_parameters(model, initial)
    if head_only:
        assert isinstance(model, SequenceClassifier)
        for p in model.encoder.parameters():
            p.requires_grad_(False)
    x, y = as_tensors(*fed.pooled_train())
    plan = _training_plan(config)
    epochs = config.federation.rounds * config.federation.local_epochs
    train_epochs(
        model,
        x,
        y,
        TrainingPlan(**{**asdict(plan), "epochs": epochs}),
        torch_generator(config.seed, Purpose.BASELINE),
    )
    xt, yt = as_tensors(fed.x_test, fed.y_test)
    return evaluate(model, xt, yt, fed.n_classes)


def _communication(
    rounds: Sequence[RoundResult], model: nn.Module, upload: NamedArrays, config: RunConfig
) -> Communication:
    """Bytes moved, and how one client's upload compares with the whole model in float32 (the
    frozen base of a LoRA model included: what full fine-tuning would send)."""
    trainable, total = parameter_counts(model)
    update_bytes = total_bytes(upload)
    per_client = [r.bytes_up / r.clients for r in rounds if r.clients]
    return Communication(
        bytes_up=sum(r.bytes_up for r in rounds),
        bytes_down=sum(r.bytes_down for r in rounds),
        update_bytes_per_client=update_bytes,
        bytes_up_per_client_round=sum(per_client) / len(per_client) if per_client else 0.0,
        trainable_parameters=trainable,
        model_parameters=total,
        model_bytes_float32=4 * total,
        update_fraction_of_model=update_bytes / (4 * total),
        compression=config.compression.kind if config.compression else "none",
    )


def _round_result(record: RoundRecord) -> RoundResult:
    return RoundResult(
        round=record.round,
        selected=record.selected,
        clients=record.completed,
        dropped=record.dropped,
        metrics=record.metrics,
        epsilon=record.epsilon,
        applied=record.applied,
        bytes_up=record.bytes_up,
        bytes_down=record.bytes_down,
        duration_s=record.duration_s,
        **compact_failures([(f.client, f.reason) for f in record.failures]),
        aggregation=record.aggregation,
    )


#: The fields of a round the run store keeps (JSON data), which a checkpoint carries too.
_STORED_ROW = (
    "round",
    "clients",
    "dropped",
    "selected",
    "applied",
    "metrics",
    "epsilon",
    "bytes_up",
    "bytes_down",
    "duration_s",
    "failures",
    "aggregation",
)


class _Recorder:
    """Writes each finished round to the checkpoint file, then to the run store.

    The checkpoint comes first and carries the privacy account with the round composed (the
    privacy observer runs before this one) and the ledger charges: nothing of a round is
    released (its row, the next round's model) before its account is on disk. It also carries
    the round's row, which a resumed run writes to the store if the process died in between.
    """

    def __init__(
        self,
        run_id: str,
        store: RunStore | None,
        checkpoint: Path | None,
        key: bytes | None = None,
        *,
        privacy: PrivacyPolicy | None = None,
    ) -> None:
        self.run_id = run_id
        self.store = store
        self.checkpoint = checkpoint
        self.key = key
        self.privacy = privacy
        #: The ledger charges of the run (`_charge_ledger`).
        self.ledger: list[dict[str, Any]] = []

    def on_round_start(self, round_: int, selected: int) -> None:
        pass

    def on_client_done(self, round_: int, client: str) -> None:
        pass

    def on_round_end(
        self, record: RoundRecord, parameters: NamedArrays, strategy: Strategy
    ) -> None:
        row = _round_result(record).model_dump()
        if self.checkpoint is not None:
            privacy = (
                {"account": self.privacy.state(), "ledger": self.ledger}
                if self.privacy is not None
                else None
            )
            save_checkpoint(
                self.checkpoint,
                Checkpoint(
                    run_id=self.run_id,
                    round=record.round,
                    parameters=parameters,
                    strategy_state=strategy.state(),
                    meta={"strategy": strategy.name},
                    privacy=privacy,
                    round_result={k: row[k] for k in _STORED_ROW if k in row},
                ),
                key=self.key,
            )
        if self.store is not None:
            self.store.record_round(self.run_id, row)
