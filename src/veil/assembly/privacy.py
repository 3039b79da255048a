"""A run's differential-privacy policy from `[privacy]`, and its privacy record.

One builder for every process: the server and a simulation plan the policy for every member
(`privacy_policy`), a deployment member plans its own from the shared config and its own
training-set size (`member_privacy`), and both get the same σ, sampling rate and steps, because
the same `RecordLevelPrivacy.plan` / `ClientLevelPrivacy.plan` computes them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from veil.assembly.secure_aggregation.base import Session
from veil.assembly.secure_aggregation.registry import backend
from veil.config import RunConfig
from veil.errors import ConfigError
from veil.federation import TrainingPlan
from veil.privacy.dp.policy import ClientLevelPrivacy, PrivacyPolicy, RecordLevelPrivacy
from veil.result import PrivacyRecord
from veil.store import Checkpoint


def privacy_policy(
    config: RunConfig, members: Sequence[tuple[str, int]], plan: TrainingPlan
) -> PrivacyPolicy | None:
    """The run's policy for every member, given as (name, training-set size): DP-SGD per
    organisation (record level) or DP-FedAvg (client level); None without `[privacy]`.
    ConfigError when a target cannot be met."""
    p = config.privacy
    if p is None:
        return None
    if p.unit == "record":
        return RecordLevelPrivacy.plan(
            p, clients=members, training=plan, rounds=config.federation.rounds
        )
    return client_privacy(config, n_clients=len(members))


def member_privacy(
    config: RunConfig, name: str, n_train: int, plan: TrainingPlan
) -> PrivacyPolicy | None:
    """Member `name`'s own policy, from the shared config and its own training-set size: the
    same σ, sampling rate and steps the coordinator accounts for it (from the size it declared)
    or, at client level, the federation's policy, whose clipping the member applies."""
    p = config.privacy
    if p is not None and p.unit == "record":
        return privacy_policy(config, [(name, n_train)], plan)
    return client_privacy(config)


def client_privacy(config: RunConfig, *, n_clients: int | None = None) -> ClientLevelPrivacy | None:
    """Client-level DP as every process derives it from the shared config: the same calibrated
    noise multiplier on the server (which accounts it) and on the clients (which clip, and add
    the noise when the secure-aggregation backend has the clients add it). `n_clients`
    defaults to the configuration's."""
    p = config.privacy
    if p is None or p.unit != "client":
        return None
    return ClientLevelPrivacy.plan(
        p,
        n_clients=config.federation.clients if n_clients is None else n_clients,
        fraction_fit=config.federation.fraction_fit,
        rounds=config.federation.rounds,
        distributed=backend(config.secure_aggregation).distributed_noise,
    )


def restore_privacy(privacy: PrivacyPolicy | None, checkpoint: Checkpoint, path: Path) -> None:
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


def privacy_record(
    config: RunConfig, privacy: PrivacyPolicy | None, session: Session
) -> PrivacyRecord:
    """result.json's `privacy`: the policy's guarantee and accounting (if any), with the
    secure-aggregation session's entry and attestation."""
    aggregation = config.secure_aggregation
    fields: dict[str, Any] = (
        privacy.privacy_record(aggregation, dimension=session.dp_dimension())
        if privacy is not None
        else {"aggregation": aggregation}
    )
    if session.record_name is not None:
        fields[session.record_name] = session.record()
    attestation = session.attestation()
    if attestation is not None:
        fields["attestation"] = attestation
    return PrivacyRecord.model_validate(fields)
