"""The data contract: one schema file that every organisation of a federation agrees on.

A `DataSchema` declares the feature columns in order, each with a type (``numeric`` with
declared ``lower``/``upper`` bounds, ``categorical`` with its ``categories``, ``boolean``) and a
missing-value policy, the ``target`` column with the ``task`` (and, for a classification, its
``classes``), and the ``identifiers`` to drop. Encoding (`encode`) is a pure function of the
schema and of one row at a time: one-hot by the declared categories in declared order, booleans
0/1, numerics clamped into the declared bounds and scaled by them (the ``scaling = "bounds"``
map of `FeatureBounds`). Every organisation therefore encodes its own file into the same
column layout, and no statistic of anyone's data is needed.

Missing-value policies (``missing`` of a column):

- ``refuse`` (the default): a missing value is a violation; nothing is encoded.
- ``constant``: a missing value is replaced by the column's declared ``fill`` (a number within
  the bounds, one of the categories, or true/false).
- ``default``: a missing value is encoded as the column's neutral value: a numeric column's
  declared centre (the midpoint of its bounds, which scales to 0), a categorical column's
  all-zero one-hot (no category), a boolean column's false (0).

A cell is missing when it is empty or only whitespace (or NaN/None in a frame that is not all
strings); every other cell is compared with its surrounding whitespace removed. A missing target
is always a violation.

Rows are numbered as a person sees them in a spreadsheet: "row 1" is the first data row, so
"row N" is line N + 1 of a CSV file whose header is its first line.

The file format is TOML (`load_schema` / `save_schema`); `schema_hash` is the SHA-256 of a
canonical JSON form, for the federation's join-time agreement. `infer_schema` proposes a schema
from one organisation's file; its bounds and categories are that file's, a local choice that the
proposer must review before the federation adopts it.
"""

from __future__ import annotations

import hashlib
import json
import math
import textwrap
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Final, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from veil.errors import DataError

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "REVIEW_NOTICE",
    "BooleanColumn",
    "CategoricalColumn",
    "Column",
    "DataSchema",
    "NumericColumn",
    "Violation",
    "check_frame",
    "dumps_schema",
    "encode",
    "feature_names",
    "infer_schema",
    "load_schema",
    "read_table",
    "save_schema",
    "schema_hash",
]

Task = Literal["binary", "multiclass", "regression"]
Missing = Literal["refuse", "constant", "default"]

REVIEW_NOTICE: Final[str] = (
    "The bounds and categories below were read from ONE organisation's file ({source}); "
    "they are a local choice: review them (widen bounds to the public, documented range of "
    "each column, add categories other organisations may hold) before the federation adopts "
    "this schema."
)

MAX_INFERRED_CLASSES: Final[int] = 20
"""`infer_schema` reads a target with at most this many distinct integer or text values as a
classification target, and any other target as a regression target."""

MIN_IDENTIFIER_ROWS: Final[int] = 10
"""`infer_schema` takes a column as an identifier only in a file with at least this many rows
(in a tiny file every column is unique per row)."""

_TRUE: Final = frozenset({"true", "1", "1.0", "yes"})
_FALSE: Final = frozenset({"false", "0", "0.0", "no"})


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _ColumnBase(_Model):
    name: str = Field(min_length=1)
    missing: Missing = "refuse"

    def _check_fill(self, fill: object) -> None:
        if self.missing == "constant" and fill is None:
            raise ValueError(f"column {self.name!r}: missing = 'constant' needs a fill value")
        if self.missing != "constant" and fill is not None:
            raise ValueError(
                f"column {self.name!r}: fill is only used with missing = 'constant'; remove it"
            )


class NumericColumn(_ColumnBase):
    """A number in the declared range ``[lower, upper]`` (values outside are violations)."""

    type: Literal["numeric"] = "numeric"
    lower: float
    upper: float
    fill: float | None = None

    @model_validator(mode="after")
    def _valid(self) -> NumericColumn:
        if not (math.isfinite(self.lower) and math.isfinite(self.upper)):
            raise ValueError(f"column {self.name!r}: bounds must be finite numbers")
        if not self.lower < self.upper:
            raise ValueError(
                f"column {self.name!r}: lower = {self.lower:g} is not below upper = "
                f"{self.upper:g}; declare a range with lower < upper"
            )
        self._check_fill(self.fill)
        if self.fill is not None and not self.lower <= self.fill <= self.upper:
            raise ValueError(f"column {self.name!r}: fill {self.fill:g} lies outside the bounds")
        return self


