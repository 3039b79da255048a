"""One run per output folder.

`run_directory(OUT)` holds an exclusive lock on ``OUT/.veil.lock`` for as long as a run writes
there, so a second `veil run` (or `veil.run`) into the same folder is refused with one line
instead of silently overwriting the first run's result and checkpoint. The lock is the
operating system's (`flock`): it goes away with the process, even after a kill -9, so a crashed
run never leaves a folder locked. On taking the lock, the temporary files that an interrupted
atomic write leaves (``.NAME.XXXX.tmp``, `veil.atomic`) are removed. A folder the run created
and left empty (the run was refused before it wrote anything) is removed again.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from veil.atomic import disk_error, writing
from veil.errors import UserError

__all__ = ["LOCK_FILE", "run_directory"]

LOCK_FILE = ".veil.lock"


@contextmanager
def run_directory(out: str | Path) -> Iterator[Path]:
    """Hold `out` for one run (created if missing); UserError if another process holds it."""
    out = Path(out)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        named = disk_error(exc, out / LOCK_FILE)
        if named is not None:
            raise named from None
        raise UserError(f"cannot use '{out}' for the run: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise UserError(
            f"another run is using '{out}' (process {holder}); wait for it to finish, or "
            "choose another --out"
        ) from None
    try:
        with writing(out / LOCK_FILE):  # a full disk is named, not a traceback
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            for stale in out.glob(".*.tmp"):
                stale.unlink(missing_ok=True)
        yield out
    finally:
        os.close(fd)  # releases the lock
        if created and {p.name for p in out.iterdir()} <= {LOCK_FILE}:
            # A run refused before it wrote anything leaves no folder behind.
            (out / LOCK_FILE).unlink(missing_ok=True)
            out.rmdir()
