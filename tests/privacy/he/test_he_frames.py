"""CKKS frames: complex-packed, seeded ciphertexts round-trip every length, take about 2x the
float32 bytes, keep the precision of the real-packed encoding in both halves of a frame, and
SEAL's loader with Veil's checks refuses frames of other parameters or scales."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.privacy.he.ckks import (
    CkksError,
    CkksParams,
    Packing,
    add_frames,
    decrypt_frames,
    encrypt_frames,
    load_public_context,
    new_secret_context,
    public_context_bytes,
    read_frames,
    write_frames,
)
from veil.privacy.he.seal_io import save_bytes

PARAMS = CkksParams()
N = PARAMS.values_per_ciphertext
CONTEXT = new_secret_context(PARAMS)
EDGES = [1, 2, N // 2 - 1, N // 2, N // 2 + 1, N - 1, N, N + 1, 2 * N + N // 2 + 3]


def roundtrip(values: np.ndarray) -> np.ndarray:
    packing = Packing(PARAMS, values.size)
    blob = write_frames(encrypt_frames(CONTEXT, values), packing)
    assert blob.shape == (packing.nbytes,)
    return decrypt_frames(CONTEXT, read_frames(CONTEXT, blob, packing), packing)


@settings(max_examples=10, deadline=None)
@given(length=st.one_of(st.sampled_from(EDGES), st.integers(1, 3 * N)), seed=st.integers(0, 2**32))
def test_frames_round_trip_every_length(length: int, seed: int) -> None:
    values = np.random.default_rng(seed).uniform(-100.0, 100.0, length)
    got = roundtrip(values)
    assert got.shape == values.shape
    # Fresh-encryption error at scale 2^40: about 1e-9 here; 1e-6 leaves a wide margin.
    assert np.max(np.abs(got - values)) < 1e-6


def test_an_upload_is_about_twice_the_float32_bytes() -> None:
    length = 10 * N
    packing = Packing(PARAMS, length)
    frames = encrypt_frames(CONTEXT, np.zeros(length))
    assert packing.ciphertexts == 10
    assert packing.nbytes <= 2.05 * 4 * length
    # Seeded: each frame is about half of the same ciphertext once expanded by SEAL.
    expanded = read_frames(CONTEXT, write_frames(frames, packing), packing)
    for frame, ciphertext in zip(frames, expanded, strict=True):
        assert len(frame) < 0.52 * len(save_bytes(ciphertext))  # type: ignore[arg-type]


def test_both_halves_of_a_frame_keep_the_stated_precision() -> None:
    """A sum of 8 fresh encryptions: the error of the real half and of the imaginary half of the
    slots are both within the stated noise estimate, and their spreads agree (complex packing
    costs no precision). 4096 samples a half: the sample std is within ~2% of the true one."""
    terms = 8
    rng = np.random.default_rng(5)
    parts = [rng.uniform(-1.0, 1.0, N) for _ in range(terms)]
    packing = Packing(PARAMS, N)
    total = read_frames(CONTEXT, write_frames(encrypt_frames(CONTEXT, parts[0]), packing), packing)
    for values in parts[1:]:
        blob = write_frames(encrypt_frames(CONTEXT, values), packing)
        add_frames(CONTEXT, total, read_frames(CONTEXT, blob, packing))
    error = decrypt_frames(CONTEXT, total, packing) - np.sum(parts, axis=0)
    real, imag = error[: N // 2], error[N // 2 :]
    estimate = PARAMS.noise_std(terms)
    assert 0 < np.std(real) <= estimate and 0 < np.std(imag) <= estimate
    assert 0.8 < np.std(real) / np.std(imag) < 1.25
    assert abs(np.mean(real)) < 5 * estimate / np.sqrt(N // 2)


def test_frames_of_other_parameters_or_scales_are_refused() -> None:
    packing = Packing(PARAMS, 100)
    other_scale = new_secret_context(PARAMS)
    other_scale.global_scale = 2.0**30
    other_degree = new_secret_context(CkksParams(poly_modulus_degree=4096))
    other_primes = new_secret_context(CkksParams(coeff_modulus_bits=(50, 40)))
    for context, reason in (
        (other_scale, "scale"),
        (other_degree, "does not parse"),
        (other_primes, "does not parse"),
    ):
        frames = encrypt_frames(context, np.ones(100))
        with pytest.raises(CkksError, match=reason):
            read_frames(CONTEXT, write_frames(frames, packing), packing)
    good = encrypt_frames(CONTEXT, np.ones(100))[0]
    for bad in (good[:-1], good[:40], b"\0" * len(good), good[:20] + bytes(len(good) - 20)):
        with pytest.raises(CkksError, match="does not parse"):
            read_frames(CONTEXT, write_frames([bad], packing), packing)
    with pytest.raises(CkksError, match=r"takes .* bytes"):
        read_frames(CONTEXT, write_frames([good, good], Packing(PARAMS, N + 1)), packing)


def test_the_servers_context_can_neither_encrypt_nor_decrypt() -> None:
    server = load_public_context(public_context_bytes(CONTEXT), PARAMS)
    blob = write_frames(encrypt_frames(CONTEXT, np.ones(10)), Packing(PARAMS, 10))
    frames = read_frames(server, blob, Packing(PARAMS, 10))  # it can parse and add ...
    add_frames(server, frames, read_frames(server, blob, Packing(PARAMS, 10)))
    with pytest.raises(CkksError, match="no secret key"):  # ... but not read
        decrypt_frames(server, frames, Packing(PARAMS, 10))
    with pytest.raises(CkksError, match="no secret key"):
        encrypt_frames(server, np.ones(10))
