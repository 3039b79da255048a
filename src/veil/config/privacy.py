"""`[privacy]`: differential privacy, its unit, target and ledger, and what it refuses."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, model_validator

from veil.config.sections import Section

if TYPE_CHECKING:
    from veil.config.run import RunConfig


class PrivacyConfig(Section):
    """Differential privacy: the unit protected, the target (ε, δ), the mechanism, the ledger.

    `unit = "record"`: every organisation runs DP-SGD on its own records (Abadi et al. 2016) and
    is accounted separately. `unit = "client"`: DP-FedAvg (McMahan et al. 2018) protects whole
    organisations: updates are clipped on the clients and noised once on the server.
    """

    unit: Literal["record", "client"]
    epsilon: float = Field(gt=0)
    delta: float = Field(gt=0, lt=1)
    #: σ, the noise standard deviation in units of the clipping norm, or "calibrate" to take the
    #: smallest σ whose accounted ε meets the target.
    noise_multiplier: Annotated[float, Field(gt=0)] | Literal["calibrate"] = "calibrate"
    #: C: per-example gradient norm bound (record) or per-client update norm bound (client).
    clip_norm: float = Field(1.0, gt=0)
    #: Client level only: adapt C towards this quantile of update norms (Andrew et al. 2021).
    target_quantile: float | None = Field(None, gt=0, lt=1)
    clip_learning_rate: float = Field(0.2, gt=0)
    #: Noise on the count of unclipped clients; default: expected clients per round / 20.
    clip_count_stddev: float | None = Field(None, gt=0)
    neighbouring: Literal["add_or_remove", "replace"] = "add_or_remove"
    #: Production mode refuses seeded noise. Only tests turn it off.
    production: bool = True
    #: Tests only: a seed for the noise and sampling randomness (refused in production mode).
    noise_seed: int | None = Field(None, ge=0)
    #: SQLite privacy ledger to charge before the run starts (relative to the config file).
    ledger: Path | None = None
    #: The data set's id in the ledger (default: the run's name); record level charges
    #: "ID/CLIENT" for each organisation.
    dataset_id: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> PrivacyConfig:
        if self.unit == "record" and self.target_quantile is not None:
            raise ValueError(
                "target_quantile (adaptive clipping) applies to unit = 'client'; "
                "remove it or use unit = 'client'"
            )
        if self.production and self.noise_seed is not None:
            raise ValueError(
                "noise_seed is refused in production mode: seeded noise can be reproduced and "
                "removed; remove noise_seed, or set production = false for a test run"
            )
        return self

    def check_in(self, run: RunConfig) -> None:
        """Refuse what would release the clients' data outside the DP guarantee: scaling fitted
        on their records, and exact federated evaluation metrics."""
        if run.data.scaling == "federated":
            raise ValueError(
                "data.scaling = 'federated' sends exact per-client feature sums, which the "
                "differential-privacy guarantee does not cover; with [privacy] set "
                "scaling = 'bounds' (declared public ranges: the data set's, or [data] "
                "feature_bounds = {lower = [...], upper = [...]}) or 'none'"
            )
        if run.data.scaling == "local":
            raise ValueError(
                "data.scaling = 'local' fits each client's scaler on its private records, "
                "so one record moves every other record's inputs, which the "
                "differential-privacy guarantee does not cover; with [privacy] set "
                "scaling = 'bounds' (declared public ranges: the data set's, or [data] "
                "feature_bounds = {lower = [...], upper = [...]}) or 'none'"
            )
        if run.federation.fraction_evaluate > 0 and run.data.validation_fraction > 0:
            raise ValueError(
                "federated evaluation releases exact metrics of the clients' validation "
                "records, which [privacy] does not cover; set federation.fraction_evaluate "
                "= 0 or data.validation_fraction = 0"
            )
