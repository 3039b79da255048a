"""Keys never leave their owner, and what a CA holder can still do is visible.

The adversaries: the CA operator (mints a second certificate for a member), the coordinator
(hands out an old revocation list, serves a revoked member), anyone who can read a key file
left world-readable.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography import x509

from veil.crypto import pki
from veil.crypto.envelope import generate_key_file, load_key_file
from veil.crypto.identity import IdentityKey
from veil.crypto.revocation import RevocationRejected
from veil.crypto.sealed_box import EncryptionKey
from veil.crypto.trust import TRUST_FILE, TrustStore
from veil.errors import UserError
from veil.federation import FitInstruction, TrainingPlan
from veil.privacy.secagg.errors import KeySubstitution
from veil.privacy.secagg.roster import CertificateRoster
from veil.transport.grpc import veil_pb2 as pb
from veil.transport.grpc import veil_pb2_grpc as pb_grpc
from veil.transport.grpc.client import ClientCredentials, open_channel
from veil.transport.grpc.codec import decode
from veil.transport.grpc.server import GrpcGateway, ServerCredentials

ORGS = ("bank-a", "bank-b", "bank-c")


def _enrol(ca: Path, org: Path, name: str, role: pki.Role = "client") -> pki.NodeFiles:
    """What an organisation and the CA operator do, each on its own machine."""
    request = pki.request(org, name, role=role)  # on the organisation's machine
    cert = pki.sign_request(ca, request)  # on the CA's: it reads the request only
    (org / pki.CA_CERT).write_bytes((ca / pki.CA_CERT).read_bytes())
    (org / "crl.pem").write_bytes((ca / "crl.pem").read_bytes())
    assert cert == org / "nodes" / name / "node.crt"
    return pki.node_files(org, name)


@pytest.fixture
def federation(tmp_path: Path) -> dict[str, Any]:
    ca = tmp_path / "ca"
    pki.init_ca(ca)
    orgs = {name: _enrol(ca, tmp_path / name, name) for name in ORGS}
    return {"root": tmp_path, "ca": ca, "orgs": orgs}


def _private_blobs(files: pki.NodeFiles) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (files.key, files.identity_key, files.encryption_key)}


def test_the_ca_never_sees_a_private_key(federation: dict[str, Any]) -> None:
    root: Path = federation["root"]
    every_file = [p for p in root.rglob("*") if p.is_file()]
    for name, files in federation["orgs"].items():
        for what, blob in _private_blobs(files).items():
            holders = [p for p in every_file if blob in p.read_bytes()]
            assert holders == [files.cert.parent / what], (name, what, holders)
            assert (files.cert.parent / what).stat().st_mode & 0o077 == 0
    ca_key = (federation["ca"] / "ca.key").read_bytes()
    assert [p for p in every_file if ca_key in p.read_bytes()] == [federation["ca"] / "ca.key"]
    # The certificate binds the keys the organisation made.
    files = federation["orgs"]["bank-a"]
    cert = pki.load_certificate(files.cert)
    assert pki.certificate_identity(cert).public_bytes() == (
        IdentityKey.load(files.identity_key).public_bytes()
    )
    assert pki.certificate_encryption_key(cert) == (
        EncryptionKey.load(files.encryption_key).public_bytes()
    )


def test_the_ca_checks_the_request(federation: dict[str, Any], tmp_path: Path) -> None:
    ca: Path = federation["ca"]
    # A second certificate for a name that has a valid one is refused: revoke first.
    request = pki.request(tmp_path / "again", "bank-a", role="client")
    with pytest.raises(UserError, match="already has a valid certificate"):
        pki.sign_request(ca, request)
    # A request whose identity key did not sign it (keys swapped after the fact).
    request = pki.request(tmp_path / "d", "bank-d", role="client")
    other = pki.request(tmp_path / "e", "bank-e", role="client")
    csr = x509.load_pem_x509_csr(request.read_bytes())
    forged = x509.load_pem_x509_csr(other.read_bytes())
    builder = x509.CertificateSigningRequestBuilder().subject_name(csr.subject)
    for ext in csr.extensions:
        if ext.oid == pki.IDENTITY_OID:
            ext = forged.extensions.get_extension_for_oid(pki.IDENTITY_OID)
        builder = builder.add_extension(ext.value, critical=ext.critical)
    from cryptography.hazmat.primitives import hashes, serialization

    key = serialization.load_pem_private_key(
        (tmp_path / "d" / "nodes" / "bank-d" / "node.key").read_bytes(), password=None
    )
    swapped = tmp_path / "swapped.csr"
    swapped.write_bytes(
        builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)  # type: ignore[arg-type]
    )
    with pytest.raises(UserError, match="proof of possession"):
        pki.sign_request(ca, swapped)
    garbage = tmp_path / "garbage.csr"
    garbage.write_bytes(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n")
    with pytest.raises(UserError, match="not a PEM certificate signing request"):
        pki.sign_request(ca, garbage)


def _roster(files: pki.NodeFiles) -> tuple[CertificateRoster, TrustStore]:
    trust = TrustStore(files.cert.parent / TRUST_FILE, pki.load_certificate(files.ca_cert))
    trust.accept_revocations((files.ca_cert.parent / "crl.pem").read_bytes())
    roster = CertificateRoster(files.ca_cert.read_bytes(), files.cert.read_bytes(), trust=trust)
    return roster, trust


def _mint_behind_the_members_back(ca: Path, root: Path, name: str) -> bytes:
    """The CA holder's attack: a fresh, valid certificate for `name` with keys it holds."""
    request = pki.request(root / "rogue", name, role="client")
    (ca / "nodes" / name / "node.crt").unlink()  # the operator edits its own register
    return pki.sign_request(ca, request).read_bytes()


