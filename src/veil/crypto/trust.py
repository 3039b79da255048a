"""What a member remembers about its federation: the newest revocation list and its peers' keys.

A CA operator can mint a second, valid certificate for member B with an identity key of its own
choosing; every check against the CA alone accepts it. So each member pins its peers' identity
keys the first time it sees them (trust on first use, per federation) in a state file of its own,
``trust.json`` beside its keys, and afterwards accepts a *different* identity key for the same
name only when the certificate it pinned has been revoked in a revocation list signed by the CA.
A substitution is then never silent: it needs a revocation that every member sees, and the
victim's own certificate stops working.

The same file records the number of the newest revocation list the member has seen, so that a
coordinator cannot hand it an older list (one from before a revocation) later.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from veil.atomic import atomic_write_text
from veil.crypto import pki
from veil.crypto.identity import IdentityPublicKey
from veil.crypto.revocation import RevocationList, RevocationRejected, load_revocations

__all__ = ["TRUST_FILE", "KeyChanged", "TrustStore"]

TRUST_FILE = "trust.json"


class KeyChanged(pki.CertificateRejected):
    """A peer presents another identity key than the one pinned for its name, and the pinned
    certificate is not revoked: a CA-minted substitute, refused."""


@dataclass
class _Pin:
    identity: str  # hex of the raw Ed25519 key
    serial: int


class TrustStore:
    """A member's pins and newest revocation list, kept in `path` (JSON, written atomically).

    Bound to one federation: the file records the CA certificate's SHA-256 and refuses to be
    used with another CA (start a fresh file for another federation).
    """

    def __init__(self, path: Path, ca_cert: x509.Certificate) -> None:
        self.path = Path(path)
        self.ca_cert = ca_cert
        self._ca = hashlib.sha256(ca_cert.public_bytes(serialization.Encoding.DER)).hexdigest()
        self._pins: dict[str, _Pin] = {}
        self._revocations: RevocationList | None = None
        self._load()

    @property
    def revoked(self) -> frozenset[int]:
        """The serials of the newest revocation list seen (empty before any)."""
        return self._revocations.serials if self._revocations else frozenset()

    @property
    def revocation_number(self) -> int | None:
        return self._revocations.number if self._revocations else None

    def accept_revocations(self, pem: bytes) -> RevocationList:
        """Take a revocation list handed over by anyone (the coordinator, with every task).

        RevocationRejected if the CA did not sign it, or it is older than the newest seen, or
        it has the newest number with other contents; a newer one replaces the stored one.
        """
        incoming = load_revocations(pem, self.ca_cert)
        current = self._revocations
        if current is not None:
            if incoming.number < current.number:
                raise RevocationRejected(
                    f"refusing revocation list number {incoming.number}: this member has "
                    f"already seen number {current.number} (a rolled-back list would un-revoke "
                    "certificates)"
                )
            if incoming.number == current.number:
                if incoming.serials != current.serials:
                    raise RevocationRejected(
                        f"two different revocation lists carry number {incoming.number}"
                    )
                return current
        self._revocations = incoming
        self._save()
        return incoming

    def check_peer(self, name: str, cert: x509.Certificate, *, role: pki.Role) -> IdentityPublicKey:
        """Peer `name`'s identity key from its certificate: checked against the CA, the newest
        revocation list and the pin (first use pins it). CertificateRejected, or KeyChanged for
        another key than the pinned one while the pinned certificate is not revoked."""
        pki.verify_certificate(cert, self.ca_cert, role=role, revoked=self.revoked)
        if pki.certificate_name(cert) != name:
            raise pki.CertificateRejected(
                f"the certificate presented for '{name}' names '{pki.certificate_name(cert)}'"
            )
        identity = pki.certificate_identity(cert)
        key = identity.public_bytes().hex()
        pinned = self._pins.get(name)
        if pinned is not None and pinned.identity != key and pinned.serial not in self.revoked:
            raise KeyChanged(
                f"'{name}' presents another identity key (certificate serial "
                f"{cert.serial_number}) than the one pinned from serial {pinned.serial}, "
                "which is not revoked: refusing a substituted key (if the member really "
                "changed its keys, the CA must revoke its old certificate first)"
            )
        if pinned is None or pinned.identity != key or pinned.serial != cert.serial_number:
            self._pins[name] = _Pin(key, cert.serial_number)
            self._save()
        return identity

    # -- persistence -------------------------------------------------------------------------

    def _load(self) -> None:
        if not self.path.is_file():
            return
        try:
            raw: dict[str, Any] = json.loads(self.path.read_text(encoding="utf-8"))
            if raw.get("ca") != self._ca:
                raise pki.CertificateRejected(
                    f"'{self.path}' belongs to another federation's CA; move it away to start "
                    "afresh"
                )
            self._pins = {
                str(n): _Pin(str(p["identity"]), int(p["serial"]))
                for n, p in dict(raw.get("pins", {})).items()
            }
            crl = raw.get("revocations")
        except (ValueError, KeyError, TypeError) as exc:
            raise pki.CertificateRejected(f"'{self.path}' is not a trust file: {exc}") from None
        if crl:
            self._revocations = load_revocations(str(crl).encode(), self.ca_cert)

    def _save(self) -> None:
        document = {
            "ca": self._ca,
            "revocations": self._revocations.pem.decode() if self._revocations else None,
            "pins": {
                n: {"identity": p.identity, "serial": p.serial}
                for n, p in sorted(self._pins.items())
            },
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(document, indent=1), mode=0o600)
