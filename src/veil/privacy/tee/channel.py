"""Channel binding: the attested aggregator's TLS key is made inside the attested process, and a
client trusts exactly the certificate of the connection it talks on.

The attack this closes: if the aggregator's TLS key were a file the CA issued a certificate
for, anyone the CA gives a server certificate (the CA operator, whoever runs the host) could
serve clients from an *unattested* process and relay the real enclave's evidence, which binds
the enclave's key and not the relay's — while a client that checks only "a server certificate
from our CA" would talk to the relay.

Server (`attested_tls_key`, or `attested_server_key` for a deployment): at start-up the attested
process generates a fresh ECDSA P-256 key in memory (never written to disk) and a self-signed
certificate for it (RA-TLS style) that carries one extension, `ATTESTED_TLS_OID`, a DER OCTET
STRING holding JSON::

    {"format": "veil-attested-tls-v1",
     "server_certificate": base64 DER of the server's CA-issued node certificate,
     "endorsement": base64 Ed25519 signature by that certificate's identity key over
                    signing_payload("tee/attested-tls-key", FORMAT, TLS SubjectPublicKeyInfo),
     "evidence": base64 `Evidence` for (TLS key, CERTIFICATE_NONCE, round 0)}

Attestation vouches that the key was made by the measured code; the endorsement, under the CA,
vouches that it is *this federation's* server (without it, with `software_dev` anyone on the
network could mint evidence for a key of their own). The server still authenticates clients
against ``ca.crt`` (mutual TLS, unchanged).

Client (`ServerPin`, with `veil.transport.grpc.client.PinnedChannel`): fetches the certificate
the server presents over a TLS handshake to the same address, checks the endorsement (CA, role,
name, revocation — or a member's `TrustStore`, which also keeps the server's identity key
pinned) and the evidence against its policy, refuses unless the attested key *is* that
certificate's key, and opens its gRPC channel trusting exactly that certificate. Only the holder
of that key can then complete the handshake, so every round's evidence is compared with the key
of the connection the update goes out on. A relay with a second certificate from the same CA
presents another key: the evidence it relays names the enclave's key, and the client refuses
to connect.

The evidence in the certificate is not fresh (made at start-up); the TLS handshake is what
proves that the process holds the key now, and each round's evidence (`protocol`) stays fresh
with the client's nonce.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from veil.crypto import pki
from veil.crypto.identity import (
    IdentityKey,
    IdentityPublicKey,
    SignatureRejected,
    signing_payload,
)
from veil.crypto.pki import spki
from veil.errors import UserError
from veil.privacy.tee.attestation import (
    NONCE_BYTES,
    AttestationRefused,
    Attester,
    Claims,
    Evidence,
    Policy,
    Verifier,
    attest,
    from_b64,
    to_b64,
    verify,
)
from veil.privacy.tee.software_dev import SoftwareDevAttester

__all__ = [
    "ATTESTED_TLS_OID",
    "CERTIFICATE_NONCE",
    "CERTIFICATE_ROUND",
    "FORMAT",
    "SERVER_NAME",
    "AttestedTlsKey",
    "CaCheck",
    "PinnedServer",
    "ServerCheck",
    "ServerPin",
    "attested_server_key",
    "attested_tls_key",
    "binding_certificate",
    "check_attested_certificate",
    "endorsed_certificate",
    "fingerprint",
    "generated_in_process",
    "server_pin",
    "spki",
]

#: The federation's server node name (`veil.deployment.SERVER_NAME`).
SERVER_NAME = "server"
FORMAT = "veil-attested-tls-v1"
#: OID of the certificate extension that binds the TLS key (a 2.25 UUID-based identifier, as
#: `veil.crypto.pki.IDENTITY_OID`).
ATTESTED_TLS_OID = x509.ObjectIdentifier("2.25.318846562958815498627532941101569457981")
#: The nonce of the evidence in the certificate: fixed, because no client asked for it; the
#: TLS handshake proves liveness. Per-round evidence uses the client's random nonce and a
#: round >= 1, so neither can stand for the other.
CERTIFICATE_NONCE = hashlib.sha256(b"veil tee: evidence in the aggregator's certificate").digest()
CERTIFICATE_ROUND = 0
assert len(CERTIFICATE_NONCE) == NONCE_BYTES

# Certificates start a few minutes in the past (small clock differences), as `pki` does.
_BACKDATE = dt.timedelta(minutes=5)
#: TLS keys this process generated with `attested_tls_key` (which result.json's record states:
#: `veil.assembly.secure_aggregation.tee.TeeSession.record`).
_IN_PROCESS: set[bytes] = set()
_IN_PROCESS_LOCK = threading.Lock()

_log = logging.getLogger("veil.tee")


def fingerprint(spki_der: bytes) -> str:
    """``sha256:`` and the first 16 hex digits of a key's SHA-256 (for messages and logs)."""
    return "sha256:" + hashlib.sha256(spki_der).hexdigest()[:16]


