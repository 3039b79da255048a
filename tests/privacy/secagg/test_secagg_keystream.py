"""The parallel, chunked keystream masking gives bit-identical masks to the implementation it
replaced (kept below as the reference), whatever the split between threads."""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

from veil.privacy.secagg.keystream import CHUNK_BYTES, add_keystreams, fill_keystream
from veil.privacy.secagg.masking import apply_masks, expand_mask

# --- Reference: masking.py's expand_mask and apply_masks before the keystream module. ---------
_REF_CHUNK = 1 << 18
_REF_ZEROS = bytes(_REF_CHUNK)
_REF_SLACK = 16


def _ref_keystream(seed: bytes) -> CipherContext:
    return Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()


def reference_expand_mask(seed: bytes, length: int, dtype: npt.DTypeLike) -> npt.NDArray[Any]:
    dt = np.dtype(dtype)
    nbytes = length * dt.itemsize
    raw = np.empty(nbytes + _REF_SLACK, dtype=np.uint8)
    view = raw.data
    encryptor = _ref_keystream(seed)
    for offset in range(0, nbytes, _REF_CHUNK):
        size = min(_REF_CHUNK, nbytes - offset)
        encryptor.update_into(_REF_ZEROS[:size], view[offset : offset + size + _REF_SLACK])
    return raw[:nbytes].view(dt.newbyteorder("<")).astype(dt, copy=False)


def reference_apply_masks(
    acc: npt.NDArray[Any], masks: Iterable[tuple[bytes, int]]
) -> npt.NDArray[Any]:
    dt = acc.dtype
    flat = acc.reshape(-1)
    streams = [(_ref_keystream(seed), sign) for seed, sign in masks]
    if not streams:
        return acc
    per_chunk = _REF_CHUNK // dt.itemsize
    scratch = np.empty(_REF_CHUNK + _REF_SLACK, dtype=np.uint8)
    scratch_view = scratch.data
    keystream = scratch[:_REF_CHUNK].view(dt.newbyteorder("<"))
    for start in range(0, flat.size, per_chunk):
        stop = min(start + per_chunk, flat.size)
        size = (stop - start) * dt.itemsize
        target = flat[start:stop]
        words = keystream[: stop - start]
        for encryptor, sign in streams:
            encryptor.update_into(_REF_ZEROS[:size], scratch_view[: size + _REF_SLACK])
            if sign > 0:
                np.add(target, words, out=target)
            else:
                np.subtract(target, words, out=target)
    return acc


# ------------------------------------------------------------------------------------------------

DTYPES = (np.uint8, np.uint16, np.uint32, np.uint64)


def _random_vector(rng: np.random.Generator, length: int, dtype: Any) -> npt.NDArray[Any]:
    info = np.iinfo(dtype)
    return rng.integers(0, int(info.max), size=length, dtype=dtype, endpoint=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 2, 3, None])
def test_apply_masks_is_bit_identical_to_the_reference(dtype: Any, threads: int | None) -> None:
    rng = np.random.default_rng(abs(hash((np.dtype(dtype).str, threads))) % 2**32)
    itemsize = np.dtype(dtype).itemsize
    # Lengths around chunk and span boundaries, and one large enough to split into many spans
    # (several MB), not a multiple of a chunk or of an AES block.
    for nbytes in (0, 1 * itemsize, CHUNK_BYTES - itemsize, CHUNK_BYTES, 5 * (1 << 20) + 24):
        length = nbytes // itemsize
        seeds = [os.urandom(32) for _ in range(int(rng.integers(1, 6)))]
        masks = [(seed, int(rng.choice([-1, 1]))) for seed in seeds]
        x = _random_vector(rng, length, dtype)
        expected = reference_apply_masks(x.copy(), masks)
        got = apply_masks(x.copy(), masks, threads=threads)
        assert got.dtype == dtype
        assert np.array_equal(got, expected), (nbytes, threads)


def test_apply_masks_in_a_2d_array_masks_it_as_flat() -> None:
    seeds = [(os.urandom(32), 1), (os.urandom(32), -1)]
    x = np.arange(3 * 700_001, dtype=np.uint32).reshape(3, -1)
    got = apply_masks(x.copy(), seeds, threads=2)
    assert got.shape == x.shape
    assert np.array_equal(got.reshape(-1), reference_apply_masks(x.reshape(-1).copy(), seeds))


@pytest.mark.parametrize("dtype", DTYPES)
def test_expand_mask_is_bit_identical_to_the_reference(dtype: Any) -> None:
    seed = os.urandom(32)
    for length in (0, 1, 4099, (6 << 20) // np.dtype(dtype).itemsize + 3):
        assert np.array_equal(
            expand_mask(seed, length, dtype), reference_expand_mask(seed, length, dtype)
        )


def test_fill_keystream_matches_one_sequential_encryption_for_any_thread_count() -> None:
    seed = os.urandom(32)
    nbytes = 7 * (1 << 20) + 5
    expected = np.frombuffer(_ref_keystream(seed).update(bytes(nbytes)), dtype=np.uint8)
    for threads in (1, 2, 4, 7):
        out = np.full(nbytes, 0xAA, dtype=np.uint8)
        fill_keystream(seed, out, threads=threads)
        assert np.array_equal(out, expected), threads


def test_masks_cancel_across_thread_counts() -> None:
    """A client masking on 3 threads and a server removing the masks on 1 thread meet."""
    x = np.random.default_rng(0).integers(0, 2**32, size=3_000_001, dtype=np.uint32)
    masks = [(os.urandom(32), 1), (os.urandom(32), -1), (os.urandom(32), 1)]
    y = apply_masks(x.copy(), masks, threads=3)
    assert np.count_nonzero(y == x) < 10  # masked: almost every word changed
    add_keystreams(y, [(seed, -sign) for seed, sign in masks], threads=1)
    assert np.array_equal(y, x)


def test_concurrent_callers_share_the_pool_without_mixing_work() -> None:
    rng = np.random.default_rng(1)
    jobs = []
    for _ in range(4):
        x = rng.integers(0, 2**32, size=2_000_003, dtype=np.uint32)
        masks = [(os.urandom(32), int(rng.choice([-1, 1]))) for _ in range(3)]
        jobs.append((x, masks, reference_apply_masks(x.copy(), masks)))
    results: dict[int, npt.NDArray[Any]] = {}

    def work(i: int) -> None:
        x, masks, _ = jobs[i]
        results[i] = apply_masks(x.copy(), masks, threads=2)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    for i, (_, _, expected) in enumerate(jobs):
        assert np.array_equal(results[i], expected)


def _mask_in_child(seed: bytes, queue: Any) -> None:
    x = np.zeros(2_000_000, dtype=np.uint32)
    apply_masks(x, [(seed, 1)], threads=2)
    queue.put(int(x[-1]))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_gets_a_working_pool() -> None:
    """A child forked after the pool started inherits the pool object but not its threads:
    masking there must not wait forever on threads that do not exist."""
    seed = os.urandom(32)
    apply_masks(np.zeros(2_000_000, dtype=np.uint32), [(seed, 1)], threads=2)  # pool started
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_mask_in_child, args=(seed, queue))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("masking in a forked child hung")
    assert child.exitcode == 0
    assert queue.get(timeout=5) == int(expand_mask(seed, 2_000_000, np.uint32)[-1])
