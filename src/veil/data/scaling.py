"""Feature standardisation, locally or federated.

Federated standardisation: each client computes `feature_statistics` (count, per-feature sum and
sum of squares) on its own training data and sends only those; the server adds them up and
`scaler_from_statistics` turns the totals into the same `StandardScaler` that `fit_scaler` would
fit on the pooled data (up to float64 rounding).
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
    "FeatureStatistics",
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