class CategoricalColumn(_ColumnBase):
    """One of the declared `categories` (text, compared exactly after trimming whitespace)."""

    type: Literal["categorical"] = "categorical"
    categories: list[str] = Field(min_length=1)
    fill: str | None = None

    @model_validator(mode="after")
    def _valid(self) -> CategoricalColumn:
        if len(set(self.categories)) != len(self.categories):
            raise ValueError(f"column {self.name!r}: categories must be distinct")
        for category in self.categories:
            if not category or category != category.strip():
                raise ValueError(
                    f"column {self.name!r}: category {category!r} is empty or has surrounding "
                    "whitespace, which no cell can match"
                )
        self._check_fill(self.fill)
        if self.fill is not None and self.fill not in self.categories:
            raise ValueError(f"column {self.name!r}: fill {self.fill!r} is not a category")
        return self


class BooleanColumn(_ColumnBase):
    """true/false, written true, false, yes, no, 1 or 0 (any case)."""

    type: Literal["boolean"] = "boolean"
    fill: bool | None = None

    @model_validator(mode="after")
    def _valid(self) -> BooleanColumn:
        self._check_fill(self.fill)
        return self


Column = Annotated[NumericColumn | CategoricalColumn | BooleanColumn, Field(discriminator="type")]


class DataSchema(_Model):
    """The federation's data contract (see the module docstring).

    Attributes:
        target: The label column.
        task: ``binary``, ``multiclass`` or ``regression``.
        classes: The target's values in class order (2 for binary, >= 3 for multiclass; none
            for regression): class k is encoded as k.
        columns: The feature columns, in the order of the encoded layout.
        identifiers: Columns that are dropped (record ids, names).
    """

    target: str = Field(min_length=1)
    task: Task
    classes: list[str] = Field(default_factory=list)
    columns: list[Column] = Field(min_length=1)
    identifiers: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _valid(self) -> DataSchema:
        names = [c.name for c in self.columns]
        seen: set[str] = set()
        for name in [*names, self.target, *self.identifiers]:
            if name in seen:
                raise ValueError(f"column {name!r} is declared more than once")
            seen.add(name)
        if self.task == "regression" and self.classes:
            raise ValueError("a regression target has no classes; remove 'classes'")
        if self.task == "binary" and len(self.classes) != 2:
            raise ValueError(f"a binary target needs 2 classes, got {len(self.classes)}")
        if self.task == "multiclass" and len(self.classes) < 3:
            raise ValueError(
                f"a multiclass target needs at least 3 classes, got {len(self.classes)}"
            )
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("the target's classes must be distinct")
        return self


def schema_hash(schema: DataSchema) -> str:
    """SHA-256 (hex) of the schema's canonical JSON: equal for equal contracts, whatever the
    file's layout or comments."""
    canonical = json.dumps(
        schema.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=True
    )
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def load_schema(path: Path) -> DataSchema:
    """Read a schema TOML file.

    Raises:
        DataError: If the file is missing, not TOML, or not a valid schema (one line).
    """
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(
            f"schema file '{path}' not found; write one with `veil schema infer`"
        ) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"schema file '{path}' is not valid TOML: {exc}") from None
    try:
        return DataSchema.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        raise DataError(f"schema file '{path}': {where + ': ' if where else ''}{msg}") from None


def _toml_str(value: str) -> str:
    # JSON's escapes (\" \\ \n \uXXXX ...) are all valid in TOML basic strings; DEL, which
    # JSON leaves raw but TOML forbids, is escaped too. Non-ASCII stays as UTF-8 (JSON's
    # surrogate-pair escapes are not valid TOML).
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def dumps_schema(schema: DataSchema, *, comment: str = "") -> str:
    """The schema as TOML text (``# comment`` lines first); `load_schema` reads it back equal."""
    lines = [
        f"# {wrapped}".rstrip()
        for line in comment.splitlines()
        for wrapped in (textwrap.wrap(line, 96) or [""])
    ]
    if lines:
        lines.append("")
    data = schema.model_dump(mode="python")
    for key in ("target", "task", "classes", "identifiers"):
        lines.append(f"{key} = {_toml_value(data[key])}")
    for column in data["columns"]:
        lines += ["", "[[columns]]"]
        for key, value in sorted(column.items(), key=lambda kv: kv[0] not in ("name", "type")):
            if value is not None:
                lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def save_schema(schema: DataSchema, path: Path, *, comment: str = "") -> None:
    """Write `schema` to `path` as TOML, with `comment` as ``#`` lines at the top."""
    Path(path).write_text(dumps_schema(schema, comment=comment), encoding="utf-8")


