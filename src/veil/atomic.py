"""Atomic file writes: a reader sees the old file or the new one, never a torn one.

Also where a failed write is named: `disk_error` turns the operating system's or SQLite's "no
space left" and "not permitted" into `DiskFullError` / `WritePermissionError` naming the file,
and `writing(path)` applies it to a block of code.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

from veil.errors import DiskError, DiskFullError, WritePermissionError

_FULL = {errno.ENOSPC, errno.EDQUOT}
_DENIED = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
           errno.EROFS: "read-only file system"}  # fmt: skip
# SQLite's primary result codes (the low byte of the extended code Python reports).
_SQLITE_PERM, _SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_FULL, _SQLITE_CANTOPEN = 3, 8, 10, 13, 14


def disk_error(exc: BaseException, path: str | Path) -> DiskError | None:
    """The named error for a failed write of `path`, or None when `exc` is not a full disk or
    a refused write (the caller then lets `exc` go on as it is).

    `exc` is an `OSError` (its errno decides) or an `sqlite3.Error` (its result code decides;
    SQLite reports a read-only file system as "unable to open", and some full disks as an I/O
    error, so the file system itself is asked then)."""
    if isinstance(exc, DiskError):
        return exc
    where = str(path)
    if isinstance(exc, OSError):
        if exc.errno in _FULL:
            return DiskFullError(where)
        if exc.errno in _DENIED:
            return WritePermissionError(where, reason=_DENIED[exc.errno])
        return None
    if not isinstance(exc, sqlite3.Error):
        return None
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    if code == _SQLITE_FULL:
        return DiskFullError(where)
    if code == _SQLITE_PERM:
        return WritePermissionError(where)
    if code in (_SQLITE_READONLY, _SQLITE_CANTOPEN, _SQLITE_IOERR):
        folder = Path(path).parent
        try:
            stat = os.statvfs(folder)
        except OSError:
            return None
        if stat.f_flag & os.ST_RDONLY:
            return WritePermissionError(where, reason="read-only file system")
        if code == _SQLITE_IOERR and stat.f_bavail == 0:
            return DiskFullError(where)
        if code != _SQLITE_IOERR and not _writable(Path(path)):
            return WritePermissionError(where)
        if code == _SQLITE_READONLY:
            return WritePermissionError(where, reason="the database is read-only")
    return None


def _writable(path: Path) -> bool:
    if path.exists() and not os.access(path, os.W_OK):
        return False
    return os.access(path.parent, os.W_OK | os.X_OK)


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Run the block that writes `path`; a full disk or a refused write in it is raised as
    `DiskFullError` / `WritePermissionError` naming `path`, anything else as it is."""
    try:
        yield
    except (OSError, sqlite3.Error) as exc:
        named = disk_error(exc, path)
        if named is None or named is exc:
            raise
        raise named from exc


def atomic_write_bytes(path: str | Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write `data` to `path` via a temporary file in the same folder, fsync, then rename.

    The folder is fsynced too, so the rename survives a power cut. A full disk or a refused
    write raises `DiskFullError` / `WritePermissionError` naming `path` (also `OSError`s).
    """
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_text(path: str | Path, text: str, *, mode: int = 0o644) -> None:
    """`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)