def endorsement_payload(tls_public_key: bytes) -> bytes:
    """What the server's identity key signs: its endorsement of one in-process TLS key."""
    return signing_payload("tee/attested-tls-key", FORMAT, tls_public_key)


# -- server ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttestedTlsKey:
    """The attested process's TLS key: PEM bytes for `ServerCredentials`, held in memory only."""

    #: PKCS#8 PEM, unencrypted; never written to disk (and never in a repr).
    private_key_pem: bytes = field(repr=False)
    certificate_pem: bytes = field(repr=False)
    #: DER SubjectPublicKeyInfo: what the evidence binds (`TeeSession.tls_public_key`).
    tls_public_key: bytes


def attested_tls_key(
    attester: Attester, node_certificate: x509.Certificate, identity: IdentityKey
) -> AttestedTlsKey:
    """A fresh TLS key made in this process, its certificate and its start-up evidence.

    `node_certificate` is the server's CA-issued certificate and `identity` the Ed25519
    identity key it names (UserError if they do not match); its subject and hosts
    (SubjectAltName) are copied, so clients dial the same names.
    """
    if pki.certificate_identity(node_certificate).public_bytes() != identity.public_bytes():
        raise UserError(
            "the server's identity key is not the one its certificate names; "
            "use the identity.key issued with node.crt"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    tls = spki(key.public_key())
    evidence = attest(attester, tls, CERTIFICATE_NONCE, CERTIFICATE_ROUND)
    certificate = binding_certificate(key, node_certificate, identity, evidence)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with _IN_PROCESS_LOCK:
        _IN_PROCESS.add(tls)
    _log.info(
        "attested TLS key %s generated in this process (%s evidence in its certificate)",
        fingerprint(tls),
        attester.backend,
    )
    return AttestedTlsKey(private, certificate, tls)


def attested_server_key(
    measurement: str, pki_dir: Path, *, name: str = SERVER_NAME
) -> AttestedTlsKey:
    """The deployment server's attested TLS key: `attested_tls_key` with the `software_dev`
    attester for `measurement`, endorsed by node `name`'s identity key from `pki_dir` (its
    certificate is checked against the CA first: role server, not revoked)."""
    files = pki.node_files(pki_dir, name)
    node = pki.load_certificate(files.cert)
    pki.verify_certificate(
        node,
        pki.load_certificate(files.ca_cert),
        role="server",
        revoked=pki.revoked_serials(pki_dir),
    )
    attester = SoftwareDevAttester(measurement)
    return attested_tls_key(attester, node, IdentityKey.load(files.identity_key))


def generated_in_process(tls_public_key: bytes) -> bool:
    """Whether `attested_tls_key` made this key in this process."""
    with _IN_PROCESS_LOCK:
        return tls_public_key in _IN_PROCESS


def binding_certificate(
    key: ec.EllipticCurvePrivateKey,
    node_certificate: x509.Certificate,
    identity: IdentityKey,
    evidence: Evidence,
) -> bytes:
    """The self-signed PEM certificate for `key` carrying the endorsement and `evidence` (what
    `attested_tls_key` serves; the tests build relays with it)."""
    tls = spki(key.public_key())
    binding = {
        "format": FORMAT,
        "server_certificate": to_b64(node_certificate.public_bytes(serialization.Encoding.DER)),
        "endorsement": to_b64(identity.sign(endorsement_payload(tls))),
        "evidence": to_b64(evidence.to_bytes()),
    }
    try:
        san: list[x509.GeneralName] = list(
            node_certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        )
    except x509.ExtensionNotFound:
        san = [x509.DNSName("localhost")]
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(node_certificate.subject)
        .issuer_name(node_certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(node_certificate.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(
            x509.UnrecognizedExtension(
                ATTESTED_TLS_OID, _octet_string(json.dumps(binding, sort_keys=True).encode())
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


# -- client ----------------------------------------------------------------------------------


class ServerCheck(Protocol):
    """Who may endorse the aggregator's key: returns the identity key of the server's
    CA-issued certificate, or raises (`veil.crypto.trust.TrustStore` is one: it also keeps the
    server's identity key pinned across runs)."""

    def check_peer(
        self, name: str, cert: x509.Certificate, *, role: pki.Role
    ) -> IdentityPublicKey: ...


class CaCheck:
    """A `ServerCheck` against the CA and a revocation list only (no memory of earlier keys:
    the CA operator can mint a second server identity, which the evidence check then stops)."""

    def __init__(
        self,
        ca_certificate: x509.Certificate,
        revoked: Collection[int] | Callable[[], Collection[int]] = (),
    ) -> None:
        self.ca_certificate = ca_certificate
        self._revoked = revoked

    def check_peer(self, name: str, cert: x509.Certificate, *, role: pki.Role) -> IdentityPublicKey:
        revoked = self._revoked() if callable(self._revoked) else self._revoked
        pki.verify_certificate(cert, self.ca_certificate, role=role, revoked=revoked)
        if pki.certificate_name(cert) != name:
            raise pki.CertificateRejected(
                f"the certificate presented for '{name}' names '{pki.certificate_name(cert)}'"
            )
        return pki.certificate_identity(cert)


@dataclass(frozen=True)
class PinnedServer:
    """A server certificate that passed `check_attested_certificate`."""

    certificate_pem: bytes
    #: DER SubjectPublicKeyInfo of the certificate's (the connection's) key.
    tls_public_key: bytes
    #: What the certificate's evidence proves (backend, measurement, ...).
    claims: Claims
    #: The CA-issued certificate whose identity key endorsed the TLS key.
    server_certificate: x509.Certificate


def check_attested_certificate(
    der: bytes,
    policy: Policy,
    check: ServerCheck,
    *,
    server_name: str = SERVER_NAME,
    verifiers: list[Verifier] | None = None,
) -> PinnedServer:
    """Check the certificate a server presented (DER) before trusting it; AttestationRefused,
    in one line, unless it is an attested aggregator's in-process certificate: self-signed,
    its key endorsed by the identity key of a server certificate that `check` accepts, and
    its evidence valid under `policy` *for this certificate's key*."""
    cert = _load(der)
    binding = _binding(cert)
    tls, server = spki(cert), _endorser(cert, binding, check, server_name)
    evidence = Evidence.from_bytes(from_b64(binding.get("evidence"), "attested TLS binding"))
    if evidence.round != CERTIFICATE_ROUND:
        raise AttestationRefused(
            f"the evidence in the server's certificate is for round {evidence.round}, not the "
            "certificate's"
        )
    claims = verify(evidence, policy, CERTIFICATE_NONCE, verifiers=verifiers)
    if claims.tls_public_key != tls:
        raise AttestationRefused(
            f"key mismatch: the attested TLS key {fingerprint(claims.tls_public_key)} is not "
            f"the key {fingerprint(tls)} of the server on this connection: the evidence is "
            "relayed from another process, refused"
        )
    return PinnedServer(cert.public_bytes(serialization.Encoding.PEM), tls, claims, server)


def endorsed_certificate(
    der: bytes, check: ServerCheck, *, server_name: str = SERVER_NAME
) -> bytes | None:
    """For a tool that sends the server nothing private (`veil status`): the PEM to pin if
    `der` is an attested aggregator's in-process certificate whose endorsement `check` accepts
    (its evidence is NOT checked), None if it is an ordinary certificate (trust the CA as
    before); AttestationRefused if it claims a binding that does not hold."""
    cert = _load(der)
    try:
        cert.extensions.get_extension_for_oid(ATTESTED_TLS_OID)
    except x509.ExtensionNotFound:
        return None
    _endorser(cert, _binding(cert), check, server_name)
    return cert.public_bytes(serialization.Encoding.PEM)


def _load(der: bytes) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        raise AttestationRefused("the server presented no readable TLS certificate") from None


def _endorser(
    cert: x509.Certificate, binding: dict[str, Any], check: ServerCheck, server_name: str
) -> x509.Certificate:
    """The CA-issued server certificate whose identity key endorsed `cert`'s key (self-signed,
    unaltered); AttestationRefused otherwise."""
    tls = spki(cert)
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        raise AttestationRefused(
            "the server's certificate is not self-signed by its own key (altered)"
        ) from None
    try:
        server = x509.load_der_x509_certificate(
            from_b64(binding.get("server_certificate"), "attested TLS binding")
        )
        identity = check.check_peer(server_name, server, role="server")
        identity.verify(
            from_b64(binding.get("endorsement"), "attested TLS binding"),
            endorsement_payload(tls),
        )
    except SignatureRejected:
        raise AttestationRefused(
            f"the server's TLS key {fingerprint(tls)} is not endorsed by the identity key of "
            f"the federation's '{server_name}' certificate it names"
        ) from None
    except (ValueError, UserError) as exc:
        raise AttestationRefused(f"the server's certificate is not endorsed: {exc}") from None
    return server


class ServerPin:
    """One client's pinned server certificate, which `TeeParticipant` compares every round's
    evidence with (its `tls_public_key`), and which `PinnedChannel` trusts (its `accept`).

    `accept` is called with each certificate the server presents at (re)connection; a
    restarted server has a new key, and the new certificate must pass the same checks.
    """

    def __init__(
        self,
        policy: Policy,
        check: ServerCheck,
        *,
        server_name: str = SERVER_NAME,
        verifiers: list[Verifier] | None = None,
    ) -> None:
        self.policy = policy
        self.check = check
        self.server_name = server_name
        self.verifiers = verifiers
        self._current: PinnedServer | None = None
        self._lock = threading.Lock()

    @property
    def current(self) -> PinnedServer | None:
        with self._lock:
            return self._current

    @property
    def tls_public_key(self) -> bytes | None:
        """The key of the certificate this client's channel trusts now (None before any)."""
        current = self.current
        return None if current is None else current.tls_public_key

    def accept(self, der: bytes) -> bytes:
        """Check the certificate the server presents and pin it; returns the PEM the channel
        must trust. AttestationRefused (the pin is unchanged) if it does not pass."""
        pinned = check_attested_certificate(
            der, self.policy, self.check, server_name=self.server_name, verifiers=self.verifiers
        )
        with self._lock:
            self._current = pinned
        _log.info(
            "pinned the aggregator's TLS certificate, key %s: %s, measurement %s",
            fingerprint(pinned.tls_public_key),
            pinned.claims.describe(),
            pinned.claims.measurement,
        )
        return pinned.certificate_pem


def server_pin(policy: Policy, pki_dir: Path, *, trust: ServerCheck | None = None) -> ServerPin:
    """A deployment client's `ServerPin`: `policy`, and the server's endorsement checked by
    `trust` (a member's `TrustStore`) or else against ``pki_dir/ca.crt`` and the folder's
    revocation list, read anew at each (re)connection."""
    directory = Path(pki_dir)
    check = trust or CaCheck(
        pki.load_certificate(directory / "ca.crt"), lambda: pki.revoked_serials(directory)
    )
    return ServerPin(policy, check)


# -- the extension ---------------------------------------------------------------------------


def _binding(cert: x509.Certificate) -> dict[str, Any]:
    try:
        ext = cert.extensions.get_extension_for_oid(ATTESTED_TLS_OID).value
    except x509.ExtensionNotFound:
        raise AttestationRefused(
            f"the server's certificate (key {fingerprint(spki(cert))}) carries no attestation "
            "binding: it is not a key made inside the attested aggregator (a certificate "
            "issued by the CA, or a server not started with an attested TLS key)"
        ) from None
    raw = ext.value if isinstance(ext, x509.UnrecognizedExtension) else b""
    try:
        binding = json.loads(_read_octet_string(raw))
    except (ValueError, UnicodeDecodeError):
        binding = None
    if not isinstance(binding, dict) or binding.get("format") != FORMAT:
        raise AttestationRefused(f"the server's attestation binding is not a {FORMAT} object")
    return binding


def _octet_string(data: bytes) -> bytes:
    """DER OCTET STRING of `data` (the extension's value must be DER)."""
    size = len(data)
    if size < 0x80:
        return b"\x04" + bytes([size]) + data
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return b"\x04" + bytes([0x80 | len(length)]) + length + data


def _read_octet_string(raw: bytes) -> bytes:
    """The contents of a DER OCTET STRING that fills `raw`; ValueError otherwise."""
    if len(raw) < 2 or raw[0] != 0x04:
        raise ValueError("not an OCTET STRING")
    first = raw[1]
    if first < 0x80:
        size, start = first, 2
    else:
        count = first & 0x7F
        if not 1 <= count <= 4 or len(raw) < 2 + count:
            raise ValueError("bad length")
        size, start = int.from_bytes(raw[2 : 2 + count], "big"), 2 + count
    if len(raw) != start + size:
        raise ValueError("length does not match")
    return raw[start:]
