"""Channel binding: the attested aggregator's TLS key is made in the attested process, and a client
trusts exactly the certificate of the connection it talks on, over real loopback gRPC with mutual
TLS and the `software_dev` backend.

The attack: whoever the CA gives a server certificate (the CA operator, the host's owner) serves
clients from an unattested process and relays the real enclave's evidence. The evidence names
the enclave's key; the relay's connection has another key; the client refuses to connect.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from veil.assembly.secure_aggregation.tee import attested_server_key, server_pin, tee_federation
from veil.config import ModelConfig, RunConfig
from veil.crypto import pki
from veil.crypto.identity import IdentityKey, IdentityPublicKey
from veil.data import ClientData
from veil.federation.client import ClientRunner
from veil.federation.messages import (
    ClientFailure,
    FitInstruction,
    FitResult,
    ProtocolInstruction,
    ProtocolReply,
    TrainingPlan,
)
from veil.federation.pipeline import RoundContext, UpdatePipeline, WeightedSum
from veil.models import build_model, get_parameters
from veil.privacy.tee.attestation import AttestationRefused, Evidence, Policy, attest, from_b64
from veil.privacy.tee.channel import (
    ATTESTED_TLS_OID,
    CERTIFICATE_NONCE,
    CERTIFICATE_ROUND,
    AttestedTlsKey,
    CaCheck,
    ServerPin,
    attested_tls_key,
    binding_certificate,
    check_attested_certificate,
    endorsed_certificate,
    fingerprint,
    spki,
)
from veil.privacy.tee.protocol import CHALLENGE, EVIDENCE, OK, TeeAggregator, TeeParticipant
from veil.privacy.tee.software_dev import SoftwareDevAttester
from veil.transport.grpc import veil_pb2 as pb
from veil.transport.grpc import veil_pb2_grpc as pb_grpc
from veil.transport.grpc.client import (
    ClientCredentials,
    PinnedChannel,
    fetch_context,
    fetch_server_certificate,
    open_channel,
    run_client,
)
from veil.transport.grpc.codec import decode
from veil.transport.grpc.server import GrpcGateway, ServerCredentials

MEASUREMENT = "ab" * 32
DEV = Policy(frozenset({MEASUREMENT}), 0, allow_insecure_dev=True)
PLAN = TrainingPlan(epochs=1, batch_size=4, learning_rate=0.1)
MODEL = ModelConfig(name="logistic")


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("pki")
    pki.init_ca(root)
    pki.issue(root, "server", role="server")
    pki.issue(root, "alice", role="client")
    # The CA holder's second server certificate: the same CA, a TLS and identity key of its own.
    holder = tmp_path_factory.mktemp("ca-holder")
    for name in ("ca.crt", "ca.key"):
        shutil.copy2(root / name, holder / name)
    pki.issue(holder, "server", role="server")
    return SimpleNamespace(root=root, holder=holder, ca=pki.load_certificate(root / "ca.crt"))


def node(directory: Path, name: str = "server") -> tuple[x509.Certificate, IdentityKey]:
    files = pki.node_files(directory, name)
    return pki.load_certificate(files.cert), IdentityKey.load(files.identity_key)


def in_process_key(directory: Path, attester: SoftwareDevAttester) -> AttestedTlsKey:
    return attested_tls_key(attester, *node(directory))


def private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@contextmanager
def gateway(
    fed: SimpleNamespace, certificate: bytes, private_key: bytes, *, port: int = 0
) -> Iterator[tuple[GrpcGateway, str]]:
    """A gateway for member alice serving `certificate`; clients still checked against the CA."""
    alice = IdentityPublicKey.load(pki.node_files(fed.root, "alice").identity_pub)
    gw = GrpcGateway(
        run_id="run-1",
        identities={"alice": alice},
        reference=get_parameters(build_model(MODEL, n_features=3, n_classes=2)),
        deadline_s=10.0,
    )
    ca = (fed.root / "ca.crt").read_bytes()
    bound = gw.start(f"127.0.0.1:{port}", ServerCredentials(certificate, private_key, ca))
    try:
        yield gw, f"localhost:{bound}"
    finally:
        gw.stop(0)


def credentials(fed: SimpleNamespace) -> ClientCredentials:
    f = pki.node_files(fed.root, "alice")
    return ClientCredentials(f.cert.read_bytes(), f.key.read_bytes(), f.ca_cert.read_bytes())


def pinned_channel(fed: SimpleNamespace, address: str, pin: ServerPin) -> PinnedChannel:
    f = pki.node_files(fed.root, "alice")
    return PinnedChannel(
        address,
        credentials(fed),
        client_certificate=f.cert,
        client_key=f.key,
        accept=pin.accept,
        timeout_s=5.0,
    )


def fetch(fed: SimpleNamespace, address: str) -> bytes:
    f = pki.node_files(fed.root, "alice")
    return fetch_server_certificate(address, fetch_context(f.cert, f.key), timeout_s=5.0)


def certificate_evidence(der: bytes) -> Evidence:
    """The evidence in a server's certificate: what a relay copies from the real one."""
    ext = x509.load_der_x509_certificate(der).extensions.get_extension_for_oid(ATTESTED_TLS_OID)
    raw = ext.value.value  # type: ignore[attr-defined]
    body = json.loads(raw[raw.index(b"{") :])
    return Evidence.from_bytes(from_b64(body["evidence"]))


