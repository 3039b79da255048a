"""`[model.trees]`: federated gradient-boosted trees (`[model] name = "gradient_boosting"`).

One boosting round grows one tree (one per class for more than two classes); each tree level's
gradient and hessian histograms are summed over the members by the run's secure aggregation
(docs/trees.md). The keys follow XGBoost's names where XGBoost has one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from veil.config.data import TEXT_DATASETS
from veil.config.sections import Section

if TYPE_CHECKING:
    from veil.config.run import RunConfig

#: The secure-aggregation backends the trees' histograms can be summed with.
TREE_AGGREGATIONS: tuple[str, ...] = ("plain", "secagg")


class TreesConfig(Section):
    """Histogram-based gradient boosting across the members (docs/trees.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    #: Boosting rounds (trees per class); default `[federation] rounds`, which it must equal
    #: when both are given (one round of the run is one tree).
    n_trees: int | None = Field(None, ge=1, le=10_000)
    #: Levels per tree (XGBoost's `max_depth`); a level is one secure sum of histograms.
    max_depth: int = Field(3, ge=1, le=12)
    #: Equal-width bins per feature over its declared bounds (XGBoost's `max_bin`).
    max_bins: int = Field(32, ge=2, le=1024)
    #: Shrinkage η of every leaf weight (XGBoost's `eta`).
    learning_rate: float = Field(0.3, gt=0, le=1)
    #: L2 regularisation λ of the leaf weights (XGBoost's `lambda`).
    reg_lambda: float = Field(1.0, alias="lambda", ge=0, allow_inf_nan=False)
    #: The least loss change a split must make (XGBoost's `gamma`, `min_split_loss`).
    gamma: float = Field(0.0, ge=0, allow_inf_nan=False)
    #: The least hessian sum of a child (XGBoost's `min_child_weight`).
    min_child_weight: float = Field(1.0, ge=0, allow_inf_nan=False)
    #: Every member clips each gradient to [-gradient_clip, gradient_clip] (the bound the
    #: secure sum and DP rely on). Default 1 for classification (the loss's own bound: no
    #: effect) and 6 for squared loss on the target mapped by its declared bounds.
    gradient_clip: float | None = Field(None, gt=0, le=1e6, allow_inf_nan=False)
    #: DP on the histograms: the noise's standard deviation is this times the histograms'
    #: L2 sensitivity to one record; absent, no DP.
    noise_multiplier: float | None = Field(None, gt=0, le=1e6, allow_inf_nan=False)
    #: The δ at which ε is reported under DP.
    delta: float = Field(1e-5, gt=0, lt=1)

    def resolved_trees(self, rounds: int) -> int:
        """The number of boosting rounds: `n_trees`, else `[federation] rounds`."""
        return self.n_trees if self.n_trees is not None else rounds

    def check_in(self, run: RunConfig) -> None:
        """Trees run in simulation, sum with "plain" or "secagg", take their DP from this
        table (not `[privacy]`), bin unscaled features, and train no neural network parts."""
        if self.n_trees is not None and self.n_trees != run.federation.rounds:
            raise ValueError(
                f"[model.trees] n_trees = {self.n_trees} and [federation] rounds = "
                f"{run.federation.rounds} differ: one round grows one tree; give one of them, "
                "or the same number"
            )
        if run.mode != "simulation":
            raise ValueError(
                "[model] name = 'gradient_boosting' runs in mode = 'simulation' in this version"
            )
        if run.secure_aggregation not in TREE_AGGREGATIONS:
            raise ValueError(
                f"gradient_boosting sums histograms with secure_aggregation = 'secagg' or "
                f"'plain', not '{run.secure_aggregation}'"
            )
        if run.privacy is not None:
            raise ValueError(
                "gradient_boosting takes its DP from [model.trees] noise_multiplier and delta; "
                "remove [privacy]"
            )
        for name in ("robust", "attack", "compression", "stragglers"):
            if getattr(run, name) is not None:
                raise ValueError(f"gradient_boosting does not use [{name}]; remove it")
        if run.data.scaling not in ("none", "bounds"):
            raise ValueError(
                "gradient_boosting bins each feature over its declared bounds: set [data] "
                "scaling = 'none' (or 'bounds')"
            )
        if run.secagg is not None and _changed(run.secagg, ("clip_range", "max_weight")):
            raise ValueError(
                "gradient_boosting sets [secagg] clip_range and max_weight itself (from the "
                "gradient clip and the members' row counts); remove them"
            )
        if run.data.dataset in TEXT_DATASETS:
            raise ValueError("gradient_boosting needs tabular features, not a text data set")
        if run.federation.simulated_dropout:
            raise ValueError("gradient_boosting does not simulate dropouts; remove it")


def _changed(section: BaseModel, names: tuple[str, ...]) -> bool:
    """Whether any of `names` differs from its default in `section` (compared with the default,
    not with the keys written, so that a config dumped whole by `RunConfig.to_dict` is accepted
    again)."""
    fields = type(section).model_fields
    return any(getattr(section, name) != fields[name].default for name in names)
