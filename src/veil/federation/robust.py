"""Robust aggregation: estimates of a round's update that a minority of arbitrary (Byzantine)
updates cannot drag far, and update-norm bounding.

Each robust aggregator is an `Aggregator` of the update pipeline. Unlike `WeightedSum`, it must
hold every update of the round (a median needs all of them), in one `(n, d)` float32 matrix:
n selected clients times d parameters, 4·n·d bytes. Rows follow the order of the selected clients,
so the estimate does not depend on the order in which updates arrive.

How weights are treated: a client's weight (its self-reported number of examples) is ignored by
the robust estimators, since a malicious client could inflate it; every accepted update counts
once. The `Aggregate` they return has `weight = n` (the updates the estimate rests on) and
`total = n · estimate`, so `Aggregate.mean()` — what every strategy consumes — is the robust
estimate itself, and strategies run unchanged. Summed scalars (`FitResult.sums`) are summed over
all accepted updates.

The server must see each individual update: robust aggregation works with plaintext
aggregation (and an attested TEE aggregator), never under masking (SecAgg) or CKKS, which hide
individual updates by design. `RunConfig` refuses those combinations.

Estimators:

- `CoordinateMedian` and `TrimmedMean`: Yin, Chen, Ramchandran, Bartlett 2018, "Byzantine-Robust
  Distributed Learning: Towards Optimal Statistical Rates" (coordinate-wise median; β-trimmed mean,
  which drops the β·n largest and β·n smallest values of each coordinate).
- `Krum` (and Multi-Krum with `keep > 1`): Blanchard, El Mhamdi, Guerraoui, Stainer 2017,
  "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent". With f Byzantine
  clients among n, each update's score is the sum of its squared distances to its n − f − 2
  nearest neighbours; Krum takes the update with the lowest score, Multi-Krum averages the m
  lowest-scoring ones. Needs n > 2f + 2.
- `NormBound` wraps any aggregator and scales every update down to an L2 norm of at most M before
  it is aggregated (norm-difference clipping of Sun, Kairouz, Suresh, McMahan 2019, "Can You
  Really Backdoor Federated Learning?").
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import numpy.typing as npt

from veil.federation.messages import FitResult
from veil.federation.pipeline import (
    Accumulator,
    Aggregate,
    AggregationFailed,
    Aggregator,
    MappedAggregator,
    ProtocolChannel,
    RoundContext,
    UpdateRejected,
    check_update,
)
from veil.tensors import NamedArrays, l2_norm

Matrix = npt.NDArray[np.float32]
Vector = npt.NDArray[np.float32]

#: Temporary working set of the coordinate-wise estimators, in matrix entries per block.
_BLOCK_ENTRIES = 1 << 22
#: Clients named in a round's report (e.g. those Multi-Krum left out); the rest are counted.
REPORT_NAMES = 10


class RobustAggregator(ABC):
    """Base of the aggregators that hold a round's updates and compute one robust estimate."""

    name: str = "robust"

    def start(
        self,
        reference: NamedArrays,
        context: RoundContext,
        channel: ProtocolChannel | None = None,
    ) -> Accumulator:
        return _BufferedAccumulator(self, reference, list(context.clients))

    def min_updates(self) -> int:
        """The fewest updates from which this estimator can form an estimate."""
        return 1

    @abstractmethod
    def estimate(self, updates: Matrix) -> tuple[Vector, list[int], dict[str, Any]]:
        """The estimate from an `(n, d)` matrix of updates (n ≥ `min_updates()`), the rows it
        rests on entirely (empty for coordinate-wise estimators, which mix all rows), and what
        to report about the round."""


class CoordinateMedian(RobustAggregator):
    """Coordinate-wise median (Yin et al. 2018): each parameter's median over the round's
    updates, as `numpy.median` computes it (the mean of the two middle values for even n)."""

    name = "median"

    def estimate(self, updates: Matrix) -> tuple[Vector, list[int], dict[str, Any]]:
        return coordinate_median(updates), [], {}