class GatewayChannel:
    """The round's protocol channel over the gateway, keeping each step's failures."""

    def __init__(self, gw: GrpcGateway, round_: int = 1) -> None:
        self.gw, self.round = gw, round_
        self.failures: list[ClientFailure] = []

    def exchange(self, stage: str, bodies: Mapping[str, bytes]) -> dict[str, bytes]:
        instructions = {
            c: ProtocolInstruction("run-1", self.round, stage, b) for c, b in bodies.items()
        }
        replies = {}
        for reply in self.gw.exchange(instructions):
            if isinstance(reply, ProtocolReply):
                replies[reply.client] = reply.body
            else:
                self.failures.append(reply)
        return replies


def serve_one_round(
    gw: GrpcGateway, aggregator: TeeAggregator, out: dict[str, Any]
) -> threading.Thread:
    """The server's side of one attested round, then the end of the run, on a thread."""

    def serve() -> None:
        reference = gw.reference
        channel = GatewayChannel(gw)
        context = RoundContext("run-1", 1, clients=("alice",))
        accumulator = aggregator.start(reference, context, channel)
        out["participants"] = list(accumulator.participants)
        if accumulator.participants:
            instruction = FitInstruction("run-1", 1, dict(reference), PLAN)
            for reply in gw.fit(accumulator.participants, instruction):
                if isinstance(reply, FitResult):
                    accumulator.add(reply)
                else:
                    channel.failures.append(reply)
        out["aggregate"] = accumulator.finish()
        out["failures"] = channel.failures
        gw.finish(linger_s=5.0)

    thread = threading.Thread(target=serve)
    thread.start()
    return thread


def alice_runner(pin: ServerPin) -> tuple[ClientRunner, Any]:
    rng = np.random.default_rng(0)
    data = ClientData(
        "alice",
        rng.normal(size=(16, 3)).astype(np.float32),
        rng.integers(0, 2, 16).astype(np.int64),
        np.zeros((0, 3), np.float32),
        np.zeros(0, np.int64),
    )
    participant = TeeParticipant("alice", DEV, pin)
    runner = ClientRunner(
        "alice", data, n_classes=2, pipeline=UpdatePipeline(), seed=1, protocol=participant
    )
    return runner, build_model(MODEL, n_features=3, n_classes=2)


def alice_identity(fed: SimpleNamespace) -> IdentityKey:
    return IdentityKey.load(pki.node_files(fed.root, "alice").identity_key)


# -- the honest server -------------------------------------------------------------------------


