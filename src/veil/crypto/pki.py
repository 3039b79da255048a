"""The federation's own PKI: one CA, one TLS certificate and one identity key per node.

Shortest example::

    init_ca(Path("pki"))                                       # pki/ca.crt, pki/ca.key
    server = issue(Path("pki"), "coordinator", role="server", hosts=("localhost", "127.0.0.1"))
    bank = issue(Path("pki"), "bank-a", role="client")
    verify_certificate(load_certificate(bank.cert), load_certificate(bank.ca_cert), role="client")

Layout of a PKI folder::

    DIR/ca.crt  DIR/ca.key (0600)  DIR/revoked.txt (one decimal serial per line)
    DIR/nodes/NAME/node.crt  node.key (0600)  identity.key (0600)  identity.pub
                   encryption.key (0600)

Keys: the CA and node TLS keys are ECDSA P-256 (PKCS#8 PEM), which gRPC's TLS stack (BoringSSL)
accepts for mutual TLS; signatures are ECDSA with SHA-256. The identity key is Ed25519
(`veil.crypto.identity`) and signs message content, not TLS.

Certificates: subject CN is the node name, OU its role (``server`` or ``client``);
ExtendedKeyUsage serverAuth or clientAuth to match; SubjectAltName the given hosts (DNS or IP) for
a server and DNS:NAME for a client; BasicConstraints CA=false; KeyUsage digitalSignature; and a
non-critical Veil extension (`IDENTITY_OID`, an OCTET STRING holding the raw 32-byte Ed25519
public key) that binds the node's identity key to its name under the CA's signature, so that a
peer can check a relayed signature (SecAgg key advertisements) without trusting the relay; and
a second one (`ENCRYPTION_OID`, the raw 32-byte X25519 public key of the node's encryption key,
`veil.crypto.sealed_box`) so that keys can be sealed to a node (the CKKS key ceremony) with the
CA's word for whose key it is.

Revocation: `revoke` appends a serial to ``revoked.txt`` and `verify_certificate` refuses it.
The TLS handshake itself does not read that list; a node must check its peer's certificate with
`verify_certificate(..., revoked=revoked_serials(DIR))` after the handshake.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from veil.atomic import atomic_write_bytes, atomic_write_text
from veil.crypto.identity import IdentityKey, IdentityPublicKey
from veil.crypto.sealed_box import EncryptionKey
from veil.errors import UserError

__all__ = [
    "IDENTITY_OID",
    "CertificateRejected",
    "IssuedNode",
    "NodeFiles",
    "Role",
    "certificate_encryption_key",
    "certificate_identity",
    "certificate_name",
    "certificate_role",
    "init_ca",
    "issue",
    "issued_nodes",
    "load_certificate",
    "node_files",
    "revoke",
    "revoked_serials",
    "verify_certificate",
]

Role = Literal["server", "client"]
ROLES: tuple[Role, ...] = ("server", "client")

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
REVOKED = "revoked.txt"
NODES = "nodes"
NODE_CERT = "node.crt"
NODE_KEY = "node.key"
IDENTITY_KEY = "identity.key"
IDENTITY_PUB = "identity.pub"
ENCRYPTION_KEY = "encryption.key"

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_HOST = re.compile(r"[A-Za-z0-9.*_-]{1,253}")
_EKU = {"server": ExtendedKeyUsageOID.SERVER_AUTH, "client": ExtendedKeyUsageOID.CLIENT_AUTH}
#: OID of the extension that carries a node's Ed25519 identity key: a 2.25 (UUID-based, ITU-T
#: X.667) identifier, unique without registration.
IDENTITY_OID = x509.ObjectIdentifier("2.25.254227675962433388747850750087626402989")
#: OID of the extension that carries a node's X25519 encryption key (same construction).
ENCRYPTION_OID = x509.ObjectIdentifier("2.25.127049348851150900984897569176333437814")
_OCTET_STRING_32 = b"\x04\x20"

# Certificates start a few minutes in the past so that small clock differences between
# organisations do not reject a certificate that was just issued.
_BACKDATE = dt.timedelta(minutes=5)


class CertificateRejected(UserError):
    """A certificate is not acceptable: wrong CA, expired, wrong role, revoked, or malformed."""


@dataclass(frozen=True)
class NodeFiles:
    """The files of one issued node; `role` is read from its certificate."""

    name: str
    role: Role
    cert: Path
    key: Path
    identity_key: Path
    identity_pub: Path
    ca_cert: Path
    #: The node's X25519 encryption key (nodes issued before it existed have none).
    encryption_key: Path


@dataclass(frozen=True)
class IssuedNode:
    """One row of `issued_nodes`: what `veil pki show` prints."""

    name: str
    role: Role
    serial: int
    not_after: dt.datetime
    revoked: bool


def init_ca(directory: Path, *, name: str = "Veil federation CA", days: int = 3650) -> Path:
    """Create the federation CA: ``DIR/ca.crt`` and ``DIR/ca.key`` (mode 0600); return the cert.

    The CA key is ECDSA P-256; the certificate is self-signed, valid for `days` days,
    BasicConstraints CA=true with path length 0 (it signs node certificates only).
    Refuses (UserError) if either file already exists: replacing a CA invalidates every node.
    """
    directory = Path(directory)
    _check_days(days)
    if not name.strip():
        raise UserError("the CA name must not be empty")
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    existing = [p for p in (cert_path, key_path) if p.exists()]
    if existing:
        raise UserError(
            f"a CA already exists in '{directory}' ({', '.join(p.name for p in existing)}); "
            "refusing to overwrite it (every node certificate would stop verifying)"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(signs_certificates=True),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    atomic_write_bytes(key_path, _private_pem(key), mode=0o600)
    atomic_write_bytes(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return cert_path


def issue(
    directory: Path,
    name: str,
    *,
    role: Role,
    days: int = 825,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    overwrite: bool = False,
) -> NodeFiles:
    """Issue node `name`: a CA-signed TLS certificate and key, an Ed25519 identity key and an
    X25519 encryption key.

    Writes ``DIR/nodes/NAME/{node.crt, node.key (0600), identity.key (0600), identity.pub,
    encryption.key (0600)}``.
    A server's SubjectAltName lists `hosts` (IP addresses as IP entries, the rest as DNS names);
    a client's holds DNS:NAME and `hosts` is ignored. UserError if the name is not 1-64 of
    ``[A-Za-z0-9._-]``, the role or a host is invalid, the CA is missing, or the node exists and
    `overwrite` is false. Overwriting does not revoke the old certificate: `revoke` it first.
    """
    directory = Path(directory)
    _check_name(name)
    if role not in ROLES:
        raise UserError(f"unknown role '{role}'; use 'server' or 'client'")
    _check_days(days)
    ca_cert, ca_key = _load_ca(directory)
    node_dir = directory / NODES / name
    paths = [node_dir / f for f in (NODE_CERT, NODE_KEY, IDENTITY_KEY, IDENTITY_PUB)]
    if not overwrite and any(p.exists() for p in paths):
        raise UserError(
            f"node '{name}' already exists in '{directory}'; pass --overwrite "
            "(overwrite=True) to replace it, and revoke the old certificate if it leaked"
        )
    if role == "server":
        if not hosts:
            raise UserError("a server certificate needs at least one host (--host)")
        san = [_san_entry(h) for h in hosts]
    else:
        san = [x509.DNSName(name)]

    key = ec.generate_private_key(ec.SECP256R1())
    identity = IdentityKey.generate()
    encryption = EncryptionKey.generate()
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, name),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(signs_certificates=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([_EKU[role]]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.UnrecognizedExtension(IDENTITY_OID, _OCTET_STRING_32 + identity.public_bytes()),
            critical=False,
        )
        .add_extension(
            x509.UnrecognizedExtension(
                ENCRYPTION_OID, _OCTET_STRING_32 + encryption.public_bytes()
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = _node_files(directory, name, role)
    # The certificate goes last: its presence means the node is complete.
    atomic_write_bytes(files.key, _private_pem(key), mode=0o600)
    identity.save(files.identity_key)
    identity.public_key().save(files.identity_pub)
    encryption.save(files.encryption_key)
    atomic_write_bytes(files.cert, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return files


def node_files(directory: Path, name: str) -> NodeFiles:
    """The files of issued node `name`, all checked to exist.

    UserError naming what is missing and the command that creates it (`veil pki init` for the CA,
    `veil pki issue` for the node).
    """
    directory = Path(directory)
    _check_name(name)
    ca = directory / CA_CERT
    if not ca.is_file():
        raise _no_ca(directory)
    node_dir = directory / NODES / name
    paths = [node_dir / f for f in (NODE_CERT, NODE_KEY, IDENTITY_KEY, IDENTITY_PUB)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise UserError(
            f"node '{name}' in '{directory}' is missing {', '.join(missing)}; create it with "
            f"`veil pki issue {directory} {name} --role server|client`"
            + (" --overwrite" if len(missing) < len(paths) else "")
        )
    return _node_files(directory, name, certificate_role(load_certificate(paths[0])))


def load_certificate(path: str | Path) -> x509.Certificate:
    """The PEM certificate in `path`; UserError if it is missing or not a PEM certificate."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"no certificate at '{path}'") from None
    except OSError as exc:
        raise UserError(f"cannot read certificate '{path}': {exc.strerror}") from None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise UserError(f"'{path}' is not a PEM certificate") from None


