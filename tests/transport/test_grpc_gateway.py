"""The gRPC gateway over real loopback TLS: who may connect, and which uploads are refused."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from support import client_credentials, issue_federation
from veil.crypto import pki
from veil.crypto.identity import IdentityKey, IdentityPublicKey, signing_payload
from veil.federation import ClientFailure, FitInstruction, FitResult, TrainingPlan
from veil.transport.grpc import veil_pb2 as pb
from veil.transport.grpc import veil_pb2_grpc as pb_grpc
from veil.transport.grpc.client import ClientCredentials, open_channel
from veil.transport.grpc.codec import decode, digest, encode
from veil.transport.grpc.server import GrpcGateway, ServerCredentials

REFERENCE = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}
PLAN = TrainingPlan(epochs=1, batch_size=4, learning_rate=0.1)
#: The gateway's round deadline: long, so that no test races it (a round's deadline starts
#: when the round does, before the test's TLS handshakes). A test of the deadline itself sets
#: a short one after its connections are up; "at once" means well inside this one.
DEADLINE_S = 30.0


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = issue_federation(tmp_path_factory.mktemp("pki"), ["alice", "bob"])
    other = issue_federation(tmp_path_factory.mktemp("other-ca"), ["alice"], server=None)
    return {"root": root, "other": other}


credentials = client_credentials


@pytest.fixture
def gateway(federation: dict[str, Any]) -> Any:
    root = federation["root"]
    server = pki.node_files(root, "server")
    identities = {
        n: IdentityPublicKey.load(pki.node_files(root, n).identity_pub) for n in ("alice", "bob")
    }
    gw = GrpcGateway(
        run_id="run-1",
        identities=identities,
        reference=REFERENCE,
        deadline_s=DEADLINE_S,
        max_update_norm=10.0,
    )
    port = gw.start(
        "127.0.0.1:0",
        ServerCredentials(
            server.cert.read_bytes(), server.key.read_bytes(), server.ca_cert.read_bytes()
        ),
    )
    yield gw, f"localhost:{port}"
    gw.stop(0)


def start_round(
    gw: GrpcGateway, clients: list[str], round_: int = 1
) -> tuple[threading.Thread, list[Any]]:
    replies: list[Any] = []
    instruction = FitInstruction("run-1", round_, REFERENCE, PLAN)
    thread = threading.Thread(target=lambda: replies.extend(gw.fit(clients, instruction)))
    thread.start()
    return thread, replies


def ready(channel: grpc.Channel) -> None:
    """Wait for the channel's TLS handshake, so that a round started next has its whole
    deadline for the exchange itself."""
    grpc.channel_ready_future(channel).result(timeout=30)


def signed_upload(task_meta: dict[str, Any], key: IdentityKey, update: dict[str, Any]) -> list[Any]:
    meta = {
        "run_id": task_meta["run_id"],
        "round": task_meta["round"],
        "nonce": task_meta["nonce"],
        "client": task_meta["client"],
        "weight": 10.0,
        "num_examples": 10,
        "metrics": {},
        "sums": {},
    }
    sig = key.sign(
        signing_payload("veil-message", "fit_result", digest("fit_result", meta, update))
    )
    return list(encode("fit_result", meta, update, signature=sig))


def identity(root: Path, name: str) -> IdentityKey:
    return IdentityKey.load(pki.node_files(root, name).identity_key)


def test_a_signed_upload_is_accepted_and_its_replay_refused(
    federation: dict[str, Any], gateway: Any
) -> None:
    gw, address = gateway
    thread, replies = start_round(gw, ["alice"])
    with open_channel(address, credentials(federation["root"], "alice")) as channel:
        stub = pb_grpc.FederationStub(channel)
        task = decode(stub.GetTask(pb.TaskRequest(client="alice", wait_s=5)))
        assert task.kind == "fit" and task.meta["round"] == 1
        assert set(task.arrays) == set(REFERENCE)
        update = {k: np.full_like(v, 0.1) for k, v in REFERENCE.items()}
        chunks = signed_upload(task.meta, identity(federation["root"], "alice"), update)
        first = stub.Upload(iter(chunks))
        assert first.accepted, first.reason
        replay = stub.Upload(iter(chunks))
        assert not replay.accepted and "replayed" in replay.reason
    thread.join()
    assert len(replies) == 1 and isinstance(replies[0], FitResult)
    np.testing.assert_array_equal(replies[0].update["w"], update["w"])


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        ("signer", "signature"),
        ("nan", "NaN"),
        ("shape", "shape"),
        ("norm", "exceeds the bound"),
        ("nonce", "stale or unknown"),
    ],
)
def test_bad_uploads_are_refused_with_the_reason(
    federation: dict[str, Any], gateway: Any, mutate: str, reason: str
) -> None:
    gw, address = gateway
    root = federation["root"]
    with open_channel(address, credentials(root, "alice")) as channel:
        ready(channel)
        gw.deadline_s = 3.0  # the refused client is dropped at the deadline
        thread, replies = start_round(gw, ["alice"])
        stub = pb_grpc.FederationStub(channel)
        task = decode(stub.GetTask(pb.TaskRequest(client="alice", wait_s=5)))
        update = {k: np.full_like(v, 0.1) for k, v in REFERENCE.items()}
        key = identity(root, "alice")
        meta = dict(task.meta)
        if mutate == "signer":
            key = identity(root, "bob")
        elif mutate == "nan":
            update["w"][0, 0] = np.nan
        elif mutate == "shape":
            update["w"] = np.zeros((2, 3), np.float32)
        elif mutate == "norm":
            update["w"][:] = 100.0
        elif mutate == "nonce":
            meta["nonce"] = "0" * 32
        reply = stub.Upload(iter(signed_upload(meta, key, update)))
    assert not reply.accepted
    assert reason in reply.reason
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert replies and all(isinstance(r, ClientFailure) for r in replies)


def test_a_client_that_never_answers_is_dropped_at_the_deadline(gateway: Any) -> None:
    gw, _ = gateway
    gw.deadline_s = 1.0
    thread, replies = start_round(gw, ["alice", "bob"])
    thread.join(timeout=20)
    assert not thread.is_alive()
    assert {r.client for r in replies} == {"alice", "bob"}
    assert all(isinstance(r, ClientFailure) and "within" in r.reason for r in replies)


def test_a_certificate_from_another_ca_is_refused(federation: dict[str, Any], gateway: Any) -> None:
    _, address = gateway
    foreign = credentials(federation["other"], "alice")
    trusted_ca = credentials(federation["root"], "alice").ca_certificate
    creds = ClientCredentials(foreign.certificate, foreign.private_key, trusted_ca)
    with open_channel(address, creds) as channel:
        stub = pb_grpc.FederationStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            decode(stub.GetTask(pb.TaskRequest(client="alice", wait_s=0), timeout=5))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_client_without_a_certificate_is_refused(
    federation: dict[str, Any], gateway: Any
) -> None:
    _, address = gateway
    ca = credentials(federation["root"], "alice").ca_certificate
    channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca))
    with channel:
        stub = pb_grpc.FederationStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            decode(stub.GetTask(pb.TaskRequest(client="alice", wait_s=0), timeout=5))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_client_cannot_claim_another_name(federation: dict[str, Any], gateway: Any) -> None:
    _, address = gateway
    with open_channel(address, credentials(federation["root"], "alice")) as channel:
        stub = pb_grpc.FederationStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            decode(stub.GetTask(pb.TaskRequest(client="bob", wait_s=0), timeout=5))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_status_reports_round_and_clients(federation: dict[str, Any], gateway: Any) -> None:
    _, address = gateway
    with open_channel(address, credentials(federation["root"], "alice")) as channel:
        stub = pb_grpc.FederationStub(channel)
        stub.GetTask(pb.TaskRequest(client="alice", wait_s=0)).next()
        status = json.loads(stub.Status(pb.StatusRequest(), timeout=5).json)
    assert status["run_id"] == "run-1"
    assert set(status["clients"]) == {"alice", "bob"}
    assert status["clients"]["alice"]["connected"] is True
    assert status["clients"]["bob"]["connected"] is False


def test_insecure_dev_warns_on_every_start(tmp_path: Path, federation: dict[str, Any]) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        'mode = "deployment"\n[data]\ndataset = "breast_cancer"\n'
        "[federation]\nclients = 1\nrounds = 1\n[deployment]\nreconnect_timeout_s = 0.5\n"
    )
    data = tmp_path / "none.npz"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "veil.cli",
            "client",
            str(config),
            "--name",
            "alice",
            "--data",
            str(data),
            "--pki",
            str(federation["root"]),
            "--server",
            "127.0.0.1:1",
            "--insecure-dev",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "WARNING: --insecure-dev" in proc.stderr
    assert proc.returncode == 2


def test_a_revoked_certificate_is_refused(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    server = pki.issue(tmp_path, "server", role="server")
    carol = pki.issue(tmp_path, "carol", role="client")
    pki.revoke(tmp_path, "carol")
    gw = GrpcGateway(
        run_id="r",
        identities={"carol": IdentityPublicKey.load(carol.identity_pub)},
        reference=REFERENCE,
        deadline_s=1.0,
    )
    port = gw.start(
        "127.0.0.1:0",
        ServerCredentials(
            server.cert.read_bytes(),
            server.key.read_bytes(),
            server.ca_cert.read_bytes(),
            revoked=pki.revoked_serials(tmp_path),
        ),
    )
    try:
        with open_channel(f"localhost:{port}", credentials(tmp_path, "carol")) as channel:
            stub = pb_grpc.FederationStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                decode(stub.GetTask(pb.TaskRequest(client="carol", wait_s=0), timeout=5))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "revoked" in (info.value.details() or "")
    finally:
        gw.stop(0)


def test_protocol_steps_carry_per_client_bodies_and_a_refusal_fails_fast(
    federation: dict[str, Any], gateway: Any
) -> None:
    """`exchange` gives each client its own body through a signed, nonce-bound task; a client
    that refuses a step says why at once (no waiting for the deadline)."""
    from veil.federation.messages import ProtocolInstruction, ProtocolReply
    from veil.transport.grpc.client import _answer

    gw, address = gateway
    replies: list[Any] = []
    instructions = {
        "alice": ProtocolInstruction("run-1", 1, "secagg/setup", b"for alice"),
        "bob": ProtocolInstruction("run-1", 1, "secagg/setup", b"for bob"),
    }
    thread = threading.Thread(target=lambda: replies.extend(gw.exchange(instructions)))
    thread.start()

    class Runner:
        def __init__(self, name: str, refuse: bool) -> None:
            self.name, self.refuse = name, refuse

        def handle(self, instruction: ProtocolInstruction) -> ProtocolReply:
            if self.refuse:
                from veil.privacy.secagg.errors import KeySubstitution

                raise KeySubstitution("a peer's key is not signed by its certificate's identity")
            return ProtocolReply(
                self.name, instruction.round, instruction.stage, b"re: " + instruction.body
            )

    root = federation["root"]
    for name, refuse in (("alice", False), ("bob", True)):
        with open_channel(address, credentials(root, name)) as channel:
            stub = pb_grpc.FederationStub(channel)
            task = decode(stub.GetTask(pb.TaskRequest(client=name, wait_s=5)))
            assert task.kind == "protocol" and task.meta["stage"] == "secagg/setup"
            upload = _answer(task, Runner(name, refuse), None, identity(root, name))  # type: ignore[arg-type]
            assert stub.Upload(iter(upload)).accepted
    # Both answers are in: the step ends now, not at its deadline (bob's failure is its refusal,
    # not "missed the deadline").
    thread.join(timeout=DEADLINE_S / 2)
    assert not thread.is_alive()
    by_client = {r.client: r for r in replies}
    assert isinstance(by_client["alice"], ProtocolReply)
    assert by_client["alice"].body == b"re: for alice"
    assert isinstance(by_client["bob"], ClientFailure)
    assert "refused secagg/setup" in by_client["bob"].reason
    assert "not signed" in by_client["bob"].reason


def _flip(chunks: list[Any], where: str) -> list[Any]:
    """A signed upload with one byte changed after signing: a tensor byte, a metadata byte
    (the weight 10.0 becomes 90.0) or a signature byte."""
    out = list(chunks)
    if where == "tensor":
        data = bytearray(out[1].data)
        data[0] ^= 0x01  # the lowest mantissa bit of w[0, 0]: still finite, still in bound
        out[1] = pb.Chunk(data=bytes(data))
        return out
    header = pb.Header()
    header.CopyFrom(out[0].header)
    if where == "metadata":
        assert header.json.count('"weight": 10.0') == 1
        header.json = header.json.replace('"weight": 10.0', '"weight": 90.0')
    else:
        signature = bytearray(header.signature)
        signature[7] ^= 0x80
        header.signature = bytes(signature)
    out[0] = pb.Chunk(header=header)
    return out


@pytest.mark.parametrize("where", ["tensor", "metadata", "signature"])
def test_a_byte_flipped_after_signing_is_refused(
    federation: dict[str, Any], gateway: Any, where: str
) -> None:
    """A man in the middle (or a buggy proxy) that changes one byte of a signed upload: the
    gateway refuses it, and the client's untouched upload of the same task is still accepted."""
    gw, address = gateway
    root = federation["root"]
    key = identity(root, "alice")
    thread, replies = start_round(gw, ["alice"])
    with open_channel(address, credentials(root, "alice")) as channel:
        stub = pb_grpc.FederationStub(channel)
        task = decode(stub.GetTask(pb.TaskRequest(client="alice", wait_s=5)))
        update = {k: np.full_like(v, 0.1) for k, v in REFERENCE.items()}
        honest = signed_upload(task.meta, key, update)
        tampered = stub.Upload(iter(_flip(honest, where)))
        assert not tampered.accepted
        assert "signature does not verify" in tampered.reason, tampered.reason
        retry = stub.Upload(iter(honest))
        assert retry.accepted, retry.reason
    thread.join(timeout=DEADLINE_S / 2)
    assert not thread.is_alive()
    [result] = replies
    assert isinstance(result, FitResult) and result.weight == 10.0
    np.testing.assert_array_equal(result.update["w"], update["w"])


