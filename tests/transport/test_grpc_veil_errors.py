"""A deliberate error (`veil.errors.VeilError`) becomes a refusal with its reason, on both sides of
the real gRPC transport (mutual TLS on loopback), never a crashed member or gRPC's UNKNOWN.

The member's case runs the real code path: a member whose own data are out of range (values near
the float32 maximum) trains to a non-finite update, its int8 compression stage raises
`UpdateRejected`, and the member refuses the task while the other member's update is accepted.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from support import client_credentials, issue_federation, wait_until
from veil.crypto import pki
from veil.crypto.identity import IdentityKey, IdentityPublicKey
from veil.data import ClientData
from veil.errors import StoreError
from veil.federation import (
    ClientFailure,
    ClientRunner,
    FitInstruction,
    FitResult,
    TrainingPlan,
    UpdatePipeline,
)
from veil.federation.compression import CompressionStage, Int8Compressor
from veil.models import LogisticRegression, get_parameters
from veil.transport.grpc import veil_pb2 as pb
from veil.transport.grpc import veil_pb2_grpc as pb_grpc
from veil.transport.grpc.client import open_channel, run_client
from veil.transport.grpc.server import GrpcGateway, ServerCredentials

MEMBERS = ("alice", "bob")
N_FEATURES, N_CLASSES = 3, 2
PLAN = TrainingPlan(epochs=1, batch_size=4, learning_rate=0.1)
DEADLINE_S = 30.0


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return issue_federation(tmp_path_factory.mktemp("pki"), MEMBERS)


def start(gateway: GrpcGateway, root: Path) -> str:
    server = pki.node_files(root, "server")
    credentials = ServerCredentials(
        server.cert.read_bytes(), server.key.read_bytes(), server.ca_cert.read_bytes()
    )
    return f"localhost:{gateway.start('127.0.0.1:0', credentials)}"


def identities(root: Path) -> dict[str, IdentityPublicKey]:
    return {n: IdentityPublicKey.load(pki.node_files(root, n).identity_pub) for n in MEMBERS}


def member_data(name: str, scale: float) -> ClientData:
    rng = np.random.default_rng(len(name))
    x = (rng.standard_normal((16, N_FEATURES)) * scale).astype(np.float32)
    y = rng.integers(0, N_CLASSES, 16).astype(np.int64)
    return ClientData(name, x, y, x[:0], y[:0])


@pytest.fixture
def gateway(root: Path) -> Iterator[tuple[GrpcGateway, str, dict[str, Any]]]:
    parameters = get_parameters(LogisticRegression(N_FEATURES, N_CLASSES))
    gw = GrpcGateway(
        run_id="run-1",
        identities=identities(root),
        # What a compressed upload looks like: the gateway checks uploads against it.
        reference=Int8Compressor().reference(parameters),
        deadline_s=DEADLINE_S,
    )
    address = start(gw, root)
    yield gw, address, parameters
    gw.stop(0)


def test_a_member_whose_update_is_rejected_refuses_the_task_and_the_round_goes_on(
    root: Path, gateway: tuple[GrpcGateway, str, dict[str, Any]]
) -> None:
    gw, address, parameters = gateway
    done: dict[str, int] = {}
    crashed: dict[str, BaseException] = {}

    def member(name: str, scale: float) -> None:
        runner = ClientRunner(
            name,
            member_data(name, scale),
            n_classes=N_CLASSES,
            pipeline=UpdatePipeline(client_stages=[CompressionStage(Int8Compressor())]),
            seed=1,
        )
        key = IdentityKey.load(pki.node_files(root, name).identity_key)
        try:
            with open_channel(address, client_credentials(root, name)) as channel:
                model = LogisticRegression(N_FEATURES, N_CLASSES)
                done[name] = run_client(channel, runner, model, key, poll_s=1.0, heartbeat_s=None)
        except BaseException as exc:  # the test fails on it below, naming the member
            crashed[name] = exc

    # bob's readings are ~1e37: finite, but his local training overflows to NaN.
    threads = [
        threading.Thread(target=member, args=("alice", 1.0), daemon=True),
        threading.Thread(target=member, args=("bob", 1e37), daemon=True),
    ]
    for thread in threads:
        thread.start()
    wait_until(lambda: all(gw._clients[n].joined for n in MEMBERS), 30, "both members to join")
    replies = {
        r.client: r for r in gw.fit(list(MEMBERS), FitInstruction("run-1", 1, parameters, PLAN))
    }
    gw.finish(linger_s=10.0)
    for thread in threads:
        thread.join(timeout=30)

    assert not crashed, f"a member crashed instead of refusing: {crashed!r}"
    assert done == {"alice": 1, "bob": 1}  # bob's refusal is his answer to the task
    assert isinstance(replies["alice"], FitResult)
    refusal = replies["bob"]
    assert isinstance(refusal, ClientFailure)
    assert refusal.reason.startswith("refused fit: cannot compress parameter"), refusal.reason
    assert "NaN or Inf" in refusal.reason and "lower the learning rate" in refusal.reason
    assert "the round goes on without this update" in refusal.reason


class FailingStatus(GrpcGateway):
    """A gateway whose status report fails on purpose (a `VeilError` inside a handler)."""

    def _unreachable(self, name: str, now: float) -> str:
        raise StoreError("the run store is gone: start the coordinator again with --resume")


def test_a_veil_error_in_a_handler_is_a_refusal_with_its_reason(root: Path) -> None:
    gw = FailingStatus(
        run_id="run-1", identities=identities(root), reference={}, deadline_s=DEADLINE_S
    )
    address = start(gw, root)
    try:
        with (
            open_channel(address, client_credentials(root, "alice")) as channel,
            pytest.raises(grpc.RpcError) as refused,
        ):
            pb_grpc.FederationStub(channel).Status(pb.StatusRequest(), timeout=10)
    finally:
        gw.stop(0)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert refused.value.details() == (
        "the run store is gone: start the coordinator again with --resume"
    )
