"""The federation PKI: CA, node certificates, verification and revocation."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from veil.crypto import pki
from veil.crypto.identity import IdentityKey, IdentityPublicKey
from veil.crypto.pki import CertificateRejected
from veil.errors import UserError


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    pki.init_ca(directory)
    pki.issue(directory, "coordinator", role="server", hosts=("localhost", "127.0.0.1"))
    pki.issue(directory, "bank-a", role="client")
    return directory


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_init_ca_writes_a_ca_certificate_and_a_private_key(federation: Path) -> None:
    ca = pki.load_certificate(federation / "ca.crt")
    assert mode(federation / "ca.key") == 0o600
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert pki.certificate_name(ca) == "Veil federation CA"


def test_init_ca_refuses_to_overwrite(federation: Path) -> None:
    before = (federation / "ca.key").read_bytes()
    with pytest.raises(UserError, match="already exists"):
        pki.init_ca(federation)
    assert (federation / "ca.key").read_bytes() == before


def test_server_certificate(federation: Path) -> None:
    files = pki.node_files(federation, "coordinator")
    assert files.role == "server"
    cert = pki.load_certificate(files.cert)
    ca = pki.load_certificate(files.ca_cert)
    assert pki.certificate_name(cert) == "coordinator"
    assert pki.certificate_role(cert) == "server"
    assert cert.issuer == ca.subject
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    cert.verify_directly_issued_by(ca)
    pki.verify_certificate(cert, ca, role="server")
    pki.verify_certificate(cert, ca)


def test_client_certificate_and_key_files(federation: Path) -> None:
    files = pki.node_files(federation, "bank-a")
    assert files.role == "client"
    cert = pki.load_certificate(files.cert)
    ca = pki.load_certificate(files.ca_cert)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["bank-a"]
    pki.verify_certificate(cert, ca, role="client")
    assert mode(files.key) == 0o600
    assert mode(files.identity_key) == 0o600
    # The TLS key matches the certificate; the identity key is Ed25519 and matches its .pub.
    tls_key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    assert isinstance(tls_key, ec.EllipticCurvePrivateKey)
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert tls_key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)
    raw = serialization.load_pem_private_key(files.identity_key.read_bytes(), password=None)
    assert isinstance(raw, ed25519.Ed25519PrivateKey)
    identity = IdentityKey.load(files.identity_key)
    assert identity.public_key() == IdentityPublicKey.load(files.identity_pub)


def test_wrong_role_is_rejected(federation: Path) -> None:
    ca = pki.load_certificate(federation / "ca.crt")
    client = pki.load_certificate(pki.node_files(federation, "bank-a").cert)
    with pytest.raises(CertificateRejected, match="client certificate, a server"):
        pki.verify_certificate(client, ca, role="server")


def test_certificate_from_another_ca_is_rejected(federation: Path, tmp_path: Path) -> None:
    pki.init_ca(tmp_path, name="Veil federation CA")  # same name, different key
    pki.issue(tmp_path, "bank-a", role="client")
    foreign = pki.load_certificate(pki.node_files(tmp_path, "bank-a").cert)
    ca = pki.load_certificate(federation / "ca.crt")
    with pytest.raises(CertificateRejected, match="not issued by this federation's CA"):
        pki.verify_certificate(foreign, ca, role="client")


def _ca_key(directory: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def test_expired_certificate_is_rejected(federation: Path) -> None:
    ca = pki.load_certificate(federation / "ca.crt")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    expired = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, "old"),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "client"),
                ]
            )
        )
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=30))
        .not_valid_after(now - dt.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(_ca_key(federation), hashes.SHA256())
    )
    expired.verify_directly_issued_by(ca)  # a genuine signature: only the date is wrong
    with pytest.raises(CertificateRejected, match="expired"):
        pki.verify_certificate(expired, ca, role="client")


def test_not_yet_valid_and_expired_by_clock(federation: Path) -> None:
    ca = pki.load_certificate(federation / "ca.crt")
    cert = pki.load_certificate(pki.node_files(federation, "bank-a").cert)
    with pytest.raises(CertificateRejected, match="not valid before"):
        pki.verify_certificate(cert, ca, at=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
    with pytest.raises(CertificateRejected, match="expired"):
        pki.verify_certificate(cert, ca, at=dt.datetime.now(dt.UTC) + dt.timedelta(days=900))


def test_ca_certificate_is_not_a_node_certificate(federation: Path) -> None:
    ca = pki.load_certificate(federation / "ca.crt")
    with pytest.raises(CertificateRejected, match="CA certificate"):
        pki.verify_certificate(ca, ca)


def test_revoked_serial_is_rejected(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    pki.issue(tmp_path, "bank-b", role="client")
    pki.issue(tmp_path, "bank-c", role="client")
    assert pki.revoked_serials(tmp_path) == frozenset()
    serial = pki.revoke(tmp_path, "bank-b")
    assert pki.revoke(tmp_path, "bank-b") == serial  # idempotent
    assert (tmp_path / "revoked.txt").read_text() == f"{serial}\n"
    assert pki.revoked_serials(tmp_path) == {serial}
    ca = pki.load_certificate(tmp_path / "ca.crt")
    revoked = pki.load_certificate(pki.node_files(tmp_path, "bank-b").cert)
    assert revoked.serial_number == serial
    with pytest.raises(CertificateRejected, match="revoked"):
        pki.verify_certificate(revoked, ca, revoked=pki.revoked_serials(tmp_path))
    other = pki.load_certificate(pki.node_files(tmp_path, "bank-c").cert)
    pki.verify_certificate(other, ca, revoked=pki.revoked_serials(tmp_path))
    rows = {n.name: n for n in pki.issued_nodes(tmp_path)}
    assert rows["bank-b"].revoked and not rows["bank-c"].revoked


def test_revoked_file_with_junk_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "revoked.txt").write_text("# comment\n\n12\nabc\n")
    with pytest.raises(UserError, match=r"revoked\.txt:4"):
        pki.revoked_serials(tmp_path)


def test_overwrite_is_refused_unless_asked(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    first = pki.issue(tmp_path, "bank-d", role="client")
    old = first.cert.read_bytes()
    with pytest.raises(UserError, match="already exists"):
        pki.issue(tmp_path, "bank-d", role="client")
    assert first.cert.read_bytes() == old
    again = pki.issue(tmp_path, "bank-d", role="server", overwrite=True)
    assert again.role == "server" and again.cert.read_bytes() != old


@pytest.mark.parametrize("name", ["", "a b", "../escape", "x" * 65, "bank/a", "é"])
def test_invalid_names_are_refused(tmp_path: Path, name: str) -> None:
    pki.init_ca(tmp_path)
    with pytest.raises(UserError, match="invalid node name"):
        pki.issue(tmp_path, name, role="client")


def test_missing_ca_and_missing_node_say_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="veil pki init"):
        pki.issue(tmp_path, "bank-a", role="client")
    with pytest.raises(UserError, match="veil pki init"):
        pki.node_files(tmp_path, "bank-a")
    pki.init_ca(tmp_path)
    with pytest.raises(UserError, match=r"missing node\.crt.*veil pki issue"):
        pki.node_files(tmp_path, "bank-a")
    files = pki.issue(tmp_path, "bank-a", role="client")
    files.identity_key.unlink()
    with pytest.raises(UserError, match=r"missing identity\.key.*--overwrite"):
        pki.node_files(tmp_path, "bank-a")


def test_invalid_host_and_days(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    with pytest.raises(UserError, match="invalid host"):
        pki.issue(tmp_path, "s", role="server", hosts=("bad host",))
    with pytest.raises(UserError, match="at least 1 day"):
        pki.issue(tmp_path, "s", role="server", days=0)
    files = pki.issue(tmp_path, "s", role="server", hosts=("::1", "node.example.org"))
    san = pki.load_certificate(files.cert).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert san.value.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("::1")]
    assert san.value.get_values_for_type(x509.DNSName) == ["node.example.org"]


def test_certificate_binds_the_identity_key(federation: Path) -> None:
    files = pki.node_files(federation, "bank-a")
    cert = pki.load_certificate(files.cert)
    bound = pki.certificate_identity(cert)
    assert bound == IdentityPublicKey.load(files.identity_pub)
    assert bound == IdentityKey.load(files.identity_key).public_key()
    ext = cert.extensions.get_extension_for_oid(pki.IDENTITY_OID)
    assert not ext.critical


def test_certificate_without_identity_key_says_to_reissue(federation: Path) -> None:
    ca_key = serialization.load_pem_private_key((federation / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca = pki.load_certificate(federation / "ca.crt")
    now = dt.datetime.now(dt.UTC)
    old = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "legacy")]))
        .issuer_name(ca.subject)
        .public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    with pytest.raises(CertificateRejected, match="reissue it with `veil pki issue"):
        pki.certificate_identity(old)
