"""The neighbour graph: complete for SecAgg, a near-regular random Harary graph for SecAgg+."""

from __future__ import annotations

import pytest

from veil.privacy.secagg.graph import neighbours

SEED = bytes(range(16))


def _names(n: int) -> list[str]:
    return [f"client-{i:02d}" for i in range(n)]


def test_complete_graph_when_degree_is_none() -> None:
    names = _names(6)
    graph = neighbours(names, None, b"")
    for name in names:
        assert graph[name] == frozenset(names) - {name}


@pytest.mark.parametrize("n", [2, 3, 4, 5, 10, 11, 17])
def test_symmetric_with_the_requested_degree(n: int) -> None:
    names = _names(n)
    for degree in range(1, n):
        graph = neighbours(names, degree, SEED)
        assert set(graph) == set(names)
        for name, peers in graph.items():
            assert name not in peers
            assert all(name in graph[peer] for peer in peers)
        degrees = sorted(len(peers) for peers in graph.values())
        if n * degree % 2 == 0:
            assert degrees == [degree] * n
        else:  # no degree-regular graph exists: exactly one client gets one more
            assert degrees == [degree] * (n - 1) + [degree + 1]


def test_deterministic_in_the_seed_and_independent_of_order() -> None:
    names = _names(20)
    graph = neighbours(names, 4, SEED)
    assert graph == neighbours(list(reversed(names)), 4, SEED)
    assert graph == neighbours(names, 4, bytes(SEED))
    assert graph != neighbours(names, 4, bytes(16))


def test_validation() -> None:
    names = _names(5)
    with pytest.raises(ValueError, match="degree"):
        neighbours(names, 5, SEED)
    with pytest.raises(ValueError, match="degree"):
        neighbours(names, 0, SEED)
    with pytest.raises(ValueError, match="seed"):
        neighbours(names, 2, b"short")
    with pytest.raises(ValueError, match="distinct"):
        neighbours(["a", "a", "b"], None, b"")
