"""Who shares masks with whom: the complete graph (SecAgg) or a sparse random graph (SecAgg+).

In SecAgg (Bonawitz et al. 2017) every pair of clients shares a pairwise mask and every client
secret-shares its keys with all others: O(n) work per client and O(n²) for the server. SecAgg+
(Bell et al. 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", §3) does
the same over a sparse graph of degree O(log n), chosen at random by the server each round: a
client masks with, and shares its keys among, its neighbours only.

The sparse graph here is the Harary graph H(degree, n) (the circulant graph in which position i
is joined to i ± 1, …, i ± ⌊degree/2⌋, plus the "diameter" chord for odd degree) laid over a
pseudo-random order of the clients, as in Bell et al. The order sorts the clients by
SHA-256(``signing_payload("secagg-graph", seed, name)``), so it depends only on the per-round
`seed`, and every client recomputes its own neighbourhood.

Degrees: every client has exactly `degree` neighbours, except when both `degree` and the number
of clients are odd (no such regular graph exists), where one client has ``degree + 1``.

Security depends on the graph being random and unknown to the server until the clients have
committed: `veil.privacy.secagg.protocol.graph_seed` derives the seed from every client's signed
advertisement, never from the server (a server that could pick the seed could isolate a victim
among colluding neighbours; Bell et al. §5).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from veil.crypto.identity import signing_payload

__all__ = ["MIN_SEED_BYTES", "neighbours"]

#: A graph seed shorter than this is refused (the order must not be guessable).
MIN_SEED_BYTES = 16

_LABEL = "secagg-graph"


def neighbours(
    clients: Sequence[str], degree: int | None, seed: bytes
) -> dict[str, frozenset[str]]:
    """Each client's neighbours (never itself) in a symmetric graph over `clients`.

    ``degree=None`` gives the complete graph (SecAgg; `seed` is ignored). Otherwise
    ``1 <= degree < len(clients)`` and `seed` is at least 16 bytes; the result is the Harary
    graph described in the module docstring, deterministic in (`clients`, `degree`, `seed`)
    and independent of the order of `clients`. ValueError for duplicate names or a bad
    degree or seed.
    """
    names = sorted(clients)
    if len(set(names)) != len(names):
        raise ValueError("client names must be distinct")
    if degree is None:
        everyone = frozenset(names)
        return {name: everyone - {name} for name in names}
    n = len(names)
    if isinstance(degree, bool) or not isinstance(degree, int):
        raise TypeError(f"degree must be an int or None, got {type(degree).__name__}")
    if not 1 <= degree < n:
        raise ValueError(
            f"degree must be between 1 and the number of clients minus one ({n - 1}), "
            f"got {degree}; use degree = None for the complete graph"
        )
    if len(seed) < MIN_SEED_BYTES:
        raise ValueError(f"the graph seed must be at least {MIN_SEED_BYTES} bytes")
    order = sorted(
        names, key=lambda name: hashlib.sha256(signing_payload(_LABEL, seed, name)).digest()
    )
    links: dict[str, set[str]] = {name: set() for name in names}

    def join(a: int, b: int) -> None:
        u, v = order[a % n], order[b % n]
        links[u].add(v)
        links[v].add(u)

    for position in range(n):
        for distance in range(1, degree // 2 + 1):
            join(position, position + distance)
    if degree % 2:
        # The chord across the circle; distance n // 2 > degree // 2 since degree < n.
        if n % 2 == 0:
            for position in range(n // 2):
                join(position, position + n // 2)
        else:
            # Harary H(2r+1, n) for odd n: (n + 1) / 2 chords of length (n - 1) / 2, which
            # cover every position; position 0 gets two, i.e. degree + 1.
            for position in range((n + 1) // 2):
                join(position, position + (n - 1) // 2)
    return {name: frozenset(links[name]) for name in names}