def certificate_name(cert: x509.Certificate) -> str:
    """The subject common name (the node name); CertificateRejected if there is none."""
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(attrs) != 1 or not isinstance(attrs[0].value, str):
        raise CertificateRejected("certificate rejected: it has no single subject common name")
    return attrs[0].value


def certificate_role(cert: x509.Certificate) -> Role:
    """The role in the subject OU; CertificateRejected if it is not 'server' or 'client'."""
    attrs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    values = [a.value for a in attrs]
    if len(values) != 1 or values[0] not in ROLES:
        raise CertificateRejected(
            "certificate rejected: its subject OU is not one role ('server' or 'client')"
        )
    return "server" if values[0] == "server" else "client"


def certificate_identity(cert: x509.Certificate) -> IdentityPublicKey:
    """The Ed25519 identity key bound in a node certificate (check the certificate itself with
    `verify_certificate` first). CertificateRejected if it carries none or a malformed one."""
    return IdentityPublicKey.from_bytes(_bound_key(cert, IDENTITY_OID, "identity key"))


def certificate_encryption_key(cert: x509.Certificate) -> bytes:
    """The raw X25519 encryption key bound in a node certificate (check the certificate with
    `verify_certificate` first). CertificateRejected if it carries none or a malformed one."""
    return _bound_key(cert, ENCRYPTION_OID, "encryption key")


