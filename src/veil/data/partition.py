"""Split examples among federated clients: IID, label skew (Dirichlet) and quantity skew.

Every partitioner returns ``n_clients`` sorted int64 arrays of positions ``0..n-1`` into the
examples it was given. The arrays are disjoint and together cover every position exactly once.
All randomness comes from the `numpy.random.Generator` passed in, so a seeded generator gives
the same partition every time.
"""

from __future__ import annotations

from typing import Final

import numpy as np

from veil.errors import DataError

__all__ = ["partition_dirichlet", "partition_iid", "partition_quantity_skew"]

MAX_DIRICHLET_ATTEMPTS: Final[int] = 1000
"""How many times `partition_dirichlet` redraws before it gives up."""


def partition_iid(n_examples: int, n_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle the examples and deal them out in near-equal shares.

    Client sizes differ by at most one. Every client gets at least one example.

    Raises:
        DataError: If ``n_clients < 1`` or ``n_clients > n_examples``.
    """
    _check_counts(n_examples, n_clients, min_examples=1)
    permutation = rng.permutation(n_examples)
    return [np.sort(part).astype(np.int64) for part in np.array_split(permutation, n_clients)]


def partition_dirichlet(
    labels: np.ndarray,
    n_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_examples: int = 2,
) -> list[np.ndarray]:
    """Label-skewed partition (Hsu, Qi and Brown 2019, "Measuring the effects of non-identical
    data distribution for federated visual classification").

    For each class separately, the class's examples are shuffled and split among the clients in
    proportions drawn from a symmetric ``Dirichlet(alpha)``. Small `alpha` (e.g. 0.1) gives each
    client few classes; large `alpha` (e.g. 100) approaches an IID split. If some client ends up
    with fewer than `min_examples` examples the whole draw is repeated, at most
    `MAX_DIRICHLET_ATTEMPTS` times.

    Args:
        labels: 1-D integer class labels of the examples to split.
        n_clients: Number of clients, at least 1.
        alpha: Dirichlet concentration, > 0.
        rng: Source of randomness.
        min_examples: Smallest acceptable client size, >= 0.

    Raises:
        DataError: For impossible requests (``n_clients < 1``, ``alpha <= 0``,
            ``n_clients * min_examples > len(labels)``) or when no draw within the retry bound
            gives every client `min_examples` examples; the message suggests a larger `alpha` or
            fewer clients.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    n_examples = int(labels.shape[0])
    _check_alpha(alpha)
    _check_counts(n_examples, n_clients, min_examples)

    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    concentration = np.full(n_clients, float(alpha))
    for _ in range(MAX_DIRICHLET_ATTEMPTS):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
        for members in by_class:
            shuffled = rng.permutation(members)
            proportions = _dirichlet(rng, concentration)
            cuts = np.round(np.cumsum(proportions)[:-1] * shuffled.size).astype(np.int64)
            for client, chunk in enumerate(np.split(shuffled, cuts)):
                parts[client].append(chunk)
        merged = [np.sort(np.concatenate(chunks)).astype(np.int64) for chunks in parts]
        if min(part.size for part in merged) >= min_examples:
            return merged
    raise DataError(
        f"could not split {n_examples} examples among {n_clients} clients with Dirichlet "
        f"alpha={alpha} so that every client gets at least {min_examples} examples "
        f"({MAX_DIRICHLET_ATTEMPTS} attempts); use a larger alpha or fewer clients"
    )


def partition_quantity_skew(
    n_examples: int,
    n_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_examples: int = 2,
) -> list[np.ndarray]:
    """Quantity-skewed partition: unequal client sizes, IID labels.

    Each client first gets `min_examples` examples; the remaining
    ``n_examples - n_clients * min_examples`` are divided by a multinomial draw with proportions
    from a symmetric ``Dirichlet(alpha)``. The examples themselves are assigned uniformly at
    random, so every client's label distribution matches the whole in expectation. Small
    `alpha` gives very unequal sizes; large `alpha` gives near-equal sizes.

    Raises:
        DataError: If ``n_clients < 1``, ``alpha <= 0`` or
            ``n_clients * min_examples > n_examples``.
    """
    _check_alpha(alpha)
    _check_counts(n_examples, n_clients, min_examples)
    proportions = _dirichlet(rng, np.full(n_clients, float(alpha)))
    extra = rng.multinomial(n_examples - n_clients * min_examples, proportions)
    sizes = extra + min_examples
    permutation = rng.permutation(n_examples)
    chunks = np.split(permutation, np.cumsum(sizes)[:-1])
    return [np.sort(chunk).astype(np.int64) for chunk in chunks]


def _dirichlet(rng: np.random.Generator, concentration: np.ndarray) -> np.ndarray:
    """A Dirichlet draw that is always a valid probability vector (tiny alpha can underflow)."""
    proportions = rng.dirichlet(concentration)
    total = proportions.sum()
    if not np.isfinite(total) or total <= 0:
        proportions = np.zeros_like(concentration)
        proportions[rng.integers(concentration.size)] = 1.0
        return proportions
    return np.asarray(proportions / total, dtype=np.float64)


def _check_alpha(alpha: float) -> None:
    if not alpha > 0 or not np.isfinite(alpha):
        raise DataError(f"Dirichlet alpha must be a positive number, got {alpha}")


def _check_counts(n_examples: int, n_clients: int, min_examples: int) -> None:
    if n_clients < 1:
        raise DataError(f"the number of clients must be at least 1, got {n_clients}")
    if min_examples < 0:
        raise DataError(f"min_examples must be >= 0, got {min_examples}")
    if n_clients * min_examples > n_examples:
        raise DataError(
            f"cannot give each of {n_clients} clients at least {min_examples} examples from "
            f"only {n_examples} examples (needs {n_clients * min_examples}); use fewer clients"
        )
