"""Feature scaling: declared public bounds, or standardisation fitted locally or federated.

Declared bounds (`FeatureBounds`): public per-feature ranges [lower, upper], stated in the config
or in the data set's schema, never computed from the private records. `FeatureBounds.clamp`
clips every value into its range and `FeatureBounds.scaler` maps it by ``(x - centre) /
((upper - lower) / 6)``: the declared range is read as six standard deviations, so the inputs
have about the scale of standardised ones (with the default centre, the midpoint, the range maps
onto [-3, 3]). Both are fixed transforms, the same for every record whatever the other records
are, so they cost no privacy: adding one record (however extreme) changes no other record's
model input.

Federated standardisation: each client computes `feature_statistics` (count, per-feature sum and
sum of squares) on its own training data and sends only those; the server adds them up and
`scaler_from_statistics` turns the totals into the same `StandardScaler` that `fit_scaler` would
fit on the pooled data (up to float64 rounding). Local and federated standardisation depend on
the records, so one record moves every other record's scaled values: differential privacy does
not cover them (the config refuses them under ``[privacy]``).

`Preprocessing` is the whole path from a raw record to the model's input (clamp, then scale),
kept with each client's data so that anything that later trains "like the run" (the privacy
audit's canaries) goes through the same transform.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from veil.errors import DataError

__all__ = [
    "FeatureBounds",
    "FeatureStatistics",
    "Preprocessing",
    "StandardScaler",
    "feature_statistics",
    "fit_scaler",
    "scaler_from_statistics",
]

CONSTANT_TOLERANCE: Final[float] = 1e-6
"""A feature whose standard deviation is at most ``CONSTANT_TOLERANCE * max(1, |mean|)`` is
treated as constant and gets scale 1 (this also absorbs the rounding error of computing the
variance from sums)."""


@dataclass(frozen=True, eq=False)
class StandardScaler:
    """``(x - mean) / scale`` per feature; constant features have scale 1.

    Attributes:
        mean: float64 array of shape ``(d,)``.
        scale: float64 array of shape ``(d,)``, strictly positive (the population standard
            deviation, or 1 for constant features).
    """

    mean: np.ndarray
    scale: np.ndarray

    def __post_init__(self) -> None:
        if self.mean.ndim != 1 or self.mean.shape != self.scale.shape:
            raise ValueError(
                f"mean and scale must be 1-D of equal length, got {self.mean.shape} "
                f"and {self.scale.shape}"
            )
        if not (self.scale > 0).all():
            raise ValueError("scale must be strictly positive")

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Standardise the rows of `x` (shape ``(n, d)``); returns a new float32 array."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"expected shape (n, {self.mean.shape[0]}), got {x.shape}")
        scaled: np.ndarray = (x.astype(np.float64) - self.mean) / self.scale
        return scaled.astype(np.float32)


RANGE_IN_STANDARD_DEVIATIONS: Final[float] = 6.0
"""How many standard deviations `FeatureBounds.scaler` takes a declared range to span (±3σ):
inputs then have about the scale of standardised features, which DP-SGD's clipping and noise
are tuned for. A fixed convention, not a statistic of the data."""


@dataclass(frozen=True, eq=False)
class FeatureBounds:
    """Declared, public per-feature ranges: every feature j lies in ``[lower[j], upper[j]]``.

    They must come from outside the private data (the data set's documentation, a measuring
    device's range, domain knowledge); bounds computed from the records themselves are not public.

    Attributes:
        lower: float64 array of shape ``(d,)``, finite.
        upper: float64 array of shape ``(d,)``, finite, strictly above `lower`.
        source: Where the bounds come from, in words (recorded, shown in errors).
        centre: float64 array of shape ``(d,)`` within ``[lower, upper]``: a declared typical
            value that `scaler` maps to 0; None means the midpoint ``(lower + upper) / 2``.

    The scale of `scaler` is ``(upper - lower) / RANGE_IN_STANDARD_DEVIATIONS``.
    """

    lower: np.ndarray
    upper: np.ndarray
    source: str = "declared"
    centre: np.ndarray | None = None

    def __post_init__(self) -> None:
        lower, upper = self.lower, self.upper
        if lower.ndim != 1 or lower.shape != upper.shape or lower.size == 0:
            raise DataError(
                f"feature bounds need lower and upper of one equal length >= 1, got "
                f"{lower.shape} and {upper.shape}"
            )
        if not (np.isfinite(lower).all() and np.isfinite(upper).all()):
            raise DataError("feature bounds must be finite numbers")
        bad = np.flatnonzero(~(lower < upper))
        if bad.size:
            j = int(bad[0])
            raise DataError(
                f"feature bounds: lower[{j}] = {lower[j]:g} is not below upper[{j}] = "
                f"{upper[j]:g}; give each feature a range with lower < upper"
            )
        centre = self.centre
        if centre is not None:
            if centre.shape != lower.shape:
                raise DataError(
                    f"feature bounds: centre has shape {centre.shape}, the bounds {lower.shape}; "
                    "give one centre per feature, or none for the midpoints"
                )
            outside = np.flatnonzero(~((lower <= centre) & (centre <= upper)))
            if outside.size:
                j = int(outside[0])
                raise DataError(
                    f"feature bounds: centre[{j}] = {centre[j]:g} lies outside [{lower[j]:g}, "
                    f"{upper[j]:g}]; give a centre within each range"
                )

    @classmethod
    def from_values(
        cls,
        lower: float | Sequence[float],
        upper: float | Sequence[float],
        n_features: int,
        *,
        source: str = "declared",
        centre: float | Sequence[float] | None = None,
    ) -> FeatureBounds:
        """Bounds for `n_features` features; a single number applies to every feature.

        Raises:
            DataError: If a list has the wrong length, or a range is empty or not finite.
        """
        ends = []
        values = [("lower", lower), ("upper", upper)]
        if centre is not None:
            values.append(("centre", centre))
        for name, value in values:
            arr = np.atleast_1d(np.asarray(value, dtype=np.float64))
            if arr.ndim != 1:
                raise DataError(f"feature bounds: {name} must be a number or a list of numbers")
            if arr.size == 1:
                arr = np.full(n_features, float(arr[0]))
            elif arr.size != n_features:
                raise DataError(
                    f"feature bounds: {name} has {arr.size} values for {n_features} features; "
                    "give one per feature (in column order) or a single number for all"
                )
            ends.append(arr)
        return cls(
            lower=ends[0],
            upper=ends[1],
            source=source,
            centre=ends[2] if centre is not None else None,
        )

    @property
    def n_features(self) -> int:
        return int(self.lower.shape[0])

    def clamp(self, x: np.ndarray) -> np.ndarray:
        """`x` (shape ``(n, d)``) with every value clipped into its feature's range (float64).

        Row by row and value by value: a row's result depends on that row only.
        """
        data = _as_matrix(x)
        if data.shape[1] != self.n_features:
            raise DataError(
                f"feature bounds are declared for {self.n_features} features, the data has "
                f"{data.shape[1]}; declare one range per feature column"
            )
        return np.clip(data.astype(np.float64), self.lower, self.upper)

    @property
    def centres(self) -> np.ndarray:
        """The declared centres, or the midpoints where none are declared."""
        return self.centre if self.centre is not None else (self.lower + self.upper) / 2.0

    def scaler(self) -> StandardScaler:
        """The fixed affine map ``(x - centre) / ((upper - lower) / 6)``, as a `StandardScaler`
        (mean = the centre). It reads the declared range as six standard deviations, so that
        inputs have about the scale of standardised features; with the midpoint as centre it
        maps ``[lower, upper]`` onto ``[-3, 3]``."""
        return StandardScaler(
            mean=self.centres,
            scale=(self.upper - self.lower) / RANGE_IN_STANDARD_DEVIATIONS,
        )

    def to_dict(self) -> dict[str, object]:
        """JSON-ready: ``{"lower": [...], "upper": [...], "centre": [...], "source": ...}``."""
        return {
            "lower": self.lower.tolist(),
            "upper": self.upper.tolist(),
            "centre": self.centres.tolist(),
            "source": self.source,
        }


@dataclass(frozen=True, eq=False)
class Preprocessing:
    """The path from a raw record to the model's input: clamp into `bounds` (if declared), then
    apply `scaler` (if any). Identity (a float32 copy) when both are None.

    Attributes:
        bounds: Declared bounds that clamp every value first, or None.
        scaler: The scaler applied after clamping: the bounds' fixed map, a federated or a
            locally fitted scaler, or None.
        kind: The run's ``scaling`` (``"bounds"``, ``"federated"``, ``"local"``, ``"none"``).
    """

    bounds: FeatureBounds | None = None
    scaler: StandardScaler | None = None
    kind: str = "none"

    def describe(self) -> str:
        """The transform in words, e.g. for the audit's record."""
        steps = []
        if self.bounds is not None:
            steps.append(f"clamped into the declared bounds ({self.bounds.source})")
        if self.kind == "bounds":
            steps.append("mapped by the bounds' fixed (x - centre) / ((upper - lower) / 6)")
        elif self.kind == "federated":
            steps.append("standardised by the federated scaler (fitted on the clients' records)")
        elif self.kind == "local":
            steps.append("standardised by the client's own scaler (fitted on its records)")
        return ", then ".join(steps) if steps else "raw values (no transform)"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Raw rows (shape ``(n, d)``) to model inputs: a new float32 array."""
        data = np.asarray(x)
        if self.bounds is not None:
            data = self.bounds.clamp(data)
        if self.scaler is not None:
            return self.scaler.transform(data)
        return np.array(data, dtype=np.float32)


@dataclass(frozen=True, eq=False)
class FeatureStatistics:
    """What one client sends for federated standardisation: no row leaves the client.

    Attributes:
        count: Number of rows summarised.
        total: float64 per-feature sum, shape ``(d,)``.
        total_sq: float64 per-feature sum of squares, shape ``(d,)``.

    Two statistics add up (`+`) to the statistics of the union of their rows.
    """

    count: int
    total: np.ndarray
    total_sq: np.ndarray

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError(f"count must be >= 0, got {self.count}")
        if self.total.ndim != 1 or self.total.shape != self.total_sq.shape:
            raise ValueError(
                f"total and total_sq must be 1-D of equal length, got {self.total.shape} "
                f"and {self.total_sq.shape}"
            )

    def __add__(self, other: FeatureStatistics) -> FeatureStatistics:
        if not isinstance(other, FeatureStatistics):
            return NotImplemented
        if other.total.shape != self.total.shape:
            raise ValueError(
                f"cannot add statistics of {self.total.shape[0]} and {other.total.shape[0]} "
                "features"
            )
        return FeatureStatistics(
            count=self.count + other.count,
            total=self.total + other.total,
            total_sq=self.total_sq + other.total_sq,
        )


def fit_scaler(x: np.ndarray) -> StandardScaler:
    """Fit mean and population standard deviation per feature of `x` (shape ``(n, d)``, n >= 1).

    Raises:
        DataError: If `x` has no rows.
    """
    x = _as_matrix(x)
    if x.shape[0] == 0:
        raise DataError("cannot fit a scaler on zero rows; every client needs training data")
    data = x.astype(np.float64)
    mean = data.mean(axis=0)
    variance = data.var(axis=0)
    return StandardScaler(mean=mean, scale=_scale(mean, variance))


def feature_statistics(x: np.ndarray) -> FeatureStatistics:
    """Count, per-feature sum and per-feature sum of squares of `x` (shape ``(n, d)``), in float64.

    Zero rows are allowed (all sums zero).
    """
    data = _as_matrix(x).astype(np.float64)
    return FeatureStatistics(
        count=int(data.shape[0]),
        total=data.sum(axis=0),
        total_sq=np.square(data).sum(axis=0),
    )


def scaler_from_statistics(stats: Sequence[FeatureStatistics]) -> StandardScaler:
    """Combine the clients' statistics into one scaler (server side of federated scaling).

    The result equals ``fit_scaler`` on the concatenation of the clients' rows, up to float64
    rounding of ``E[x^2] - E[x]^2``.

    Raises:
        DataError: If `stats` is empty or counts zero rows in total.
        ValueError: If the statistics disagree on the number of features.
    """
    if not stats:
        raise DataError("no client sent feature statistics; cannot fit a federated scaler")
    combined = functools.reduce(operator.add, stats)
    if combined.count == 0:
        raise DataError("the clients' feature statistics count zero rows; cannot fit a scaler")
    mean = combined.total / combined.count
    variance = np.maximum(combined.total_sq / combined.count - np.square(mean), 0.0)
    return StandardScaler(mean=mean, scale=_scale(mean, variance))


def _scale(mean: np.ndarray, variance: np.ndarray) -> np.ndarray:
    std = np.sqrt(np.maximum(variance, 0.0))
    constant = std <= CONSTANT_TOLERANCE * np.maximum(1.0, np.abs(mean))
    return np.where(constant, 1.0, std)


def _as_matrix(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array of shape (n, d), got shape {x.shape}")
    return x
