"""Paillier with packing: round trips, sums, and refusal where packing is unsafe."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.errors import ConfigError
from veil.privacy.he.paillier import (
    PackedEncoding,
    PackedVector,
    PaillierError,
    decrypt_vector,
    encrypt_vector,
    generate_keypair,
)

PUBLIC, PRIVATE = generate_keypair(2048)


@settings(max_examples=15, deadline=None)
@given(
    values=st.lists(st.floats(-100, 100), min_size=1, max_size=80),
    precision=st.integers(8, 32),
)
def test_packed_round_trip(values: list[float], precision: int) -> None:
    enc = PackedEncoding(bound=100.0, precision_bits=precision)
    x = np.array(values)
    packed, clipped = encrypt_vector(PUBLIC, x, enc)
    assert clipped == 0
    back = PackedVector.from_bytes(packed.to_bytes(), PUBLIC)
    np.testing.assert_allclose(decrypt_vector(PRIVATE, back, enc), x, atol=2.0**-precision)


def test_packed_sums_add_slot_by_slot_and_pack_many_values() -> None:
    enc = PackedEncoding(bound=10.0, precision_bits=20, max_terms=8)
    rng = np.random.default_rng(0)
    xs = [rng.uniform(-10, 10, 200) for _ in range(8)]
    packed = [encrypt_vector(PUBLIC, x, enc)[0] for x in xs]
    total = packed[0]
    for p in packed[1:]:
        total = total + p
    np.testing.assert_allclose(decrypt_vector(PRIVATE, total, enc), sum(xs), atol=8 * 2.0**-20)
    # Many values share one ciphertext: 200 values in far fewer than 200 ciphertexts.
    assert len(total.ciphertexts) == -(-200 // enc.per_plaintext(PUBLIC)) < 10


def test_unsafe_packing_is_refused() -> None:
    enc = PackedEncoding(bound=10.0, precision_bits=20, max_terms=2)
    a, _ = encrypt_vector(PUBLIC, np.ones(5), enc)
    with pytest.raises(PaillierError, match="max_terms"):
        decrypt_vector(PRIVATE, a + a + a, enc)
    with pytest.raises(ConfigError, match="does not fit"):
        PackedEncoding(bound=1.0, precision_bits=64, max_terms=2**2000).per_plaintext(PUBLIC)
    with pytest.raises(ConfigError, match="too weak"):
        generate_keypair(1024)


def test_values_out_of_bounds_are_clipped_and_counted() -> None:
    enc = PackedEncoding(bound=1.0, precision_bits=16)
    packed, clipped = encrypt_vector(PUBLIC, np.array([0.5, 3.0, -7.0]), enc)
    assert clipped == 2
    np.testing.assert_allclose(decrypt_vector(PRIVATE, packed, enc), [0.5, 1.0, -1.0], atol=1e-4)
