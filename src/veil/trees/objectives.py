"""Gradients and hessians of the boosting losses, clipped to declared bounds.

The bounds make every member's histogram entry bounded (what the secure sum's fixed-point
encoding and the DP sensitivity rest on):

* ``binary:logistic``: g = p - y in [-1, 1], h = p(1 - p) in [0, 1/4];
* ``multi:softprob`` (K classes, one tree per class per round, XGBoost's layout):
  g_k = p_k - [y = k] in [-1, 1], h_k = 2 p_k (1 - p_k) in [0, 1/2] (XGBoost's hessian);
* ``reg:squarederror`` on the target mapped by its declared bounds, t = (y - centre) / scale:
  g = margin - t, clipped to [-gradient_clip, gradient_clip]; h = 1.

`gradient_clip` applies to every objective (a clip at or above the natural bound changes
nothing); hessians are clipped to ``[0, hessian_bound]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

__all__ = ["OBJECTIVES", "Objective", "ObjectiveName"]

ObjectiveName = Literal["binary:logistic", "multi:softprob", "reg:squarederror"]
OBJECTIVES: tuple[ObjectiveName, ...] = ("binary:logistic", "multi:softprob", "reg:squarederror")

_HESSIAN_BOUND: dict[str, float] = {
    "binary:logistic": 0.25,
    "multi:softprob": 0.5,
    "reg:squarederror": 1.0,
}
#: XGBoost's floor on the softmax hessian.
_EPS = 1e-16


@dataclass(frozen=True)
class Objective:
    """A loss, its number of tree groups (classes for softmax, else 1) and its clips."""

    name: ObjectiveName
    n_groups: int = 1
    gradient_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.name!r}; use one of {OBJECTIVES}")
        if (self.name == "multi:softprob") != (self.n_groups > 1):
            raise ValueError("multi:softprob needs n_groups = classes > 1; the others 1")
        if not self.gradient_clip > 0:
            raise ValueError(f"gradient_clip must be > 0, got {self.gradient_clip}")

    @property
    def hessian_bound(self) -> float:
        return _HESSIAN_BOUND[self.name]

    @property
    def gradient_bound(self) -> float:
        """The largest |g| a member contributes: the clip, or the loss's own bound of 1."""
        if self.name == "reg:squarederror":
            return self.gradient_clip
        return min(self.gradient_clip, 1.0)

    def gradients(
        self, margin: npt.NDArray[np.float64], y: npt.NDArray[np.float64]
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """(g, h), each of shape ``(n, n_groups)``, for margins ``(n, n_groups)`` and targets
        ``(n,)`` (class indices, or the mapped regression target), clipped to the bounds."""
        if self.name == "binary:logistic":
            p = 1.0 / (1.0 + np.exp(-margin[:, 0]))
            g = (p - y)[:, None]
            h = (p * (1.0 - p))[:, None]
        elif self.name == "multi:softprob":
            shifted = margin - margin.max(axis=1, keepdims=True)
            e = np.exp(shifted)
            p = e / e.sum(axis=1, keepdims=True)
            onehot = np.zeros_like(p)
            onehot[np.arange(p.shape[0]), y.astype(np.int64)] = 1.0
            g = p - onehot
            h = np.maximum(2.0 * p * (1.0 - p), _EPS)
        else:
            g = (margin[:, 0] - y)[:, None]
            h = np.ones_like(g)
        clip = self.gradient_bound
        return np.clip(g, -clip, clip), np.clip(h, 0.0, self.hessian_bound)
