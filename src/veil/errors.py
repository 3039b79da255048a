"""Exceptions that Veil raises on purpose.

`UserError` and its subclasses mean "the input is wrong and the user can fix it": the CLI prints
their message as one line on stderr and exits with status 2, without a traceback. Anything else
is a bug in Veil and keeps its traceback.
"""

from __future__ import annotations

import errno


class VeilError(Exception):
    """Base class of every exception Veil raises deliberately."""


class UserError(VeilError):
    """Bad input by the user: the message says what is wrong and how to fix it."""


class ConfigError(UserError):
    """A run configuration is invalid (unknown key, wrong type, impossible value)."""


class DataError(UserError):
    """A data set cannot be loaded or partitioned as requested."""


class StoreError(UserError):
    """A run store or run directory is missing or does not hold what was asked for."""


class DiskError(UserError, OSError):
    """Writing `path` failed for a reason outside Veil: the disk is full, or the file or its
    folder may not be written. Also an `OSError`, so code that handles failed writes as
    `OSError` keeps doing so."""

    def __init__(self, message: str, *, path: str, code: int) -> None:
        super().__init__(message)
        self.path = path
        self.errno = code


class DiskFullError(DiskError):
    """No space left (or the quota is used up) where a run writes its checkpoint, result,
    run store or ledger. `resume` is the command that continues the run once space is free."""

    def __init__(self, path: str, *, resume: str = "veil run CONFIG --out DIR --resume") -> None:
        super().__init__(
            f"disk full writing '{path}': free space and run `{resume}`",
            path=path,
            code=errno.ENOSPC,
        )
        self.resume = resume


class WritePermissionError(DiskError):
    """`path` (or its folder) may not be written: permissions, or a read-only file system."""

    def __init__(self, path: str, *, reason: str = "permission denied") -> None:
        super().__init__(
            f"no permission to write '{path}' ({reason}): make it (or its folder) writable "
            "and try again",
            path=path,
            code=errno.EACCES,
        )
        self.reason = reason


class Aborted(KeyboardInterrupt):
    """A run stopped at once by a signal (a second Ctrl-C or SIGTERM): what it finished is in
    its run store and checkpoint. A `KeyboardInterrupt`, not a `VeilError`, so that no
    `except Exception` on the way (a transport recording a client's failure) can swallow it.
    `exit_status` is the conventional 128 + signal number."""

    def __init__(self, message: str, *, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_status = 128 + signum