def test_a_ca_minted_second_certificate_is_refused_by_peers(federation: dict[str, Any]) -> None:
    ca, root = federation["ca"], federation["root"]
    a, b = federation["orgs"]["bank-a"], federation["orgs"]["bank-b"]
    roster, trust = _roster(a)
    genuine = roster.identity("bank-b", b.cert.read_bytes())  # first use: pinned
    minted = _mint_behind_the_members_back(ca, root, "bank-b")
    pki.verify_certificate(  # every CA check passes: only the pin stops it
        x509.load_pem_x509_certificate(minted), pki.load_certificate(ca / pki.CA_CERT)
    )
    with pytest.raises(KeySubstitution, match="another identity key"):
        roster.identity("bank-b", minted)
    # The pin survives a restart of the member (its own state file).
    roster2, _ = _roster(a)
    with pytest.raises(KeySubstitution, match="another identity key"):
        roster2.identity("bank-b", minted)
    # A legitimate rotation is visible: the CA revokes the old certificate, everyone sees it.
    (ca / "nodes" / "bank-b" / "node.crt").write_bytes(b.cert.read_bytes())
    pki.revoke(ca, "bank-b")
    trust.accept_revocations((ca / "crl.pem").read_bytes())
    rotated = roster.identity("bank-b", minted)
    assert rotated.public_bytes() != genuine.public_bytes()
    with pytest.raises(KeySubstitution, match="revoked"):
        roster.identity("bank-b", b.cert.read_bytes())


def test_a_revoked_member_is_refused_by_secagg_peers(federation: dict[str, Any]) -> None:
    ca = federation["ca"]
    a, c = federation["orgs"]["bank-a"], federation["orgs"]["bank-c"]
    roster, trust = _roster(a)
    roster.identity("bank-c", c.cert.read_bytes())
    pki.revoke(ca, "bank-c")
    trust.accept_revocations((ca / "crl.pem").read_bytes())
    with pytest.raises(KeySubstitution, match="revoked"):
        roster.identity("bank-c", c.cert.read_bytes())


def test_an_older_revocation_list_is_refused(federation: dict[str, Any]) -> None:
    ca = federation["ca"]
    a = federation["orgs"]["bank-a"]
    _, trust = _roster(a)
    first = (ca / "crl.pem").read_bytes()
    pki.revoke(ca, "bank-c")
    newer = (ca / "crl.pem").read_bytes()
    assert trust.accept_revocations(newer).number == 2
    with pytest.raises(RevocationRejected, match="already seen number 2"):
        trust.accept_revocations(first)
    # ... also after a restart: the newest number is kept in the member's own state.
    reopened = TrustStore(trust.path, pki.load_certificate(a.ca_cert))
    with pytest.raises(RevocationRejected, match="already seen number 2"):
        reopened.accept_revocations(first)
    # A list the CA did not sign is refused whatever its number.
    other = federation["root"] / "other-ca"
    pki.init_ca(other)
    with pytest.raises(RevocationRejected, match=r"not issued by this federation's CA|not verify"):
        trust.accept_revocations((other / "crl.pem").read_bytes())


REFERENCE = {"w": np.zeros((3, 2), np.float32)}


