"""Fast Paillier (`veil.privacy.he.paillier_fast`): the same ciphertexts as `phe` under the same
key, exact encrypted dot products and packing of signed slots, and a randomness pool that never
hands out a value twice."""

from __future__ import annotations

from collections.abc import Iterator

import gmpy2
import numpy as np
import phe
import pytest

from veil.errors import ConfigError
from veil.privacy.he.paillier_fast import (
    FastPrivateKey,
    FastPublicKey,
    PackError,
    RandomnessPool,
    Slots,
    encrypted_dot,
    multi_exp,
    pack,
    quantise,
    slot_bits,
    unpack_signed,
)

PUBLIC, PRIVATE = phe.generate_paillier_keypair(n_length=1024)  # short: tests only
KEY = FastPrivateKey.from_phe(PRIVATE, allow_weak=True)
PK = KEY.public


@pytest.fixture
def pool() -> Iterator[RandomnessPool]:
    p = RandomnessPool(PK, workers=2)
    p.fill(64)
    yield p
    p.close()


def test_round_trips_with_phe_both_ways(pool: RandomnessPool) -> None:
    for m in (0, 1, -1, 123456789, -(2**200), PUBLIC.n // 2 - 1):
        c = PK.encrypt(m, pool.take())
        assert KEY.decrypt_signed(c) == m
        assert PRIVATE.raw_decrypt(int(c)) == m % PUBLIC.n
        assert KEY.decrypt(gmpy2.mpz(PUBLIC.raw_encrypt(m % PUBLIC.n))) == m % PUBLIC.n


def test_homomorphic_addition_plain_addition_and_rerandomisation(pool: RandomnessPool) -> None:
    a, b = PK.encrypt(-40, pool.take()), PK.encrypt(2, pool.take())
    assert KEY.decrypt_signed(PK.add(a, b)) == -38
    shifted = PK.add_plain(a, 100)
    assert KEY.decrypt_signed(shifted) == 60
    fresh = PK.rerandomise(shifted, pool.take())
    assert fresh != shifted and KEY.decrypt_signed(fresh) == 60


def test_encrypted_dot_matches_integer_matrix_product(pool: RandomnessPool) -> None:
    rng = np.random.default_rng(0)
    values = rng.integers(-(2**30), 2**30, size=12)
    # Columns with few distinct values (one-hot-like), many, zeros, and negative entries.
    q = np.stack(
        [
            rng.choice([-3, 5], size=12),
            rng.integers(-(2**20), 2**20, size=12),
            np.zeros(12, np.int64),
            np.ones(12, np.int64),
        ],
        axis=1,
    )
    cts = [PK.encrypt(int(v), pool.take()) for v in values]
    got = [KEY.decrypt_signed(c) for c in encrypted_dot(cts, q, PK.nsquare)]
    assert got == [int(x) for x in values.astype(object) @ q.astype(object)]
    with pytest.raises(PackError):
        encrypted_dot(cts[:-1], q, PK.nsquare)


def test_packed_signed_slots_add_and_decode_exactly(pool: RandomnessPool) -> None:
    bits = slot_bits(20, 3)  # values below 2^20, three summands
    assert bits == 20 + 2 + 1
    slots = Slots.fit(PK, bits)
    assert slots.per_plaintext == (1024 - 2) // bits
    rows = [[-(2**20) + 1, 7, 0, 2**20 - 1], [5, -9, -1, 2**20 - 1], [3, 3, -(2**20) + 1, 2]]
    packed = []
    for row in rows:
        cts = [PK.encrypt(v, pool.take()) for v in row]
        packed.append(pack(cts, bits, PK.nsquare))
    total = PK.add(PK.add(packed[0], packed[1]), packed[2])
    assert unpack_signed(KEY.decrypt_signed(total), 4, bits) == [
        sum(c) for c in zip(*rows, strict=True)
    ]


def test_an_overflowing_slot_is_detected() -> None:
    with pytest.raises(PackError, match="overflowed"):
        unpack_signed((1 << 12) + 5, 1, 8)


def test_pool_values_are_fresh_and_a_dry_pool_still_works() -> None:
    p = RandomnessPool(PK, workers=0)
    values = {int(p.take()) for _ in range(20)}
    assert len(values) == 20 and p.misses == 20
    # r^n mod n² encrypts 0: (1 + 0·n) · r^n decrypts to 0.
    assert KEY.decrypt(p.take()) == 0
    p.close()


def test_weak_keys_and_bad_values_are_refused() -> None:
    with pytest.raises(ConfigError, match="too weak"):
        FastPublicKey(PUBLIC.n)
    with pytest.raises(ConfigError, match="too weak"):
        FastPrivateKey.from_phe(PRIVATE)
    with pytest.raises(PackError, match="NaN"):
        quantise([1.0, float("nan")], 16)
    assert quantise([0.5, -0.25], 4).tolist() == [8, -4]


def test_multi_exp_equals_the_product_of_powers() -> None:
    modulus = gmpy2.mpz(PK.nsquare)
    rng = np.random.default_rng(1)
    for count in (0, 1, 3, 4, 9):
        pairs = [
            (gmpy2.mpz(int(rng.integers(2, 2**62))), int(rng.integers(0, 2**21)))
            for _ in range(count)
        ]
        expected = gmpy2.mpz(1)
        for base, e in pairs:
            expected = expected * gmpy2.powmod(base, e, modulus) % modulus
        assert multi_exp(pairs, modulus) == expected
