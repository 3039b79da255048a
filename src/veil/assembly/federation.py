"""A server's whole federation, assembled from the config: the parts `veil.runtime` drives.

`assemble` builds, in this order (the order the global random state sees them in, so a run is
reproducible): the global model, the privacy policy (continued from a checkpoint), the
secure-aggregation session, the attack, the update pipeline and aggregator chain, the members'
runners and the gateway that reaches them, the strategy, and the `FederatedServer`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from torch import nn

from veil.assembly import privacy as privacy_builder
from veil.assembly.data import held_out_evaluator
from veil.assembly.model import member_model, run_objective, training_plan
from veil.assembly.model import model as build_run_model
from veil.assembly.secure_aggregation.base import SecureAggregation, ServerInputs, Session
from veil.assembly.secure_aggregation.registry import backend as find_backend
from veil.assembly.stages import client_runner, client_stages, server_stages, update_compressor
from veil.assembly.strategy import (
    Attack,
    attack,
    clear_aggregator,
    ray_settings,
    stragglers,
    strategy,
)
from veil.config import RunConfig
from veil.data import FederatedData
from veil.federation import ClientRunner, FederatedServer, ServerObserver, UpdatePipeline
from veil.federation.server import ClientGateway
from veil.federation.vectorised import VectorisedTrainer, vectorisable
from veil.models import get_parameters
from veil.models.parameters import frozen_fingerprint
from veil.privacy.dp.policy import ClientLevelPrivacy, PrivacyPolicy
from veil.seeding import Purpose, derive_seed
from veil.store import Checkpoint
from veil.tensors import NamedArrays
from veil.transport import LocalTransport
from veil.transport.ray import RayTransport

#: Builds the gateway to real clients: (run id, initial parameters) -> gateway.
GatewayFactory = Callable[[str, NamedArrays], ClientGateway]


@dataclass(frozen=True)
class ServerSide:
    """What a deployment server adds to its config: its gateway to the members' processes, its
    PKI folder and (when the backend made one) the TLS key it serves."""

    gateway_factory: GatewayFactory
    pki_dir: Path | None = None
    tls_public_key: bytes | None = None
    #: The run's data with each member's row counts as it declared them when it joined
    #: (called once the gateway has waited for the members); None: as given.
    members: Callable[[FederatedData], FederatedData] | None = None


@dataclass
class Federation:
    """A run's parts, built from its config."""

    run_id: str
    fed: FederatedData
    model: nn.Module
    #: The parameters the run starts from: the initial model's, or the checkpoint's.
    initial: NamedArrays
    start_round: int
    privacy: PrivacyPolicy | None
    backend: SecureAggregation
    session: Session
    attack: Attack | None
    pipeline: UpdatePipeline
    gateway: ClientGateway
    server: FederatedServer


def assemble(
    config: RunConfig,
    *,
    run_id: str,
    fed: FederatedData,
    observers: Sequence[ServerObserver],
    checkpoint: Checkpoint | None = None,
    checkpoint_path: Path | None = None,
    deployment: ServerSide | None = None,
) -> Federation:
    """Every part of one run from `config` and `fed` (a deployment server's `fed` holds the test
    data and the members' declared sizes only). With `checkpoint` the parameters, the strategy
    state and the privacy account continue from it (`checkpoint_path` names it in errors).
    The privacy policy observes the rounds first, then `observers`. ConfigError for a run that
    cannot work (a DP target, an encoding that could overflow) before any round."""
    backend = find_backend(config.secure_aggregation)
    backend.check(config)
    plan = training_plan(config)
    model = build_run_model(config, fed, seed=derive_seed(config.seed, Purpose.MODEL_INIT))
    initial = get_parameters(model)
    plan = replace(plan, base_model=frozen_fingerprint(model))
    names = [c.name for c in fed.clients]
    start = checkpoint.parameters if checkpoint is not None else initial
    # A deployment's members join first: the privacy policy accounts each with its declared size.
    gateway, fed = _join(deployment, run_id, start, fed)
    privacy = privacy_builder.privacy_policy(
        config, [(c.name, c.n_train) for c in fed.clients], plan
    )
    if checkpoint is not None:
        privacy_builder.restore_privacy(privacy, checkpoint, checkpoint_path or Path())
    session = backend.start(
        ServerInputs(
            config,
            initial,
            names,
            privacy,
            pki_dir=deployment.pki_dir if deployment else None,
            tls_public_key=deployment.tls_public_key if deployment else None,
        )
    )
    adversary = attack(config, names)
    pipeline = update_pipeline(config, privacy, adversary, session)
    if gateway is None:
        runners = _runners(config, fed, pipeline, privacy, adversary, session)
        gateway = in_process_gateway(config, fed, runners)
    chosen = strategy(
        config,
        poisson_source=privacy.sampler if isinstance(privacy, ClientLevelPrivacy) else None,
    )
    if checkpoint is not None:
        chosen.load_state(checkpoint.strategy_state)
    server = FederatedServer(
        run_id=run_id,
        clients=names,
        parameters=start,
        strategy=chosen,
        gateway=gateway,
        plan=plan,
        pipeline=pipeline,
        min_clients=config.federation.min_clients,
        learning_rate_decay=config.federation.learning_rate_decay,
        evaluate_every=config.federation.evaluate_every,
        evaluator=held_out_evaluator(config, fed),
        observers=[*([privacy] if privacy else []), *observers],
        seed=config.seed,
    )
    return Federation(
        run_id=run_id,
        fed=fed,
        model=model,
        initial=start,
        start_round=checkpoint.round + 1 if checkpoint is not None else 1,
        privacy=privacy,
        backend=backend,
        session=session,
        attack=adversary,
        pipeline=pipeline,
        gateway=gateway,
        server=server,
    )


