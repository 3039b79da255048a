"""Masks and the keys they come from: X25519 agreement, HKDF-SHA256, AES-256-CTR expansion.

In Bonawitz et al. 2017 (§4, "Practical Secure Aggregation for Privacy-Preserving Machine
Learning") client u sends

    y_u = x_u + PRG(b_u) + Σ_{v ∈ U2 ∩ N(u), v ≠ u} sign(u, v) · PRG(s_{u,v})   (mod 2^k)

with ``sign(u, v) = +1`` when ``v > u`` and ``-1`` when ``v < u`` (names compared as strings),
so the pairwise masks of every pair of surviving clients cancel in the sum. Here:

* ``s_{u,v}`` is `pairwise_seed` of the X25519 shared secret of u's and v's masking keys;
* ``PRG(b_u)`` expands `self_mask_seed` of u's fresh 16-byte secret ``b_u``;
* u's X25519 masking key is `masking_key` of a fresh 16-byte secret, so that both secrets a
  client Shamir-shares are one 128-bit block each (half the share arithmetic of 32-byte
  secrets, at the 128-bit security level of the rest of the protocol);
* ``PRG`` is `expand_mask`: the AES-256-CTR keystream under the 32-byte seed, from a zero
  counter block, read as little-endian unsigned integers. A zero nonce is safe because every
  seed is used once: it is derived (HKDF) from fresh per-round keys and bound to the run, the
  round and the pair.

Every HKDF ``info`` is `veil.crypto.identity.signing_payload` of a purpose label and the run,
round and client names, so keys for different purposes, runs, rounds or pairs never coincide.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from veil.crypto.identity import signing_payload
from veil.privacy.secagg.keystream import add_keystreams, fill_keystream
from veil.privacy.secagg.quantize import UIntArray

__all__ = [
    "SECRET_BYTES",
    "SEED_BYTES",
    "agree",
    "apply_masks",
    "expand_mask",
    "mask_sign",
    "masking_key",
    "pairwise_seed",
    "self_mask_commitment",
    "self_mask_seed",
    "share_encryption_key",
]

#: Length of every mask seed and derived key (AES-256).
SEED_BYTES = 32
#: Length of the secrets a client Shamir-shares (self-mask secret, masking-key secret).
SECRET_BYTES = 16
_MASKING_KEY_LABEL = "secagg-masking-key"
_COMMITMENT_LABEL = "secagg-self-mask-commitment"

_PAIRWISE_LABEL = "secagg-pairwise-mask"
_SELF_LABEL = "secagg-self-mask"
_SHARE_KEY_LABEL = "secagg-share-encryption"


def expand_mask(
    seed: bytes,
    length: int,
    dtype: npt.DTypeLike,
    modulus_bits: int | None = None,
) -> UIntArray:
    """``PRG(seed)``: `length` pseudo-random unsigned integers of `dtype` (uint8 to uint64).

    The AES-256-CTR keystream under the 32-byte `seed`, from an all-zero counter block, read as
    little-endian integers (the same on every platform). With `modulus_bits` the values are
    reduced mod ``2**modulus_bits`` (keeping the low bits, so they stay uniform). The seed must
    never be used for anything else.
    """
    dt = _uint_dtype(dtype)
    _check_seed(seed)
    if length < 0:
        raise ValueError(f"length must be non-negative, got {length}")
    raw = np.empty(length * dt.itemsize, dtype=np.uint8)
    fill_keystream(seed, raw)
    out: UIntArray = raw.view(dt.newbyteorder("<")).astype(dt, copy=False)
    if modulus_bits is not None:
        _reduce(out, modulus_bits)
    return out


def apply_masks(
    acc: UIntArray, masks: Iterable[tuple[bytes, int]], *, threads: int | None = None
) -> UIntArray:
    """Add ``sign · PRG(seed)`` to `acc` in place, for every ``(seed, sign)`` in `masks`
    (``sign`` is +1 or -1); returns `acc`.

    The result is the same as adding each `expand_mask` of ``acc.size`` entries, mod 2^width
    of `acc`'s dtype (reduce mod 2^k afterwards), whatever `threads` is. It streams: the masks
    advance together over cache-sized chunks of `acc`, so no mask is ever held whole, and a
    large `acc` is split between `threads` threads (default: the usable CPUs, at most 4;
    `veil.privacy.secagg.keystream`).
    """
    _uint_dtype(acc.dtype)
    if not acc.flags.c_contiguous:
        raise ValueError("acc must be C-contiguous")
    streams = []
    for seed, sign in masks:
        _check_seed(seed)
        if sign not in (1, -1):
            raise ValueError(f"a mask sign is +1 or -1, got {sign}")
        streams.append((seed, sign))
    add_keystreams(acc, streams, threads)
    return acc


def mask_sign(owner: str, peer: str) -> int:
    """The sign with which `owner` adds the pairwise mask it shares with `peer`: +1 if
    ``peer > owner``, -1 if ``peer < owner`` (string order), so the pair's masks cancel."""
    if owner == peer:
        raise ValueError(f"no pairwise mask between {owner!r} and itself")
    return 1 if peer > owner else -1