def _bound_key(cert: x509.Certificate, oid: x509.ObjectIdentifier, what: str) -> bytes:
    """The raw 32-byte key in the Veil extension `oid` (an OCTET STRING)."""
    name = _safe_name(cert)
    try:
        ext = cert.extensions.get_extension_for_oid(oid).value
    except x509.ExtensionNotFound:
        raise CertificateRejected(
            f"certificate of '{name}' carries no {what} (it was issued by an older "
            f"version of Veil); reissue it with `veil pki issue DIR {name} --overwrite`"
        ) from None
    raw = ext.value if isinstance(ext, x509.UnrecognizedExtension) else b""
    if len(raw) != 34 or not raw.startswith(_OCTET_STRING_32):
        raise CertificateRejected(f"certificate of '{name}' has a malformed {what}")
    return bytes(raw[2:])


def verify_certificate(
    cert: x509.Certificate,
    ca_cert: x509.Certificate,
    *,
    role: Role | None = None,
    revoked: Collection[int] = (),
    at: dt.datetime | None = None,
) -> None:
    """Return if `cert` is a valid node certificate of this federation; else CertificateRejected.

    Checks, in order: signed by `ca_cert` (issuer name and ECDSA signature); both certificates
    valid at `at` (default: now, UTC); not a CA certificate; if `role` is given, the OU and the
    ExtendedKeyUsage match it; the serial is not in `revoked`. The reason is in the message.
    """
    name = _safe_name(cert)
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise CertificateRejected(
            f"certificate of '{name}' rejected: not issued by this federation's CA"
        ) from None
    when = at if at is not None else _now()
    if when.tzinfo is None:
        raise ValueError("`at` must be timezone-aware")
    ca_what = f"CA certificate '{_safe_name(ca_cert)}'"
    for c, what in ((ca_cert, ca_what), (cert, f"certificate of '{name}'")):
        if when < c.not_valid_before_utc:
            raise CertificateRejected(
                f"{what} rejected: not valid before {c.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
            )
        if when > c.not_valid_after_utc:
            raise CertificateRejected(
                f"{what} rejected: expired on {c.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
            )
    try:
        ca_flag = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        ca_flag = False
    if ca_flag:
        raise CertificateRejected(f"certificate of '{name}' rejected: it is a CA certificate")
    if role is not None:
        actual = certificate_role(cert)
        if actual != role:
            raise CertificateRejected(
                f"certificate of '{name}' rejected: it is a {actual} certificate, "
                f"a {role} certificate is required"
            )
        try:
            usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            usages = x509.ExtendedKeyUsage([])
        if _EKU[role] not in usages:
            raise CertificateRejected(
                f"certificate of '{name}' rejected: its extended key usage does not allow "
                f"{role} authentication"
            )
    if cert.serial_number in revoked:
        raise CertificateRejected(
            f"certificate of '{name}' rejected: serial {cert.serial_number} is revoked"
        )


