"""`[robust]` (robust aggregation), `[attack]` and `[stragglers]` (simulated malicious and
slow clients), and `[ray]` (the Ray pool), with what each requires of the rest of the run."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from veil.config.sections import Section, above_limit
from veil.selection import count_of, sample_size

if TYPE_CHECKING:
    from veil.config.run import RunConfig

#: Upper limit of Ray worker actors and of a local instance's CPUs: far above one cluster's
#: sane pool (each worker is a process holding a model).
MAX_RAY_WORKERS = 10_000

#: The modes that simulate clients, where simulated attacks and stragglers can run.
SIMULATED_MODES: tuple[str, ...] = ("simulation", "ray")


class RobustConfig(Section):
    """Robust aggregation (`veil.federation.robust`): a round's update that a minority of
    arbitrary updates cannot drag far. The server must see each update, so it works with
    `secure_aggregation = "plain"` only (masking and CKKS hide individual updates)."""

    #: "median" and "trimmed_mean" (Yin et al. 2018), "krum" and "multi_krum" (Blanchard et
    #: al. 2017), or "mean" (the weighted mean, for norm bounding alone).
    method: Literal["mean", "median", "trimmed_mean", "krum", "multi_krum"] = "median"
    #: trimmed_mean: fraction of the values dropped at each end of every coordinate (default 0.1).
    trim_fraction: float | None = Field(None, ge=0, lt=0.5)
    #: krum and multi_krum: f, the Byzantine updates to tolerate per round (needs n > 2f + 2).
    byzantine: int | None = Field(None, ge=0)
    #: multi_krum: m, how many lowest-scoring updates to average (default n - f).
    keep: int | None = Field(None, ge=1)
    #: Scale every update down to this L2 norm before aggregating (Sun et al. 2019).
    max_update_norm: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _keys_fit_the_method(self) -> RobustConfig:
        m = self.method
        if self.trim_fraction is not None and m != "trimmed_mean":
            raise ValueError(f"trim_fraction applies to method = 'trimmed_mean', not '{m}'")
        if m in ("krum", "multi_krum") and self.byzantine is None:
            raise ValueError(f"method = '{m}' needs byzantine = f, the attackers to tolerate")
        if self.byzantine is not None and m not in ("krum", "multi_krum"):
            raise ValueError(f"byzantine applies to method = 'krum' or 'multi_krum', not '{m}'")
        if self.keep is not None and m != "multi_krum":
            raise ValueError(f"keep applies to method = 'multi_krum', not '{m}'")
        if m == "mean" and self.max_update_norm is None:
            raise ValueError(
                "method = 'mean' without max_update_norm is plain aggregation; set "
                "max_update_norm, choose a robust method, or remove [robust]"
            )
        return self

    def check_in(self, run: RunConfig) -> None:
        """The server must see each update and aggregate it without DP-FedAvg's noise, and the
        method must fit the clients selected per round."""
        if run.secure_aggregation in ("secagg", "ckks"):
            raise ValueError(
                f"[robust] needs the server to see each update, which secure_aggregation = "
                f"'{run.secure_aggregation}' hides; use secure_aggregation = 'plain', or "
                "remove [robust]"
            )
        if run.privacy is not None and run.privacy.unit == "client":
            raise ValueError(
                "[robust] is not available with client-level [privacy]: DP-FedAvg's noise is "
                "calibrated to a sum of clipped updates, not to a robust estimate; remove one"
            )
        selected = sample_size(run.federation.fraction_fit, run.federation.clients)
        if self.byzantine is not None and selected < 2 * self.byzantine + 3:
            raise ValueError(
                f"robust.method = '{self.method}' with byzantine = {self.byzantine} needs at "
                f"least {2 * self.byzantine + 3} clients per round (n > 2f + 2), and {selected} "
                "are selected; lower byzantine or select more clients"
            )
        if (
            self.keep is not None
            and self.byzantine is not None
            and self.keep > selected - self.byzantine
        ):
            raise ValueError(
                f"robust.keep = {self.keep} exceeds the {selected} selected clients less "
                f"byzantine = {self.byzantine}; lower keep"
            )


class AttackConfig(Section):
    """Simulated malicious clients (`veil.federation.attacks`), for testing defences; simulation
    and Ray modes only. A fixed set of clients, drawn from the run's seed, misbehaves."""

    kind: Literal["sign_flip", "scale", "gaussian", "label_flip"]
    #: Fraction of all clients that are malicious (⌊fraction · clients⌋ of them).
    fraction: float = Field(gt=0, lt=1)
    #: sign_flip: send -scale·Δ (default 1); scale: scale·Δ (default 10); gaussian: noise of
    #: standard deviation scale (default 1).
    scale: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _scale_fits_the_kind(self) -> AttackConfig:
        if self.kind == "label_flip" and self.scale is not None:
            raise ValueError("scale does not apply to kind = 'label_flip'; remove it")
        return self

    def check_in(self, run: RunConfig) -> None:
        """Attackers are simulated clients, and the fraction must make at least one of them."""
        if run.mode not in SIMULATED_MODES:
            raise ValueError("[attack] simulates malicious clients in mode = 'simulation' or 'ray'")
        if self.kind == "label_flip" and run.data.resolved_task == "regression":
            raise ValueError(
                "attack kind = 'label_flip' flips class labels, and a regression target has "
                "none; use kind = 'sign_flip', 'scale' or 'gaussian'"
            )
        if count_of(self.fraction, run.federation.clients) < 1:
            raise ValueError(
                f"attack.fraction = {self.fraction} of {run.federation.clients} clients "
                "makes no client malicious; raise fraction"
            )