def test_a_client_pins_the_in_process_key_verifies_the_evidence_and_completes_a_round(
    fed: SimpleNamespace,
) -> None:
    attester = SoftwareDevAttester(MEASUREMENT)
    key = in_process_key(fed.root, attester)
    pin = ServerPin(DEV, CaCheck(fed.ca))
    out: dict[str, Any] = {}
    with gateway(fed, key.certificate_pem, key.private_key_pem) as (gw, address):
        aggregator = TeeAggregator(WeightedSum(), attester, key.tls_public_key, hardware=False)
        thread = serve_one_round(gw, aggregator, out)
        runner, model = alice_runner(pin)
        with pinned_channel(fed, address, pin) as channel:
            done = run_client(
                channel, runner, model, alice_identity(fed), poll_s=1, reconnect_timeout_s=10
            )
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert done == 3  # the challenge, the evidence, the fit
    # The connection's key is the in-process one, and it is what every check used.
    assert pin.current is not None and pin.current.certificate_pem == key.certificate_pem
    assert pin.tls_public_key == key.tls_public_key
    assert pin.current.claims.describe() == "software_dev (no hardware root of trust)"
    assert out["participants"] == ["alice"] and out["failures"] == []
    aggregate = out["aggregate"]
    assert aggregate.count == 1 and aggregate.report["attested"] == 1
    # Not the CA-issued certificate's key: that one lives in a file outside the process.
    server_cert, _ = node(fed.root)
    assert key.tls_public_key != spki(server_cert)


def test_the_deployment_helpers_bind_a_key_that_is_never_on_disk(
    fed: SimpleNamespace, tmp_path: Path
) -> None:
    config = RunConfig.from_dict(
        {
            "mode": "deployment",
            "secure_aggregation": "tee",
            "data": {"dataset": "breast_cancer"},
            "model": {"name": "logistic"},
            "federation": {"clients": 2, "rounds": 1},
            "tee": {"allow_insecure_dev": True},
        }
    )
    key = attested_server_key(config, fed.root)
    pinned = server_pin(config, fed.root)
    der = x509.load_pem_x509_certificate(key.certificate_pem).public_bytes(
        serialization.Encoding.DER
    )
    assert pinned.accept(der) == key.certificate_pem
    assert pinned.tls_public_key == key.tls_public_key
    assert "private" not in repr(key).lower()
    on_disk = b"".join(p.read_bytes() for p in fed.root.rglob("*") if p.is_file())
    assert key.private_key_pem not in on_disk and key.certificate_pem not in on_disk
    record = tee_federation(config, tls_public_key=key.tls_public_key).record()
    assert record["tls_key"].startswith("the server certificate's key, generated inside")


# -- relays --------------------------------------------------------------------------------------


def test_a_relay_with_a_second_server_certificate_from_the_same_ca_fails_to_connect(
    fed: SimpleNamespace,
) -> None:
    """The issue's attack: the CA holder's second server certificate, an unattested process, the
    real enclave's evidence relayed. The client refuses to connect, naming the key mismatch."""
    honest = in_process_key(fed.root, SoftwareDevAttester(MEASUREMENT))
    with gateway(fed, honest.certificate_pem, honest.private_key_pem) as (_, honest_address):
        relayed = certificate_evidence(fetch(fed, honest_address))
    relay_key = ec.generate_private_key(ec.SECP256R1())
    relay_cert = binding_certificate(relay_key, *node(fed.holder), relayed)
    pin = ServerPin(DEV, CaCheck(fed.ca))
    with gateway(fed, relay_cert, private_pem(relay_key)) as (relay, relay_address):
        runner, model = alice_runner(pin)
        # Were the client let in, the relay would end the run after a while (no hang).
        ends = threading.Timer(15.0, relay.finish, kwargs={"linger_s": 2.0})
        ends.start()
        try:
            with (
                pinned_channel(fed, relay_address, pin) as channel,
                pytest.raises(grpc.RpcError) as info,
            ):
                run_client(
                    channel, runner, model, alice_identity(fed), poll_s=1, reconnect_timeout_s=5
                )
        finally:
            ends.cancel()
        never_polled = relay.wait_for_clients(0)
    assert never_polled == ["alice"]  # not one call reached the relay
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    reason = info.value.details()
    assert "\n" not in reason
    assert "key mismatch" in reason
    assert fingerprint(honest.tls_public_key) in reason
    assert fingerprint(spki(relay_key.public_key())) in reason
    assert pin.tls_public_key is None


