"""Mask expansion (AES-256-CTR) and key derivation (X25519, HKDF-SHA256)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from veil.privacy.secagg.masking import (
    agree,
    apply_masks,
    expand_mask,
    mask_sign,
    masking_key,
    pairwise_seed,
    self_mask_seed,
    share_encryption_key,
)


def test_expand_mask_is_the_aes_ctr_keystream_little_endian() -> None:
    seed = os.urandom(32)
    length = 70_001  # more than one internal chunk, not a multiple of one
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        mask = expand_mask(seed, length, dtype)
        size = length * np.dtype(dtype).itemsize
        stream = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(bytes(size))
        assert mask.dtype == dtype
        assert np.array_equal(mask, np.frombuffer(stream, dtype=np.dtype(dtype).newbyteorder("<")))
        assert np.array_equal(mask, expand_mask(seed, length, dtype))
    reduced = expand_mask(seed, 1000, np.uint32, modulus_bits=12)
    assert np.array_equal(reduced, expand_mask(seed, 1000, np.uint32) & 0xFFF)


def test_apply_masks_adds_and_subtracts_the_expansions() -> None:
    seeds = [os.urandom(32) for _ in range(3)]
    length = 150_007
    acc = np.arange(length, dtype=np.uint32)
    apply_masks(acc, [(seeds[0], 1), (seeds[1], -1), (seeds[2], 1)])
    expected = np.arange(length, dtype=np.uint32)
    expected += expand_mask(seeds[0], length, np.uint32)
    expected -= expand_mask(seeds[1], length, np.uint32)
    expected += expand_mask(seeds[2], length, np.uint32)
    assert np.array_equal(acc, expected)
    apply_masks(acc, [(seeds[0], -1), (seeds[1], 1), (seeds[2], -1)])
    assert np.array_equal(acc, np.arange(length, dtype=np.uint32))
    narrow = np.arange(length, dtype=np.uint16)
    apply_masks(narrow, [(seeds[0], 1), (seeds[1], -1)])
    assert not np.array_equal(narrow, np.arange(length, dtype=np.uint16))
    apply_masks(narrow, [(seeds[1], 1), (seeds[0], -1)])
    assert np.array_equal(narrow, np.arange(length, dtype=np.uint16))  # masks cancel mod 2^16
    with pytest.raises(TypeError, match="unsigned"):
        apply_masks(np.zeros(4, np.int32), [(seeds[0], 1)])
    with pytest.raises(ValueError, match="sign"):
        apply_masks(acc, [(seeds[0], 2)])
    with pytest.raises(ValueError, match="32 bytes"):
        apply_masks(acc, [(b"short", 1)])


def test_derived_seeds_agree_at_both_ends_and_separate_everything_else() -> None:
    a, b = x25519.X25519PrivateKey.generate(), x25519.X25519PrivateKey.generate()
    secret = agree(a, b.public_key().public_bytes_raw())
    assert secret == agree(b, a.public_key().public_bytes_raw())
    seed = pairwise_seed(secret, "run", 3, "alice", "bob")
    assert len(seed) == 32
    assert seed == pairwise_seed(secret, "run", 3, "bob", "alice")
    others = {
        pairwise_seed(secret, "run", 4, "alice", "bob"),
        pairwise_seed(secret, "run2", 3, "alice", "bob"),
        pairwise_seed(secret, "run", 3, "alice", "carol"),
        share_encryption_key(secret, "run", 3, "alice", "bob"),
        self_mask_seed(secret[:16], "run", 3, "alice"),
        masking_key(secret[:16], "run", 3, "alice").private_bytes_raw(),
    }
    assert seed not in others and len(others) == 6
    with pytest.raises(ValueError, match="16 bytes"):
        self_mask_seed(secret, "run", 3, "alice")
    with pytest.raises(ValueError, match="distinct"):
        pairwise_seed(secret, "run", 3, "alice", "alice")


def test_sign_convention_cancels() -> None:
    assert mask_sign("alice", "bob") == 1
    assert mask_sign("bob", "alice") == -1
    with pytest.raises(ValueError):
        mask_sign("alice", "alice")


def test_low_order_public_keys_are_refused() -> None:
    key = x25519.X25519PrivateKey.generate()
    with pytest.raises(ValueError):
        agree(key, bytes(32))
    with pytest.raises(ValueError, match="32 bytes"):
        agree(key, bytes(31))
