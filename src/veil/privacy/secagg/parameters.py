"""SecAgg+ parameters from the federation's size, dropout rate and corruption rate.

Bell et al. 2020 ("Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", §3–4)
choose the degree k of the random graph and the Shamir threshold t so that, with overwhelming
probability over the random graph, (a) no client's neighbourhood holds enough corrupted clients
to break it, and (b) every neighbourhood keeps at least t survivors. They bound both with tail
bounds and a union bound over the n clients; this module does the same computation numerically,
with exact hypergeometric tails, for the protocol Veil runs:

* A client's neighbours in the Harary graph laid over a uniformly random order of the clients
  (`veil.privacy.secagg.graph`, seeded by every client's advertisement) are a uniformly random
  k-subset of the other n - 1 clients. Its holder set H (itself and its neighbours) has k + 1
  members.
* Security against a malicious server (`veil.privacy.secagg.protocol`): two different unmask
  requests can both gather t consistency signatures in H only if at least ``2t - |H|`` of H
  sign both, i.e. are corrupted. With ⌊γn⌋ corrupted clients, the neighbours a client draws
  hold Hypergeometric(n - 1, ⌊γn⌋, k) of them; the probability that any client sees at least
  ``2t - (k + 1)`` (the client itself counted as corrupted, the worst case) is bounded by
  n times the tail, and must be at most 2^-σ.
* Correctness: a round fails when some holder set keeps fewer than t survivors. With ⌈δn⌉
  dropouts the same union bound over ``Hypergeometric(n - 1, ⌈δn⌉, k) > k + 1 - t - 1`` (the
  client itself dropped, the worst case) must be at most 2^-η.
* Veil also enforces ``3t > 2(k + 1)`` in every round (`RoundParams`), whatever the rates.

The smallest even k (every holder set then has exactly k + 1 members) with a threshold meeting
all three is returned; when none below n - 1 does, the complete graph (SecAgg) is the answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from veil.privacy.secagg.protocol import active_threshold

__all__ = ["SecAggPlusParameters", "secagg_plus_parameters"]

#: Statistical security: the chance that the random graph breaks privacy in a round.
SECURITY_BITS = 40
#: The chance that a round fails because a neighbourhood lost too many clients.
CORRECTNESS_BITS = 20


@dataclass(frozen=True)
class SecAggPlusParameters:
    """A degree (None: the complete graph) and threshold, with the failure bounds they meet."""

    degree: int | None
    threshold: int
    #: log2 of the union bound on a privacy failure per round (≤ -SECURITY_BITS).
    log2_privacy_failure: float
    #: log2 of the union bound on a correctness failure (a round that cannot finish).
    log2_round_failure: float


def secagg_plus_parameters(
    n_clients: int,
    dropout_rate: float,
    corruption_rate: float,
    *,
    security_bits: int = SECURITY_BITS,
    correctness_bits: int = CORRECTNESS_BITS,
) -> SecAggPlusParameters:
    """The sparsest graph and its threshold for rounds of `n_clients` in which up to a fraction
    `dropout_rate` of clients drop out and a fraction `corruption_rate` collude with the server
    (see the module docstring for the bounds). ValueError for rates outside [0, 1/3) and [0, 1)
    or fewer than 3 clients."""
    if n_clients < 3:
        raise ValueError(f"SecAgg+ needs at least 3 clients, got {n_clients}")
    if not 0 <= corruption_rate < 1 / 3:
        raise ValueError(
            f"corruption_rate must be in [0, 1/3) (Veil's threshold tolerates fewer than a "
            f"third of a neighbourhood corrupted), got {corruption_rate}"
        )
    if not 0 <= dropout_rate < 1:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
    from scipy.stats import hypergeom

    corrupted = math.floor(corruption_rate * n_clients)
    dropped = math.ceil(dropout_rate * n_clients)
    log2_n = math.log2(n_clients)

    def log2_tail(bad: int, degree: int, at_least: int) -> float:
        """log2 of n · P[a client's k neighbours hold at least `at_least` of `bad`]."""
        if at_least <= 0:
            return log2_n
        p = float(hypergeom.sf(at_least - 1, n_clients - 1, min(bad, n_clients - 1), degree))
        return log2_n + (math.log2(p) if p > 0 else -math.inf)

    for degree in range(2, n_clients - 1, 2):
        holders = degree + 1
        for t in range(max(2, active_threshold(holders)), holders + 1):
            # The client itself may be corrupted (or dropped): one of the bad ones is free.
            privacy = log2_tail(corrupted, degree, 2 * t - holders - 1)
            correctness = log2_tail(dropped, degree, holders - t)
            if privacy <= -security_bits and correctness <= -correctness_bits:
                return SecAggPlusParameters(degree, t, privacy, correctness)
    return SecAggPlusParameters(None, max(2, active_threshold(n_clients)), -math.inf, -math.inf)