def read_table(path: Path) -> pd.DataFrame:
    """A CSV or Parquet file (by its suffix: ``.parquet`` / ``.pq``) with every cell as the
    string written in it (no NA guessing, no types), so that a typo such as ``thirty`` in a
    numeric column is seen as written. A Parquet null, like an empty CSV cell, is a missing
    value.

    Raises:
        DataError: If the file is missing or not a readable CSV or Parquet file.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file '{path}' not found")
    if path.suffix.lower() in PARQUET_SUFFIXES:
        return _read_parquet(path)
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"data file '{path}' is not a readable CSV: {exc}") from None


#: File suffixes read as Parquet; any other file is read as CSV.
PARQUET_SUFFIXES = (".parquet", ".pq")


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"reading '{path}' needs pyarrow: pip install 'veil[parquet]' (or give a CSV file)"
        ) from None
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"data file '{path}' is not a readable Parquet file: {exc}") from None
    frame = table.to_pandas()
    # Cells as text, as a CSV's would be: nulls become empty (missing) cells.
    return frame.apply(lambda col: [_parquet_text(v) for v in col]).astype(str)


def _parquet_text(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _cells(frame: pd.DataFrame, column: str) -> list[str | None]:
    """The column's cells as trimmed strings, None where missing."""
    out: list[str | None] = []
    for value in frame[column].tolist():
        if value is None or (isinstance(value, float) and math.isnan(value)):
            out.append(None)
            continue
        text = str(value).strip()
        out.append(text or None)
    return out


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _boolean(text: str) -> bool | None:
    low = text.lower()
    return True if low in _TRUE else False if low in _FALSE else None


@dataclass(frozen=True)
class Violation:
    """One way a frame breaks the schema. `row` is the 1-based data row (None for a whole
    column); `value` the cell as written (None for a missing column or value)."""

    column: str
    row: int | None
    value: str | None
    problem: str

    def __str__(self) -> str:
        if self.row is None:
            return f"column {self.column!r} {self.problem}"
        what = f"{self.value!r} {self.problem}" if self.value is not None else self.problem
        return f"column {self.column!r}, row {self.row}: {what}"


def check_frame(schema: DataSchema, frame: pd.DataFrame) -> list[Violation]:
    """Every violation of `schema` in `frame`, column by column in schema order, then row.

    Reported: a declared column (or the target) that is missing; a column the schema does not
    declare; a value that is not a number / not a boolean; a value outside a numeric column's
    bounds; a category (or target class) that is not declared; a missing value where the
    policy is ``refuse``, and any missing target. Rows are 1-based data rows (row N = line
    N + 1 of a CSV with a header line).
    """
    violations: list[Violation] = []
    present = {str(c) for c in frame.columns}
    declared = {c.name for c in schema.columns} | {schema.target} | set(schema.identifiers)
    for name in [str(c) for c in frame.columns]:
        if name not in declared:
            violations.append(
                Violation(
                    name,
                    None,
                    None,
                    "is not in the schema; declare it as a column or an identifier",
                )
            )
    for column in schema.columns:
        if column.name not in present:
            violations.append(Violation(column.name, None, None, "is missing from the data"))
            continue
        for i, text in enumerate(_cells(frame, column.name), start=1):
            if text is None:
                if column.missing == "refuse":
                    violations.append(
                        Violation(column.name, i, None, "missing value (the schema refuses it)")
                    )
                continue
            if isinstance(column, NumericColumn):
                value = _number(text)
                if value is None:
                    violations.append(Violation(column.name, i, text, "is not a number"))
                elif not column.lower <= value <= column.upper:
                    violations.append(
                        Violation(
                            column.name,
                            i,
                            text,
                            f"is outside the declared bounds [{column.lower:g}, {column.upper:g}]",
                        )
                    )
            elif isinstance(column, CategoricalColumn):
                if text not in column.categories:
                    violations.append(Violation(column.name, i, text, "is not a declared category"))
            elif _boolean(text) is None:
                violations.append(
                    Violation(column.name, i, text, "is not a boolean (true/false, yes/no, 1/0)")
                )
    if schema.target not in present:
        violations.append(
            Violation(schema.target, None, None, "(the target) is missing from the data")
        )
    else:
        for i, text in enumerate(_cells(frame, schema.target), start=1):
            if text is None:
                violations.append(Violation(schema.target, i, None, "missing label"))
            elif schema.task == "regression":
                if _number(text) is None:
                    violations.append(Violation(schema.target, i, text, "is not a number"))
            elif text not in schema.classes:
                violations.append(
                    Violation(schema.target, i, text, "is not a declared class of the target")
                )
    return violations


