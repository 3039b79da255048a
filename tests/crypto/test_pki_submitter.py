"""The `submitter` role: a TLS client certificate that may submit jobs to a coordinator and is
refused wherever a member (`client`) is required, and the other way round."""

from __future__ import annotations

import shutil
from concurrent import futures
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from extras import require
from support import client_credentials, issue_federation, veil
from veil.crypto import pki
from veil.crypto.identity import IdentityPublicKey
from veil.errors import UserError


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA with a server, member 'alice' and submitter 'carol' (made by request and sign)."""
    d = issue_federation(tmp_path_factory.mktemp("pki"), ["alice"])
    own = tmp_path_factory.mktemp("carol")
    csr = pki.request(own, "carol", role="submitter")
    pki.sign_request(d, csr)
    shutil.copy(csr.parent / pki.NODE_CERT, d / pki.NODES / "carol" / pki.NODE_CERT)
    for name in ("node.key", "identity.key", "identity.pub", "encryption.key"):
        shutil.copy(csr.parent / name, d / pki.NODES / "carol" / name)
    return d


def cert(root: Path, name: str) -> x509.Certificate:
    return pki.load_certificate(pki.node_files(root, name).cert)


def pem(root: Path, name: str) -> bytes:
    return pki.node_files(root, name).cert.read_bytes()


def test_a_submitter_request_round_trips_to_a_client_auth_certificate(root: Path) -> None:
    files = pki.node_files(root, "carol")
    assert files.role == "submitter"
    c = cert(root, "carol")
    ca = pki.load_certificate(root / pki.CA_CERT)
    pki.verify_certificate(c, ca, role="submitter")
    assert pki.certificate_role(c) == "submitter"
    assert pki.certificate_name(c) == "carol"
    eku = c.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.DNSName("carol")]
    assert pki.certificate_identity(c) == IdentityPublicKey.load(files.identity_pub)
    assert len(pki.certificate_encryption_key(c)) == 32
    rows = {n.name: n.role for n in pki.issued_nodes(root)}
    assert rows == {"server": "server", "alice": "client", "carol": "submitter"}


@pytest.mark.parametrize(
    ("name", "required"),
    [("carol", "client"), ("carol", "server"), ("alice", "submitter"), ("server", "submitter")],
)
def test_each_role_is_refused_where_another_is_required(
    root: Path, name: str, required: pki.Role
) -> None:
    ca = pki.load_certificate(root / pki.CA_CERT)
    with pytest.raises(pki.CertificateRejected, match=f"a {required} certificate is required"):
        pki.verify_certificate(cert(root, name), ca, role=required)
    with pytest.raises(pki.CertificateRejected):
        pki.peer_from_pem(pem(root, name), ca, revoked=(), role=required)


def test_peer_from_pem_names_the_verified_peer_and_refuses_the_rest(
    root: Path, tmp_path: Path
) -> None:
    ca = pki.load_certificate(root / pki.CA_CERT)
    assert pki.peer_from_pem(pem(root, "carol"), ca, revoked=(), role="submitter") == "carol"
    assert pki.peer_from_pem(pem(root, "alice"), ca, revoked=(), role="client") == "alice"
    serial = cert(root, "carol").serial_number
    with pytest.raises(pki.CertificateRejected, match="revoked"):
        pki.peer_from_pem(pem(root, "carol"), ca, revoked={serial}, role="submitter")
    for junk in (b"", b"not a certificate", pem(root, "carol")[:100]):
        with pytest.raises(pki.CertificateRejected, match="no PEM certificate"):
            pki.peer_from_pem(junk, ca, revoked=(), role="submitter")
    other = issue_federation(tmp_path / "other", [], server=None)
    pki.issue(other, "carol", role="submitter")
    with pytest.raises(pki.CertificateRejected, match="not issued by this federation's CA"):
        pki.peer_from_pem(pem(other, "carol"), ca, revoked=(), role="submitter")


def test_a_submitter_cannot_take_a_members_name(root: Path, tmp_path: Path) -> None:
    """The gateway knows its members by certificate name: the CA refuses a submitter
    certificate for a name that a member's valid certificate holds."""
    csr = pki.request(tmp_path, "alice", role="submitter")
    with pytest.raises(UserError, match="'alice' already has a valid certificate"):
        pki.sign_request(root, csr, out=tmp_path / "alice.crt")


