"""`[data]`: which data set, how it is split among the clients, and how features are scaled."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from veil.config.sections import Section

if TYPE_CHECKING:
    from veil.config.run import RunConfig

DatasetName = Literal[
    "breast_cancer",
    "digits",
    "german_credit",
    "csv",
    "synthetic_logistic",
    "synthetic_vehicle_faults",
    "synthetic_machine_failures",
    "vader_lexicon",
    "synthetic_reviews",
]
#: Data sets of texts, tokenised by the transformer's tokenizer (`veil.data.text`).
TEXT_DATASETS: tuple[str, ...] = ("vader_lexicon", "synthetic_reviews")

#: Default of `[data] max_classes`.
DEFAULT_MAX_CLASSES = 100
#: The largest `max_classes` accepted: the output layer has one unit per class.
MAX_MAX_CLASSES = 100_000


class PartitionConfig(Section):
    """How the training examples are split among the clients."""

    kind: Literal["iid", "dirichlet", "quantity"] = "iid"
    #: Concentration of the Dirichlet prior: small values give skewed clients.
    alpha: float = Field(0.5, gt=0)
    min_examples: int = Field(2, ge=1)


class FeatureBoundsConfig(Section):
    """Public, declared per-feature ranges: each value is clamped into [lower, upper] before
    training, and ``scaling = "bounds"`` maps it by (x - centre) / ((upper - lower) / 6) (the
    midpoint as centre maps the range onto [-3, 3]). A number applies to every feature; a list
    gives one per feature column, in order (after one-hot encoding). They must come from outside
    the private data (documentation, device ranges, domain knowledge)."""

    lower: float | list[float]
    upper: float | list[float]
    #: A typical value per feature, mapped to 0; default the midpoint of each range.
    centre: float | list[float] | None = None

    @model_validator(mode="after")
    def _ranges(self) -> FeatureBoundsConfig:
        given = {"lower": self.lower, "upper": self.upper, "centre": self.centre}
        lists = {k: v if isinstance(v, list) else [v] for k, v in given.items() if v is not None}
        if not all(lists.values()):
            raise ValueError("feature_bounds lower, upper and centre need at least one number")
        lengths = {len(v) for v in lists.values()} - {1}
        if len(lengths) > 1:
            counts = ", ".join(f"{len(v)} {k}" for k, v in lists.items())
            raise ValueError(
                f"feature_bounds has {counts} values; give one per feature (the same number "
                "in each list), or a single number for all"
            )
        if not all(math.isfinite(x) for v in lists.values() for x in v):
            raise ValueError("feature_bounds must be finite numbers")
        n = max(len(v) for v in lists.values())
        full = {k: v * n if len(v) == 1 else v for k, v in lists.items()}
        for j in range(n):
            lo, hi = full["lower"][j], full["upper"][j]
            if not lo < hi:
                raise ValueError(
                    f"feature_bounds: lower {lo:g} is not below upper {hi:g} (feature {j}); "
                    "give each feature a range with lower < upper"
                )
            if "centre" in full and not lo <= full["centre"][j] <= hi:
                raise ValueError(
                    f"feature_bounds: centre {full['centre'][j]:g} lies outside [{lo:g}, "
                    f"{hi:g}] (feature {j}); give a centre within each range"
                )
        return self


class DataConfig(Section):
    """Which data set, how it is split, and how features are scaled."""

    dataset: DatasetName
    #: CSV file (dataset = "csv" only); a relative path is relative to the config file.
    path: Path | None = None
    #: Target column of the CSV file.
    target: str | None = None
    #: Fraction held out as the server's test set, on which no client trains.
    test_fraction: float = Field(0.2, gt=0, lt=1)
    #: Fraction of each client's examples kept for its local (federated) evaluation.
    validation_fraction: float = Field(0.2, ge=0, lt=1)
    #: "bounds": clamp into the declared feature bounds, then a fixed affine map (the scaling
    #: [privacy] accepts besides "none"); "federated" / "local":
    #: standardisation fitted on the clients' records; "none": raw values.
    scaling: Literal["federated", "local", "none", "bounds"] = "federated"
    #: Public per-feature ranges; default: those the data set's schema declares (if any).
    #: Declared bounds clamp every value before scaling, whatever the scaling.
    feature_bounds: FeatureBoundsConfig | None = None
    partition: PartitionConfig = PartitionConfig()
    #: The most classes a classification target may have: a target column with more distinct
    #: values is refused when the data is loaded (it is likely a continuous, regression target).
    max_classes: int = Field(DEFAULT_MAX_CLASSES, ge=2, le=MAX_MAX_CLASSES)

    @model_validator(mode="after")
    def _csv_needs_path_and_target(self) -> DataConfig:
        if self.dataset == "csv":
            if self.path is None:
                raise ValueError("dataset = 'csv' needs path = 'FILE.csv' in [data]")
            if not self.target:
                raise ValueError("dataset = 'csv' needs target = 'COLUMN' in [data]")
            if not self.path.is_file():
                raise ValueError(
                    f"data file not found: '{self.path}' (resolved to '{self.path.resolve()}'); "
                    "check [data].path, which is relative to the config file"
                )
        elif self.path is not None or self.target is not None:
            raise ValueError(f"path and target are for dataset = 'csv', not '{self.dataset}'")
        return self

    def check_in(self, run: RunConfig) -> None:
        """A text data set gives token ids: they need the transformer and no scaling."""
        if self.dataset not in TEXT_DATASETS:
            return
        if run.model.name != "transformer":
            raise ValueError(
                f"dataset = '{self.dataset}' holds texts: use [model] name = 'transformer'"
            )
        if self.scaling != "none":
            raise ValueError(
                f"dataset = '{self.dataset}' gives token ids, which must not be scaled: "
                "set [data] scaling = 'none'"
            )
