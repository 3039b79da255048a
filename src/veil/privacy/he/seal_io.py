"""SEAL objects to and from bytes, through an anonymous in-memory file.

TenSEAL's binding of Microsoft SEAL (`tenseal.sealapi`) saves and loads ciphertexts only by
file path, and it is the only binding that reaches SEAL's seeded symmetric ciphertexts
(`Encryptor.encrypt_symmetric` returning a `Serializable`). An anonymous memory file
(`memfd_create`, Linux) gives SEAL a path (``/proc/self/fd/N``) that never touches a disk and
disappears when closed. `Ciphertext.load` is SEAL's own, which checks the header, the
parameters and that every coefficient is reduced, so bytes from the network are parsed by SEAL,
never by us.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol


class _Saveable(Protocol):
    def save(self, path: str) -> None: ...


@contextmanager
def _memory_file() -> Iterator[tuple[int, str]]:
    fd = os.memfd_create("veil-seal", os.MFD_CLOEXEC)
    try:
        yield fd, f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def save_bytes(obj: _Saveable) -> bytes:
    """What SEAL's `save` writes for `obj` (a ciphertext or a seeded `Serializable`)."""
    with _memory_file() as (fd, path):
        obj.save(path)
        size = os.fstat(fd).st_size
        return os.pread(fd, size, 0)


def load_ciphertext(seal_context: Any, data: bytes) -> Any:
    """A `sealapi.Ciphertext` parsed by SEAL from `data` (a seeded one is expanded); SEAL raises
    (ValueError/RuntimeError) on bytes that are malformed or made for other parameters."""
    import tenseal.sealapi as sealapi

    ciphertext = sealapi.Ciphertext()
    with _memory_file() as (fd, path):
        os.pwrite(fd, data, 0)
        ciphertext.load(seal_context, path)
    return ciphertext