def test_a_submitter_request_naming_hosts_is_refused(tmp_path: Path) -> None:
    """A request edited to carry a server's hosts under the submitter role is refused (the
    requester re-signs it with its own keys, so only the CA's checks stand in the way)."""
    ca_dir = issue_federation(tmp_path / "ca", [], server=None)
    own = tmp_path / "own"
    csr_path = pki.request(own, "carol", role="submitter")
    key = serialization.load_pem_private_key(
        (csr_path.parent / pki.NODE_KEY).read_bytes(), password=None
    )
    original = x509.load_pem_x509_csr(csr_path.read_bytes())
    builder = x509.CertificateSigningRequestBuilder().subject_name(original.subject)
    for ext in original.extensions:
        value = ext.value
        if isinstance(value, x509.SubjectAlternativeName):
            value = x509.SubjectAlternativeName([x509.DNSName("carol"), x509.DNSName("evil.org")])
        builder = builder.add_extension(value, critical=ext.critical)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    csr_path.write_bytes(
        builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(UserError, match="a submitter request names only DNS:carol"):
        pki.sign_request(ca_dir, csr_path)


def test_cli_issues_and_requests_submitters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "ca"
    assert veil("pki", "init", str(d)) == 0
    assert veil("pki", "issue", str(d), "carol", "--role", "submitter") == 0
    assert "issued submitter 'carol'" in capsys.readouterr().out
    assert pki.node_files(d, "carol").role == "submitter"
    own = tmp_path / "dana"
    assert veil("pki", "request", str(own), "dana", "--role", "submitter") == 0
    csr = own / pki.NODES / "dana" / pki.REQUEST
    assert veil("pki", "sign", str(d), str(csr)) == 0
    assert "issued submitter 'dana'" in capsys.readouterr().out
    with pytest.raises(UserError, match="server certificates only"):
        veil("pki", "issue", str(d), "erin", "--role", "submitter", "--host", "x.org")
    assert veil("pki", "show", str(d)) == 0
    table = capsys.readouterr().out
    assert "submitter" in next(line for line in table.splitlines() if "carol" in line)
    with pytest.raises(UserError, match="--role server\\|client\\|submitter"):
        pki.node_files(d, "ghost")


def test_a_submitter_is_named_through_grpc_and_is_no_member_of_the_gateway(root: Path) -> None:
    """Over real mutual TLS: `peer_from_pem` reads the peer as gRPC's auth context holds it;
    the federation gateway refuses a submitter's certificate (not one of its members)."""
    grpc: Any = require("grpc")
    from veil.transport.grpc import veil_pb2 as pb
    from veil.transport.grpc import veil_pb2_grpc as pb_grpc
    from veil.transport.grpc.client import open_channel
    from veil.transport.grpc.server import GrpcGateway, ServerCredentials

    ca = pki.load_certificate(root / pki.CA_CERT)
    server = pki.node_files(root, "server")
    seen: list[str] = []

    def who(request: bytes, context: Any) -> bytes:
        peer = context.auth_context().get("x509_pem_cert", [b""])[0]
        try:
            seen.append(pki.peer_from_pem(peer, ca, revoked=(), role="submitter"))
        except pki.CertificateRejected as exc:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        return b""

    probe = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    probe.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "t.P", {"W": grpc.unary_unary_rpc_method_handler(who)}
            )
        ]
    )
    creds = (server.key.read_bytes(), server.cert.read_bytes())
    port = probe.add_secure_port(
        "127.0.0.1:0",
        grpc.ssl_server_credentials([creds], server.ca_cert.read_bytes(), True),
    )
    probe.start()
    try:
        for name, expected in (("carol", None), ("alice", grpc.StatusCode.PERMISSION_DENIED)):
            with open_channel(f"localhost:{port}", client_credentials(root, name)) as channel:
                call = channel.unary_unary("/t.P/W")
                if expected is None:
                    call(b"", timeout=10)
                else:
                    with pytest.raises(grpc.RpcError) as info:
                        call(b"", timeout=10)
                    assert info.value.code() == expected
                    assert "a submitter certificate is required" in (info.value.details() or "")
        assert seen == ["carol"]
    finally:
        probe.stop(0)

    alice = IdentityPublicKey.load(pki.node_files(root, "alice").identity_pub)
    gateway = GrpcGateway(
        run_id="r",
        identities={"alice": alice},
        reference={"w": np.zeros(2, np.float32)},
        deadline_s=30.0,
    )
    port = gateway.start(
        "127.0.0.1:0",
        ServerCredentials(
            server.cert.read_bytes(), server.key.read_bytes(), server.ca_cert.read_bytes()
        ),
    )
    try:
        with open_channel(f"localhost:{port}", client_credentials(root, "carol")) as channel:
            stub = pb_grpc.FederationStub(channel)
            for call in (
                lambda: stub.Join(pb.JoinRequest(client="carol", json="{}"), timeout=10),
                lambda: stub.Status(pb.StatusRequest(), timeout=10),
                lambda: stub.Join(pb.JoinRequest(client="alice", json="{}"), timeout=10),
            ):
                with pytest.raises(grpc.RpcError) as info:
                    call()
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with open_channel(f"localhost:{port}", client_credentials(root, "alice")) as channel:
            pb_grpc.FederationStub(channel).Status(pb.StatusRequest(), timeout=10)
    finally:
        gateway.stop(0)
