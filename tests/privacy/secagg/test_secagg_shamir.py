"""Shamir t-of-n sharing of 32-byte secrets over pycryptodome's GF(2^128)."""

from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.privacy.secagg.shamir import NotEnoughShares, combine, split


def test_any_t_shares_reconstruct_and_t_minus_one_do_not() -> None:
    secret = os.urandom(32)
    indices = [1, 2, 3, 4, 5, 6]
    shares = split(secret, 4, indices)
    assert sorted(shares) == indices
    assert all(len(share) == 32 for share in shares.values())
    for subset in itertools.combinations(indices, 4):
        assert combine({i: shares[i] for i in subset}, 4) == secret
    assert combine(shares, 4) == secret  # more than t: uses t of them
    for subset in itertools.combinations(indices, 3):
        with pytest.raises(NotEnoughShares, match="4 are needed"):
            combine({i: shares[i] for i in subset}, 4)


@settings(max_examples=30, deadline=None)
@given(
    secret=st.binary(min_size=16, max_size=16) | st.binary(min_size=32, max_size=32),
    indices=st.lists(st.integers(1, 40), min_size=2, max_size=8, unique=True),
    data=st.data(),
)
def test_explicit_indices(secret: bytes, indices: list[int], data: st.DataObject) -> None:
    threshold = data.draw(st.integers(2, len(indices)))
    shares = split(secret, threshold, indices)
    assert set(shares) == set(indices)
    chosen = data.draw(st.permutations(indices))[:threshold]
    assert combine({i: shares[i] for i in chosen}, threshold) == secret


def test_the_halves_are_shared_independently() -> None:
    # A 32-byte secret whose halves are equal must not give shares with equal halves.
    shares = split(bytes(16) * 2, 2, [1, 2, 3])
    assert any(share[:16] != share[16:] for share in shares.values())


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        split(b"short", 2, [1, 2])
    with pytest.raises(ValueError, match="threshold"):
        split(bytes(32), 1, [1, 2])
    with pytest.raises(ValueError, match="threshold"):
        split(bytes(32), 3, [1, 2])
    with pytest.raises(ValueError, match="distinct"):
        split(bytes(32), 2, [1, 1, 2])
    with pytest.raises(ValueError, match="index"):
        split(bytes(32), 2, [0, 1, 2])
    shares = split(bytes(32), 2, [1, 2, 3])
    with pytest.raises(ValueError, match="length"):
        combine({1: shares[1], 2: shares[2][:16]}, 2)
