"""Reading private key files: only the owner may read or write them.

Every private key Veil loads (TLS, Ed25519 identity, X25519 encryption, the CA's, a checkpoint
key) goes through `read_private`, which refuses a file that its group or other users can
access, as ssh does: a key that others can read is a key others may hold.
"""

from __future__ import annotations

import stat
from pathlib import Path

from veil.errors import UserError

__all__ = ["PRIVATE_MODE", "read_private"]

#: The mode Veil writes private key files with.
PRIVATE_MODE = 0o600


def read_private(path: str | Path, what: str) -> bytes:
    """The bytes of the private key file `path` (`what` names it in errors).

    UserError, in one line, if it is missing, unreadable, or accessible by group or others
    (the message says `chmod 600 PATH`).
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise UserError(f"no {what} at '{path}'") from None
    except OSError as exc:
        raise UserError(f"cannot read {what} '{path}': {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UserError(
            f"{what} '{path}' is accessible by group or others (mode {stat.S_IMODE(mode):o}); "
            f"run `chmod 600 {path}`"
        )
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {what} '{path}': {exc.strerror}") from None