def feature_names(schema: DataSchema) -> list[str]:
    """The encoded layout's column names: ``age``, ``class=1st``, ``alone``, ..."""
    names: list[str] = []
    for column in schema.columns:
        if isinstance(column, CategoricalColumn):
            names += [f"{column.name}={c}" for c in column.categories]
        else:
            names.append(column.name)
    return names


def encode(schema: DataSchema, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """`frame` encoded by `schema` alone: ``(X, y)``.

    X is float32 with the columns of `feature_names(schema)`: numerics clamped into and scaled
    by their declared bounds (`FeatureBounds.scaler`: the range maps onto [-3, 3]), booleans
    0/1, categoricals one-hot in declared order; missing values filled per policy; identifiers
    dropped. y is int64 class indices in `schema.classes` order, or float32 for regression.
    Each row's encoding depends on that row and the schema only.

    Raises:
        DataError: If `frame` violates the schema (one line: the count and the first one).
    """
    from veil.data.scaling import FeatureBounds

    violations = check_frame(schema, frame)
    if violations:
        more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
        raise DataError(
            f"the data violates the schema: {violations[0]}{more}; run `veil schema check "
            "SCHEMA DATA` to list every violation"
        )
    n = len(frame)
    blocks: list[np.ndarray] = []
    numeric = [c for c in schema.columns if isinstance(c, NumericColumn)]
    scaled: np.ndarray | None = None
    if numeric:
        bounds = FeatureBounds(
            lower=np.array([c.lower for c in numeric], dtype=np.float64),
            upper=np.array([c.upper for c in numeric], dtype=np.float64),
            source="the data schema",
        )
        raw = np.empty((n, len(numeric)), dtype=np.float64)
        for j, num in enumerate(numeric):
            neutral = num.fill if num.fill is not None else float(bounds.centres[j])
            raw[:, j] = [neutral if t is None else float(t) for t in _cells(frame, num.name)]
        scaled = bounds.scaler().transform(bounds.clamp(raw))
    k = 0
    for column in schema.columns:
        cells = _cells(frame, column.name)
        if isinstance(column, NumericColumn):
            assert scaled is not None
            blocks.append(scaled[:, k : k + 1])
            k += 1
        elif isinstance(column, CategoricalColumn):
            index = {c: i for i, c in enumerate(column.categories)}
            block = np.zeros((n, len(column.categories)), dtype=np.float32)
            for i, text in enumerate(cells):
                chosen = text if text is not None else column.fill
                if chosen is not None:
                    block[i, index[chosen]] = 1.0
            blocks.append(block)
        else:
            fill = bool(column.fill)
            blocks.append(
                np.array(
                    [[float(fill if t is None else bool(_boolean(t)))] for t in cells],
                    dtype=np.float32,
                ).reshape(n, 1)
            )
    x = np.concatenate(blocks, axis=1).astype(np.float32)
    labels = _cells(frame, schema.target)
    if schema.task == "regression":
        y = np.array([float(t) for t in labels if t is not None], dtype=np.float32)
    else:
        classes = {c: i for i, c in enumerate(schema.classes)}
        y = np.array([classes[t] for t in labels if t is not None], dtype=np.int64)
    return x, y


def _class_order(values: Sequence[str]) -> list[str]:
    numbers = [_number(v) for v in values]
    if all(v is not None for v in numbers):
        return [v for _, v in sorted(zip(numbers, values, strict=True))]
    return sorted(values)


def _integer_like(values: Sequence[str]) -> bool:
    return all((v := _number(t)) is not None and float(v).is_integer() for t in values)


def infer_schema(
    data: pd.DataFrame | Path | str, *, target: str, task: Task | None = None
) -> DataSchema:
    """Propose a schema from one organisation's table (a frame or a CSV path).

    Numeric columns get that file's min and max as bounds, categorical ones the categories it
    holds (sorted), so the proposal is a local choice to review (`REVIEW_NOTICE`). Columns
    whose non-missing values are all true/false (any case) are boolean; columns unique per row
    holding integers or text (in a file of at least `MIN_IDENTIFIER_ROWS` rows) are
    identifiers. A column with missing values gets ``missing = "default"``, others
    ``"refuse"``. Without `task`, a target of at most `MAX_INFERRED_CLASSES` distinct integer or
    text values is binary/multiclass, any other regression.

    Raises:
        DataError: If the target is missing, has fewer than 2 values, or does not fit `task`.
    """
    frame = read_table(Path(data)) if isinstance(data, str | Path) else data
    names = [str(c) for c in frame.columns]
    if target not in names:
        raise DataError(
            f"target column {target!r} is not in the data; its columns are: {', '.join(names)}"
        )
    columns: list[NumericColumn | CategoricalColumn | BooleanColumn] = []
    identifiers: list[str] = []
    for name in names:
        if name == target:
            continue
        column = _infer_column(name, _cells(frame, name), len(frame))
        if column is None:
            identifiers.append(name)
        else:
            columns.append(column)
    labels = [t for t in _cells(frame, target) if t is not None]
    task, classes = _infer_task(target, labels, task)
    try:
        return DataSchema(
            target=target,
            task=task,
            classes=classes,
            columns=columns,
            identifiers=identifiers,
        )
    except ValidationError as exc:
        msg = exc.errors(include_url=False)[0]["msg"].removeprefix("Value error, ")
        raise DataError(f"cannot propose a schema: {msg}") from None


def _infer_column(
    name: str, cells: list[str | None], n: int
) -> NumericColumn | CategoricalColumn | BooleanColumn | None:
    """One feature column's proposal from its cells (None: an identifier, to drop)."""
    seen = [t for t in cells if t is not None]
    missing: Missing = "default" if len(seen) < n else "refuse"
    numbers = [_number(t) for t in seen]
    is_numeric = bool(seen) and all(v is not None for v in numbers)
    if (
        n >= MIN_IDENTIFIER_ROWS
        and len(seen) == n
        and len(set(seen)) == n
        and (not is_numeric or _integer_like(seen))
    ):
        return None
    if seen and {t.lower() for t in seen} <= {"true", "false"}:
        return BooleanColumn(name=name, missing=missing)
    if is_numeric:
        lower = min(v for v in numbers if v is not None)
        upper = max(v for v in numbers if v is not None)
        # A constant column still needs a non-empty range.
        return NumericColumn(
            name=name, lower=lower, upper=upper if upper > lower else lower + 1.0, missing=missing
        )
    if seen:
        return CategoricalColumn(name=name, categories=sorted(set(seen)), missing=missing)
    raise DataError(f"column {name!r} holds no values; drop it or fill it in")


def _infer_task(target: str, labels: list[str], task: Task | None) -> tuple[Task, list[str]]:
    """The task (the given one, checked against the labels, or proposed) and its classes."""
    distinct = sorted(set(labels))
    if len(distinct) < 2:
        raise DataError(f"target column {target!r} has fewer than 2 distinct values")
    classification = len(distinct) <= MAX_INFERRED_CLASSES and (
        _integer_like(distinct) or any(_number(t) is None for t in distinct)
    )
    if task is None:
        task = (
            ("binary" if len(distinct) == 2 else "multiclass") if classification else "regression"
        )
    if task == "regression":
        if any(_number(t) is None for t in labels):
            raise DataError(f"target column {target!r} holds text; it cannot be a regression")
        return task, []
    if task == "binary" and len(distinct) != 2:
        raise DataError(
            f"target column {target!r} has {len(distinct)} distinct values, not the 2 of a "
            "binary task"
        )
    if task == "multiclass" and len(distinct) > MAX_INFERRED_CLASSES:
        raise DataError(
            f"target column {target!r} has {len(distinct)} distinct values, more than "
            f"{MAX_INFERRED_CLASSES} classes: it may be a regression target (task = "
            "'regression')"
        )
    return task, _class_order(distinct)
