"""The `Dataset` type: one labelled data set in the uniform, validated shape that every loader
(`veil.data.datasets`, `veil.data.text`) and generator (`veil.data.synthetic_industry`,
`veil.data.synthetic_text`) returns. It lives apart from the loaders so that the generators can
build one without importing the loaders that call them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from veil.data.scaling import FeatureBounds

__all__ = ["Dataset", "Task"]

#: What a data set's labels are: classes (int64 ``0..k-1``) or a real-valued target (float32).
Task = Literal["classification", "regression"]


@dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled data set, validated on construction.

    Two tasks share the type. Classification: `labels` are int64 classes and there are at least
    two `class_names`. Regression (``task == "regression"``): `labels` are the float32 target
    values, finite, `class_names` is empty, and the model has one output (`n_classes` is 1);
    `target_bounds` may declare the target's public range (`veil.federation.objective`).

    Attributes:
        name: Data set name (``"synthetic..."`` for generated data).
        features: float32 array of shape ``(n, d)``: raw, unscaled values; categorical columns
            one-hot encoded; no NaN or infinity.
        labels: int64 array of shape ``(n,)`` with values in ``0..n_classes-1``; for
            regression a float32 array of shape ``(n,)`` (the target, original units).
        feature_names: One name per column of `features`; one-hot columns are ``"column=value"``.
        class_names: One name per class; label ``k`` means ``class_names[k]``. Empty for
            regression.
        image_shape: ``(channels, height, width)`` when each row is a flattened image
            (``(1, 8, 8)`` for digits), else ``None``.
        synthetic: ``True`` for generated data (benchmarks), ``False`` for real data.
        feature_bounds: Public per-feature ranges the schema declares (`FeatureBounds`, with
            their source), or ``None`` when none are known (the user's CSV, German credit).
        task: ``"classification"`` (default) or ``"regression"``.
        target_bounds: Regression only: a public ``(lower, upper)`` range of the target,
            declared (documentation, domain knowledge), not computed from the records; the
            model predicts the target on the fixed scale it defines. ``None``: raw target.

    Raises:
        ValueError: If the arrays do not satisfy the contract above (a bug in the loader).
    """

    name: str
    features: np.ndarray
    labels: np.ndarray
    feature_names: tuple[str, ...]
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int] | None = None
    synthetic: bool = False
    feature_bounds: FeatureBounds | None = None
    task: Task = "classification"
    target_bounds: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        x = self.features
        if x.dtype != np.float32 or x.ndim != 2:
            raise ValueError(f"features must be a 2-D float32 array, got {x.dtype} {x.shape}")
        if self.task == "regression":
            self._check_target()
        else:
            self._check_classes()
        if not np.isfinite(x).all():
            raise ValueError(f"features of data set {self.name!r} contain NaN or infinity")
        if len(self.feature_names) != x.shape[1]:
            raise ValueError(
                f"{len(self.feature_names)} feature names for {x.shape[1]} feature columns"
            )
        if self.image_shape is not None and int(np.prod(self.image_shape)) != x.shape[1]:
            raise ValueError(f"image shape {self.image_shape} does not match {x.shape[1]} features")
        if self.feature_bounds is not None and self.feature_bounds.n_features != x.shape[1]:
            raise ValueError(
                f"{self.feature_bounds.n_features} feature bounds for {x.shape[1]} feature columns"
            )

    def _check_classes(self) -> None:
        y, n = self.labels, self.features.shape[0]
        if self.task != "classification":
            raise ValueError(f"task must be 'classification' or 'regression', got {self.task!r}")
        if y.dtype != np.int64 or y.shape != (n,):
            raise ValueError(f"labels must be int64 of shape ({n},), got {y.dtype} {y.shape}")
        if len(self.class_names) < 2:
            raise ValueError(f"a data set needs at least 2 classes, got {self.class_names}")
        if y.size and (y.min() < 0 or y.max() >= len(self.class_names)):
            raise ValueError(f"labels must lie in 0..{len(self.class_names) - 1}")
        if self.target_bounds is not None:
            raise ValueError("target_bounds are for a regression target")

    def _check_target(self) -> None:
        y, n = self.labels, self.features.shape[0]
        if y.dtype != np.float32 or y.shape != (n,):
            raise ValueError(
                f"a regression target must be float32 of shape ({n},), got {y.dtype} {y.shape}"
            )
        if not np.isfinite(y).all():
            raise ValueError(f"the target of data set {self.name!r} contains NaN or infinity")
        if self.class_names:
            raise ValueError("a regression data set has no class names")
        if self.target_bounds is not None and not self.target_bounds[0] < self.target_bounds[1]:
            raise ValueError(f"target_bounds need lower < upper, got {self.target_bounds}")

    @property
    def n_examples(self) -> int:
        """Number of rows."""
        return int(self.features.shape[0])

    @property
    def n_features(self) -> int:
        """Number of feature columns (after one-hot encoding)."""
        return int(self.features.shape[1])

    @property
    def n_classes(self) -> int:
        """Number of classes, ``len(class_names)``; 1 (the model's one output) for
        regression."""
        return 1 if self.task == "regression" else len(self.class_names)
