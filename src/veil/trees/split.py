"""XGBoost's split finding on aggregated histograms: gain, best split, leaf weight.

For a node with gradient and hessian sums (G, H) split into (G_L, H_L) and (G_R, H_R), XGBoost's
loss change (Chen & Guestrin 2016, eq. 7, as XGBoost computes it: without the factor 1/2) is

    loss_change = G_L² / (H_L + λ) + G_R² / (H_R + λ) - G² / (H + λ)

A split is allowed when both children carry hessian at least `min_child_weight`; the best split
of a node is the allowed one with the largest loss change, and it is made when that change
exceeds `gamma` (XGBoost's `min_split_loss`) and a tiny positive epsilon. A leaf's weight is
``-G / (H + λ)`` times the learning rate η (L1 regularisation α = 0, no max_delta_step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["Split", "SplitRule", "best_split", "leaf_weight", "loss_change"]

#: XGBoost's `kRtEps`: a split must improve the loss by more than this.
RT_EPS = 1e-6


@dataclass(frozen=True)
class SplitRule:
    """The regularisation of split finding (XGBoost's names)."""

    reg_lambda: float = 1.0
    gamma: float = 0.0
    min_child_weight: float = 1.0
    learning_rate: float = 0.3

    def __post_init__(self) -> None:
        if self.reg_lambda < 0 or self.gamma < 0 or self.min_child_weight < 0:
            raise ValueError("lambda, gamma and min_child_weight must be >= 0")
        if not 0 < self.learning_rate <= 1:
            raise ValueError(f"learning_rate must be in (0, 1], got {self.learning_rate}")


@dataclass(frozen=True)
class Split:
    """The best split of a node: feature j, rows with bin <= `bin` go left."""

    feature: int
    bin: int
    loss_change: float
    left: tuple[float, float]
    right: tuple[float, float]


def loss_change(
    gl: npt.ArrayLike, hl: npt.ArrayLike, gr: npt.ArrayLike, hr: npt.ArrayLike, reg_lambda: float
) -> npt.NDArray[np.float64]:
    """XGBoost's loss change of splitting (G, H) = (gl + gr, hl + hr), elementwise."""
    gl_, hl_, gr_, hr_ = (np.asarray(a, dtype=np.float64) for a in (gl, hl, gr, hr))
    parent = (gl_ + gr_) ** 2 / (hl_ + hr_ + reg_lambda)
    result: npt.NDArray[np.float64] = (
        gl_**2 / (hl_ + reg_lambda) + gr_**2 / (hr_ + reg_lambda) - parent
    )
    return result


def leaf_weight(g: float, h: float, rule: SplitRule) -> float:
    """``-G / (H + λ) · η``; 0 where H + λ is not positive (a noisy empty node)."""
    denominator = h + rule.reg_lambda
    return 0.0 if denominator <= 0 else -g / denominator * rule.learning_rate


def best_split(
    grad: npt.NDArray[np.float64],
    hess: npt.NDArray[np.float64],
    rule: SplitRule,
    *,
    n_bins: Sequence[int] | None = None,
) -> Split | None:
    """The best allowed split of a node from its histograms ``(features, bins)`` of g and h, or
    None when no split changes the loss by more than ``max(gamma, RT_EPS)``. Ties go to the
    lowest feature, then the lowest bin.

    `n_bins` (one count per feature, each in ``[1, bins]``) is for features binned to different
    widths and padded with zeros to a common one (SecureBoost's per-party bins): feature j is
    then split only at ``bin < n_bins[j] - 1``, never in its padding. ValueError for counts
    that do not fit the histograms."""
    gl = np.cumsum(grad, axis=1)[:, :-1]
    hl = np.cumsum(hess, axis=1)[:, :-1]
    g_total = grad.sum(axis=1, keepdims=True)
    h_total = hess.sum(axis=1, keepdims=True)
    gr, hr = g_total - gl, h_total - hl
    with np.errstate(divide="ignore", invalid="ignore"):
        change = loss_change(gl, hl, gr, hr, rule.reg_lambda)
    allowed = (hl >= rule.min_child_weight) & (hr >= rule.min_child_weight)
    allowed &= (hl + rule.reg_lambda > 0) & (hr + rule.reg_lambda > 0)
    if n_bins is not None:
        allowed &= _below_last_bin(n_bins, grad.shape)
    change = np.where(allowed & np.isfinite(change), change, -np.inf)
    if change.size == 0:
        return None
    j, b = np.unravel_index(int(np.argmax(change)), change.shape)
    best = float(change[j, b])
    if not best > max(rule.gamma, RT_EPS):
        return None
    return Split(
        feature=int(j),
        bin=int(b),
        loss_change=best,
        left=(float(gl[j, b]), float(hl[j, b])),
        right=(float(gr[j, b]), float(hr[j, b])),
    )


def _below_last_bin(n_bins: Sequence[int], shape: tuple[int, ...]) -> npt.NDArray[np.bool_]:
    """``[j, b]``: whether "bin <= b" splits feature j's own `n_bins[j]` bins."""
    counts = np.asarray(n_bins, dtype=np.int64).reshape(-1)
    features, width = shape
    if counts.size != features or (counts.size and (counts.min() < 1 or counts.max() > width)):
        raise ValueError(f"n_bins needs {features} counts in [1, {width}], got {list(n_bins)}")
    below: npt.NDArray[np.bool_] = np.arange(width - 1)[None, :] < (counts - 1)[:, None]
    return below