def agree(private: x25519.X25519PrivateKey, peer_public: bytes) -> bytes:
    """The X25519 shared secret of `private` and the raw 32-byte `peer_public`.

    ValueError if `peer_public` is not 32 bytes or is a low-order point (all-zero secret).
    """
    if len(peer_public) != 32:
        raise ValueError(f"an X25519 public key is 32 bytes, got {len(peer_public)}")
    return private.exchange(x25519.X25519PublicKey.from_public_bytes(peer_public))


def pairwise_seed(shared_secret: bytes, run_id: str, round: int, i: str, j: str) -> bytes:
    """The seed ``s_{i,j}`` of the pairwise mask of clients `i` and `j` in one round.

    HKDF-SHA256 of their X25519 `shared_secret` with ``info = signing_payload(
    "secagg-pairwise-mask", run_id, round, min(i, j), max(i, j))``: both ends derive the same 32
    bytes, and no other run, round, pair or purpose does.
    """
    return _derive(shared_secret, _PAIRWISE_LABEL, run_id, round, i, j)


def share_encryption_key(shared_secret: bytes, run_id: str, round: int, i: str, j: str) -> bytes:
    """The AES-256-GCM key for share messages between `i` and `j` in one round.

    Like `pairwise_seed` with the label ``"secagg-share-encryption"`` (and the X25519 secret of
    the encryption keys, not the masking keys). Both directions use the same key; the
    associated data names the sender and the recipient.
    """
    return _derive(shared_secret, _SHARE_KEY_LABEL, run_id, round, i, j)


def self_mask_seed(b: bytes, run_id: str, round: int, client: str) -> bytes:
    """The seed of client `client`'s self mask ``PRG(b_u)``: HKDF-SHA256 of its fresh 16-byte
    secret `b` with ``info = signing_payload("secagg-self-mask", run_id, round, client)``."""
    return _expand_secret(b, _SELF_LABEL, run_id, round, client)


def self_mask_commitment(b: bytes, run_id: str, round: int, client: str) -> bytes:
    """SHA-256 of ``signing_payload("secagg-self-mask-commitment", run_id, round, client, b)``:
    published (signed) with the client's keys so that the server can check the self-mask secret
    it rebuilds from t shares; hiding because b is 128 fresh random bits."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(signing_payload(_COMMITMENT_LABEL, run_id, round, client, b))
    return digest.finalize()


def masking_key(secret: bytes, run_id: str, round: int, client: str) -> x25519.X25519PrivateKey:
    """Client `client`'s X25519 masking key for one round, derived from its fresh 16-byte
    `secret` (HKDF-SHA256, label ``"secagg-masking-key"``): the server rebuilds it from the
    Shamir shares of `secret` when the client drops out."""
    raw = _expand_secret(secret, _MASKING_KEY_LABEL, run_id, round, client)
    return x25519.X25519PrivateKey.from_private_bytes(raw)


def _expand_secret(secret: bytes, label: str, run_id: str, round: int, client: str) -> bytes:
    if not isinstance(secret, bytes) or len(secret) != SECRET_BYTES:
        size = len(secret) if isinstance(secret, bytes) else type(secret).__name__
        raise ValueError(f"a shared secret is {SECRET_BYTES} bytes, got {size}")
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=SEED_BYTES,
        salt=None,
        info=signing_payload(label, run_id, round, client),
    )
    return hkdf.derive(secret)


def _derive(secret: bytes, label: str, run_id: str, round: int, i: str, j: str) -> bytes:
    if i == j:
        raise ValueError(f"a pair needs two distinct clients, got {i!r} twice")
    low, high = sorted((i, j))
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=SEED_BYTES,
        salt=None,
        info=signing_payload(label, run_id, round, low, high),
    )
    return hkdf.derive(secret)


def _check_seed(seed: bytes) -> None:
    if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
        size = len(seed) if isinstance(seed, bytes) else type(seed).__name__
        raise ValueError(f"a mask seed is {SEED_BYTES} bytes, got {size}")


def _uint_dtype(dtype: npt.DTypeLike) -> np.dtype[Any]:
    dt = np.dtype(dtype)
    if dt.kind != "u":
        raise TypeError(f"masks are unsigned integers (uint8 to uint64), got {dt}")
    return dt


def _reduce(values: UIntArray, bits: int) -> None:
    width = 8 * values.dtype.itemsize
    if not 1 <= bits <= width:
        raise ValueError(f"modulus_bits must be between 1 and {width}, got {bits}")
    if bits < width:
        np.bitwise_and(values, values.dtype.type((1 << bits) - 1), out=values)