class StragglerConfig(Section):
    """Simulated stragglers (`veil.transport.simulated`): clients whose simulated training time
    exceeds the deadline are dropped from the round; simulation and Ray modes only."""

    #: Simulated seconds a round waits for results.
    deadline_s: float = Field(gt=0)
    #: Simulated seconds a client of median speed needs per training example and epoch.
    seconds_per_example: float = Field(0.001, gt=0)
    #: σ of the log of each client's persistent speed factor (0: all equally fast).
    speed_spread: float = Field(0.5, ge=0)
    #: σ of the log of a per-round slowdown factor (0: none).
    jitter: float = Field(0.0, ge=0)

    def check_in(self, run: RunConfig) -> None:
        """Simulated training time exists only where clients are simulated."""
        if run.mode not in SIMULATED_MODES:
            raise ValueError(
                "[stragglers] applies to mode = 'simulation' or 'ray'; a deployment drops late "
                "clients after deployment.round_deadline_s"
            )


class RayConfig(Section):
    """`mode = "ray"`: clients run on a Ray cluster in a fixed pool of worker actors."""

    #: None: start a local Ray instance for the run (stopped after it); "auto": join the
    #: cluster this machine belongs to; "ray://HOST:PORT": connect through Ray Client.
    address: str | None = None
    #: Worker actors in the pool, each training one client at a time (the bound on concurrent
    #: clients). None: as many as the cluster's CPUs allow (its CPUs / num_cpus).
    workers: int | None = Field(None, ge=1)
    #: Resources each worker reserves (one client trains at a time in a worker).
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    memory_mb: int | None = Field(None, ge=1)
    #: Clients one call to a worker trains before returning their updates.
    clients_per_task: int = Field(8, ge=1)
    #: A local instance only: the CPUs it offers (None: this machine's) and its object store.
    local_cpus: int | None = Field(None, ge=1)
    object_store_mb: int | None = Field(None, ge=80)

    @field_validator("workers", "local_cpus")
    @classmethod
    def _within_limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value > MAX_RAY_WORKERS:
            reason = f"far more than one Ray cluster runs; lower {info.field_name}"
            raise above_limit(MAX_RAY_WORKERS, str(info.field_name), reason)
        return value

    @model_validator(mode="after")
    def _local_keys_for_a_local_instance(self) -> RayConfig:
        if self.address is not None and (
            self.local_cpus is not None or self.object_store_mb is not None
        ):
            raise ValueError(
                "local_cpus and object_store_mb configure a local Ray instance; remove them, "
                "or remove address"
            )
        return self

    def check_in(self, run: RunConfig) -> None:
        """What mode = "ray" does not run in this version (checked whenever the mode is "ray",
        with or without a `[ray]` table)."""
        if run.mode != "ray":
            return
        if run.secure_aggregation in ("secagg", "ckks", "tee"):
            raise ValueError(
                f"secure_aggregation = '{run.secure_aggregation}' is not available with "
                "mode = 'ray' in this version; use mode = 'simulation' or 'deployment'"
            )
        if run.privacy is not None and run.privacy.unit == "record":
            raise ValueError(
                "record-level [privacy] is not available with mode = 'ray' in this version "
                "(each worker would need its own secure noise source); use unit = 'client', "
                "or mode = 'simulation'"
            )
