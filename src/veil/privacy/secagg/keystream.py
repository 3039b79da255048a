"""AES-256-CTR keystreams written, added or subtracted straight into numpy arrays, on every core.

The keystream of a 32-byte seed starts at the all-zero counter block and is read as
little-endian unsigned integers (`veil.privacy.secagg.masking.expand_mask`). Because CTR mode
encrypts block ``i`` as ``AES(key, i)`` (the 16-byte counter is a 128-bit big-endian integer),
the stream from byte offset ``16·i`` on is the stream of a cipher whose initial counter block
is ``i``: the vector splits into spans that threads fill independently, each giving exactly the
bytes one sequential pass would. ``cryptography`` releases the GIL while it encrypts large
buffers and numpy does so while it adds, so the spans run in parallel.

Within a span the work goes chunk by chunk (`CHUNK_BYTES`, a fraction of a core's L2 cache):
for each chunk, every stream's keystream for that chunk is written into one scratch buffer and
added into (or subtracted from) the output chunk, which stays in cache throughout. Nothing
allocates per chunk: the plaintext is a view of one shared zero buffer, the scratch is reused.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

__all__ = ["CHUNK_BYTES", "add_keystreams", "fill_keystream", "worker_count"]

#: Keystream bytes per AES call: large enough to amortise the call, small enough that the
#: output chunk and the scratch stay in L2 while every stream passes over them.
CHUNK_BYTES = 1 << 18
_BLOCK = 16
#: Below this many output bytes per span a split costs more (new ciphers, a thread hand-off)
#: than it saves.
_MIN_SPAN_BYTES = 1 << 20
#: Spans per thread: a few, so that a thread slowed by other work on its core is helped out.
_SPANS_PER_WORKER = 2
_ZEROS = memoryview(bytes(CHUNK_BYTES))

_pool_lock = threading.Lock()
_pool: tuple[int, int, ThreadPoolExecutor] | None = None
_local = threading.local()


def worker_count() -> int:
    """The threads keystreams use by default: the CPUs this process may run on, at most 4
    (beyond that the work is bound by memory bandwidth, not AES)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


def fill_keystream(seed: bytes, out: npt.NDArray[np.uint8], threads: int | None = None) -> None:
    """Write the AES-256-CTR keystream of `seed` (zero initial counter) into `out`, a
    C-contiguous uint8 array, over `threads` threads (default `worker_count`)."""
    flat = out.reshape(-1)
    _run(flat, threads, lambda lo, hi: _fill_span(flat, seed, lo, hi))


def add_keystreams(
    acc: npt.NDArray[Any], streams: Sequence[tuple[bytes, int]], threads: int | None = None
) -> None:
    """For each ``(seed, sign)`` in `streams` (sign +1 or -1), add ``sign`` times the keystream
    of `seed`, read as little-endian integers of `acc`'s unsigned dtype, into the C-contiguous
    `acc` in place (wrapping mod 2^width), over `threads` threads (default `worker_count`).

    The caller validates seeds, signs and the dtype; the result does not depend on `threads`.
    """
    if not streams:
        return
    flat = acc.reshape(-1)
    pairs = list(streams)
    _run(flat, threads, lambda lo, hi: _add_span(flat, pairs, lo, hi))


def _run(flat: npt.NDArray[Any], threads: int | None, job: Callable[[int, int], None]) -> None:
    """Split `flat` into spans of whole chunks and call ``job(start, stop)`` on each (element
    indices), on the pool's threads and this one when the vector is large enough."""
    itemsize = flat.dtype.itemsize
    nbytes = flat.size * itemsize
    workers = worker_count() if threads is None else max(1, threads)
    n_chunks = -(-nbytes // CHUNK_BYTES)
    n_spans = min(workers * _SPANS_PER_WORKER, nbytes // _MIN_SPAN_BYTES, n_chunks)
    if workers == 1 or n_spans <= 1:
        job(0, flat.size)
        return
    per_chunk = CHUNK_BYTES // itemsize
    bounds = [min(flat.size, (n_chunks * k // n_spans) * per_chunk) for k in range(n_spans + 1)]
    spans = [(lo, hi) for lo, hi in itertools.pairwise(bounds) if hi > lo]
    taken = iter(spans)  # next() on a list iterator is atomic: each span goes to one thread

    def drain() -> None:
        for lo, hi in taken:
            job(lo, hi)

    pool = _executor(workers)
    futures = [pool.submit(drain) for _ in range(min(workers, len(spans)) - 1)]
    drain()  # the calling thread works too
    for future in futures:
        future.result()


def _fill_span(flat: npt.NDArray[np.uint8], seed: bytes, start: int, stop: int) -> None:
    """Write the keystream's bytes ``[start, stop)`` into the same bytes of `flat`."""
    cipher = _cipher(seed, start)
    raw = flat.data
    for lo in range(start, stop, CHUNK_BYTES):
        hi = min(lo + CHUNK_BYTES, stop)
        cipher.update_into(_ZEROS[: hi - lo], raw[lo:hi])


def _add_span(
    flat: npt.NDArray[Any], streams: list[tuple[bytes, int]], start: int, stop: int
) -> None:
    """Add ``sign`` times each stream's words ``[start, stop)`` into the same words of `flat`."""
    itemsize = flat.dtype.itemsize
    per_chunk = CHUNK_BYTES // itemsize
    steps = [
        (_cipher(seed, start * itemsize).update_into, np.add if sign > 0 else np.subtract)
        for seed, sign in streams
    ]
    scratch, words = _scratch(flat.dtype)
    for lo in range(start, stop, per_chunk):
        hi = min(lo + per_chunk, stop)
        size = (hi - lo) * itemsize
        target = flat[lo:hi]
        mask = words[: hi - lo]
        plain, out = _ZEROS[:size], scratch[:size]
        for encrypt_into, combine in steps:
            encrypt_into(plain, out)
            combine(target, mask, target)  # in place: wraps mod 2^width, no temporary


def _cipher(seed: bytes, byte_offset: int) -> CipherContext:
    """AES-256-CTR under `seed`, positioned at `byte_offset` (a multiple of 16) of the stream."""
    counter = (byte_offset // _BLOCK).to_bytes(_BLOCK, "big")
    return Cipher(algorithms.AES(seed), modes.CTR(counter)).encryptor()


def _scratch(dtype: np.dtype[Any]) -> tuple[memoryview, npt.NDArray[Any]]:
    """This thread's chunk-sized scratch buffer, as bytes and as little-endian `dtype` words."""
    buffer = getattr(_local, "buffer", None)
    if buffer is None:
        buffer = _local.buffer = np.empty(CHUNK_BYTES, dtype=np.uint8)
    return buffer.data, buffer.view(dtype.newbyteorder("<"))


def _executor(workers: int) -> ThreadPoolExecutor:
    """The shared pool (``workers - 1`` threads besides the caller's), made again after a fork
    (a forked child inherits the pool object but not its threads) or for another size."""
    global _pool
    with _pool_lock:
        pid = os.getpid()
        if _pool is None or _pool[:2] != (pid, workers):
            if _pool is not None and _pool[0] == pid:
                _pool[2].shutdown(wait=False)
            _pool = (pid, workers, ThreadPoolExecutor(workers - 1, "veil-keystream"))
        return _pool[2]
