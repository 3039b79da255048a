"""Secure aggregation by masking: SecAgg (Bonawitz et al. 2017) and SecAgg+ (Bell et al. 2020).

The server learns the sum of the clients' vectors and nothing else about any one of them. The
modules, bottom up:

* `quantize`: floats → integers mod 2^k (clipping counted, stochastic rounding, capacity check);
* `masking`: X25519 agreement, HKDF-SHA256 key derivation, AES-256-CTR mask expansion;
* `shamir`: t-of-n secret sharing of 32-byte secrets (pycryptodome's GF(2^128));
* `graph`: who masks with whom (complete graph, or SecAgg+'s sparse random graph);
* `messages`: the round's messages with a safe wire encoding;
* `protocol`: `ClientSession` and `ServerSession`, pure state machines for one round, secure
  against a malicious server (signed round views, a consistency round, a graph the server
  cannot choose).
"""

from veil.privacy.secagg.errors import (
    InconsistentView,
    KeySubstitution,
    NotEnoughShares,
    ProtocolError,
    SecAggError,
    ShareTampered,
    UnsafeUnmaskRequest,
)
from veil.privacy.secagg.messages import (
    ConsistencyCheck,
    ConsistencySignature,
    EncryptedShares,
    KeyAdvertisement,
    UnmaskReply,
    UnmaskRequest,
)
from veil.privacy.secagg.protocol import (
    ClientSession,
    RoundGraph,
    RoundParams,
    RoundSummary,
    ServerSession,
    active_threshold,
)
from veil.privacy.secagg.quantize import CapacityError, Encoded, FixedPoint

__all__ = [
    "CapacityError",
    "ClientSession",
    "ConsistencyCheck",
    "ConsistencySignature",
    "Encoded",
    "EncryptedShares",
    "FixedPoint",
    "InconsistentView",
    "KeyAdvertisement",
    "KeySubstitution",
    "NotEnoughShares",
    "ProtocolError",
    "RoundGraph",
    "RoundParams",
    "RoundSummary",
    "SecAggError",
    "ServerSession",
    "ShareTampered",
    "UnmaskReply",
    "UnmaskRequest",
    "UnsafeUnmaskRequest",
    "active_threshold",
]
