"""`[data]`: which data set, how it is split among the clients, and how features are scaled."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from veil.config.sections import Section

if TYPE_CHECKING:
    from veil.config.run import RunConfig
    from veil.data.contract import DataSchema

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
    "diabetes",
    "synthetic_instructions",
    "instructions",
]
#: Data sets of texts, tokenised by the transformer's tokenizer (`veil.data.text`).
TEXT_DATASETS: tuple[str, ...] = ("vader_lexicon", "synthetic_reviews")
#: Instruction pairs for a causal language model (`veil.data.instructions`): the SYNTHETIC
#: built-in set, or one JSON Lines file per organisation (`organisations`).
INSTRUCTION_DATASETS: tuple[str, ...] = ("synthetic_instructions", "instructions")
#: The built-in data sets whose target is real-valued: their task is "regression".
REGRESSION_DATASETS: tuple[str, ...] = ("diabetes",)

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


#: An organisation's name: what its certificate names (`veil.crypto.pki`).
_ORGANISATION = re.compile(r"[A-Za-z0-9._-]{1,64}")


class TargetBoundsConfig(Section):
    """A regression target's public, declared range (documentation, domain knowledge; not
    computed from the records): the model predicts ``(y - centre) / ((upper - lower) / 6)``,
    and predictions are mapped back before they are scored (docs/regression.md)."""

    lower: float
    upper: float

    @model_validator(mode="after")
    def _range(self) -> TargetBoundsConfig:
        if not (math.isfinite(self.lower) and math.isfinite(self.upper)):
            raise ValueError("target_bounds lower and upper must be finite numbers")
        if not self.lower < self.upper:
            raise ValueError(
                f"target_bounds: lower {self.lower:g} is not below upper {self.upper:g}"
            )
        return self


class DataConfig(Section):
    """Which data set, how it is split, and how features are scaled."""

    dataset: DatasetName
    #: CSV file (dataset = "csv" only); a relative path is relative to the config file.
    path: Path | None = None
    #: Target column of the CSV file (not with `schema_file`, which names it).
    target: str | None = None
    #: The federation's data contract (`veil schema infer`): every file is checked against it
    #: and encoded by it alone (dataset = "csv" only). Scaling is then the schema's bounds.
    schema_file: Path | None = None
    #: One data file (CSV or Parquet) per organisation, by name: {bank_a = "bank_a.csv", ...}
    #: (dataset = "csv" with `schema_file`). In a deployment each member gives its own file
    #: (`veil client --data`) and the coordinator reads none of them. dataset = "instructions":
    #: one JSON Lines file of {"instruction", "response"} (or {"text"}) objects per organisation.
    organisations: dict[str, Path] | None = None
    #: A held-out evaluation file (with `schema_file`), read by the coordinator only; without
    #: it the run is evaluated by the members on their own validation rows.
    test_file: Path | None = None
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
    #: "classification" or "regression"; default the data set's own (regression for diabetes).
    #: Only dataset = "csv" chooses: "regression" trains on its numeric target column's values.
    task: Literal["classification", "regression"] | None = None
    #: Regression: the target's public range, fixing the model's output scale; default the
    #: data set's declared one (diabetes), else none (the model predicts the raw target).
    target_bounds: TargetBoundsConfig | None = None

    @property
    def resolved_task(self) -> Literal["classification", "regression"]:
        """The run's task: `task` if given, else the data contract's (`schema_file`: its task
        "regression", or classification for "binary" and "multiclass"), else the data set's
        own. A contract that cannot be read counts as classification here (`_csv_sources`
        reports it)."""
        if self.task is not None:
            return self.task
        if self.schema_file is not None:
            from veil.errors import DataError

            try:
                schema = self.contract()
            except (DataError, OSError):
                return "classification"
            regression = schema is not None and schema.task == "regression"
            return "regression" if regression else "classification"
        return "regression" if self.dataset in REGRESSION_DATASETS else "classification"

    @model_validator(mode="after")
    def _task_fits_the_dataset(self) -> DataConfig:
        own = "regression" if self.dataset in REGRESSION_DATASETS else "classification"
        if self.task is not None and self.dataset != "csv" and self.task != own:
            raise ValueError(
                f"dataset = '{self.dataset}' is a {own} data set: remove task = '{self.task}' "
                "(only dataset = 'csv' chooses its task)"
            )
        if self.target_bounds is not None and self.resolved_task != "regression":
            raise ValueError(
                "target_bounds apply to a regression target: remove it, or set task = "
                "'regression' for a CSV whose target is a number"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _schema_scales_by_bounds(cls, data: Any) -> Any:
        # A schema's encoding clamps into and scales by its declared bounds: that is the
        # scaling unless the file says otherwise (and `_csv_sources` refuses any other).
        if isinstance(data, dict) and data.get("schema_file") and "scaling" not in data:
            return {**data, "scaling": "bounds"}
        # Token ids are never scaled: instruction data sets default to "none".
        if isinstance(data, dict) and data.get("dataset") in INSTRUCTION_DATASETS:
            return {"scaling": "none", **data}
        return data

    @model_validator(mode="after")
    def _csv_sources(self) -> DataConfig:
        if self.dataset == "instructions":
            self._check_instruction_files()
            return self
        if self.dataset != "csv":
            given = [k for k in ("path", "target", "schema_file", "organisations", "test_file")
                     if getattr(self, k) is not None]  # fmt: skip
            if given:
                raise ValueError(f"{', '.join(given)}: for dataset = 'csv', not '{self.dataset}'")
            return self
        if self.schema_file is not None:
            self._check_schema_sources()
            return self
        if self.organisations is not None or self.test_file is not None:
            raise ValueError(
                "organisations and test_file need a data contract: add schema_file = "
                "'schema.toml' to [data] (write one with `veil schema infer FILE.csv`)"
            )
        if self.path is None:
            raise ValueError("dataset = 'csv' needs path = 'FILE.csv' in [data]")
        if not self.target:
            raise ValueError("dataset = 'csv' needs target = 'COLUMN' in [data]")
        _must_exist(self.path, "[data].path")
        return self

    def _check_instruction_files(self) -> None:
        given = [k for k in ("path", "target", "schema_file", "test_file") if getattr(self, k)]
        if given:
            raise ValueError(f"{', '.join(given)}: not for dataset = 'instructions'")
        if not self.organisations:
            raise ValueError(
                "dataset = 'instructions' needs organisations = {NAME = 'FILE.jsonl', ...}: one "
                "JSON Lines file of instruction pairs per organisation"
            )
        for name, path in self.organisations.items():
            if not _ORGANISATION.fullmatch(name):
                raise ValueError(
                    f"organisation name {name!r}: use 1 to 64 letters, digits, '.', '_' or '-'"
                )
            _must_exist(path, f"[data].organisations.{name}")

    def _check_schema_sources(self) -> None:
        assert self.schema_file is not None
        _must_exist(self.schema_file, "[data].schema_file")
        if self.target is not None:
            raise ValueError("the data schema names the target: remove target from [data]")
        if self.scaling not in ("bounds", "none"):
            raise ValueError(
                f"scaling = '{self.scaling}' with a data schema: the schema's encoding already "
                "clamps and scales by its declared bounds; remove scaling (or set 'bounds')"
            )
        if (self.organisations is None) == (self.path is None):
            raise ValueError(
                "with schema_file, give either organisations = {NAME = 'FILE.csv', ...} (one "
                "file per organisation) or path = 'FILE.csv' (one file split among the clients)"
            )
        if self.organisations is not None:
            if not self.organisations:
                raise ValueError("organisations is empty: name at least one organisation's file")
            for name in self.organisations:
                if not _ORGANISATION.fullmatch(name):
                    raise ValueError(
                        f"organisation name {name!r}: use 1 to 64 letters, digits, '.', '_' or "
                        "'-' (it is the name in the organisation's certificate)"
                    )
        if self.path is not None:
            _must_exist(self.path, "[data].path")
        from veil.errors import DataError

        try:
            schema = self.contract()
        except DataError as exc:  # every process needs the contract: refuse it at load
            raise ValueError(str(exc)) from None
        if schema is not None and len(schema.classes) > self.max_classes:
            raise ValueError(
                f"the data schema's target {schema.target!r} declares {len(schema.classes)} "
                f"classes, more than max_classes = {self.max_classes}: it may be a regression "
                "target (task = 'regression' in the schema); or raise [data] max_classes if "
                "these really are classes"
            )

    def contract(self) -> DataSchema | None:
        """The data contract `schema_file` names, read and validated (None without one)."""
        if self.schema_file is None:
            return None
        from veil.data.contract import load_schema

        return load_schema(self.schema_file)

    def check_in(self, run: RunConfig) -> None:
        """One client per organisation file; a text data set gives token ids: they need the
        transformer and no scaling."""
        if self.organisations is not None and len(self.organisations) != run.federation.clients:
            raise ValueError(
                f"[data] organisations names {len(self.organisations)} organisations but "
                f"[federation] clients = {run.federation.clients}; set clients = "
                f"{len(self.organisations)}"
            )
        if self.dataset in INSTRUCTION_DATASETS and self.scaling != "none":
            raise ValueError(
                f"dataset = '{self.dataset}' gives token ids, which must not be scaled: remove "
                "scaling (or set 'none')"
            )
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


def _must_exist(path: Path, key: str) -> None:
    if not path.is_file():
        raise ValueError(
            f"file not found: '{path}' (resolved to '{path.resolve()}'); check {key}, which is "
            "relative to the config file"
        )
