"""Property tests for the partitioners in `veil.data.partition`."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.data import partition_dirichlet, partition_iid, partition_quantity_skew
from veil.errors import DataError

SETTINGS = settings(max_examples=60, deadline=None)


def assert_valid_partition(parts: list[np.ndarray], n_examples: int, n_clients: int) -> None:
    """Disjoint, complete, sorted int64 index arrays, one per client."""
    assert len(parts) == n_clients
    for part in parts:
        assert part.dtype == np.int64
        assert part.ndim == 1
        assert np.all(np.diff(part) > 0), "each part must be sorted without repeats"
    merged = np.concatenate(parts)
    assert merged.size == n_examples, "every example exactly once"
    np.testing.assert_array_equal(np.sort(merged), np.arange(n_examples))


def assert_same(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


@SETTINGS
@given(
    n_clients=st.integers(1, 12),
    extra=st.integers(0, 200),
    seed=st.integers(0, 2**32 - 1),
)
def test_iid_is_a_balanced_deterministic_partition(n_clients: int, extra: int, seed: int) -> None:
    n_examples = n_clients + extra
    parts = partition_iid(n_examples, n_clients, np.random.default_rng(seed))
    assert_valid_partition(parts, n_examples, n_clients)
    sizes = [p.size for p in parts]
    assert min(sizes) >= 1
    assert max(sizes) - min(sizes) <= 1
    assert_same(parts, partition_iid(n_examples, n_clients, np.random.default_rng(seed)))


@SETTINGS
@given(
    n_clients=st.integers(1, 8),
    n_classes=st.integers(1, 5),
    min_examples=st.integers(0, 3),
    per_client=st.integers(10, 40),
    alpha=st.floats(0.5, 100.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_dirichlet_is_a_valid_deterministic_partition(
    n_clients: int, n_classes: int, min_examples: int, per_client: int, alpha: float, seed: int
) -> None:
    n_examples = n_clients * per_client
    labels = np.random.default_rng(seed).integers(0, n_classes, size=n_examples)
    try:
        parts = partition_dirichlet(
            labels, n_clients, alpha, np.random.default_rng(seed), min_examples
        )
    except DataError as exc:  # allowed by the contract, but must say what to do
        assert "larger alpha or fewer clients" in str(exc)
        return
    assert_valid_partition(parts, n_examples, n_clients)
    assert min(p.size for p in parts) >= min_examples
    again = partition_dirichlet(labels, n_clients, alpha, np.random.default_rng(seed), min_examples)
    assert_same(parts, again)


@SETTINGS
@given(
    n_clients=st.integers(1, 12),
    min_examples=st.integers(0, 5),
    extra=st.integers(0, 200),
    alpha=st.floats(0.01, 100.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_quantity_skew_is_a_valid_deterministic_partition(
    n_clients: int, min_examples: int, extra: int, alpha: float, seed: int
) -> None:
    n_examples = n_clients * min_examples + extra
    if n_examples == 0:
        n_examples = 1
    parts = partition_quantity_skew(
        n_examples, n_clients, alpha, np.random.default_rng(seed), min_examples
    )
    assert_valid_partition(parts, n_examples, n_clients)
    assert min(p.size for p in parts) >= min_examples
    again = partition_quantity_skew(
        n_examples, n_clients, alpha, np.random.default_rng(seed), min_examples
    )
    assert_same(parts, again)


def _label_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean over clients of the total variation distance between the client's label
    distribution and the global one (0 = identical, 1 = disjoint support)."""
    n_classes = int(labels.max()) + 1
    overall = np.bincount(labels, minlength=n_classes) / labels.size
    distances = [
        0.5 * np.abs(np.bincount(labels[p], minlength=n_classes) / p.size - overall).sum()
        for p in parts
    ]
    return float(np.mean(distances))


def test_small_alpha_gives_more_label_skew_than_large_alpha() -> None:
    # Measure: mean total-variation distance between client and global label distributions,
    # averaged over 10 seeds; 10 balanced classes x 100 examples, 5 clients.
    # Observed: ~0.65 for alpha=0.1 and ~0.035 for alpha=100. Tolerance: alpha=0.1 must exceed
    # 0.4, alpha=100 must stay below 0.1 (both far from the observed values).
    labels = np.repeat(np.arange(10), 100)
    skew = {
        alpha: np.mean(
            [
                _label_skew(labels, partition_dirichlet(labels, 5, alpha, np.random.default_rng(s)))
                for s in range(10)
            ]
        )
        for alpha in (0.1, 100.0)
    }
    assert skew[0.1] > 0.4
    assert skew[100.0] < 0.1


def test_quantity_skew_small_alpha_gives_unequal_sizes() -> None:
    # Coefficient of variation of client sizes, mean over 10 seeds: large for alpha=0.1,
    # small for alpha=100 (observed ~2.0 and ~0.13; thresholds 0.8 and 0.3).
    def cv(alpha: float, seed: int) -> float:
        sizes = [
            p.size for p in partition_quantity_skew(1000, 10, alpha, np.random.default_rng(seed))
        ]
        return float(np.std(sizes) / np.mean(sizes))

    assert np.mean([cv(0.1, s) for s in range(10)]) > 0.8
    assert np.mean([cv(100.0, s) for s in range(10)]) < 0.3


def test_different_seeds_give_different_partitions() -> None:
    a = partition_iid(100, 4, np.random.default_rng(1))
    b = partition_iid(100, 4, np.random.default_rng(2))
    assert any(not np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    ("call", "numbers"),
    [
        (lambda rng: partition_iid(3, 4, rng), ["4", "3"]),
        (lambda rng: partition_iid(10, 0, rng), ["0"]),
        (lambda rng: partition_quantity_skew(10, 6, 1.0, rng, min_examples=2), ["6", "2", "10"]),
        (lambda rng: partition_quantity_skew(10, 2, 0.0, rng), ["0.0"]),
        (lambda rng: partition_quantity_skew(10, 2, -1.0, rng), ["-1.0"]),
        (lambda rng: partition_dirichlet(np.zeros(10, dtype=np.int64), 6, 1.0, rng), ["6", "10"]),
        (lambda rng: partition_dirichlet(np.zeros(10, dtype=np.int64), 2, 0.0, rng), ["0.0"]),
        (lambda rng: partition_dirichlet(np.zeros(10, dtype=np.int64), 0, 1.0, rng), ["0"]),
    ],
)
def test_impossible_requests_raise_data_error_naming_the_numbers(
    call: Callable[[np.random.Generator], object], numbers: list[str]
) -> None:
    with pytest.raises(DataError) as info:
        call(np.random.default_rng(0))
    for number in numbers:
        assert number in str(info.value)


def test_dirichlet_gives_up_with_advice_when_min_examples_cannot_be_met() -> None:
    # Two classes, 20 clients, alpha=0.01: almost all mass goes to one client per class, so
    # 20 clients with >= 2 examples each is (practically) never drawn.
    labels = np.repeat([0, 1], 200)
    with pytest.raises(DataError, match="larger alpha or fewer clients"):
        partition_dirichlet(labels, 20, 0.01, np.random.default_rng(0))
