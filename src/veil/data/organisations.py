"""One data file per organisation, each encoded by the federation's data contract.

Each organisation holds its own table (CSV or Parquet, `veil.data.contract.read_table`); it
checks it against the agreed `DataSchema` (every violation is reported with its column, row
and value, and nothing is encoded when there is one), encodes it with `encode` (a function of
the schema and of each row alone: no statistic of anyone's data) and keeps a share of its own
rows for its local validation. The coordinator holds no training data: what it needs of the
data (the encoded layout, the classes) follows from the schema alone (`coordinator_data`), and a
held-out evaluation file is optional.

The same functions serve a simulation (`organisations_data`: every organisation's file on one
machine) and a deployment member (`member_data`: its own file only), so both encode and split
a given file identically.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np

from veil.data.contract import DataSchema, Violation, check_frame, encode, feature_names, read_table
from veil.data.dataset import Dataset
from veil.data.federated import ClientData, FederatedData, validation_split
from veil.errors import DataError

__all__ = [
    "MAX_LISTED",
    "SchemaViolations",
    "contract_dataset",
    "coordinator_data",
    "declared_member",
    "load_encoded",
    "member_data",
    "organisations_data",
]

#: At most this many violations are listed in one error; the rest are counted.
MAX_LISTED: Final[int] = 20


class SchemaViolations(DataError):
    """A data file that breaks the data contract: each violation on its own line (column, row,
    value), at most `MAX_LISTED`, then how many more."""

    def __init__(self, path: Path, violations: Sequence[Violation]) -> None:
        self.path = path
        self.violations = list(violations)
        shown = [f"  {v}" for v in self.violations[:MAX_LISTED]]
        more = len(self.violations) - len(shown)
        lines = [
            f"'{path}' violates the data schema ({len(self.violations)} "
            f"violation{'s' if len(self.violations) != 1 else ''}); nothing was trained:",
            *shown,
            *([f"  ... and {more} more"] if more > 0 else []),
            f"fix the file (or the schema, if the federation agrees) and check it with "
            f"`veil schema check SCHEMA {path}`",
        ]
        super().__init__("\n".join(lines))


def load_encoded(schema: DataSchema, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """`path` read, checked against `schema` and encoded: ``(X, y)``.

    Raises:
        SchemaViolations: If any row or column breaks the schema (all of them listed).
        DataError: If the file cannot be read.
    """
    frame = read_table(path)
    violations = check_frame(schema, frame)
    if violations:
        raise SchemaViolations(path, violations)
    return encode(schema, frame)


@dataclass(frozen=True)
class _Shape:
    n_features: int
    n_classes: int
    feature_names: tuple[str, ...]
    class_names: tuple[str, ...]


def _shape(schema: DataSchema) -> _Shape:
    names = tuple(feature_names(schema))
    classes = tuple(schema.classes)
    # A regression target has one model output.
    return _Shape(len(names), len(classes) if classes else 1, names, classes)


def member_data(
    schema: DataSchema, name: str, path: Path, *, validation_fraction: float, seed: int
) -> ClientData:
    """Organisation `name`'s own data from its file: encoded by `schema`, its rows split into
    training and validation (stratified, `validation_fraction` of them; the split is
    determined by `seed` and `name`, so a member and a simulation of it split alike).

    Raises:
        SchemaViolations: If the file breaks the schema.
        DataError: If the file cannot be read or holds no row to train on.
    """
    x, y = load_encoded(schema, path)
    if x.shape[0] == 0:
        raise DataError(f"'{path}' holds no data rows; organisation '{name}' has nothing to train")
    rng = np.random.default_rng([seed, _name_key(name)])
    labels = y if y.dtype == np.int64 else np.zeros(y.shape[0], np.int64)
    train, val = validation_split(labels, validation_fraction, rng)
    return ClientData(name, x[train], y[train], x[val], y[val], file=Path(path).name)


def _name_key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")


def organisations_data(
    schema: DataSchema,
    files: Mapping[str, Path],
    *,
    test: Path | None,
    validation_fraction: float,
    seed: int,
    dataset_name: str = "organisations",
) -> FederatedData:
    """Every organisation's data from its own file (a simulation of `member_data` on each),
    with the held-out evaluation file `test` (None: no held-out test set; the run then reports
    the members' federated evaluation)."""
    if not files:
        raise DataError("no organisation files: give [data] organisations = {NAME = 'FILE', ...}")
    clients = [
        member_data(schema, name, Path(path), validation_fraction=validation_fraction, seed=seed)
        for name, path in files.items()
    ]
    return coordinator_data(schema, clients, test=test, dataset_name=dataset_name)


def coordinator_data(
    schema: DataSchema,
    members: Sequence[ClientData],
    *,
    test: Path | None,
    dataset_name: str = "organisations",
) -> FederatedData:
    """The `FederatedData` of a federation whose layout is `schema`'s: the members given (a
    deployment coordinator's hold no rows, only each member's declared size) and the held-out
    evaluation file `test`, encoded by the schema (None: an empty test set)."""
    shape = _shape(schema)
    if test is not None:
        x_test, y_test = load_encoded(schema, test)
    else:
        x_test = np.zeros((0, shape.n_features), np.float32)
        y_test = np.zeros(0, np.float32 if schema.task == "regression" else np.int64)
    return FederatedData(
        dataset_name=dataset_name,
        synthetic=False,
        n_features=shape.n_features,
        n_classes=shape.n_classes,
        image_shape=None,
        feature_names=shape.feature_names,
        class_names=shape.class_names,
        clients=list(members),
        x_test=x_test,
        y_test=y_test,
        # Encoding clamps into the declared bounds and scales by them: nothing more is fitted.
        scaling="bounds",
        task="regression" if schema.task == "regression" else "classification",
    )


def declared_member(
    name: str, width: int, rows: int, *, validation: int = 0, file: str | None = None
) -> ClientData:
    """A member as the coordinator knows it: its name and the row counts it declared when it
    joined (labels of zeros stand in for the counts), no features."""
    empty = np.zeros((0, width), np.float32)
    return ClientData(
        name, empty, np.zeros(rows, np.int64), empty, np.zeros(validation, np.int64), file=file
    )


def contract_dataset(schema: DataSchema, path: Path) -> Dataset:
    """One file (of one party, split later among simulated clients) checked and encoded by
    `schema`: a `Dataset` whose features are already clamped and scaled by the schema's
    declared bounds."""
    x, y = load_encoded(schema, path)
    shape = _shape(schema)
    return Dataset(
        name=Path(path).stem,
        features=x,
        labels=y,
        feature_names=shape.feature_names,
        class_names=shape.class_names,
        task="regression" if schema.task == "regression" else "classification",
    )
