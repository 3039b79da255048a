"""Paillier encryption (`phe`, accelerated by `gmpy2`) for small vectors, several fixed-point
values packed into each plaintext.

Paillier (1999) is additively homomorphic over the integers mod n with exact arithmetic; one
ciphertext of a 2048-bit key is 4096 bits and costs milliseconds to make, so it suits short
vectors (vertical federated learning's gradients and residuals), not whole models (use CKKS).

Packing (`PackedEncoding`): each value v, clipped to [-bound, bound] (clipped values are
counted), becomes the integer q = round(v · 2^precision_bits) + B with B = round(bound ·
2^precision_bits), so 0 <= q <= 2B. Values sit side by side in slots of `slot_bits` bits of one
plaintext, m = Σ q_i · 2^(i · slot_bits). Adding `terms` ciphertexts adds slot by slot; a slot
can reach terms · 2B, and the encoding is refused unless max_terms · 2B < 2^slot_bits (no carry
into the next slot) and every packed plaintext stays below n. That is when packing is safe.
Decoding subtracts terms · B from each slot. Multiplying by a plaintext scalar is not offered:
it would need headroom per slot and would turn negative values' offsets into garbage.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import phe
from phe import PaillierPrivateKey as PrivateKey
from phe import PaillierPublicKey as PublicKey

from veil.errors import ConfigError, VeilError

__all__ = [
    "PackedEncoding",
    "PackedVector",
    "PaillierError",
    "decrypt_vector",
    "encrypt_vector",
    "generate_keypair",
]


class PaillierError(VeilError):
    """Packed ciphertexts that cannot be combined or decoded (other key, too many terms)."""


def generate_keypair(bits: int = 3072) -> tuple[PublicKey, PrivateKey]:
    """A fresh key pair (primes from `random.SystemRandom`, i.e. os.urandom). 3072 bits match
    128-bit security; 2048 bits (112-bit) is `phe`'s default."""
    if bits < 2048:
        raise ConfigError(f"a Paillier key of {bits} bits is too weak; use at least 2048")
    public, private = phe.generate_paillier_keypair(n_length=bits)
    return public, private


@dataclass(frozen=True)
class PackedEncoding:
    """How values are fixed-point encoded and packed; `check` it against a key."""

    bound: float
    precision_bits: int = 24
    max_terms: int = 1

    def __post_init__(self) -> None:
        if not (self.bound > 0 and math.isfinite(self.bound)):
            raise ConfigError(f"bound must be a positive number, got {self.bound}")
        if not 1 <= self.precision_bits <= 64 or self.max_terms < 1:
            raise ConfigError("precision_bits must be in [1, 64] and max_terms at least 1")

    @property
    def offset(self) -> int:
        return round(self.bound * float(1 << self.precision_bits))

    @property
    def slot_bits(self) -> int:
        """Bits per value: the largest sum of max_terms shifted values, plus one guard bit."""
        return (self.max_terms * 2 * self.offset).bit_length() + 1

    def per_plaintext(self, public: PublicKey) -> int:
        """Values per ciphertext under `public`; ConfigError if not even one fits."""
        count = int((public.n.bit_length() - 1) // self.slot_bits)
        if count < 1:
            raise ConfigError(
                f"a slot of {self.slot_bits} bits does not fit under a {public.n.bit_length()}-"
                "bit Paillier modulus; lower bound, precision_bits or max_terms"
            )
        return count

    def encode(self, values: npt.NDArray[np.float64], per: int) -> tuple[list[int], int]:
        """The packed plaintexts of `values` and how many values were clipped."""
        v = np.asarray(values, np.float64)
        if not np.isfinite(v).all():
            raise PaillierError("cannot encode NaN or Inf")
        clipped = int(np.count_nonzero(np.abs(v) > self.bound))
        q = np.rint(np.clip(v, -self.bound, self.bound) * 2.0**self.precision_bits)
        shifted = [int(x) + self.offset for x in q]
        plaintexts = []
        for start in range(0, len(shifted), per):
            m = 0
            for i, x in enumerate(shifted[start : start + per]):
                m |= x << (i * self.slot_bits)
            plaintexts.append(m)
        return plaintexts, clipped

    def decode(
        self, plaintexts: list[int], length: int, terms: int, per: int
    ) -> npt.NDArray[np.float64]:
        """The values of a sum of `terms` packed vectors of `length` values."""
        mask = (1 << self.slot_bits) - 1
        out = np.empty(length, np.float64)
        for index in range(length):
            m = plaintexts[index // per]
            q = (m >> ((index % per) * self.slot_bits)) & mask
            out[index] = (q - terms * self.offset) / 2.0**self.precision_bits
        return out


@dataclass(frozen=True)
class PackedVector:
    """Encrypted packed values: ciphertexts mod n², how many values, how many terms summed."""

    public: PublicKey
    ciphertexts: tuple[int, ...]
    length: int
    terms: int = 1

    def __add__(self, other: PackedVector) -> PackedVector:
        if other.public != self.public or other.length != self.length:
            raise PaillierError("packed vectors under other keys or of other lengths do not add")
        n2 = self.public.nsquare
        summed = tuple(a * b % n2 for a, b in zip(self.ciphertexts, other.ciphertexts, strict=True))
        return PackedVector(self.public, summed, self.length, self.terms + other.terms)

    def to_bytes(self) -> bytes:
        """JSON: the modulus, the ciphertexts in hex, the length and terms (no pickle)."""
        return json.dumps(
            {
                "n": format(self.public.n, "x"),
                "ciphertexts": [format(c, "x") for c in self.ciphertexts],
                "length": self.length,
                "terms": self.terms,
            }
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes, public: PublicKey) -> PackedVector:
        """Parse; PaillierError if malformed or made under another key."""
        try:
            raw = json.loads(data)
            if int(raw["n"], 16) != public.n:
                raise PaillierError("the packed vector was encrypted under another key")
            cts = tuple(int(c, 16) for c in raw["ciphertexts"])
            length, terms = int(raw["length"]), int(raw["terms"])
        except (ValueError, KeyError, TypeError):
            raise PaillierError("malformed packed Paillier vector") from None
        if any(not 0 < c < public.nsquare for c in cts) or length < 0 or terms < 1:
            raise PaillierError("a packed Paillier vector holds values out of range")
        return cls(public, cts, length, terms)


def encrypt_vector(
    public: PublicKey, values: npt.NDArray[np.float64], encoding: PackedEncoding
) -> tuple[PackedVector, int]:
    """Encrypt `values` packed; returns the vector and how many values were clipped."""
    per = encoding.per_plaintext(public)
    plaintexts, clipped = encoding.encode(values, per)
    ciphertexts = tuple(public.raw_encrypt(m) for m in plaintexts)
    return PackedVector(public, ciphertexts, int(np.asarray(values).size)), clipped


def decrypt_vector(
    private: PrivateKey, vector: PackedVector, encoding: PackedEncoding
) -> npt.NDArray[np.float64]:
    """The values of a packed vector (a sum of `vector.terms` encryptions)."""
    if vector.public != private.public_key:
        raise PaillierError("this private key does not belong to the vector's public key")
    if vector.terms > encoding.max_terms:
        raise PaillierError(
            f"a sum of {vector.terms} packed vectors exceeds max_terms = {encoding.max_terms}: "
            "its slots may have carried into each other"
        )
    per = encoding.per_plaintext(vector.public)
    plaintexts = [private.raw_decrypt(c) for c in vector.ciphertexts]
    return encoding.decode(plaintexts, vector.length, vector.terms, per)
