"""The coordinator's control service: JSON requests over gRPC with mutual TLS.

Sites (certificate role ``client``) and submitters (role ``submitter``) call one service,
``veil.sites.Control``, with unary calls whose request and reply are JSON objects. Each method
says which role may call it; the caller's name is the verified certificate's, never a field of
the request (`ControlServer`). Every call is stateless, so a caller that loses its connection
(a network cut, a coordinator restart) simply calls again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509

from veil.crypto import pki
from veil.crypto.keyfile import read_private
from veil.errors import UserError, VeilError
from veil.transport.grpc.client import ClientCredentials, open_channel
from veil.transport.grpc.server import ServerCredentials

SERVICE = "veil.sites.Control"
#: Key material for CKKS jobs travels through the service: allow a few MB.
MAX_MESSAGE_BYTES = 64 << 20
log = logging.getLogger("veil.coordinator")

#: A method's handler: (the caller's certificate name, its request) → the reply.
Handler = Callable[[str, dict[str, Any]], dict[str, Any]]


class ControlError(UserError):
    """The coordinator refused a call, or cannot be reached."""


@dataclass(frozen=True)
class Method:
    """One method: who may call it, and what it does."""

    role: pki.Role
    handler: Handler


class ControlServer:
    """Serves `methods` on one port; a caller whose certificate does not verify under the CA,
    is revoked, or has another role than the method's is refused before its handler runs."""

    def __init__(
        self,
        methods: Mapping[str, Method],
        *,
        ca: x509.Certificate,
        revoked: Callable[[], frozenset[int]],
    ) -> None:
        self.methods = dict(methods)
        self.ca = ca
        self.revoked = revoked
        self._server: grpc.Server | None = None

    def start(self, address: str, credentials: ServerCredentials) -> int:
        """Listen on `address` (port 0: any free port); returns the port."""
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=16),
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                self._wrap(name, method),
                request_deserializer=None,
                response_serializer=None,
            )
            for name, method in self.methods.items()
        }
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
        creds = grpc.ssl_server_credentials(
            [(credentials.private_key, credentials.certificate)],
            root_certificates=credentials.ca_certificate,
            require_client_auth=True,
        )
        port = server.add_secure_port(address, creds)
        if port == 0:
            raise UserError(f"cannot listen on {address}: is another process using that port?")
        server.start()
        self._server = server
        return int(port)

    def stop(self, grace_s: float = 1.0) -> None:
        if self._server is not None:
            self._server.stop(grace_s).wait()
            self._server = None

    def _wrap(self, name: str, method: Method) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        def call(request: bytes, context: grpc.ServicerContext) -> bytes:
            caller = self._caller(context, method.role)
            try:
                body = json.loads(request or b"{}")
                if not isinstance(body, dict):
                    raise ControlError("a request is one JSON object")
                reply = method.handler(caller, body)
            except VeilError as exc:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
            except (ValueError, KeyError, TypeError) as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {exc}")
            except Exception:
                log.exception(json.dumps({"event": "internal error", "method": name}))
                context.abort(grpc.StatusCode.INTERNAL, "internal error; see the coordinator log")
            return json.dumps(reply).encode()

        return call

    def _caller(self, context: grpc.ServicerContext, role: pki.Role) -> str:
        pem = (context.auth_context().get("x509_pem_cert") or [b""])[0]
        try:
            cert = x509.load_pem_x509_certificate(pem)
            pki.verify_certificate(cert, self.ca, role=role, revoked=self.revoked())
        except (ValueError, UserError) as exc:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"refused: {exc}")
        return pki.certificate_name(cert)


class ControlClient:
    """A caller of the control service, as the node whose folder is `pki_dir`."""

    def __init__(self, address: str, pki_dir: Path, name: str, *, timeout_s: float = 30.0):
        files = pki.node_files(pki_dir, name)
        self.address = address
        self.name = name
        self.files = files
        self.timeout_s = timeout_s
        credentials = ClientCredentials(
            files.cert.read_bytes(),
            read_private(files.key, "TLS key"),
            files.ca_cert.read_bytes(),
        )
        self._channel = open_channel(address, credentials)

    def call(self, method: str, request: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """One call; ControlError with the coordinator's reason, or saying it is unreachable."""
        stub = self._channel.unary_unary(
            f"/{SERVICE}/{method}", request_serializer=None, response_deserializer=None
        )
        try:
            reply = stub(json.dumps(dict(request or {})).encode(), timeout=self.timeout_s)
        except grpc.RpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise ControlError(
                    f"cannot reach the coordinator at {self.address}: is `veil coordinator "
                    "start` running there?"
                ) from None
            raise ControlError(str(exc.details())) from None
        try:
            result = json.loads(reply)
        except ValueError:  # not JSON, or not UTF-8: the caller expects ControlError only
            result = None
        if not isinstance(result, dict):
            raise ControlError("the coordinator sent a malformed reply; is it the same version?")
        return result

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