def revoke(directory: Path, name: str) -> int:
    """Add node `name`'s certificate serial to ``DIR/revoked.txt``; return the serial.

    Revoking twice is harmless (the serial is listed once). The file is rewritten atomically.
    """
    directory = Path(directory)
    _check_name(name)
    cert_path = directory / NODES / name / NODE_CERT
    if not cert_path.is_file():
        raise UserError(
            f"no node '{name}' in '{directory}' (missing {cert_path}); "
            f"see `veil pki show {directory}`"
        )
    serial = load_certificate(cert_path).serial_number
    path = directory / REVOKED
    if serial not in revoked_serials(directory):
        old = path.read_text(encoding="utf-8") if path.is_file() else ""
        if old and not old.endswith("\n"):
            old += "\n"
        atomic_write_text(path, f"{old}{serial}\n", mode=0o644)
    return serial


def revoked_serials(directory: Path) -> frozenset[int]:
    """The serials listed in ``DIR/revoked.txt`` (empty if there is no such file).

    Blank lines and lines starting with '#' are ignored; anything else that is not a decimal
    integer is a UserError naming the line.
    """
    path = Path(directory) / REVOKED
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return frozenset()
    serials: set[int] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not line.isdecimal():
            raise UserError(f"{path}:{number}: expected a decimal serial number, got '{line}'")
        serials.add(int(line))
    return frozenset(serials)


def issued_nodes(directory: Path) -> list[IssuedNode]:
    """Every node with a certificate under ``DIR/nodes``, sorted by name, with revocation state.

    UserError if `directory` has no CA (the message says to run `veil pki init`).
    """
    directory = Path(directory)
    if not (directory / CA_CERT).is_file():
        raise _no_ca(directory)
    revoked = revoked_serials(directory)
    rows = []
    for cert_path in sorted((directory / NODES).glob(f"*/{NODE_CERT}")):
        cert = load_certificate(cert_path)
        rows.append(
            IssuedNode(
                name=cert_path.parent.name,
                role=certificate_role(cert),
                serial=cert.serial_number,
                not_after=cert.not_valid_after_utc,
                revoked=cert.serial_number in revoked,
            )
        )
    return rows


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if not cert_path.is_file() or not key_path.is_file():
        raise UserError(
            f"no CA in '{directory}' (need {CA_CERT} and {CA_KEY}); run `veil pki init {directory}`"
        )
    cert = load_certificate(cert_path)
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise UserError(f"'{key_path}' is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise UserError(f"'{key_path}' is not an ECDSA key")
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise UserError(f"'{key_path}' does not match '{cert_path}'")
    return cert, key


def _node_files(directory: Path, name: str, role: Role) -> NodeFiles:
    node_dir = directory / NODES / name
    return NodeFiles(
        name=name,
        role=role,
        cert=node_dir / NODE_CERT,
        key=node_dir / NODE_KEY,
        identity_key=node_dir / IDENTITY_KEY,
        identity_pub=node_dir / IDENTITY_PUB,
        ca_cert=directory / CA_CERT,
        encryption_key=node_dir / ENCRYPTION_KEY,
    )


def _no_ca(directory: Path) -> UserError:
    return UserError(f"no CA in '{directory}' (missing {CA_CERT}); run `veil pki init {directory}`")


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    """Digital signatures only; a CA also signs certificates and revocation lists."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san_entry(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _HOST.fullmatch(host):
        raise UserError(f"invalid host '{host}': give a DNS name or an IP address")
    return x509.DNSName(host)


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise UserError(f"invalid node name '{name}': use 1 to 64 letters, digits, '.', '_' or '-'")


def _check_days(days: int) -> None:
    if days < 1:
        raise UserError(f"validity must be at least 1 day, got {days}")


def _safe_name(cert: x509.Certificate) -> str:
    try:
        return certificate_name(cert)
    except CertificateRejected:
        return "<no name>"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
