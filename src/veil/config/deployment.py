"""`[deployment]` (real processes over gRPC with mutual TLS) and `[checkpoint]` (where
checkpoints go and how they are sealed)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationInfo, field_validator, model_validator

from veil.config.sections import Section, above_limit

#: Upper limit of every `[deployment]` duration: a week. Longer waits are no sane run's, and a
#: wait of ~1e300 s would crash the process (the OS's timestamp overflows) rather than wait.
MAX_WAIT_S = 604_800


class DeploymentConfig(Section):
    """Real processes: one server, one process per organisation, gRPC with mutual TLS."""

    #: Where the server listens; port 0 picks a free port.
    address: str = "127.0.0.1:0"
    #: Seconds a round waits for clients' results; later ones are dropped from the round.
    round_deadline_s: float = Field(60.0, gt=0)
    #: Refuse updates whose L2 norm exceeds this (None: no bound).
    max_update_norm: float | None = Field(None, gt=0)
    #: Seconds the server waits, before the first round, for every client to connect (the
    #: run then starts with whoever is there; missing clients are dropped from rounds).
    connect_timeout_s: float = Field(120.0, ge=0)
    #: Seconds a client keeps retrying to reach the server before it gives up.
    reconnect_timeout_s: float = Field(120.0, gt=0)
    #: Seconds `veil run` waits for the whole deployment before killing it.
    timeout_s: float = Field(1800.0, gt=0)
    #: Seconds between a member's heartbeats (sent from a background thread, also while it
    #: trains).
    heartbeat_s: float = Field(2.0, gt=0)
    #: Seconds without any call from a member after which the coordinator drops it from the
    #: current step at once and gives it no task until it calls again (> heartbeat_s).
    liveness_s: float = Field(10.0, gt=0)
    #: Seconds an upload stream may go without a chunk before the coordinator cancels it.
    upload_idle_s: float = Field(10.0, gt=0)
    #: Seconds one upload stream (or the stream of one task) may take in all.
    upload_timeout_s: float = Field(300.0, gt=0)

    @field_validator(
        "round_deadline_s",
        "connect_timeout_s",
        "reconnect_timeout_s",
        "timeout_s",
        "heartbeat_s",
        "liveness_s",
        "upload_idle_s",
        "upload_timeout_s",
    )
    @classmethod
    def _at_most_a_week(cls, value: float, info: ValidationInfo) -> float:
        if value > MAX_WAIT_S:
            reason = f"no sane run waits longer; lower {info.field_name}"
            raise above_limit(MAX_WAIT_S, "seconds (a week)", reason)
        return value

    @model_validator(mode="after")
    def _intervals(self) -> DeploymentConfig:
        if self.liveness_s <= self.heartbeat_s:
            raise ValueError(
                f"liveness_s ({self.liveness_s:g}) must be greater than heartbeat_s "
                f"({self.heartbeat_s:g}), or every member looks silent "
                "between two heartbeats; e.g. liveness_s = 5 * heartbeat_s"
            )
        if self.upload_timeout_s < self.upload_idle_s:
            raise ValueError(
                f"upload_timeout_s ({self.upload_timeout_s:g}) must be at least upload_idle_s "
                f"({self.upload_idle_s:g})"
            )
        return self


class CheckpointConfig(Section):
    """Where checkpoints go and how they are protected at rest."""

    #: Key file (32 random bytes, base64, mode 0600; `veil keygen PATH` makes one): with it,
    #: checkpoints are sealed with AES-256-GCM envelope encryption. Relative to the config file.
    key_file: Path | None = None
