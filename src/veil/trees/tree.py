"""One regression tree in XGBoost's array layout, grown level by level, and its prediction.

Nodes are numbered as they are made (the root is 0; a split appends its two children). Every
node keeps its hessian sum, its loss change and its weight ``-G / (H + λ) · η`` (XGBoost's
`base_weights`); a leaf's weight is its value. Split conditions and weights are float32, as in
an XGBoost model, so this tree and the `Booster` loaded from its JSON predict alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["Tree"]

#: XGBoost's "no parent" marker.
_NO_PARENT = 2147483647


@dataclass
class Tree:
    """A binary tree: internal nodes test ``x[feature] < threshold`` (true goes left)."""

    left: list[int] = field(default_factory=lambda: [-1])
    right: list[int] = field(default_factory=lambda: [-1])
    parent: list[int] = field(default_factory=lambda: [_NO_PARENT])
    feature: list[int] = field(default_factory=lambda: [0])
    threshold: list[float] = field(default_factory=lambda: [0.0])
    weight: list[float] = field(default_factory=lambda: [0.0])
    loss_change: list[float] = field(default_factory=lambda: [0.0])
    hessian: list[float] = field(default_factory=lambda: [0.0])

    @classmethod
    def root(cls, weight: float, hessian: float) -> Tree:
        """A one-leaf tree."""
        return cls(weight=[_f32(weight)], hessian=[float(hessian)])

    @property
    def n_nodes(self) -> int:
        return len(self.left)

    def is_leaf(self, node: int) -> bool:
        return self.left[node] == -1

    def split(
        self,
        node: int,
        feature: int,
        threshold: float,
        loss_change: float,
        children: tuple[tuple[float, float], tuple[float, float]],
    ) -> tuple[int, int]:
        """Split leaf `node`; `children` are the (weight, hessian) of the left and right
        child. Returns their node ids."""
        if not self.is_leaf(node):
            raise ValueError(f"node {node} is already split")
        ids = []
        for weight, hessian in children:
            ids.append(self.n_nodes)
            self.left.append(-1)
            self.right.append(-1)
            self.parent.append(node)
            self.feature.append(0)
            self.threshold.append(0.0)
            self.weight.append(_f32(weight))
            self.loss_change.append(0.0)
            self.hessian.append(float(hessian))
        self.left[node], self.right[node] = ids
        self.feature[node] = int(feature)
        self.threshold[node] = _f32(threshold)
        self.loss_change[node] = float(loss_change)
        return ids[0], ids[1]

    def leaf_of(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
        """The leaf each row of `x` ``(n, features)`` reaches."""
        values = np.asarray(x, dtype=np.float32)
        left, right = np.array(self.left), np.array(self.right)
        feature = np.array(self.feature)
        threshold = np.array(self.threshold, dtype=np.float32)
        node = np.zeros(values.shape[0], dtype=np.int64)
        rows = np.arange(values.shape[0])
        while True:
            inner = left[node] != -1
            if not inner.any():
                return node
            at = node[inner]
            goes_left = values[rows[inner], feature[at]] < threshold[at]
            node[inner] = np.where(goes_left, left[at], right[at])

    def predict(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """The leaf value of every row of `x`."""
        return np.array(self.weight, dtype=np.float32)[self.leaf_of(x)]

    def to_xgboost(self, tree_id: int, n_features: int) -> dict[str, Any]:
        """The tree as an entry of an XGBoost JSON model's ``trees`` list."""
        n = self.n_nodes
        conditions = [self.weight[i] if self.is_leaf(i) else self.threshold[i] for i in range(n)]
        return {
            "base_weights": list(self.weight),
            "categories": [],
            "categories_nodes": [],
            "categories_segments": [],
            "categories_sizes": [],
            "default_left": [0] * n,
            "id": tree_id,
            "left_children": list(self.left),
            "loss_changes": list(self.loss_change),
            "parents": list(self.parent),
            "right_children": list(self.right),
            "split_conditions": conditions,
            "split_indices": list(self.feature),
            "split_type": [0] * n,
            "sum_hessian": list(self.hessian),
            "tree_param": {
                "num_deleted": "0",
                "num_feature": str(n_features),
                "num_nodes": str(n),
                "size_leaf_vector": "1",
            },
        }


def _f32(value: float) -> float:
    return float(np.float32(value))
