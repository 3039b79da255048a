"""Test-only certificate authorities standing in for AMD's and Intel's (generated per test)."""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def make_cert(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    *,
    ca: bool = True,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, signing_key = (issuer[0].subject, issuer[1]) if issuer else (subject, key)
    hash_ = hashes.SHA384() if isinstance(key.curve, ec.SECP384R1) else hashes.SHA256()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(signing_key, hash_)
    )


def pem(*certs: x509.Certificate) -> str:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs).decode()


def chain(
    curve: ec.EllipticCurve, names: tuple[str, str, str]
) -> tuple[x509.Certificate, x509.Certificate, x509.Certificate, ec.EllipticCurvePrivateKey]:
    """(root, intermediate, leaf, leaf key)."""
    root_key, mid_key, leaf_key = (ec.generate_private_key(curve) for _ in range(3))
    root = make_cert(names[0], root_key)
    mid = make_cert(names[1], mid_key, (root, root_key))
    leaf = make_cert(names[2], leaf_key, (mid, mid_key), ca=False)
    return root, mid, leaf, leaf_key
