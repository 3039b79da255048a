"""Bin edges from declared public bounds: the cut points every member bins its features with.

The edges depend only on the declared range of each feature (`[data] feature_bounds`, or the
bounds the data set's schema declares), never on a record, so they cost no privacy and every
member computes the same ones. Equal-width bins: feature j's range ``[lower_j, upper_j]`` is cut
into `max_bins` bins of equal width; a value below the range falls into the first bin, one above
it into the last (the members clamp into the declared bounds anyway).

The bin of a value is the number of cut points at or below it, so a split "bin <= b" is exactly
XGBoost's test ``x < cuts[b]`` (cut points are float32, as XGBoost compares in float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from veil.errors import DataError

__all__ = ["MAX_BINS", "BinEdges", "equal_width_edges"]

#: The most bins per feature (histogram memory grows with it; XGBoost's default is 256).
MAX_BINS = 1024


@dataclass(frozen=True, eq=False)
class BinEdges:
    """Per feature, ``max_bins - 1`` ascending interior cut points (float32)."""

    #: Shape ``(n_features, max_bins - 1)``.
    cuts: npt.NDArray[np.float32]

    @property
    def n_features(self) -> int:
        return int(self.cuts.shape[0])

    @property
    def n_bins(self) -> int:
        """Bins per feature (the same for every feature)."""
        return int(self.cuts.shape[1]) + 1

    def transform(self, x: npt.ArrayLike) -> npt.NDArray[np.int32]:
        """The bin index of every value, shape ``(n, n_features)``, in ``[0, n_bins)``.
        DataError for another number of features or a NaN."""
        values = np.asarray(x, dtype=np.float32)
        if values.ndim != 2 or values.shape[1] != self.n_features:
            raise DataError(
                f"binning expects {self.n_features} features per row, got shape {values.shape}"
            )
        if np.isnan(values).any():
            raise DataError("binning met a NaN: impute or drop missing values before training")
        out = np.empty(values.shape, dtype=np.int32)
        for j in range(self.n_features):
            out[:, j] = np.searchsorted(self.cuts[j], values[:, j], side="right")
        return out

    def threshold(self, feature: int, bin_: int) -> float:
        """XGBoost's split condition for "bin <= `bin_`": rows with x < threshold go left."""
        return float(self.cuts[feature, bin_])


def equal_width_edges(lower: npt.ArrayLike, upper: npt.ArrayLike, max_bins: int) -> BinEdges:
    """`max_bins` equal-width bins over each declared range ``[lower_j, upper_j]``.

    DataError unless ``2 <= max_bins <= MAX_BINS``, `lower` and `upper` have one finite value
    per feature and every ``lower_j < upper_j``.
    """
    lo = np.asarray(lower, dtype=np.float64).reshape(-1)
    hi = np.asarray(upper, dtype=np.float64).reshape(-1)
    if not 2 <= max_bins <= MAX_BINS:
        raise DataError(f"max_bins = {max_bins}: use between 2 and {MAX_BINS} bins per feature")
    if lo.shape != hi.shape or lo.size == 0:
        raise DataError("bin edges need one lower and one upper bound per feature")
    if not (np.isfinite(lo).all() and np.isfinite(hi).all() and (lo < hi).all()):
        raise DataError("bin edges need finite declared bounds with lower < upper per feature")
    fractions = np.arange(1, max_bins, dtype=np.float64) / max_bins
    cuts = lo[:, None] + (hi - lo)[:, None] * fractions[None, :]
    return BinEdges(cuts=cuts.astype(np.float32))
