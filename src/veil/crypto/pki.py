"""The federation's own PKI: one CA, one TLS certificate and one identity key per node.

The safe flow: every member makes its own keys and a certificate request on its own machine, and
the CA operator signs the request without ever seeing a private key::

    init_ca(Path("ca"))                                          # on the CA operator's machine
    request = request(Path("bank"), "bank-a", role="client")     # on bank-a's machine
    sign_request(Path("ca"), request)                            # the CA reads the request only
    # bank-a puts the certificate, ca/ca.crt and ca/crl.pem into its own folder

`issue` makes a node's keys and certificate in the CA's own folder at once: only for a test
federation run by one operator, since whoever holds that folder holds every member's keys.

Layout of a PKI folder (the CA's, or one organisation's own)::

    DIR/ca.crt  DIR/ca.key (0600, the CA's folder only)  DIR/crl.pem (the signed revocation list)
    DIR/revoked.txt (the CA's own list, one decimal serial per line)
    DIR/nodes/NAME/node.crt  node.key (0600)  identity.key (0600)  identity.pub
                   encryption.key (0600)  request.csr  trust.json (0600, `veil.crypto.trust`)

In the CA's folder ``nodes/NAME/node.crt`` is its register of issued certificates; in the
coordinator's folder, ``nodes/NAME/node.crt`` of each member is a public copy.

Keys: the CA and node TLS keys are ECDSA P-256 (PKCS#8 PEM), which gRPC's TLS stack (BoringSSL)
accepts for mutual TLS; signatures are ECDSA with SHA-256. The identity key is Ed25519
(`veil.crypto.identity`) and signs message content, not TLS.

Certificates: subject CN is the node name, OU its role (``server``, ``client`` or ``submitter``);
ExtendedKeyUsage serverAuth for a server, clientAuth for the other two; SubjectAltName the given
hosts (DNS or IP) for a server and DNS:NAME for the others; BasicConstraints CA=false; KeyUsage
digitalSignature; and a non-critical Veil extension (`IDENTITY_OID`, an OCTET STRING holding the
raw 32-byte Ed25519 public key) that binds the node's identity key to its name under the CA's
signature, so that a peer can check a relayed signature (SecAgg key advertisements) without
trusting the relay; and a second one (`ENCRYPTION_OID`, the raw 32-byte X25519 public key of the
node's encryption key, `veil.crypto.sealed_box`) so that keys can be sealed to a node (the CKKS key
ceremony) with the CA's word for whose key it is.

Roles: the coordinator is a ``server``; a member organisation (or its long-lived site) a
``client``; a ``submitter`` (a data scientist or team) may submit jobs to a coordinator and
nothing else: its certificate is a TLS client certificate like a member's, but every check that
requires a member (``role="client"``) refuses it, and one that requires a submitter refuses a
member.

Revocation: `revoke` appends a serial to ``revoked.txt`` and signs a new ``crl.pem`` with a
higher number (`veil.crypto.revocation`). The TLS handshake itself does not read that list; the
coordinator checks its peers' certificates against it, and hands it to every member with every
task, and members keep the newest one they saw (`veil.crypto.trust`).
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
from veil.crypto.identity import IdentityKey, IdentityPublicKey, SignatureRejected, signing_payload
from veil.crypto.keyfile import read_private
from veil.crypto.revocation import CRL_FILE, read_revocations, sign_revocations
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
    "member_certificate",
    "node_files",
    "peer_from_pem",
    "publish_revocations",
    "request",
    "revoke",
    "revoked_serials",
    "sign_request",
    "spki",
    "verify_certificate",
]

Role = Literal["server", "client", "submitter"]
ROLES: tuple[Role, ...] = ("server", "client", "submitter")

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
REVOKED = "revoked.txt"
NODES = "nodes"
NODE_CERT = "node.crt"
NODE_KEY = "node.key"
IDENTITY_KEY = "identity.key"
IDENTITY_PUB = "identity.pub"
ENCRYPTION_KEY = "encryption.key"
REQUEST = "request.csr"

_ROLE_LIST = ", ".join(f"'{r}'" for r in ROLES)
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_HOST = re.compile(r"[A-Za-z0-9.*_-]{1,253}")
_EKU = {
    "server": ExtendedKeyUsageOID.SERVER_AUTH,
    "client": ExtendedKeyUsageOID.CLIENT_AUTH,
    "submitter": ExtendedKeyUsageOID.CLIENT_AUTH,
}
#: OID of the extension that carries a node's Ed25519 identity key: a 2.25 (UUID-based, ITU-T
#: X.667) identifier, unique without registration.
IDENTITY_OID = x509.ObjectIdentifier("2.25.254227675962433388747850750087626402989")
#: OID of the extension that carries a node's X25519 encryption key (same construction).
ENCRYPTION_OID = x509.ObjectIdentifier("2.25.127049348851150900984897569176333437814")
#: OID of a certificate request's proof that the requester holds its identity key (an
#: Ed25519 signature over `request_payload`); requests only, never in a certificate.
POSSESSION_OID = x509.ObjectIdentifier("2.25.33693880485117809004665379647775684287")
_OCTET_STRING_32 = b"\x04\x20"
_OCTET_STRING_64 = b"\x04\x40"

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
    sign_revocations(directory / CRL_FILE, cert, key, ())
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
    """Issue node `name` in the CA's own folder: `request` and `sign_request` in one step, for a
    test federation run by a single operator (whoever holds this folder holds the node's keys;
    a real member runs `request` on its own machine).

    Writes ``DIR/nodes/NAME/{node.crt, node.key (0600), identity.key (0600), identity.pub,
    encryption.key (0600), request.csr}``. A server's SubjectAltName lists `hosts` (IP addresses
    as IP entries, the rest as DNS names); a client's or submitter's holds DNS:NAME and `hosts`
    is ignored.
    UserError if the name is not 1-64 of ``[A-Za-z0-9._-]``, the role or a host is invalid, the
    CA is missing, or the node exists and `overwrite` is false. Overwriting does not revoke the
    old certificate: `revoke` it first.
    """
    directory = Path(directory)
    _check_name(name)
    _check_days(days)
    _load_ca(directory)
    node_dir = directory / NODES / name
    paths = [node_dir / f for f in (NODE_CERT, NODE_KEY, IDENTITY_KEY, IDENTITY_PUB)]
    if not overwrite and any(p.exists() for p in paths):
        raise UserError(
            f"node '{name}' already exists in '{directory}'; pass --overwrite "
            "(overwrite=True) to replace it, and revoke the old certificate if it leaked"
        )
    request_path = request(directory, name, role=role, hosts=hosts, overwrite=True)
    # The node's certificate is the CA's register entry too: replacing it is the overwrite.
    (node_dir / NODE_CERT).unlink(missing_ok=True)
    sign_request(directory, request_path, days=days)
    return _node_files(directory, name, role)


def request(
    directory: Path,
    name: str,
    *,
    role: Role,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    overwrite: bool = False,
) -> Path:
    """On the organisation's own machine: create node `name`'s keys and a certificate signing
    request for the CA; return the request's path. No private key ever leaves `directory`.

    Writes ``DIR/nodes/NAME/{node.key, identity.key, encryption.key (all 0600), identity.pub,
    request.csr}``. The request (PKCS#10, signed with the TLS key) carries the name, the role,
    the hosts (server) and the identity and encryption public keys, with an Ed25519 signature
    by the identity key over the name, role and keys (`request_payload`), which proves to the
    CA that the requester holds the identity key too. Send ``request.csr`` to the CA operator
    (`sign_request`), and put the certificate and ``ca.crt`` it sends back at
    ``DIR/nodes/NAME/node.crt`` and ``DIR/ca.crt``. UserError for a bad name, role or host, or
    existing keys without `overwrite`.
    """
    directory = Path(directory)
    _check_name(name)
    if role not in ROLES:
        raise UserError(f"unknown role '{role}'; use {_ROLE_LIST}")
    node_dir = directory / NODES / name
    files = _node_files(directory, name, role)
    existing = [p for p in (files.key, files.identity_key, files.encryption_key) if p.exists()]
    if existing and not overwrite:
        raise UserError(
            f"node '{name}' already has keys in '{node_dir}'; pass --overwrite to make new ones "
            "(and have the CA revoke the old certificate)"
        )
    if role == "server" and not hosts:
        raise UserError("a server certificate needs at least one host (--host)")
    san = [_san_entry(h) for h in hosts] if role == "server" else [x509.DNSName(name)]
    key = ec.generate_private_key(ec.SECP256R1())
    identity = IdentityKey.generate()
    encryption = EncryptionKey.generate()
    possession = identity.sign(
        request_payload(
            name, role, spki(key.public_key()), identity.public_bytes(), encryption.public_bytes()
        )
    )
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_subject(name, role))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
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
        .add_extension(
            x509.UnrecognizedExtension(POSSESSION_OID, _OCTET_STRING_64 + possession),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    node_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write_bytes(files.key, _private_pem(key), mode=0o600)
    identity.save(files.identity_key)
    identity.public_key().save(files.identity_pub)
    encryption.save(files.encryption_key)
    path = node_dir / REQUEST
    atomic_write_bytes(path, csr.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return path


def request_payload(
    name: str, role: str, tls_public_key: bytes, identity: bytes, encryption: bytes
) -> bytes:
    """What a requester's identity key signs in its certificate request: ``signing_payload(
    "veil-csr", name, role, TLS SubjectPublicKeyInfo DER, identity key, encryption key)``."""
    return signing_payload("veil-csr", name, role, tls_public_key, identity, encryption)


def sign_request(
    directory: Path, request_path: Path, *, days: int = 825, out: Path | None = None
) -> Path:
    """The CA operator's half: check a certificate signing request and issue its certificate.

    Checks the request's own signature (the requester holds the TLS key), its name, role and
    hosts, and the identity key's signature over the keys (it holds the identity key); refuses
    a name that already has a valid, unrevoked certificate (revoke it first: a second
    certificate for a name is how a CA operator would substitute a member's keys, and members
    refuse a changed key unless the old certificate is revoked). Writes the certificate to
    `out` (default: ``node.crt`` beside the request) and records it in the CA's register
    ``DIR/nodes/NAME/node.crt``. Never sees a private key. UserError, in one line, for anything
    wrong with the request.
    """
    directory = Path(directory)
    request_path = Path(request_path)
    _check_days(days)
    ca_cert, ca_key = _load_ca(directory)
    checked = _checked_request(_read_request(request_path), request_path)
    register = directory / NODES / checked.name / NODE_CERT
    _refuse_second_certificate(directory, checked.name, register)
    cert = _node_certificate(
        ca_cert,
        ca_key,
        name=checked.name,
        role=checked.role,
        san=checked.san,
        public_key=checked.public_key,
        identity=checked.identity,
        encryption=checked.encryption,
        days=days,
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    target = Path(out) if out is not None else request_path.parent / NODE_CERT
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, pem, mode=0o644)
    register.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(register, pem, mode=0o644)
    return target


@dataclass(frozen=True)
class _CheckedRequest:
    """What a certificate request asks for, once `_checked_request` has verified all of it."""

    name: str
    role: Role
    san: list[x509.GeneralName]
    public_key: ec.EllipticCurvePublicKey
    identity: bytes
    encryption: bytes


def _read_request(request_path: Path) -> x509.CertificateSigningRequest:
    """The PEM request at `request_path`, whose own signature verifies (its TLS key signed it)."""
    try:
        csr = x509.load_pem_x509_csr(request_path.read_bytes())
    except FileNotFoundError:
        raise UserError(f"no certificate request at '{request_path}'") from None
    except ValueError:
        raise UserError(f"'{request_path}' is not a PEM certificate signing request") from None
    if not csr.is_signature_valid:
        raise UserError(f"'{request_path}': the request's signature does not verify")
    return csr


def _checked_request(csr: x509.CertificateSigningRequest, request_path: Path) -> _CheckedRequest:
    """The request's name, role, TLS key, hosts and Veil keys, each checked; UserError naming
    `request_path` for the first that is wrong, including a failed proof of possession of the
    identity key."""
    name = _request_attribute(csr, NameOID.COMMON_NAME, "a name")
    _check_name(name)
    role_value = _request_attribute(csr, NameOID.ORGANIZATIONAL_UNIT_NAME, "a role")
    role = _role_of(role_value)
    if role is None:
        raise UserError(
            f"'{request_path}': unknown role '{role_value}'; make the request again with "
            f"`veil pki request` and one of {_ROLE_LIST}"
        )
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name != (
        "secp256r1"
    ):
        raise UserError(f"'{request_path}': the TLS key must be ECDSA P-256")
    try:
        san = list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
        identity = _request_key(csr, IDENTITY_OID, 32)
        encryption = _request_key(csr, ENCRYPTION_OID, 32)
        possession = _request_key(csr, POSSESSION_OID, 64)
    except x509.ExtensionNotFound:
        raise UserError(
            f"'{request_path}' lacks Veil's key extensions; make it with `veil pki request`"
        ) from None
    _check_request_hosts(name, role, san, request_path)
    try:
        IdentityPublicKey.from_bytes(identity).verify(
            possession, request_payload(name, role, spki(public_key), identity, encryption)
        )
    except SignatureRejected:
        raise UserError(
            f"'{request_path}': the identity key did not sign the request (proof of possession "
            "failed)"
        ) from None
    return _CheckedRequest(name, role, san, public_key, identity, encryption)


def _check_request_hosts(
    name: str, role: Role, san: list[x509.GeneralName], request_path: Path
) -> None:
    """A client or submitter names only DNS:`name`; a server names DNS names and IP addresses
    only."""
    if role != "server" and san != [x509.DNSName(name)]:
        raise UserError(f"'{request_path}': a {role} request names only DNS:{name}")
    if role == "server":
        for entry in san:
            if not isinstance(entry, x509.DNSName | x509.IPAddress):
                raise UserError(f"'{request_path}': unexpected host entry {entry}")
            if isinstance(entry, x509.DNSName):
                _san_entry(entry.value)


def _refuse_second_certificate(directory: Path, name: str, register: Path) -> None:
    """UserError if `name`'s registered certificate is still valid and not revoked."""
    if register.is_file():
        current = load_certificate(register)
        if current.serial_number not in revoked_serials(directory) and (
            current.not_valid_after_utc > _now()
        ):
            raise UserError(
                f"'{name}' already has a valid certificate (serial {current.serial_number}); "
                f"revoke it first with `veil pki revoke {directory} {name}`"
            )