def test_a_channel_pinned_to_the_in_process_key_cannot_reach_a_ca_certified_relay(
    fed: SimpleNamespace,
) -> None:
    """Only the holder of the pinned key completes the handshake; trusting the CA instead (the
    old binding) lets the same relay in."""
    honest = in_process_key(fed.root, SoftwareDevAttester(MEASUREMENT))
    holder = pki.node_files(fed.holder, "server")
    with gateway(fed, holder.cert.read_bytes(), holder.key.read_bytes()) as (_, address):
        request = pb.TaskRequest(client="alice", wait_s=0)
        pinned = open_channel(address, credentials(fed), server_certificate=honest.certificate_pem)
        with pinned, pytest.raises(grpc.RpcError) as info:
            decode(pb_grpc.FederationStub(pinned).GetTask(request, timeout=5))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with open_channel(address, credentials(fed)) as ca_rooted:
            assert decode(pb_grpc.FederationStub(ca_rooted).GetTask(request, timeout=5)).kind == (
                "wait"
            )


@pytest.mark.parametrize(
    ("relay", "reason"),
    [
        ("ca-issued certificate", "carries no attestation binding"),
        ("evidence relabelled with the relay's key", "not bound to this challenge"),
        ("endorsed by another identity", "not endorsed by the identity key"),
        ("another CA", "not endorsed: certificate of 'server' rejected"),
        ("a client certificate", "not endorsed"),
        ("the honest one, without allow_insecure_dev", "no hardware root of trust"),
        ("the honest one, another measurement", "not in the policy's allowed"),
    ],
)
def test_certificates_that_do_not_bind_their_own_key_are_refused(
    fed: SimpleNamespace, tmp_path: Path, relay: str, reason: str
) -> None:
    attester = SoftwareDevAttester(MEASUREMENT)
    honest = in_process_key(fed.root, attester)
    honest_der = x509.load_pem_x509_certificate(honest.certificate_pem).public_bytes(
        serialization.Encoding.DER
    )
    relay_key = ec.generate_private_key(ec.SECP256R1())
    policy = DEV
    if relay == "ca-issued certificate":
        pem = pki.node_files(fed.holder, "server").cert.read_bytes()
    elif relay == "evidence relabelled with the relay's key":
        real = certificate_evidence(honest_der)
        relabelled = Evidence(real.backend, real.report, spki(relay_key.public_key()), real.round)
        pem = binding_certificate(relay_key, *node(fed.holder), relabelled)
    elif relay == "endorsed by another identity":
        cert, _ = node(fed.root)
        own = attest(attester, spki(relay_key.public_key()), CERTIFICATE_NONCE, CERTIFICATE_ROUND)
        pem = binding_certificate(relay_key, cert, IdentityKey.generate(), own)
    elif relay in ("another CA", "a client certificate"):
        other = tmp_path / "other"
        if relay == "another CA":
            pki.init_ca(other)
            pki.issue(other, "server", role="server")
            cert, identity = node(other)
        else:
            cert, identity = node(fed.root, "alice")
        own = attest(attester, spki(relay_key.public_key()), CERTIFICATE_NONCE, CERTIFICATE_ROUND)
        pem = binding_certificate(relay_key, cert, identity, own)
    else:
        pem = honest.certificate_pem
        if relay.endswith("allow_insecure_dev"):
            policy = Policy(frozenset({MEASUREMENT}), 0, allow_insecure_dev=False)
        else:
            policy = Policy(frozenset({"cd" * 32}), 0, allow_insecure_dev=True)
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    pin = ServerPin(policy, CaCheck(fed.ca))
    with pytest.raises(AttestationRefused, match=reason):
        pin.accept(der)
    assert pin.tls_public_key is None
    # The same checks pass for the honest certificate under the development policy.
    assert check_attested_certificate(honest_der, DEV, CaCheck(fed.ca)).tls_public_key == (
        honest.tls_public_key
    )


def test_a_revoked_server_certificate_cannot_endorse(fed: SimpleNamespace) -> None:
    honest = in_process_key(fed.root, SoftwareDevAttester(MEASUREMENT))
    der = x509.load_pem_x509_certificate(honest.certificate_pem).public_bytes(
        serialization.Encoding.DER
    )
    serial = node(fed.root)[0].serial_number
    with pytest.raises(AttestationRefused, match="revoked"):
        ServerPin(DEV, CaCheck(fed.ca, lambda: {serial})).accept(der)


