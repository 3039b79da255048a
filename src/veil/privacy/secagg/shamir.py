"""t-of-n Shamir secret sharing of 32-byte secrets, over pycryptodome's GF(2^128).

Bonawitz et al. 2017 (§4) share each client's self-mask seed ``b_u`` and masking private key
``s_u`` among its neighbours so that the server can recover exactly one of the two for each
client: ``b_u`` for a client whose masked input arrived, ``s_u`` for one that dropped out.

The field arithmetic is pycryptodome's (`Crypto.Protocol.SecretSharing.Shamir`, secrets of 16
bytes, shares at indices 1..n, coefficients from the OS CSPRNG); this module only handles
longer secrets and explicit indices. A secret of 16·m bytes is cut into m blocks, each block is
shared with an independent polynomial at the same indices, and a participant's share is the
concatenation of its m block shares (so a 32-byte secret gives 32-byte shares).

Indices are positive integers, one per participant, fixed before sharing (the protocol numbers a
client's share holders 1..m in sorted-name order). Any `threshold` shares reconstruct the
secret; fewer reveal nothing about it (information-theoretically).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from Crypto.Protocol.SecretSharing import Shamir

from veil.privacy.secagg.errors import NotEnoughShares

__all__ = ["BLOCK_BYTES", "NotEnoughShares", "combine", "split"]

#: pycryptodome shares secrets of exactly this many bytes.
BLOCK_BYTES = 16
#: The largest index accepted: pycryptodome computes the shares of every index up to the largest.
MAX_INDEX = 1 << 16


def split(secret: bytes, threshold: int, indices: Sequence[int]) -> dict[int, bytes]:
    """Share `secret` (a non-empty multiple of 16 bytes) so that any `threshold` of the shares
    reconstruct it; returns ``{index: share}`` for the given distinct positive `indices`.

    Requires ``2 <= threshold <= len(indices)`` (a threshold of 1 would hand out the secret
    itself). ValueError otherwise.
    """
    if not secret or len(secret) % BLOCK_BYTES:
        raise ValueError(
            f"a secret is a non-empty multiple of {BLOCK_BYTES} bytes, got {len(secret)}"
        )
    wanted = _check_indices(indices)
    if not 2 <= threshold <= len(wanted):
        raise ValueError(
            f"threshold must be between 2 and the number of shares ({len(wanted)}), got {threshold}"
        )
    top = max(wanted)
    parts: dict[int, list[bytes]] = {index: [] for index in wanted}
    for offset in range(0, len(secret), BLOCK_BYTES):
        block = secret[offset : offset + BLOCK_BYTES]
        for index, share in Shamir.split(threshold, top, block):
            if index in parts:
                parts[index].append(share)
    return {index: b"".join(blocks) for index, blocks in parts.items()}


def combine(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """The secret behind `shares` (``{index: share}``, as `split` returned them).

    Uses `threshold` of them (the lowest indices). NotEnoughShares if fewer than `threshold`
    are given; ValueError if the shares have different or invalid lengths or bad indices.
    A wrong share gives a wrong secret without error: authenticate what the secret unlocks.
    """
    if threshold < 2:
        raise ValueError(f"threshold must be at least 2, got {threshold}")
    if len(shares) < threshold:
        raise NotEnoughShares(
            f"{len(shares)} shares are not enough to reconstruct the secret: {threshold} are needed"
        )
    indices = sorted(_check_indices(list(shares)))[:threshold]
    lengths = {len(shares[index]) for index in indices}
    if len(lengths) != 1:
        raise ValueError(f"shares of one secret have one length, got {sorted(lengths)}")
    length = lengths.pop()
    if not length or length % BLOCK_BYTES:
        raise ValueError(f"a share is a non-empty multiple of {BLOCK_BYTES} bytes, got {length}")
    blocks = []
    for offset in range(0, length, BLOCK_BYTES):
        points = [(index, shares[index][offset : offset + BLOCK_BYTES]) for index in indices]
        blocks.append(Shamir.combine(points))
    return b"".join(blocks)


def _check_indices(indices: Sequence[int]) -> set[int]:
    unique = set(indices)
    if len(unique) != len(indices):
        raise ValueError("share indices must be distinct")
    for index in unique:
        if isinstance(index, bool) or not isinstance(index, int) or not 1 <= index <= MAX_INDEX:
            raise ValueError(f"a share index is an int between 1 and {MAX_INDEX}, got {index!r}")
    return unique