def _request_attribute(
    csr: x509.CertificateSigningRequest, oid: x509.ObjectIdentifier, what: str
) -> str:
    attrs = csr.subject.get_attributes_for_oid(oid)
    if len(attrs) != 1 or not isinstance(attrs[0].value, str):
        raise UserError(f"the certificate request does not name {what}")
    return attrs[0].value


def _request_key(
    csr: x509.CertificateSigningRequest, oid: x509.ObjectIdentifier, size: int
) -> bytes:
    ext = csr.extensions.get_extension_for_oid(oid).value
    raw = ext.value if isinstance(ext, x509.UnrecognizedExtension) else b""
    header = bytes([0x04, size])
    if len(raw) != size + 2 or not raw.startswith(header):
        raise UserError(f"the certificate request has a malformed extension {oid.dotted_string}")
    return bytes(raw[2:])


def spki(key: ec.EllipticCurvePublicKey | x509.Certificate) -> bytes:
    """The DER SubjectPublicKeyInfo of a key, or of a certificate's key (what a TLS binding,
    a certificate request's proof of possession and attestation evidence name)."""
    public = key.public_key() if isinstance(key, x509.Certificate) else key
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _node_certificate(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    name: str,
    role: Role,
    san: Sequence[x509.GeneralName],
    public_key: ec.EllipticCurvePublicKey,
    identity: bytes,
    encryption: bytes,
    days: int,
) -> x509.Certificate:
    """A node certificate as the module docstring describes, signed by the CA."""
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_subject(name, role))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.UnrecognizedExtension(IDENTITY_OID, _OCTET_STRING_32 + identity),
            critical=False,
        )
        .add_extension(
            x509.UnrecognizedExtension(ENCRYPTION_OID, _OCTET_STRING_32 + encryption),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def _subject(name: str, role: Role) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
        ]
    )


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
            f"`veil pki issue {directory} {name} --role {'|'.join(ROLES)}`"
            + (" --overwrite" if len(missing) < len(paths) else "")
        )
    return _node_files(directory, name, certificate_role(load_certificate(paths[0])))


