"""The one way Veil opens the SQLite files it keeps (run store, privacy ledger, job store, site
journal): write-ahead log, `synchronous=FULL` (a commit is on disk before `COMMIT` returns, so
a process killed at any moment, or a power cut, loses no committed write), foreign keys on,
rows by column name, the schema created if missing; and one set of errors for a file that
cannot be opened: a full disk or a refused write names the file (`DiskFullError` /
`WritePermissionError`), and a file that is not such a database says what it should have been.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from veil.atomic import disk_error, writing
from veil.errors import StoreError


def open_database(
    path: Path,
    schema: str,
    *,
    what: str,
    autocommit: bool = True,
    threads: bool = False,
    migrate: Callable[[sqlite3.Connection], None] | None = None,
) -> sqlite3.Connection:
    """A connection to the SQLite file `path` (created with its folder if missing) holding
    `schema` (then `migrate` run on it). `autocommit`: no implicit transactions, every write
    opens its own (`BEGIN IMMEDIATE`); otherwise Python's default, commit by hand. `threads`: the
    connection may be used from several threads (the caller serialises them).

    Raises DiskFullError / WritePermissionError naming `path`, or StoreError "'PATH' is not
    a Veil WHAT" when the file exists but is not an SQLite database of this kind."""
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(
            path,
            timeout=30,
            isolation_level=None if autocommit else "DEFERRED",
            check_same_thread=not threads,
        )
    db.row_factory = sqlite3.Row
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        db.executescript(schema)
        if migrate is not None:
            migrate(db)
    except sqlite3.DatabaseError as exc:
        db.close()
        named = disk_error(exc, path)
        if named is not None:
            raise named from None
        raise StoreError(f"'{path}' is not a Veil {what} ({exc})") from None
    return db
