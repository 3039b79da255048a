"""A member's update pipeline: its client stages, its trainer and its `ClientRunner`.

One builder for every place a member trains: in process (simulation, Ray) and in a deployment
member's own process, so both run the same stages in the same order:

    train (DP-SGD under record-level DP; label flipping for a simulated attacker)
    → clip (client-level DP) → poison (a simulated attacker) → compress (`[compression]`)
    → the secure-aggregation participant's sealing (SecAgg's masking, CKKS' encryption)
"""

from __future__ import annotations

from veil.assembly.secure_aggregation.registry import backend
from veil.assembly.strategy import Attack
from veil.config import CompressionConfig, RunConfig
from veil.data import ClientData
from veil.federation import ClientRunner, UpdatePipeline
from veil.federation.compression import (
    CompressionStage,
    Compressor,
    Int8Compressor,
    TopKCompressor,
)
from veil.federation.lora_stacking import DropMergedStage
from veil.federation.objective import CROSS_ENTROPY, Objective
from veil.federation.pipeline import ClientProtocol, ClientStage, ServerStage
from veil.federation.training import LocalTrainer
from veil.privacy.dp.policy import ClientLevelPrivacy, PrivacyPolicy, RecordLevelPrivacy
from veil.seeding import Purpose, derive_seed


def compressor(config: CompressionConfig) -> Compressor:
    """The compressor that `[compression]` names."""
    if config.kind == "int8":
        return Int8Compressor()
    return TopKCompressor(config.fraction)


def update_compressor(config: RunConfig) -> Compressor | None:
    """The compressor of a run's uploads: None without `[compression]`, and None when the
    secure-aggregation backend encodes uploads itself (SecAgg's fixed point then does the
    compressing: `veil.assembly.secure_aggregation.secagg.modulus_bits`)."""
    if config.compression is None or backend(config.secure_aggregation).encodes_updates:
        return None
    return compressor(config.compression)


def compression_stage(config: RunConfig) -> CompressionStage | None:
    """The client stage that compresses uploads, if the run compresses them as a stage."""
    found = update_compressor(config)
    if found is None or config.compression is None:
        return None
    return CompressionStage(found, error_feedback=config.compression.error_feedback)


def client_stages(
    config: RunConfig, privacy: PrivacyPolicy | None, attack: Attack | None = None
) -> list[ClientStage]:
    """A member's client stages, in order: LoRA stacking's dropping of the merged deltas,
    client-level DP's clipping, a simulated attacker's poisoning, compression."""
    compress = compression_stage(config)
    return [
        *([DropMergedStage()] if config.model.lora.aggregation == "stack" else []),
        *(privacy.client_stages if isinstance(privacy, ClientLevelPrivacy) else []),
        *(attack.client_stages() if attack else []),
        *([compress] if compress else []),
    ]


def server_stages(privacy: PrivacyPolicy | None) -> list[ServerStage]:
    """The stages after the sum: client-level DP's noise."""
    return privacy.server_stages if isinstance(privacy, ClientLevelPrivacy) else []


def trainer(
    privacy: PrivacyPolicy | None,
    attack: Attack | None,
    name: str,
    index: int,
    n_classes: int,
    objective: Objective = CROSS_ENTROPY,
) -> LocalTrainer | None:
    """Member `name`'s local trainer: DP-SGD under record-level DP (clipping the gradients of
    `objective`'s per-example loss), wrapped by label flipping for a simulated attacker; None
    for plain SGD (the `ClientRunner` then minimises `objective` itself)."""
    loss = objective.per_example if objective.regression or objective.tokens else None
    honest = privacy.trainer(name, index, loss) if isinstance(privacy, RecordLevelPrivacy) else None
    return attack.trainer(name, honest, n_classes) if attack else honest


def client_runner(
    config: RunConfig,
    client: ClientData,
    *,
    index: int,
    n_classes: int,
    pipeline: UpdatePipeline,
    privacy: PrivacyPolicy | None,
    attack: Attack | None = None,
    protocol: ClientProtocol | None = None,
    objective: Objective = CROSS_ENTROPY,
) -> ClientRunner:
    """Member number `index` (`client.name`), training on `client`'s data with the run's
    seed for it, its trainer, `pipeline`'s client stages and the participant `protocol`,
    minimising `objective` (`veil.assembly.model.objective`: the run's loss; `n_classes` is 1
    for regression)."""
    return ClientRunner(
        client.name,
        client,
        n_classes=n_classes,
        pipeline=pipeline,
        seed=derive_seed(config.seed, Purpose.LOCAL_TRAINING, index),
        trainer=trainer(privacy, attack, client.name, index, n_classes, objective),
        protocol=protocol,
        objective=objective,
    )
