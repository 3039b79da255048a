"""Commutative blinding on NIST P-256 for ECDH private set intersection.

Recipe, on `cryptography`'s P-256 (no group arithmetic of our own):

* `hash_to_point(id)`: try-and-increment. For counter c = 0, 1, ... the candidate x-coordinate
  is SHA-256("veil-psi-v1/P-256" | len(id) | id | c); the first candidate that is a valid
  x-coordinate (about one in two) becomes the point with that x and even y (SEC1 compressed
  encoding, decoded and validated by OpenSSL). The discrete log of the result is unknown.
  This is the classic try-and-increment map, not RFC 9380's constant-time map: its running
  time depends on the id, which only the id's owner observes (the map runs locally).
* `BlindingKey.blind(x)`: x-coordinate of k·P, where P is the point with x-coordinate `x`
  (even y). `cryptography` exposes scalar multiplication only as ECDH, which returns the
  x-coordinate; since x(k·P) = x(k·(-P)), the x-coordinate alone is enough and blinding
  commutes: blind_b(blind_a(H(id))) == blind_a(blind_b(H(id))) == x(ab·H(id)).

This is the Diffie-Hellman PSI of Meadows (1986) / Huberman-Franklin-Hogg (1999), as in
OpenMined's `openmined-psi` (which pins protobuf 6 and so cannot be installed beside Veil's
gRPC code). Every received x-coordinate is decoded by OpenSSL, which rejects points not on the
curve (no invalid-curve attacks).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from cryptography.hazmat.primitives.asymmetric import ec

__all__ = ["POINT_BYTES", "BlindingKey", "hash_to_point"]

POINT_BYTES = 32
"""Bytes of one blinded element on the wire (a P-256 x-coordinate)."""

_CURVE = ec.SECP256R1()
_DOMAIN = b"veil-psi-v1/P-256"


def _hash_to_key(identifier: str) -> tuple[bytes, ec.EllipticCurvePublicKey]:
    data = identifier.encode("utf-8")
    prefix = _DOMAIN + len(data).to_bytes(8, "big") + data
    counter = 0
    while True:
        candidate = hashlib.sha256(prefix + counter.to_bytes(4, "big")).digest()
        try:
            point = ec.EllipticCurvePublicKey.from_encoded_point(_CURVE, b"\x02" + candidate)
        except ValueError:
            counter += 1
            continue
        return candidate, point


def hash_to_point(identifier: str) -> bytes:
    """The x-coordinate (32 bytes) of the point that `identifier` hashes to (see module doc)."""
    return _hash_to_key(identifier)[0]


class BlindingKey:
    """A secret scalar k (fresh from OpenSSL's CSPRNG); `blind` maps x(P) to x(k·P)."""

    def __init__(self) -> None:
        self._key = ec.generate_private_key(_CURVE)

    def blind(self, x_coordinate: bytes) -> bytes:
        """x(k·P) for the point P with this x-coordinate; ValueError if none is on the curve."""
        if len(x_coordinate) != POINT_BYTES:
            raise ValueError("a blinded element is 32 bytes")
        point = ec.EllipticCurvePublicKey.from_encoded_point(_CURVE, b"\x02" + x_coordinate)
        return self._key.exchange(ec.ECDH(), point)

    def blind_identifier(self, identifier: str) -> bytes:
        """x(k·H(identifier)): `blind(hash_to_point(identifier))` without decoding twice."""
        return self._key.exchange(ec.ECDH(), _hash_to_key(identifier)[1])

    def blind_all(self, x_coordinates: Iterable[bytes]) -> list[bytes]:
        """`blind` of each element, in order."""
        return [self.blind(x) for x in x_coordinates]