def test_a_round_one_upload_replayed_in_round_two_is_refused(
    federation: dict[str, Any], gateway: Any
) -> None:
    """An eavesdropper (or the member itself) sends round 1's accepted, correctly signed upload
    again as the answer to round 2: refused; the member's own round-2 answer is accepted."""
    gw, address = gateway
    root = federation["root"]
    key = identity(root, "alice")
    update = {k: np.full_like(v, 0.1) for k, v in REFERENCE.items()}
    with open_channel(address, credentials(root, "alice")) as channel:
        stub = pb_grpc.FederationStub(channel)
        thread, replies = start_round(gw, ["alice"], round_=1)
        first = decode(stub.GetTask(pb.TaskRequest(client="alice", wait_s=5)))
        round_one = signed_upload(first.meta, key, update)
        assert stub.Upload(iter(round_one)).accepted
        thread.join(timeout=DEADLINE_S / 2)
        assert not thread.is_alive() and isinstance(replies[0], FitResult)

        thread, replies = start_round(gw, ["alice"], round_=2)
        second = decode(stub.GetTask(pb.TaskRequest(client="alice", wait_s=5)))
        assert second.meta["round"] == 2 and second.meta["nonce"] != first.meta["nonce"]
        replay = stub.Upload(iter(round_one))
        assert not replay.accepted and "replayed" in replay.reason, replay.reason
        fresh = stub.Upload(iter(signed_upload(second.meta, key, update)))
        assert fresh.accepted, fresh.reason
    thread.join(timeout=DEADLINE_S / 2)
    assert not thread.is_alive()
    [result] = replies
    assert isinstance(result, FitResult) and result.round == 2