def member_certificate(directory: Path, name: str) -> x509.Certificate:
    """Node `name`'s certificate as another party holds it: ``DIR/nodes/NAME/node.crt`` alone
    (the coordinator's copy of a member's certificate, or the CA's register), not checked here
    (`verify_certificate`). UserError if it is missing."""
    directory = Path(directory)
    _check_name(name)
    path = directory / NODES / name / NODE_CERT
    if not path.is_file():
        raise UserError(
            f"no certificate of '{name}' at '{path}'; the member sends its node.crt (public) "
            "to whoever needs it"
        )
    return load_certificate(path)


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
    """The role in the subject OU; CertificateRejected if it is not one of `ROLES`."""
    attrs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    role = _role_of(attrs[0].value) if len(attrs) == 1 else None
    if role is None:
        raise CertificateRejected(
            f"certificate rejected: its subject OU is not one role ({_ROLE_LIST}); have the "
            "CA issue it again with `veil pki sign`"
        )
    return role


def _role_of(value: object) -> Role | None:
    """`value` as a `Role`, or None if it is not one."""
    for role in ROLES:
        if value == role:
            return role
    return None


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


def peer_from_pem(pem: bytes, ca: x509.Certificate, *, revoked: Collection[int], role: Role) -> str:
    """The name of the peer whose PEM certificate is `pem` (as gRPC's auth context holds it,
    ``x509_pem_cert``), once `verify_certificate` accepts it for `role` against `ca` and the
    `revoked` serials. CertificateRejected if `pem` is not one PEM certificate or is refused:
    a member's certificate where a submitter's is required, say, or the other way round."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise CertificateRejected(
            "certificate rejected: the peer presented no PEM certificate; connect with the "
            "certificate the CA issued (`veil pki request` and `veil pki sign`)"
        ) from None
    verify_certificate(cert, ca, role=role, revoked=revoked)
    return certificate_name(cert)


def revoke(directory: Path, name: str) -> int:
    """Revoke node `name`'s certificate: add its serial to ``DIR/revoked.txt`` and sign a new
    revocation list ``DIR/crl.pem`` (`veil.crypto.revocation`) for the coordinator to hand to
    every member; return the serial.

    Revoking twice is harmless (the serial is listed once). The files are rewritten atomically.
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
    listed = _listed_serials(directory)
    if serial not in listed:
        old = path.read_text(encoding="utf-8") if path.is_file() else ""
        if old and not old.endswith("\n"):
            old += "\n"
        atomic_write_text(path, f"{old}{serial}\n", mode=0o644)
    publish_revocations(directory)
    return serial


def publish_revocations(directory: Path) -> Path:
    """Sign ``DIR/crl.pem`` anew from ``DIR/revoked.txt`` (the CA's own list); return its path."""
    directory = Path(directory)
    ca_cert, ca_key = _load_ca(directory)
    path = directory / CRL_FILE
    sign_revocations(path, ca_cert, ca_key, _listed_serials(directory))
    return path


def revoked_serials(directory: Path) -> frozenset[int]:
    """The serials revoked in a PKI folder: those of ``DIR/crl.pem``, checked against
    ``DIR/ca.crt`` (a folder that a member or the coordinator holds), and, in the CA's own
    folder, those of ``DIR/revoked.txt``. Empty if there is neither.

    UserError for a revocation list the CA did not sign, or a malformed ``revoked.txt`` line.
    """
    directory = Path(directory)
    serials = set(_listed_serials(directory))
    crl = directory / CRL_FILE
    if crl.is_file():
        serials |= read_revocations(crl, load_certificate(directory / CA_CERT)).serials
    return frozenset(serials)


def _listed_serials(directory: Path) -> frozenset[int]:
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
        key = serialization.load_pem_private_key(read_private(key_path, "CA key"), password=None)
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
