"""Histogram gradient boosting, the plaintext half of SecureBoost (`veil.vertical.secureboost`):
per-party binning, the trees with passive-party split records, and the tree builder that takes
histograms and splits from wherever they come (a party's own columns, or decrypted ones from
another party).

The math shared with the horizontal trees lives once, in `veil.trees`, and is used from here:
the objective's gradient and hessian (`veil.trees.objectives.Objective`: logistic, squared
error), the per-(feature, bin) histogram sums of a node's rows
(`veil.trees.histograms.node_histograms`), and XGBoost's split finding and leaf weight
(`veil.trees.split`: loss change ``G_L²/(H_L+λ) + G_R²/(H_R+λ) - G²/(H+λ)`` without the factor
½, as XGBoost computes it; a split needs both children's hessian sums >= `min_child_weight` and
a loss change above `gamma` and XGBoost's 1e-6; leaf weight -G/(H + λ) times the learning
rate). Trees grow level by level to `max_depth`.

What stays here is what differs from `veil.trees`:

* binning: each party bins its own columns from their own values (quantiles, or the midpoints
  between distinct values when there are few), so features have different numbers of bins and
  float64 cut points; `veil.trees.binning` cuts declared public bounds into equal-width float32
  bins, the same for every member (horizontal members must agree on them; a vertical party's
  columns are its own). "Go left" means "bin <= b", i.e. x < edges[b], in both;
* `Node`/`Tree`: a split is held by its `owner` under a `key` that for the passive party is an
  opaque record id (the bank never learns the feature or threshold), where `veil.trees.tree.Tree`
  stores every split's feature and threshold in XGBoost's array layout;
* `grow_tree`: splits come from callbacks (the bank's own histograms, or the passive party's
  decrypted ones) rather than from one secure sum per level;
* no clipping of g (there is no DP here; the Paillier slots widen with the largest |g|).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, cast

import numpy as np
import numpy.typing as npt

from veil.errors import ConfigError
from veil.trees.histograms import HistogramShape, node_histograms
from veil.trees.objectives import Objective as TreeObjective
from veil.trees.split import Split, SplitRule, leaf_weight
from veil.trees.split import best_split as best_split_of_arrays

__all__ = [
    "BoostSettings",
    "Histogram",
    "Node",
    "PlainBooster",
    "Tree",
    "apply_bins",
    "best_split",
    "bin_edges",
    "gradients",
    "grow_tree",
    "split_key",
    "train_plain",
]

Objective = Literal["binary", "regression"]

#: The `veil.trees` objective of each; squared error unclipped (no DP sensitivity to bound).
_TREE_OBJECTIVES: dict[str, TreeObjective] = {
    "binary": TreeObjective("binary:logistic"),
    "regression": TreeObjective("reg:squarederror", gradient_clip=math.inf),
}


@dataclass(frozen=True)
class BoostSettings:
    """Boosting settings (XGBoost's names in brackets): `trees` (n_estimators), `max_depth`,
    `bins` (max_bin), `learning_rate` (eta), `reg_lambda` (lambda), `min_child_weight`, `gamma`;
    `first_tree_active_only` keeps the first tree's splits on the label holder's columns."""

    trees: int = 5
    max_depth: int = 3
    bins: int = 32
    learning_rate: float = 0.3
    reg_lambda: float = 1.0
    min_child_weight: float = 1.0
    gamma: float = 0.0
    objective: Objective = "binary"
    first_tree_active_only: bool = False

    def __post_init__(self) -> None:
        if min(self.trees, self.max_depth) < 1 or not 2 <= self.bins <= 256:
            raise ConfigError("trees and max_depth must be >= 1 and bins in [2, 256]")
        if not 0 < self.learning_rate <= 1:
            raise ConfigError(f"learning_rate must be in (0, 1], got {self.learning_rate}")
        if min(self.reg_lambda, self.min_child_weight, self.gamma) < 0:
            raise ConfigError("reg_lambda, min_child_weight and gamma must be >= 0")
        if self.objective not in ("binary", "regression"):
            raise ConfigError("objective must be 'binary' or 'regression'")

    @property
    def rule(self) -> SplitRule:
        """The split finding and leaf weight regularisation, as `veil.trees.split` takes it."""
        return SplitRule(self.reg_lambda, self.gamma, self.min_child_weight, self.learning_rate)


def bin_edges(x: npt.NDArray[np.floating], bins: int) -> list[npt.NDArray[np.float64]]:
    """Per column, the sorted cut points (at most bins - 1): between consecutive distinct
    values when there are at most `bins` of them, else at the inner quantiles."""
    edges = []
    for column in np.asarray(x, np.float64).T:
        distinct = np.unique(column)
        if len(distinct) <= bins:
            cuts = (distinct[:-1] + distinct[1:]) / 2.0
        else:
            cuts = np.unique(np.quantile(column, np.linspace(0, 1, bins + 1)[1:-1]))
            cuts = cuts[cuts > distinct[0]]
        edges.append(np.asarray(cuts, np.float64))
    return edges


def apply_bins(
    x: npt.NDArray[np.floating], edges: list[npt.NDArray[np.float64]]
) -> npt.NDArray[np.uint8]:
    """Bin index of each value: b such that edges[b-1] <= x < edges[b]."""
    x = np.asarray(x, np.float64)
    out = np.empty(x.shape, np.uint8)
    for j, cuts in enumerate(edges):
        out[:, j] = np.searchsorted(cuts, x[:, j], side="right")
    return out


def gradients(
    objective: Objective, y: npt.NDArray[np.floating], margin: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(g, h) of the loss at the current margin, each ``(n,)``: logistic (|g| <= 1,
    h <= 1/4) or squared error (h = 1), by `veil.trees.objectives.Objective`."""
    column = np.asarray(margin, np.float64).reshape(-1, 1)
    g, h = _TREE_OBJECTIVES[objective].gradients(column, np.asarray(y, np.float64))
    return g[:, 0], h[:, 0]


@dataclass(frozen=True)
class Histogram:
    """Gradient and hessian sums per (feature, bin); `bins[j]` bins are used by feature j."""

    g: npt.NDArray[np.float64]
    h: npt.NDArray[np.float64]
    bins: tuple[int, ...]

    @classmethod
    def of(
        cls,
        binned: npt.NDArray[np.uint8],
        g: npt.NDArray[np.float64],
        h: npt.NDArray[np.float64],
        bins: tuple[int, ...],
    ) -> Histogram:
        """Plaintext histogram of `binned` rows (rows x features) with their g and h: one
        node of `veil.trees.histograms.node_histograms`, padded to the widest feature."""
        width, features = (max(bins) if bins else 1), binned.shape[1]
        if features == 0:
            return cls(np.zeros((0, width)), np.zeros((0, width)), bins)
        both = node_histograms(
            binned.astype(np.int32),
            np.zeros((len(g), 1), np.int64),
            np.asarray(g, np.float64).reshape(-1, 1),
            np.asarray(h, np.float64).reshape(-1, 1),
            HistogramShape(slots=1, groups=1, features=features, bins=width),
        )
        return cls(both[0, 0, 0], both[0, 0, 1], bins)

    def __sub__(self, other: Histogram) -> Histogram:
        return Histogram(self.g - other.g, self.h - other.h, self.bins)


def best_split(hist: Histogram, settings: BoostSettings) -> Split | None:
    """The allowed split with the largest loss change over `hist` (feature j split only within
    its own `hist.bins[j]` bins), or None if none is allowed: `veil.trees.split.best_split`."""
    return best_split_of_arrays(hist.g, hist.h, settings.rule, n_bins=hist.bins)


@dataclass
class Node:
    """A tree node: a leaf `weight`, or a split held by `owner` under `key` (the active party's
    (feature, threshold) for its own splits; an opaque record id for the passive party's)."""

    depth: int
    parent: int = -1
    weight: float = 0.0
    owner: str | None = None
    key: object = None
    left: int = -1
    right: int = -1


@dataclass
class Tree:
    """Nodes by index (0 is the root)."""

    nodes: list[Node] = field(default_factory=list)


SplitFinder = Callable[[Tree, int, npt.NDArray[np.int64]], tuple[str, float, object] | None]
Partition = Callable[
    [int, str, object, npt.NDArray[np.int64]], tuple[npt.NDArray[np.bool_], object]
]


def grow_tree(
    rows: npt.NDArray[np.int64],
    g: npt.NDArray[np.float64],
    h: npt.NDArray[np.float64],
    settings: BoostSettings,
    find: SplitFinder,
    partition: Partition,
) -> tuple[Tree, npt.NDArray[np.float64]]:
    """Grow one tree level by level. `find(tree, node, rows)` returns (owner, loss change, key)
    of the best split of the node or None; `partition(node, owner, key, rows)` says which rows
    go left and returns the key to store in the node.
    Of two siblings the smaller is visited first (so a finder can get the larger one's
    histogram as parent minus smaller). Returns the tree and each training row's leaf value
    (learning rate applied)."""
    tree = Tree([Node(0)])
    frontier = [(0, rows)]
    update = np.zeros(len(g), np.float64)
    while frontier:
        next_level = []
        for index, node_rows in frontier:
            node = tree.nodes[index]
            found = find(tree, index, node_rows) if node.depth < settings.max_depth else None
            if found is None:
                g_sum, h_sum = float(g[node_rows].sum()), float(h[node_rows].sum())
                node.weight = leaf_weight(g_sum, h_sum, settings.rule)
                update[node_rows] = node.weight
                continue
            node.owner, _, node.key = found
            left, node.key = partition(index, node.owner, node.key, node_rows)
            node.left, node.right = len(tree.nodes), len(tree.nodes) + 1
            tree.nodes += [Node(node.depth + 1, index), Node(node.depth + 1, index)]
            children = [(node.left, node_rows[left]), (node.right, node_rows[~left])]
            next_level += sorted(children, key=lambda child: len(child[1]))
        frontier = next_level
    return tree, update


def split_key(key: object) -> tuple[int, float]:
    """A split key held in the clear: (feature, threshold)."""
    feature, threshold = cast(tuple[int, float], key)
    return int(feature), float(threshold)


def tree_margins(
    trees: Sequence[Tree],
    n_rows: int,
    goes_left: Callable[[Node, npt.NDArray[np.int64]], npt.NDArray[np.bool_]],
) -> npt.NDArray[np.float64]:
    """The sum of `trees`' leaf weights for each of `n_rows` rows, routing at each internal
    node by `goes_left(node, rows)` (which of `rows` go to the left child): the one traversal
    that a party holding every split and a bank asking for passive splits both use."""
    margin: npt.NDArray[np.float64] = np.zeros(n_rows)
    for tree in trees:
        frontier = [(0, np.arange(n_rows))]
        while frontier:
            index, rows = frontier.pop()
            node = tree.nodes[index]
            if node.left < 0:
                margin[rows] += node.weight
                continue
            left = goes_left(node, rows)
            frontier += [(node.left, rows[left]), (node.right, rows[~left])]
    return margin


@dataclass
class PlainBooster:
    """Trees on one party's (or pooled) columns; split keys are (feature, threshold)."""

    trees: list[Tree]

    def predict_margin(self, x: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
        """Sum of the trees' leaf values for each row of `x`."""
        x = np.asarray(x, np.float64)

        def goes_left(node: Node, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
            feature, threshold = split_key(node.key)
            return np.asarray(x[rows, feature] < threshold)

        return tree_margins(self.trees, len(x), goes_left)


@dataclass
class _PlainRound:
    x: npt.NDArray[np.float64]
    binned: npt.NDArray[np.uint8]
    edges: list[npt.NDArray[np.float64]]
    g: npt.NDArray[np.float64]
    h: npt.NDArray[np.float64]
    settings: BoostSettings

    def find(
        self, tree: Tree, index: int, rows: npt.NDArray[np.int64]
    ) -> tuple[str, float, object] | None:
        bins = tuple(len(e) + 1 for e in self.edges)
        hist = Histogram.of(self.binned[rows], self.g[rows], self.h[rows], bins)
        best = best_split(hist, self.settings)
        if best is None:
            return None
        threshold = float(self.edges[best.feature][best.bin])
        return "plain", best.loss_change, (best.feature, threshold)

    def partition(
        self, index: int, owner: str, key: object, rows: npt.NDArray[np.int64]
    ) -> tuple[npt.NDArray[np.bool_], object]:
        feature, threshold = split_key(key)
        return np.asarray(self.x[rows, feature] < threshold, np.bool_), key


def train_plain(
    x: npt.NDArray[np.floating], y: npt.NDArray[np.floating], settings: BoostSettings
) -> PlainBooster:
    """The same boosting in plaintext on columns held in one place: SecureBoost's centralised
    twin (it is lossless: both grow the same trees up to fixed-point rounding of g and h)."""
    columns, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    edges = bin_edges(columns, settings.bins)
    binned = apply_bins(columns, edges)
    margin = np.zeros(len(y))
    trees = []
    for _ in range(settings.trees):
        g, h = gradients(settings.objective, y, margin)
        job = _PlainRound(columns, binned, edges, g, h, settings)
        tree, update = grow_tree(np.arange(len(y)), g, h, settings, job.find, job.partition)
        margin += update
        trees.append(tree)
    return PlainBooster(trees)