def test_the_coordinator_refuses_a_member_revoked_during_the_run(
    federation: dict[str, Any], tmp_path: Path
) -> None:
    """The CA operator revokes bank-c while the run goes on: the coordinator reads the new list
    at its next task and hands it to every member; bank-c is refused from then on."""
    ca, root = federation["ca"], federation["root"]
    server = _enrol(ca, root / "coordinator", "server", role="server")
    published = root / "coordinator" / "crl.pem"
    gw = GrpcGateway(
        run_id="r",
        identities={
            n: pki.certificate_identity(pki.load_certificate(f.cert))
            for n, f in federation["orgs"].items()
        },
        reference=REFERENCE,
        deadline_s=2.0,
        revocations=published.read_bytes,
    )
    port = gw.start(
        "127.0.0.1:0",
        ServerCredentials(
            server.cert.read_bytes(), server.key.read_bytes(), server.ca_cert.read_bytes()
        ),
    )
    c = federation["orgs"]["bank-c"]
    creds = ClientCredentials(c.cert.read_bytes(), c.key.read_bytes(), c.ca_cert.read_bytes())
    instruction = FitInstruction(
        "r", 1, REFERENCE, TrainingPlan(epochs=1, batch_size=4, learning_rate=0.1)
    )
    try:
        with open_channel(f"localhost:{port}", creds) as channel:
            stub = pb_grpc.FederationStub(channel)
            thread = threading.Thread(target=lambda: list(gw.fit(["bank-c"], instruction)))
            thread.start()
            task = decode(stub.GetTask(pb.TaskRequest(client="bank-c", wait_s=5), timeout=10))
            assert task.kind == "fit" and "BEGIN X509 CRL" in task.meta["revocations"]
            thread.join()
            pki.revoke(ca, "bank-c")
            published.write_bytes((ca / "crl.pem").read_bytes())  # the operator publishes
            thread = threading.Thread(target=lambda: list(gw.fit(["bank-a"], instruction)))
            thread.start()
            with pytest.raises(grpc.RpcError) as info:
                decode(stub.GetTask(pb.TaskRequest(client="bank-c", wait_s=0), timeout=5))
            thread.join()
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "revoked" in (info.value.details() or "")
    finally:
        gw.stop(0)


def test_status_answers_members_only(federation: dict[str, Any]) -> None:
    ca, root = federation["ca"], federation["root"]
    server = _enrol(ca, root / "coordinator", "server", role="server")
    stranger = _enrol(ca, root / "stranger", "stranger")  # CA-signed, not a member
    gw = GrpcGateway(
        run_id="r",
        identities={
            "bank-a": pki.certificate_identity(
                pki.load_certificate(federation["orgs"]["bank-a"].cert)
            )
        },
        reference=REFERENCE,
        deadline_s=1.0,
    )
    port = gw.start(
        "127.0.0.1:0",
        ServerCredentials(
            server.cert.read_bytes(), server.key.read_bytes(), server.ca_cert.read_bytes()
        ),
    )
    try:
        for files, allowed in ((federation["orgs"]["bank-a"], True), (stranger, False)):
            creds = ClientCredentials(
                files.cert.read_bytes(), files.key.read_bytes(), files.ca_cert.read_bytes()
            )
            with open_channel(f"localhost:{port}", creds) as channel:
                stub = pb_grpc.FederationStub(channel)
                if allowed:
                    assert "bank-a" in stub.Status(pb.StatusRequest(), timeout=5).json
                else:
                    with pytest.raises(grpc.RpcError) as info:
                        stub.Status(pb.StatusRequest(), timeout=5)
                    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        gw.stop(0)


@pytest.mark.parametrize("which", ["identity", "encryption", "checkpoint", "ca"])
def test_a_readable_private_key_is_refused(federation: dict[str, Any], which: str) -> None:
    files = federation["orgs"]["bank-a"]
    path, load = {
        "identity": (files.identity_key, lambda p: IdentityKey.load(p)),
        "encryption": (files.encryption_key, lambda p: EncryptionKey.load(p)),
        "checkpoint": (files.cert.parent / "checkpoint.key", load_key_file),
        "ca": (federation["ca"] / "ca.key", lambda p: pki.revoke(federation["ca"], "bank-c")),
    }[which]
    if which == "checkpoint":
        generate_key_file(path)
    os.chmod(path, 0o644)
    with pytest.raises(UserError) as info:
        load(path)
    message = str(info.value)
    assert str(path) in message and f"chmod 600 {path}" in message and "\n" not in message


def test_the_client_command_refuses_a_readable_tls_key(
    federation: dict[str, Any], tmp_path: Path
) -> None:
    files = federation["orgs"]["bank-a"]
    os.chmod(files.key, 0o644)
    config = tmp_path / "c.toml"
    config.write_text(
        'mode = "deployment"\n[data]\ndataset = "breast_cancer"\n[model]\nname = "logistic"\n'
        "[federation]\nclients = 3\nrounds = 1\n"
    )
    data = tmp_path / "data.npz"
    np.savez(
        data,
        x_train=np.zeros((2, 30), np.float32),
        y_train=np.zeros(2, np.int64),
        x_val=np.zeros((0, 30), np.float32),
        y_val=np.zeros(0, np.int64),
        meta=np.frombuffer(
            b'{"n_features": 30, "n_classes": 2, "index": 0, "dataset": "x", '
            b'"synthetic": true, "image_shape": null}',
            np.uint8,
        ),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "veil.cli", "client", str(config), "--name", "bank-a",
         "--data", str(data), "--pki", str(files.cert.parent.parent.parent),
         "--server", "localhost:1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"chmod 600 {files.key}" in lines[0]