class TrimmedMean(RobustAggregator):
    """Coordinate-wise β-trimmed mean (Yin et al. 2018): for each parameter, drop the
    ⌊β·n⌋ largest and ⌊β·n⌋ smallest values and average the rest."""

    name = "trimmed_mean"

    def __init__(self, trim_fraction: float) -> None:
        if not 0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
        self.trim_fraction = trim_fraction

    def estimate(self, updates: Matrix) -> tuple[Vector, list[int], dict[str, Any]]:
        trim = math.floor(self.trim_fraction * updates.shape[0])
        return trimmed_mean(updates, trim), [], {"trimmed_per_side": trim}


class Krum(RobustAggregator):
    """Krum, and Multi-Krum for `keep > 1` (Blanchard et al. 2017).

    `byzantine` is f, the number of Byzantine updates to tolerate in a round; a round needs
    n > 2f + 2 updates, otherwise it fails (`AggregationFailed`) and leaves the model unchanged.
    `keep` is Multi-Krum's m; None keeps n − f (the paper's suggestion), and a fixed m larger
    than n − f in a round with dropouts is lowered to n − f.
    """

    def __init__(self, byzantine: int, keep: int | None = 1) -> None:
        if byzantine < 0:
            raise ValueError(f"byzantine must be >= 0, got {byzantine}")
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.byzantine = byzantine
        self.keep = keep
        self.name = "krum" if keep == 1 else "multi_krum"

    def min_updates(self) -> int:
        return 2 * self.byzantine + 3

    def estimate(self, updates: Matrix) -> tuple[Vector, list[int], dict[str, Any]]:
        n = updates.shape[0]
        scores = krum_scores(updates, self.byzantine)
        keep = n - self.byzantine if self.keep is None else min(self.keep, n - self.byzantine)
        chosen = sorted(np.argsort(scores, kind="stable")[:keep].tolist())
        mean = updates[chosen].astype(np.float64).mean(axis=0).astype(np.float32)
        return mean, chosen, {"byzantine": self.byzantine, "kept": keep}


class NormBound(MappedAggregator):
    """Any aggregator, after scaling each update down to an L2 norm of at most `max_norm`
    (Sun et al. 2019). Updates within the bound pass unchanged; the round's report counts the
    scaled ones."""

    def __init__(self, inner: Aggregator, max_norm: float) -> None:
        if not max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        self.max_norm = max_norm
        super().__init__(inner, f"norm_bound+{inner.name}", lambda _: _NormBounder(max_norm))


class _NormBounder:
    def __init__(self, max_norm: float) -> None:
        self.max_norm = max_norm
        self.scaled = 0

    def apply(self, result: FitResult) -> FitResult:
        norm = l2_norm(result.update)
        if np.isfinite(norm) and norm > self.max_norm:
            factor = np.float32(self.max_norm / norm)
            result = replace(result, update={k: a * factor for k, a in result.update.items()})
            self.scaled += 1
        return result

    def report(self) -> dict[str, Any]:
        return {"max_update_norm": self.max_norm, "norm_bounded": self.scaled}