def test_a_status_tool_pins_an_endorsed_certificate_and_trusts_the_ca_otherwise(
    fed: SimpleNamespace,
) -> None:
    """`endorsed_certificate` (for `veil status`, which sends no update): the endorsement is
    checked, the evidence is not; an ordinary CA-issued certificate is left to the CA."""
    honest = in_process_key(fed.root, SoftwareDevAttester(MEASUREMENT))
    check = CaCheck(fed.ca)

    def der(pem: bytes) -> bytes:
        return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)

    assert endorsed_certificate(der(honest.certificate_pem), check) == honest.certificate_pem
    ordinary = pki.node_files(fed.holder, "server").cert.read_bytes()
    assert endorsed_certificate(der(ordinary), check) is None
    relay_key = ec.generate_private_key(ec.SECP256R1())
    cert, _ = node(fed.root)
    evidence = certificate_evidence(der(honest.certificate_pem))
    forged = binding_certificate(relay_key, cert, IdentityKey.generate(), evidence)
    with pytest.raises(AttestationRefused, match="not endorsed"):
        endorsed_certificate(der(forged), check)


def test_per_round_evidence_relayed_to_another_connection_is_refused(
    fed: SimpleNamespace,
) -> None:
    """`software_dev` lets a relay mint start-up evidence for a key of its own (no hardware root
    of trust), so its certificate passes; the real enclave's per-round answers, relayed, still
    name the enclave's key and not the connection's: the client withholds its update."""
    enclave = SoftwareDevAttester(MEASUREMENT)
    honest = in_process_key(fed.root, enclave)
    relay = in_process_key(fed.holder, SoftwareDevAttester(MEASUREMENT))
    pin = ServerPin(DEV, CaCheck(fed.ca))
    out: dict[str, Any] = {}
    with gateway(fed, relay.certificate_pem, relay.private_key_pem) as (gw, address):
        # The relay forwards each challenge to the enclave, which answers for its own key.
        relaying = TeeAggregator(WeightedSum(), enclave, honest.tls_public_key, hardware=False)
        thread = serve_one_round(gw, relaying, out)
        runner, model = alice_runner(pin)
        with pinned_channel(fed, address, pin) as channel:
            run_client(
                channel, runner, model, alice_identity(fed), poll_s=1, reconnect_timeout_s=10
            )
        thread.join(timeout=30)
    assert pin.tls_public_key == relay.tls_public_key
    assert out["participants"] == []
    assert out["aggregate"].report["refused"] == 1
    (failure,) = out["failures"]
    assert "refused tee/evidence" in failure.reason
    assert "is not the key of this client's channel" in failure.reason
    assert fingerprint(relay.tls_public_key) in failure.reason


def test_a_restarted_server_is_pinned_again_and_an_update_verified_before_is_withheld(
    fed: SimpleNamespace,
) -> None:
    attester = SoftwareDevAttester(MEASUREMENT)
    first = in_process_key(fed.root, attester)
    pin = ServerPin(DEV, CaCheck(fed.ca))
    participant = TeeParticipant("alice", DEV, pin)
    request = pb.TaskRequest(client="alice", wait_s=0)
    with gateway(fed, first.certificate_pem, first.private_key_pem) as (_, address):
        port = int(address.rsplit(":", 1)[1])
        channel = pinned_channel(fed, address, pin)
        stub = pb_grpc.FederationStub(channel)
        assert decode(stub.GetTask(request, timeout=5)).kind == "wait"
        assert pin.tls_public_key == first.tls_public_key
        nonce = participant.handle(ProtocolInstruction("run-1", 1, CHALLENGE, b""))
        evidence = attest(attester, first.tls_public_key, nonce, 1).to_bytes()
        assert participant.handle(ProtocolInstruction("run-1", 1, EVIDENCE, evidence)) == OK
    second = in_process_key(fed.root, attester)
    with gateway(fed, second.certificate_pem, second.private_key_pem, port=port):
        with pytest.raises(grpc.RpcError) as info:  # the old pin: no handshake
            decode(stub.GetTask(request, timeout=5))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert decode(stub.GetTask(request, timeout=5)).kind == "wait"  # pinned again
        assert pin.tls_public_key == second.tls_public_key
        update = FitResult("alice", 1, {"w": np.zeros(2, np.float32)}, 1.0, 1)
        with pytest.raises(AttestationRefused, match="changed after this round's evidence"):
            participant.seal(update, RoundContext("run-1", 1))
        channel.close()
