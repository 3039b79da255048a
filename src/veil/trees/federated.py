"""Federated gradient boosting: the members, the coordinator, one tree (per group) per round.

A round grows one tree per group (one per class for ``multi:softprob``) level by level:

1. every member computes g and h of its rows from the current ensemble's margins (clipped,
   `veil.trees.objectives`);
2. for each level, every member builds its gradient and hessian histograms for the frontier
   nodes (`veil.trees.histograms`), adds its share of the DP noise when DP is on, and hands the
   vector to the level's sum (`SecureSum`: one SecAgg round; the coordinator receives masked
   vectors only and decodes the sum);
3. the coordinator finds each node's best split on the summed histograms (`veil.trees.split`)
   and sends the decisions (feature, bin) back; members route their rows to the children;
4. nodes that do not split, and the children of the last level, become leaves with weight
   ``-G / (H + λ) · η``, computed from the parent's summed histograms (no further release).

So a tree of depth d costs at most d secure sums, and the coordinator learns the level sums
only. With DP, each sum is a Gaussian mechanism: one record adds (g, h), clipped, to one bin per
feature and group, so the L2 sensitivity of a level's histograms is
``sqrt(features · groups · (g_bound² + h_bound²))`` (`histogram_sensitivity`); noise of standard
deviation σ = z · sensitivity is added, by the members as shares of variance σ² / t (t the
SecAgg threshold: any sum the coordinator can unmask holds at least t shares) or, without
secure aggregation, by the coordinator. Splits, leaf weights and everything after are
post-processing of the noisy sums.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from veil.privacy.dp.randomness import RandomSource, SecureRandom
from veil.trees.binning import BinEdges
from veil.trees.booster import Ensemble
from veil.trees.histograms import HistogramShape, node_histograms
from veil.trees.objectives import Objective
from veil.trees.secure_sum import SumResult
from veil.trees.split import SplitRule, best_split, leaf_weight
from veil.trees.tree import Tree

__all__ = [
    "BoostingPlan",
    "Decision",
    "FederatedBooster",
    "HistogramNoise",
    "Summer",
    "TreeMember",
    "TreeRound",
    "histogram_sensitivity",
]

#: A frontier node's fate: None (a leaf), or (feature, bin, left child's slot, right child's).
Decision = tuple[int, int, int, int] | None


def histogram_sensitivity(
    features: int, groups: int, gradient_bound: float, hessian_bound: float
) -> float:
    """The L2 sensitivity of one level's histograms to adding or removing one record."""
    return math.sqrt(features * groups * (gradient_bound**2 + hessian_bound**2))


@dataclass(frozen=True)
class HistogramNoise:
    """Gaussian noise on every level's summed histograms: standard deviation
    ``noise_multiplier · sensitivity``; `shares` members each add a share of variance σ²/shares
    (None: the coordinator adds all of it to the sum)."""

    noise_multiplier: float
    sensitivity: float
    shares: int | None = None

    @property
    def stddev(self) -> float:
        return self.noise_multiplier * self.sensitivity

    @property
    def member_stddev(self) -> float:
        return 0.0 if self.shares is None else self.stddev / math.sqrt(self.shares)


@dataclass(frozen=True)
class BoostingPlan:
    """What every party agrees on: rounds (trees per group), depth, split rule, objective."""

    rounds: int
    max_depth: int
    rule: SplitRule
    objective: Objective
    noise: HistogramNoise | None = None

    def __post_init__(self) -> None:
        if self.rounds < 1 or not 1 <= self.max_depth <= 12:
            raise ValueError("rounds must be >= 1 and max_depth between 1 and 12")

    def shape(self, edges: BinEdges) -> HistogramShape:
        """The histograms of one level: ``2 ** (max_depth - 1)`` node slots."""
        return HistogramShape(
            2 ** (self.max_depth - 1), self.objective.n_groups, edges.n_features, edges.n_bins
        )


class TreeMember:
    """One organisation's rows and its half of the protocol; nothing but its (noised)
    histogram vectors leaves it."""

    def __init__(
        self,
        name: str,
        x: npt.ArrayLike,
        y: npt.ArrayLike,
        edges: BinEdges,
        objective: Objective,
        *,
        random: RandomSource | None = None,
    ) -> None:
        self.name = name
        self.x = np.asarray(x, dtype=np.float32)
        self.y = np.asarray(y, dtype=np.float64)
        self.bins = edges.transform(self.x)
        self.objective = objective
        self.random = random if random is not None else SecureRandom()
        groups = objective.n_groups
        self.margin = np.zeros((self.x.shape[0], groups), dtype=np.float64)
        self.node = np.zeros((self.x.shape[0], groups), dtype=np.int64)
        self.g = np.zeros_like(self.margin)
        self.h = np.zeros_like(self.margin)

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])

    def start_tree(self) -> None:
        """g and h of every row at the current margins; every row at the root."""
        self.g, self.h = self.objective.gradients(self.margin, self.y)
        self.node[:] = 0

    def histograms(self, shape: HistogramShape, noise_stddev: float = 0.0) -> npt.NDArray[Any]:
        """This level's histograms, flattened, plus this member's noise share."""
        vector = node_histograms(self.bins, self.node, self.g, self.h, shape).reshape(-1)
        if noise_stddev > 0:
            vector += noise_stddev * self.random.standard_normal(vector.size)
        return vector

    def route(self, decisions: Sequence[Sequence[Decision]]) -> None:
        """Move every row to its child's slot (or -1 at a leaf); `decisions[k][s]` is the
        fate of slot s of group k's tree."""
        for k, fates in enumerate(decisions):
            current = self.node[:, k].copy()
            self.node[:, k] = -1
            for slot, fate in enumerate(fates):
                if fate is None:
                    continue
                feature, bin_, left, right = fate
                rows = current == slot
                goes_left = self.bins[:, feature] <= bin_
                self.node[rows & goes_left, k] = left
                self.node[rows & ~goes_left, k] = right

    def finish_tree(self, trees: Sequence[Tree]) -> None:
        """Add the round's trees (one per group) to the margins."""
        for k, tree in enumerate(trees):
            self.margin[:, k] += tree.predict(self.x)