class _BufferedAccumulator:
    """Holds the round's updates as rows of one matrix, in the order of the selected clients."""

    def __init__(
        self, estimator: RobustAggregator, reference: NamedArrays, participants: list[str]
    ) -> None:
        self.participants = participants
        self._estimator = estimator
        self._reference = reference
        self._row = {name: i for i, name in enumerate(participants)}
        size = sum(int(a.size) for a in reference.values())
        self._matrix = np.empty((len(participants), size), np.float32)
        self._filled = np.zeros(len(participants), bool)
        self._sums: dict[str, float] = {}

    def add(self, result: FitResult) -> None:
        check_update(self._reference, result)
        row = self._row.get(result.client)
        if row is None:
            raise UpdateRejected(f"client '{result.client}' is not a participant of this round")
        if self._filled[row]:
            raise UpdateRejected(f"client '{result.client}' has already sent its update")
        offset = 0
        for name, ref in self._reference.items():
            self._matrix[row, offset : offset + ref.size] = result.update[name].reshape(-1)
            offset += ref.size
        self._filled[row] = True
        for key, value in result.sums.items():
            self._sums[key] = self._sums.get(key, 0.0) + value

    def finish(self) -> Aggregate:
        rows = np.flatnonzero(self._filled)
        n = int(rows.size)
        needed = self._estimator.min_updates()
        if n < needed:
            raise AggregationFailed(
                f"{self._estimator.name} needs at least {needed} updates, and {n} arrived"
            )
        # Every participant answered (the usual case): use the matrix itself, not a copy.
        updates = self._matrix if n == len(self.participants) else self._matrix[rows]
        self._matrix = np.empty((0, 0), np.float32)
        estimate, used, report = self._estimator.estimate(updates)
        names = [self.participants[i] for i in rows]
        norms = np.sqrt(np.einsum("ij,ij->i", updates, updates, dtype=np.float64))
        report = {"method": self._estimator.name, "updates": n, **report}
        report["update_norm_median"] = float(np.median(norms))
        report["update_norm_max"] = float(norms.max())
        if used:
            kept = set(used)
            left_out = [names[i] for i in range(n) if i not in kept]
            report["left_out"] = len(left_out)
            report["left_out_clients"] = left_out[:REPORT_NAMES]
        return Aggregate(
            total=self._unflatten(estimate * np.float32(n)),
            weight=float(n),
            count=n,
            sums=self._sums,
            report=report,
        )

    def _unflatten(self, flat: Vector) -> NamedArrays:
        out: NamedArrays = {}
        offset = 0
        for name, ref in self._reference.items():
            out[name] = flat[offset : offset + ref.size].reshape(ref.shape).astype(np.float32)
            offset += ref.size
        return out


def coordinate_median(updates: Matrix) -> Vector:
    """`numpy.median(updates, axis=0)`, computed in column blocks to bound temporary memory."""
    return _by_columns(updates, lambda block: np.median(block, axis=0))


def trimmed_mean(updates: Matrix, trim: int) -> Vector:
    """Per column, the mean (in float64) of the values left after dropping the `trim` largest
    and the `trim` smallest; needs `2 · trim < n`."""
    n = updates.shape[0]
    if not 0 <= 2 * trim < n:
        raise ValueError(f"cannot trim {trim} from each side of {n} values")

    def block_mean(block: Matrix) -> Vector:
        ordered = np.sort(block, axis=0)[trim : n - trim]
        mean: Vector = ordered.astype(np.float64).mean(axis=0).astype(np.float32)
        return mean

    return _by_columns(updates, block_mean)


def krum_scores(updates: Matrix, byzantine: int) -> npt.NDArray[np.float64]:
    """Krum's score of each row: the sum of its squared L2 distances to its n − f − 2 nearest
    other rows (Blanchard et al. 2017). Distances are computed in float64 in row blocks, so
    memory stays O(block · n), not O(n²)."""
    n = updates.shape[0]
    neighbours = n - byzantine - 2
    if byzantine < 0 or n <= 2 * byzantine + 2:
        raise ValueError(f"Krum with f = {byzantine} needs n > 2f + 2 updates, got n = {n}")
    x = updates.astype(np.float64)
    squares = np.einsum("ij,ij->i", x, x)
    scores = np.empty(n, np.float64)
    step = max(1, (1 << 21) // max(n, 1))
    for start in range(0, n, step):
        stop = min(n, start + step)
        dist = squares[start:stop, None] + squares[None, :] - 2.0 * (x[start:stop] @ x.T)
        np.maximum(dist, 0.0, out=dist)
        dist[np.arange(stop - start), np.arange(start, stop)] = np.inf  # not its own neighbour
        nearest = np.partition(dist, neighbours - 1, axis=1)[:, :neighbours]
        scores[start:stop] = nearest.sum(axis=1)
    return scores


def _by_columns(updates: Matrix, reduce: Callable[[Matrix], Vector]) -> Vector:
    n, d = updates.shape
    width = max(1, _BLOCK_ENTRIES // max(n, 1))
    out = np.empty(d, np.float32)
    for start in range(0, d, width):
        out[start : start + width] = reduce(updates[:, start : start + width])
    return out
