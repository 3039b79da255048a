"""CKKS keys: who holds what, and the key ceremony that hands them out.

- Every client holds a `SecretKeySet`: the secret CKKS context, the key id and the release key
  that keys the decryptors' flooding noise (`veil.privacy.he.release`).
- The server holds a `PublicKeySet`: the parameters and the key id, no key of any kind. It
  refuses a context that carries a secret key (`load_public_context`).

Ceremony (`veil he keygen`, and `veil run --mode deployment` before it starts the processes):
`ceremony` creates a fresh context and key id, writes ``PKI/he/public.ctx`` and
``PKI/he/keyset.json`` for the server, and seals the secret key set to each client's X25519
encryption key, taken from the client's CA-verified certificate (HPKE, `veil.crypto.sealed_box`),
as ``PKI/he/sealed/NAME.box``. The plaintext secret key is never written to disk; the machine
that runs the ceremony sees it for a moment and must be trusted like the CA (run it on an
organisation's machine or the CA's, never on the aggregation server). Running the ceremony
again (`rotate=True`) gives a new key: rotate per run.

In a simulation the run generates the key set in memory and gives each client the secret set
directly, standing in for the ceremony.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from veil.atomic import atomic_write_bytes, atomic_write_text
from veil.crypto import pki
from veil.crypto.identity import signing_payload
from veil.crypto.sealed_box import EncryptionKey, open_box, seal_to
from veil.errors import UserError
from veil.privacy.he.ckks import (
    CkksParams,
    load_public_context,
    new_secret_context,
    public_context_bytes,
    secret_context_bytes,
)

HE_DIR = "he"
PUBLIC_CONTEXT = "public.ctx"
KEYSET = "keyset.json"
SEALED = "sealed"
_RELEASE_KEY_BYTES = 32


@dataclass(frozen=True)
class PublicKeySet:
    """What the server holds: the parameters (as a context without keys) and the key id."""

    key_id: str
    params: CkksParams
    context: bytes


@dataclass(frozen=True)
class SecretKeySet:
    """What each client holds. Never give it to the server."""

    key_id: str
    params: CkksParams
    context: bytes
    release_key: bytes

    def __repr__(self) -> str:
        return f"SecretKeySet(key_id={self.key_id!r})"


def generate(params: CkksParams) -> tuple[SecretKeySet, PublicKeySet]:
    """A fresh key set: a new secret key (SEAL's CSPRNG), key id and release key (os.urandom)."""
    context = new_secret_context(params)
    key_id = secrets.token_hex(8)
    secret = SecretKeySet(
        key_id, params, secret_context_bytes(context), os.urandom(_RELEASE_KEY_BYTES)
    )
    return secret, PublicKeySet(key_id, params, public_context_bytes(context))


def ceremony(
    pki_dir: Path,
    params: CkksParams,
    *,
    clients: Sequence[str] | None = None,
    rotate: bool = False,
) -> PublicKeySet:
    """Create a key set and seal it to each client (default: every issued, unrevoked client
    of the PKI); write ``PKI/he/``. UserError if keys exist and `rotate` is false, or if a
    client's certificate does not verify or carries no encryption key."""
    out = Path(pki_dir) / HE_DIR
    if (out / KEYSET).exists() and not rotate:
        raise UserError(
            f"CKKS keys already exist in '{out}'; pass --rotate to replace them with new ones "
            "(every client then needs its new sealed key)"
        )
    ca = pki.load_certificate(Path(pki_dir) / pki.CA_CERT)
    revoked = pki.revoked_serials(pki_dir)
    if clients is None:
        clients = [
            n.name for n in pki.issued_nodes(pki_dir) if n.role == "client" and not n.revoked
        ]
    if not clients:
        raise UserError(f"no client nodes in '{pki_dir}' to give the CKKS key to")
    recipients: dict[str, bytes] = {}
    for name in clients:
        cert = pki.member_certificate(pki_dir, name)
        pki.verify_certificate(cert, ca, role="client", revoked=revoked)
        recipients[name] = pki.certificate_encryption_key(cert)
    secret, public = generate(params)
    sealed = out / SEALED
    sealed.mkdir(parents=True, exist_ok=True, mode=0o700)
    for old in sealed.glob("*.box"):
        old.unlink()
    for name, key in recipients.items():
        box = seal_to(key, _secret_to_bytes(secret), info=_info(public.key_id, name))
        atomic_write_bytes(sealed / f"{name}.box", box, mode=0o600)
    atomic_write_bytes(out / PUBLIC_CONTEXT, public.context, mode=0o644)
    keyset = {
        "key_id": public.key_id,
        "params": params.to_dict(),
        "recipients": sorted(recipients),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    atomic_write_text(out / KEYSET, json.dumps(keyset, indent=2) + "\n", mode=0o644)
    return public


def load_public(pki_dir: Path, params: CkksParams) -> PublicKeySet:
    """The server's key set from ``PKI/he/``; SecretKeyRefused if the context holds a secret
    key, UserError if the ceremony has not run or was run with other parameters."""
    out = Path(pki_dir) / HE_DIR
    keyset = _keyset(out)
    data = (out / PUBLIC_CONTEXT).read_bytes()
    load_public_context(data, params)
    return PublicKeySet(str(keyset["key_id"]), params, data)


def load_secret(pki_dir: Path, name: str, params: CkksParams) -> SecretKeySet:
    """Client `name`'s key set, opened with its own encryption key."""
    out = Path(pki_dir) / HE_DIR
    keyset = _keyset(out)
    key_id = str(keyset["key_id"])
    box = out / SEALED / f"{name}.box"
    if not box.is_file():
        raise UserError(
            f"no sealed CKKS key for '{name}' in '{box.parent}'; run `veil he keygen` with this "
            "client among the recipients"
        )
    files = pki.node_files(pki_dir, name)
    plain = open_box(
        EncryptionKey.load(files.encryption_key), box.read_bytes(), info=_info(key_id, name)
    )
    secret = _secret_from_bytes(plain)
    if secret.key_id != key_id or secret.params != params:
        raise UserError(
            f"the sealed CKKS key for '{name}' does not match {out / KEYSET} or this run's "
            "[ckks] parameters; run `veil he keygen --rotate` with this config"
        )
    return secret


def _keyset(out: Path) -> dict[str, object]:
    path = out / KEYSET
    if not path.is_file() or not (out / PUBLIC_CONTEXT).is_file():
        raise UserError(
            f"no CKKS keys in '{out}'; run `veil he keygen CONFIG --pki {out.parent}` first"
        )
    raw = json.loads(path.read_text())
    if not isinstance(raw, dict) or "key_id" not in raw:
        raise UserError(f"'{path}' is not a Veil CKKS key set")
    return raw


def _info(key_id: str, client: str) -> bytes:
    return signing_payload("veil-ckks-secret-key-set", key_id, client)


def _secret_to_bytes(secret: SecretKeySet) -> bytes:
    return json.dumps(
        {
            "key_id": secret.key_id,
            "params": secret.params.to_dict(),
            "context": base64.b64encode(secret.context).decode("ascii"),
            "release_key": base64.b64encode(secret.release_key).decode("ascii"),
        }
    ).encode()


def _secret_from_bytes(data: bytes) -> SecretKeySet:
    try:
        raw = json.loads(data)
        p = raw["params"]
        params = CkksParams(
            int(p["poly_modulus_degree"]),
            tuple(int(b) for b in p["coeff_modulus_bits"]),
            int(p["scale_bits"]),
        )
        return SecretKeySet(
            str(raw["key_id"]),
            params,
            base64.b64decode(raw["context"], validate=True),
            base64.b64decode(raw["release_key"], validate=True),
        )
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise UserError("a sealed CKKS key set is malformed") from None
