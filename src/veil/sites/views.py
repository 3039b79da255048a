"""A job's view of a PKI folder: what one job's process is given, and nothing more.

A long-lived site or coordinator keeps one PKI folder for every job, but a job may bring keys
of its own (under CKKS a key set made for that job alone). Each job's `veil server` or
`veil client` is therefore given a folder of its own, ``JOB/pki/``, that links to the node's
long-lived files (``ca.crt``, ``crl.pem``, its own ``nodes/NAME/`` and, for the coordinator,
the members' public certificates) and holds the job's key material as real files. Links, not
copies: a revocation list the node receives reaches every job at once.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from veil.atomic import atomic_write_bytes
from veil.crypto import pki
from veil.errors import UserError

_NODE_FOLDERS = ("nodes", "he")


def server_view(
    pki_dir: Path, view: Path, members: Sequence[str], material: Mapping[str, bytes]
) -> Path:
    """The coordinator's view for one job: its own keys, the job members' certificates and the
    job's public key material (``he/public.ctx``, ``he/keyset.json``); never a sealed box."""
    from veil.deployment import SERVER_NAME

    _base(pki_dir, view)
    for name in [SERVER_NAME, *members]:
        if not (pki_dir / pki.NODES / name / pki.NODE_CERT).is_file():
            raise UserError(
                f"the coordinator has no certificate for '{name}': copy its node.crt to "
                f"{pki_dir / pki.NODES / name / pki.NODE_CERT}"
            )
        _link(pki_dir / pki.NODES / name, view / pki.NODES / name)
    public = {k: v for k, v in material.items() if k.startswith("he/") and "sealed" not in k}
    _material(view, public)
    return view


def member_view(pki_dir: Path, view: Path, name: str, material: Mapping[str, bytes]) -> Path:
    """Site `name`'s view for one job: its own keys, the coordinator's certificate when the
    site holds it, and the job's key material for this site (public set, its sealed box)."""
    from veil.deployment import SERVER_NAME

    _base(pki_dir, view)
    _link(pki_dir / pki.NODES / name, view / pki.NODES / name)
    server = pki_dir / pki.NODES / SERVER_NAME
    if server.is_dir():
        _link(server, view / pki.NODES / SERVER_NAME)
    own = {k: v for k, v in material.items() if "sealed" not in k or k.endswith(f"/{name}.box")}
    _material(view, own)
    return view


def _base(pki_dir: Path, view: Path) -> None:
    """The view's folder, with a link to each long-lived file at the top of `pki_dir`."""
    view.mkdir(parents=True, exist_ok=True, mode=0o700)
    for entry in pki_dir.iterdir():
        if entry.name not in _NODE_FOLDERS and entry.is_file():
            _link(entry, view / entry.name)


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if link.is_symlink() or link.exists():
        if link.is_symlink() and Path(os.readlink(link)) == target.resolve():
            return
        link.unlink()
    link.symlink_to(target.resolve())


def _material(view: Path, files: Mapping[str, bytes]) -> None:
    for name, data in files.items():
        path = (view / name).resolve()
        if not path.is_relative_to(view.resolve()):
            raise UserError(f"key material '{name}' would be written outside the job's folder")
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_bytes(path, data, mode=0o600 if "sealed" in name else 0o644)