class Summer(Protocol):
    """A sum of the members' vectors (`SecureSum`, or `ClearSum` in the clear)."""

    def run(self, round_: int, vectors: Mapping[str, npt.NDArray[np.float64]]) -> SumResult: ...


@dataclass
class TreeRound:
    """One boosting round: its trees (one per group) and what it cost."""

    round: int
    trees: list[Tree]
    #: Sums (histogram releases) the round ran: one per level with a frontier.
    levels: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    duration_s: float = 0.0
    aggregation: dict[str, Any] = field(default_factory=dict)


class FederatedBooster:
    """The coordinator: grows the ensemble from summed histograms only."""

    def __init__(
        self,
        members: Sequence[TreeMember],
        plan: BoostingPlan,
        edges: BinEdges,
        summer: Summer,
        *,
        server_random: RandomSource | None = None,
    ) -> None:
        if not members:
            raise ValueError("federated boosting needs at least one member")
        self.members = list(members)
        self.plan = plan
        self.edges = edges
        self.summer = summer
        self.server_random = server_random if server_random is not None else SecureRandom()
        self.ensemble = Ensemble(plan.objective.name, edges.n_features, plan.objective.n_groups)
        self._sums = 0

    def fit(self, on_round: Callable[[TreeRound, Ensemble], None] | None = None) -> Ensemble:
        """Run every round; `on_round` sees each finished round and the ensemble so far."""
        for r in range(1, self.plan.rounds + 1):
            record = self.grow_round(r)
            if on_round is not None:
                on_round(record, self.ensemble)
        return self.ensemble

    def grow_round(self, round_: int) -> TreeRound:
        """Grow one tree per group and add them to the ensemble and the members' margins."""
        started = time.perf_counter()
        groups = self.plan.objective.n_groups
        for member in self.members:
            member.start_tree()
        record = TreeRound(round=round_, trees=[Tree.root(0.0, 0.0) for _ in range(groups)])
        frontiers: list[list[int]] = [[0] for _ in range(groups)]
        for depth in range(self.plan.max_depth):
            if not any(frontiers):
                break
            total = self._level_sum(record)
            decisions, frontiers = self._split_level(record.trees, frontiers, total, depth)
            for member in self.members:
                member.route(decisions)
        for member in self.members:
            member.finish_tree(record.trees)
        self.ensemble.trees.extend(record.trees)
        record.duration_s = time.perf_counter() - started
        return record

    def _level_sum(self, record: TreeRound) -> npt.NDArray[np.float64]:
        """One secure sum of the members' histograms (noised when DP is on)."""
        shape = self.plan.shape(self.edges)
        noise = self.plan.noise
        share = noise.member_stddev if noise is not None else 0.0
        vectors = {m.name: m.histograms(shape, share) for m in self.members}
        self._sums += 1
        result = self.summer.run(self._sums, vectors)
        total = result.total
        if noise is not None and noise.shares is None:
            total = total + noise.stddev * self.server_random.standard_normal(total.size)
        record.levels += 1
        record.bytes_up += result.bytes_up
        record.bytes_down += result.bytes_down
        record.aggregation = result.report
        return total.reshape(shape.shape)

    def _split_level(
        self,
        trees: list[Tree],
        frontiers: list[list[int]],
        total: npt.NDArray[np.float64],
        depth: int,
    ) -> tuple[list[list[Decision]], list[list[int]]]:
        """Each frontier node's split (or leaf) from the level's sums; the next frontiers."""
        rule = self.plan.rule
        last = depth == self.plan.max_depth - 1
        decisions: list[list[Decision]] = []
        nexts: list[list[int]] = []
        for k, frontier in enumerate(frontiers):
            fates: list[Decision] = []
            following: list[int] = []
            for slot, node in enumerate(frontier):
                grad, hess = total[slot, k, 0], total[slot, k, 1]
                if depth == 0:  # the root's own totals: each feature's bins cover every row
                    g, h = float(grad.sum(axis=1).mean()), float(hess.sum(axis=1).mean())
                    trees[k].weight[0] = float(np.float32(leaf_weight(g, h, rule)))
                    trees[k].hessian[0] = h
                split = best_split(grad, hess, rule)
                if split is None:
                    fates.append(None)
                    continue
                children = (
                    (leaf_weight(*split.left, rule), split.left[1]),
                    (leaf_weight(*split.right, rule), split.right[1]),
                )
                threshold = self.edges.threshold(split.feature, split.bin)
                left, right = trees[k].split(
                    node, split.feature, threshold, split.loss_change, children
                )
                if last:
                    fates.append(None)
                    continue
                fates.append((split.feature, split.bin, len(following), len(following) + 1))
                following += [left, right]
            decisions.append(fates)
            nexts.append(following)
        return decisions, nexts
