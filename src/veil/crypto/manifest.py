"""Signed artifacts: a SHA-256 manifest of a run folder, signed with a node's Ed25519 key.

`sign_run` writes ``manifest.json`` (format, run id, privacy record, signer key, SHA-256 of every
artifact file) and ``manifest.sig`` (base64 Ed25519 signature over
``signing_payload("veil-run-manifest", manifest bytes)``). `verify_run` recomputes every hash and
fails on any changed, missing or added file, or on a signature by another key.

Artifacts are the files of the run folder except its PKI and key folders (private keys), its
logs and data folders (written by other processes), SQLite's transient ``-wal``/``-shm`` files,
the port file, and the manifest itself.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from veil.atomic import atomic_write_bytes
from veil.crypto.identity import IdentityKey, IdentityPublicKey, SignatureRejected, signing_payload
from veil.errors import UserError

__all__ = ["MANIFEST", "SIGNATURE", "ManifestError", "VerifiedManifest", "sign_run", "verify_run"]

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
FORMAT = "veil-manifest-v1"
_SKIP_DIRS = {"pki", "keys", "logs", "data", "ca", "orgs"}
_SKIP_FILES = {MANIFEST, SIGNATURE, "server.port", ".veil.lock"}
_SKIP_SUFFIXES = ("-wal", "-shm", "-journal")


class ManifestError(UserError):
    """A run folder does not match its signed manifest."""


@dataclass(frozen=True)
class VerifiedManifest:
    run_id: str | None
    signer: IdentityPublicKey
    files: dict[str, str]


def artifacts(run_dir: Path) -> dict[str, str]:
    """SHA-256 (hex) of every artifact file, by path relative to `run_dir`."""
    out: dict[str, str] = {}
    for path in sorted(run_dir.rglob("*")):
        rel = path.relative_to(run_dir)
        if not path.is_file() or rel.parts[0] in _SKIP_DIRS or path.name in _SKIP_FILES:
            continue
        if path.name.endswith(_SKIP_SUFFIXES):
            continue
        out[rel.as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def sign_run(run_dir: Path, key: IdentityKey) -> Path:
    """Write and sign the manifest of `run_dir`; returns the manifest's path."""
    run_dir = Path(run_dir)
    result = _result(run_dir)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "run_id": result.get("run_id"),
        "privacy": result.get("privacy"),
        "signer": key.public_bytes().hex(),
        "files": artifacts(run_dir),
    }
    body = json.dumps(manifest, sort_keys=True, indent=1).encode()
    signature = key.sign(signing_payload("veil-run-manifest", body))
    atomic_write_bytes(run_dir / MANIFEST, body, mode=0o644)
    atomic_write_bytes(run_dir / SIGNATURE, base64.b64encode(signature) + b"\n", mode=0o644)
    return run_dir / MANIFEST


def verify_run(run_dir: Path, public_key: IdentityPublicKey | None = None) -> VerifiedManifest:
    """Check `run_dir` against its signed manifest; ManifestError naming the first problem.

    With `public_key` the signer must be that key; without it, the manifest's own signer key is
    used, which proves integrity but not who signed (pass the server's key to prove that).
    """
    run_dir = Path(run_dir)
    try:
        body = (run_dir / MANIFEST).read_bytes()
        signature = base64.b64decode((run_dir / SIGNATURE).read_bytes().strip(), validate=True)
        manifest = json.loads(body)
        signer = IdentityPublicKey.from_bytes(bytes.fromhex(manifest["signer"]))
        files = dict(manifest["files"])
    except FileNotFoundError as exc:
        raise ManifestError(
            f"no signed manifest in '{run_dir}' ({Path(str(exc.filename)).name} missing); "
            "sign the run with `veil sign`"
        ) from None
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise ManifestError(f"the manifest in '{run_dir}' is malformed") from None
    if public_key is not None and public_key != signer:
        raise ManifestError("the manifest is signed by another key than the one given")
    try:
        signer.verify(signature, signing_payload("veil-run-manifest", body))
    except SignatureRejected:
        raise ManifestError("the manifest's signature does not verify: it was altered") from None
    found = artifacts(run_dir)
    for name in sorted(set(files) | set(found)):
        if name not in found:
            raise ManifestError(f"'{name}' is in the manifest but missing from the run folder")
        if name not in files:
            raise ManifestError(f"'{name}' was added after the manifest was signed")
        if found[name] != files[name]:
            raise ManifestError(f"'{name}' changed after the manifest was signed")
    return VerifiedManifest(manifest.get("run_id"), signer, files)


def _result(run_dir: Path) -> dict[str, Any]:
    try:
        raw = json.loads((run_dir / "result.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}
