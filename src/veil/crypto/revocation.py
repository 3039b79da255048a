"""The federation's signed revocation list: an X.509 CRL with a version number.

The CA operator revokes a certificate with `veil pki revoke`, which rewrites ``CA_DIR/crl.pem``:
every revoked serial, signed with the CA key, with a CRL number one above the last. The
coordinator hands the newest list to every member with every task; a member checks the CA's
signature, refuses a list older than the newest it has seen (`veil.crypto.trust`), and refuses
certificates on it. The list is public: anyone may carry it, nobody can forge or roll it back.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from veil.atomic import atomic_write_bytes
from veil.errors import UserError

__all__ = ["CRL_FILE", "RevocationList", "load_revocations", "read_revocations", "sign_revocations"]

CRL_FILE = "crl.pem"


class RevocationRejected(UserError):
    """A revocation list that is not the CA's, is malformed, or is older than one already seen."""


@dataclass(frozen=True)
class RevocationList:
    """A verified list: its number, the revoked serials, and its PEM (to pass on)."""

    number: int
    serials: frozenset[int]
    pem: bytes


def sign_revocations(
    path: Path,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    serials: Collection[int],
) -> RevocationList:
    """Write ``path``: a CRL of `serials` numbered one above the list already there (1 for the
    first), signed with the CA key; return it."""
    previous = read_revocations(path, ca_cert) if path.is_file() else None
    number = 1 if previous is None else previous.number + 1
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(ca_cert.not_valid_after_utc)
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    for serial in sorted(set(serials)):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    pem = builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    atomic_write_bytes(path, pem, mode=0o644)
    return RevocationList(number, frozenset(serials), pem)


def load_revocations(pem: bytes, ca_cert: x509.Certificate) -> RevocationList:
    """The list in `pem` after checking that this federation's CA signed it;
    RevocationRejected otherwise."""
    try:
        crl = x509.load_pem_x509_crl(pem)
    except ValueError:
        raise RevocationRejected("the revocation list is not a PEM CRL") from None
    public_key = ca_cert.public_key()
    if crl.issuer != ca_cert.subject or not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise RevocationRejected("the revocation list was not issued by this federation's CA")
    if not crl.is_signature_valid(public_key):
        raise RevocationRejected("the revocation list's signature does not verify with the CA key")
    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        raise RevocationRejected("the revocation list has no CRL number") from None
    return RevocationList(int(number), frozenset(r.serial_number for r in crl), pem)


def read_revocations(path: Path, ca_cert: x509.Certificate) -> RevocationList:
    """`load_revocations` of the file `path`."""
    try:
        pem = Path(path).read_bytes()
    except OSError as exc:
        raise RevocationRejected(f"cannot read the revocation list '{path}': {exc}") from None
    return load_revocations(pem, ca_cert)
