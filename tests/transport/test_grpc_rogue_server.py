"""Veil's own client against a rogue server, over real loopback TLS.

A member runs `run_client` over `open_channel` with its certificate and the federation's CA.
A rogue listens where the member expects the coordinator: the real gateway code, serving a
certificate that the federation's CA did not issue, or a certificate the CA did issue but for a
client (a member playing the coordinator; its certificate even names "localhost"). The member
must refuse the handshake, send nothing (the rogue never sees a single request from it), and
give up with an error instead of serving the rogue. The same member against the genuine
coordinator connects and finishes, so the refusals come from the certificates alone.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from torch import nn

from support import client_credentials, issue_federation
from veil.crypto import pki
from veil.crypto.identity import IdentityKey, IdentityPublicKey
from veil.data.federated import ClientData
from veil.errors import VeilError
from veil.federation.client import ClientRunner
from veil.federation.pipeline import UpdatePipeline
from veil.transport.grpc.client import ClientCredentials, open_channel, run_client
from veil.transport.grpc.server import GrpcGateway, ServerCredentials

REFERENCE = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}


@pytest.fixture(scope="module")
def pkis(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    # "localhost" is a member whose client certificate's SubjectAltName is DNS:localhost, the
    # host the members dial: only the certificate's role tells it from the coordinator's.
    root = issue_federation(tmp_path_factory.mktemp("federation"), ["alice", "localhost"])
    other = issue_federation(tmp_path_factory.mktemp("other-ca"), [])
    return {"root": root, "other": other}


def serve(certificate_of: pki.NodeFiles, ca: Path, alice: Path) -> tuple[GrpcGateway, int]:
    """A gateway (the real server code) presenting `certificate_of`'s certificate and key,
    accepting clients of `ca`, with alice as its one member."""
    gateway = GrpcGateway(
        run_id="run-1",
        identities={"alice": IdentityPublicKey.load(alice)},
        reference=REFERENCE,
        deadline_s=30.0,
    )
    credentials = ServerCredentials(
        certificate_of.cert.read_bytes(),
        certificate_of.key.read_bytes(),
        (ca / "ca.crt").read_bytes(),
    )
    return gateway, gateway.start("127.0.0.1:0", credentials)


def member(root: Path) -> tuple[ClientCredentials, ClientRunner, IdentityKey]:
    files = pki.node_files(root, "alice")
    credentials = client_credentials(root, "alice")
    x = np.zeros((4, 3), np.float32)
    y = np.zeros(4, np.int64)
    data = ClientData("alice", x, y, x[:0], y[:0])
    runner = ClientRunner("alice", data, n_classes=2, pipeline=UpdatePipeline(), seed=0)
    return credentials, runner, IdentityKey.load(files.identity_key)


def connect(root: Path, port: int, reconnect_timeout_s: float) -> int:
    """alice's client process, as `veil client` runs it, against localhost:`port`."""
    credentials, runner, identity = member(root)
    with open_channel(f"localhost:{port}", credentials) as channel:
        return run_client(
            channel,
            runner,
            nn.Linear(3, 2),
            identity,
            poll_s=1.0,
            reconnect_timeout_s=reconnect_timeout_s,
        )


def test_the_member_connects_to_the_genuine_coordinator(pkis: dict[str, Path]) -> None:
    root = pkis["root"]
    alice = pki.node_files(root, "alice").identity_pub
    gateway, port = serve(pki.node_files(root, "server"), root, alice)
    done: list[Any] = []
    thread = threading.Thread(target=lambda: done.append(connect(root, port, 30.0)))
    try:
        thread.start()
        assert gateway.wait_for_clients(30.0) == []  # alice polled
        gateway.finish(linger_s=10.0)
        thread.join(timeout=30)
    finally:
        gateway.stop(0)
    assert not thread.is_alive() and done == [0]  # told the run is over, no task done


@pytest.mark.parametrize("rogue", ["another CA's server", "a member's client certificate"])
def test_the_member_refuses_a_rogue_server(pkis: dict[str, Path], rogue: str) -> None:
    root = pkis["root"]
    alice = pki.node_files(root, "alice").identity_pub
    presented = (
        pki.node_files(pkis["other"], "server")
        if rogue == "another CA's server"
        else pki.node_files(root, "localhost")
    )
    # The rogue accepts the federation's client certificates: it wants alice's requests.
    gateway, port = serve(presented, root, alice)
    outcome: list[Any] = []

    def attempt() -> None:
        try:
            outcome.append(connect(root, port, reconnect_timeout_s=2.0))
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=attempt)
    try:
        thread.start()
        thread.join(timeout=60)
        # Nothing reached the rogue: alice never completed a handshake, so never polled.
        missing = gateway.wait_for_clients(0.0)
        if thread.is_alive():  # alice is serving the rogue: end the run to end the test
            gateway.finish(linger_s=10.0)
            thread.join(timeout=30)
    finally:
        gateway.stop(0)
    assert missing == ["alice"], "alice polled the rogue for tasks"
    # The client gave up: a gRPC error, or the one-line VeilError that names the failed
    # connection; never a return (which would mean it took the rogue's tasks).
    assert len(outcome) == 1 and isinstance(outcome[0], grpc.RpcError | VeilError), outcome
