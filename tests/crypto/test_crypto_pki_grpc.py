"""gRPC accepts the federation's certificates for mutual TLS (skipped without grpcio)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import pytest

from extras import require
from support import issue_federation
from veil.crypto import pki

grpc: Any = require("grpc")

METHOD = "/veil.test.Probe/WhoAmI"


def _who_am_i(request: bytes, context: Any) -> bytes:
    # What a transport would read after the handshake: the client's certificate name.
    names = context.auth_context().get("x509_common_name", [b""])
    return bytes(names[0])


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return issue_federation(tmp_path_factory.mktemp("pki-grpc"), ["bank-a"], server="coordinator")


@pytest.fixture(scope="module")
def port(federation: Path) -> Iterator[int]:
    files = pki.node_files(federation, "coordinator")
    credentials = grpc.ssl_server_credentials(
        [(files.key.read_bytes(), files.cert.read_bytes())],
        root_certificates=files.ca_cert.read_bytes(),
        require_client_auth=True,
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler(
        "veil.test.Probe", {"WhoAmI": grpc.unary_unary_rpc_method_handler(_who_am_i)}
    )
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    yield int(bound)
    server.stop(grace=None)


def _call(files: pki.NodeFiles | None, ca: bytes, port: int, host: str = "127.0.0.1") -> bytes:
    if files is None:
        credentials = grpc.ssl_channel_credentials(root_certificates=ca)
    else:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=files.key.read_bytes(),
            certificate_chain=files.cert.read_bytes(),
        )
    with grpc.secure_channel(f"{host}:{port}", credentials) as channel:
        return bytes(channel.unary_unary(METHOD)(b"", timeout=5))


def test_mutual_tls_with_issued_certificates(federation: Path, port: int) -> None:
    files = pki.node_files(federation, "bank-a")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=files.ca_cert.read_bytes(),
        private_key=files.key.read_bytes(),
        certificate_chain=files.cert.read_bytes(),
    )
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        assert channel.unary_unary(METHOD)(b"", timeout=5) == b"bank-a"
    # The DNS name in the server's SubjectAltName verifies too.
    assert _call(files, files.ca_cert.read_bytes(), port, host="localhost") == b"bank-a"


def test_client_without_certificate_is_refused(federation: Path, port: int) -> None:
    ca = (federation / "ca.crt").read_bytes()
    with pytest.raises(grpc.RpcError) as info:
        _call(None, ca, port)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_of_another_ca_is_refused(federation: Path, port: int, tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    foreign = pki.issue(tmp_path, "bank-a", role="client")
    with pytest.raises(grpc.RpcError) as info:
        _call(foreign, (federation / "ca.crt").read_bytes(), port)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_server_of_another_ca_is_refused(federation: Path, port: int, tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    pki.issue(tmp_path, "bank-a", role="client")
    files = pki.node_files(federation, "bank-a")
    with pytest.raises(grpc.RpcError) as info:
        # The client trusts only the other CA, so the real server's certificate is refused.
        _call(files, (tmp_path / "ca.crt").read_bytes(), port)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_server_certificate_cannot_act_as_client(federation: Path, port: int) -> None:
    # BoringSSL checks the extended key usage: a serverAuth-only certificate is refused as a
    # client ("unsupported certificate purpose"), so roles hold in the handshake itself.
    server_files = pki.node_files(federation, "coordinator")
    with pytest.raises(grpc.RpcError) as info:
        _call(server_files, server_files.ca_cert.read_bytes(), port)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