def _join(
    deployment: ServerSide | None, run_id: str, start: NamedArrays, fed: FederatedData
) -> tuple[ClientGateway | None, FederatedData]:
    """A deployment's gateway, once the members have joined, and `fed` with the row counts
    they declared; (None, `fed`) for members in this process."""
    if deployment is None:
        return None, fed
    gateway = deployment.gateway_factory(run_id, start)
    return gateway, deployment.members(fed) if deployment.members is not None else fed


def update_pipeline(
    config: RunConfig, privacy: PrivacyPolicy | None, adversary: Attack | None, session: Session
) -> UpdatePipeline:
    """The server's update pipeline: the members' client stages (listed in the result), the
    aggregator chain (the clear rule, kept, wrapped or replaced by the session) and the server
    stages."""
    return UpdatePipeline(
        client_stages=client_stages(config, privacy, adversary),
        aggregator=session.server_aggregator(clear_aggregator(config, update_compressor(config))),
        server_stages=server_stages(privacy),
    )


def _runners(
    config: RunConfig,
    fed: FederatedData,
    pipeline: UpdatePipeline,
    privacy: PrivacyPolicy | None,
    adversary: Attack | None,
    session: Session,
) -> list[ClientRunner]:
    return [
        client_runner(
            config,
            client,
            index=index,
            n_classes=fed.n_classes,
            pipeline=pipeline,
            privacy=privacy,
            attack=adversary,
            protocol=session.participant(client.name),
            objective=run_objective(config, fed),
        )
        for index, client in enumerate(fed.clients)
    ]


def in_process_gateway(
    config: RunConfig, fed: FederatedData, runners: Sequence[ClientRunner]
) -> ClientGateway:
    """The gateway to members that run in this process (simulation) or on Ray workers."""
    by_name = {runner.name: runner for runner in runners}
    if config.mode == "ray":
        return RayTransport(
            by_name,
            partial(
                member_model,
                config,
                n_features=fed.n_features,
                n_classes=fed.n_classes,
                image_shape=fed.image_shape,
            ),
            settings=ray_settings(config.ray, torch_threads=config.federation.torch_threads),
            dropout=config.federation.simulated_dropout,
            seed=config.seed,
            stragglers=stragglers(config),
        )
    model = build_run_model(config, fed)
    return LocalTransport(
        by_name,
        lambda: model,
        dropout=config.federation.simulated_dropout,
        seed=config.seed,
        stragglers=stragglers(config),
        vectorised=vectorised_trainer(model, fed, by_name),
    )


def vectorised_trainer(
    model: nn.Module, fed: FederatedData, runners: Mapping[str, ClientRunner]
) -> VectorisedTrainer | None:
    """The simulation's batched trainer when its model and every member's trainer allow it
    (`veil.federation.vectorised`: a Linear/ReLU chain trained by plain SGD on the
    cross-entropy), else None: members then train one by one. The results are the same."""
    if vectorisable(model, runners.values()) is not None:
        return None
    return VectorisedTrainer(model, runners, {client.name: client for client in fed.clients})
