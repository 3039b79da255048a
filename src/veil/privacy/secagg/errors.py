"""The exceptions of secure aggregation.

Each one means a round cannot go on safely or correctly; none of them is a bug in Veil. The
transport decides what to do (abort the round, drop the offending peer, report it); the protocol
code never retries on its own.
"""

from __future__ import annotations

from veil.errors import VeilError

__all__ = [
    "InconsistentView",
    "KeySubstitution",
    "NotEnoughShares",
    "ProtocolError",
    "SecAggError",
    "ShareTampered",
    "UnsafeUnmaskRequest",
]


class SecAggError(VeilError):
    """Base class of the secure-aggregation errors."""


class NotEnoughShares(SecAggError):
    """Fewer than the threshold of Shamir shares (or of live participants) are available, so a
    secret cannot be reconstructed and the round cannot complete."""


class KeySubstitution(SecAggError):
    """A key advertisement is not signed by the roster identity of the client it names (or names
    no roster client): someone (the server included) tried to substitute a public key."""


class InconsistentView(SecAggError):
    """Two clients were told different rounds: a peer's signed view (member list, threshold,
    graph, encoding, noise plan) differs from this client's. The server lied, or the two
    organisations run different configurations; no share is released."""


class UnsafeUnmaskRequest(SecAggError):
    """An unmask request that would let the server learn one client's input: overlapping
    survivor/dropped sets, too few survivors, a peer this client holds no shares for, or a second
    request that conflicts with the first."""


class ShareTampered(SecAggError):
    """An encrypted share message fails authentication (altered, replayed from another run, round
    or pair, or encrypted under another key)."""


class ProtocolError(SecAggError):
    """A message arrives out of order, twice, from an unknown client, or with the wrong shape."""
