"""PSI between two processes over gRPC with mutual TLS, certificates from Veil's PKI.

The sender (`serve_psi`) listens; the designated receiver (`join_psi`) connects, sends its
request and gets the answer in one unary call (method ``/veil.vertical.Psi/Exchange``, raw
bytes: the JSON messages of `veil.vertical.psi`). Both sides present node certificates issued
by the federation CA (`veil pki issue`); the sender serves a certificate of role ``server``,
checks the client certificate against the CA and the revocation list and, if `peer` is given,
that its name is `peer`. One exchange, then the server stops.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509

from veil.crypto import pki
from veil.errors import UserError
from veil.vertical.psi import PsiError, PsiReceiver, PsiResult, PsiSender, Reveal

__all__ = ["PSI_METHOD", "PsiServed", "join_psi", "serve_psi"]

PSI_METHOD = "/veil.vertical.Psi/Exchange"
_SERVICE, _RPC = "veil.vertical.Psi", "Exchange"
_MAX_MESSAGE = 256 << 20
_OPTIONS = [
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
    ("grpc.max_send_message_length", _MAX_MESSAGE),
]


@dataclass(frozen=True)
class PsiServed:
    """What the sender learned: who asked and how many ids they hold."""

    peer: str
    peer_size: int
    own_size: int


def _peer_name(context: grpc.ServicerContext, ca: x509.Certificate, pki_dir: Path) -> str:
    pems = context.auth_context().get("x509_pem_cert", [])
    if len(pems) != 1:
        raise pki.CertificateRejected("the PSI peer presented no client certificate")
    cert = x509.load_pem_x509_certificate(pems[0])
    pki.verify_certificate(cert, ca, role="client", revoked=pki.revoked_serials(pki_dir))
    return pki.certificate_name(cert)


def serve_psi(
    ids: list[str],
    *,
    pki_dir: Path,
    name: str,
    listen: str = "127.0.0.1:0",
    reveal: Reveal = "intersection",
    peer: str | None = None,
    timeout_s: float = 300.0,
    on_listening: Callable[[int], None] | None = None,
) -> PsiServed:
    """Serve one PSI exchange as the sender with node `name`'s credentials; return what we
    learned. `on_listening(port)` is called once the port is bound. UserError on timeout or if
    the peer is not acceptable."""
    files = pki.node_files(pki_dir, name)
    ca = pki.load_certificate(files.ca_cert)
    sender = PsiSender(ids, reveal=reveal)
    sender.prepare()
    done = threading.Event()
    outcome: dict[str, Any] = {}

    def exchange(request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            who = _peer_name(context, ca, pki_dir)
            if peer is not None and who != peer:
                raise pki.CertificateRejected(f"PSI peer '{who}' is not the expected '{peer}'")
            reply = sender.respond(request)
        except UserError as exc:
            outcome["error"] = str(exc)
            done.set()
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
            raise  # abort raises; this line only tells type checkers so
        outcome["peer"] = who
        done.set()
        return reply

    handler = grpc.method_handlers_generic_handler(
        _SERVICE, {_RPC: grpc.unary_unary_rpc_method_handler(exchange)}
    )
    server = grpc.server(ThreadPoolExecutor(max_workers=2), options=_OPTIONS, handlers=[handler])
    creds = grpc.ssl_server_credentials(
        [(files.key.read_bytes(), files.cert.read_bytes())],
        root_certificates=files.ca_cert.read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port(listen, creds)
    server.start()
    try:
        if on_listening is not None:
            on_listening(port)
        if not done.wait(timeout_s):
            raise UserError(
                f"no PSI peer connected within {timeout_s:.0f} s; is `veil psi join` running?"
            )
    finally:
        server.stop(grace=2.0).wait()
    if "error" in outcome:
        raise PsiError(f"PSI refused: {outcome['error']}")
    assert sender.peer_size is not None
    return PsiServed(str(outcome["peer"]), sender.peer_size, len(set(ids)))


def join_psi(
    ids: list[str],
    *,
    pki_dir: Path,
    name: str,
    server: str,
    reveal: Reveal = "intersection",
    timeout_s: float = 300.0,
) -> PsiResult:
    """Run PSI as the designated receiver with node `name`'s credentials against `server`."""
    files = pki.node_files(pki_dir, name)
    creds = grpc.ssl_channel_credentials(
        root_certificates=files.ca_cert.read_bytes(),
        private_key=files.key.read_bytes(),
        certificate_chain=files.cert.read_bytes(),
    )
    receiver = PsiReceiver(ids, reveal=reveal)
    request = receiver.request()
    with grpc.secure_channel(server, creds, options=_OPTIONS) as channel:
        call = channel.unary_unary(PSI_METHOD)
        try:
            response = call(request, timeout=timeout_s, wait_for_ready=True)
        except grpc.RpcError as exc:
            raise PsiError(f"PSI with {server} failed: {exc.details()}") from None
    return receiver.finish(response)
