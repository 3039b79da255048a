"""The client side of the deployment transport: poll for tasks, train, upload signed results.

The same `ClientRunner` as in simulation does the work. A client survives a server restart or a
network cut: it retries with backoff and rejoins at the next task, until `reconnect_timeout_s`
pass without reaching the server.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from torch import nn

from veil.crypto.identity import IdentityKey, signing_payload
from veil.errors import UserError, VeilError
from veil.federation.client import ClientRunner
from veil.federation.fingerprint import Fingerprint
from veil.federation.messages import (
    EvaluateInstruction,
    FitInstruction,
    ProtocolInstruction,
    TrainingPlan,
)
from veil.transport.grpc import veil_pb2 as pb
from veil.transport.grpc import veil_pb2_grpc as pb_grpc
from veil.transport.grpc.codec import Message, decode, digest, encode
from veil.transport.grpc.diagnose import Endpoint, diagnose

log = logging.getLogger("veil.client")

#: `run_client`'s `task_guard`: called with a task's kind ("fit", "evaluate", "protocol") and
#: metadata before the member works on it; a VeilError it raises refuses the task.
TaskCheck = Callable[[str, Mapping[str, Any]], None]

_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
# `run_client`'s waits between attempts to reach the coordinator: doubling from the first, at
# most the cap, each drawn in [half, all] of that (jitter, so that members cut off together do
# not all come back at the same instant).
_FIRST_RETRY_S, _MAX_RETRY_S = 1.0, 5.0
# One connection attempt gives up after this (gRPC's own default is 20 s), so that an address
# that does not answer at all is reported within seconds.
_CONNECT_TIMEOUT_MS = 5_000


class ConnectionFailed(UserError):
    """`run_client` cannot work with the coordinator: the message says, in one line, which
    certificate or address is wrong and what to do, or that it could not be reached for
    `reconnect_timeout_s`. `code` is the gRPC status of the failed call, when there was one."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ClientCredentials:
    """PEM bytes for mutual TLS."""

    certificate: bytes
    private_key: bytes
    ca_certificate: bytes


def open_channel(
    address: str,
    credentials: ClientCredentials | None,
    *,
    server_certificate: bytes | None = None,
) -> grpc.Channel:
    """A channel to the server: mutual TLS, or plaintext when `credentials` is None (dev only).

    With `server_certificate` (PEM) the channel trusts exactly that certificate instead of the
    CA (pinning): only the holder of its key can complete the handshake. The server still
    checks this client's certificate against the CA.
    """
    options = [
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.max_receive_message_length", 8 << 20),
        # C-core reads this one as the connect timeout of one attempt.
        ("grpc.min_reconnect_backoff_ms", _CONNECT_TIMEOUT_MS),
        # gRPC's own reconnection waits grow to 120 s by default: a coordinator that is back
        # would stay unused that long after `run_client`'s next attempt.
        ("grpc.initial_reconnect_backoff_ms", int(_FIRST_RETRY_S * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(_MAX_RETRY_S * 1000)),
    ]
    if credentials is None:
        return grpc.insecure_channel(address, options=options)
    creds = grpc.ssl_channel_credentials(
        root_certificates=credentials.ca_certificate
        if server_certificate is None
        else server_certificate,
        private_key=credentials.private_key,
        certificate_chain=credentials.certificate,
    )
    return grpc.secure_channel(address, creds, options=options)


def fetch_context(client_certificate: Path, client_key: Path) -> ssl.SSLContext:
    """The TLS context `fetch_server_certificate` uses: this client's certificate and key (the
    server requires one), and NO verification of the server's certificate: whoever fetches it
    checks it and then pins it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # trust comes from the caller's check, then the pin
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    try:
        context.load_cert_chain(client_certificate, client_key)
    except (OSError, ssl.SSLError) as exc:
        raise UserError(
            f"cannot load this client's TLS certificate '{client_certificate}' and key "
            f"'{client_key}': {exc}"
        ) from None
    return context


def fetch_server_certificate(
    address: str, context: ssl.SSLContext, *, timeout_s: float = 10.0
) -> bytes:
    """The DER certificate the server at `address` (``host:port``) presents in a TLS handshake
    (`context` from `fetch_context`; nothing is verified). OSError if it cannot be reached."""
    host, port = _host_port(address)
    with (
        socket.create_connection((host, port), timeout=timeout_s) as sock,
        context.wrap_socket(sock, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    if not der:
        raise ssl.SSLError(f"the server at {address} presented no certificate")
    return der


class PinFailed(grpc.RpcError, VeilError):  # type: ignore[misc]
    """A `PinnedChannel` could not pin: the server cannot be reached (UNAVAILABLE, which
    `run_client` retries), or its certificate was refused (UNAUTHENTICATED, not retried; the
    reason is in `details()`)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class PinnedChannel(grpc.Channel):  # type: ignore[misc]
    """A mutual-TLS channel that trusts exactly the certificate the server presents, once
    `accept` has checked it (`veil.privacy.tee.channel.ServerPin.accept`: an attested
    aggregator's in-process key), instead of any certificate the CA issued.

    `accept(der)` returns the PEM to trust, or raises a VeilError to refuse. The certificate is
    fetched (`fetch_server_certificate`, same address) before the first call, and again after
    a call that could not reach the server (a restarted server has a new key); it must pass
    `accept` each time, and the channel is reopened to trust it when it changed. A refused
    certificate fails the call with `PinFailed` (UNAUTHENTICATED, the reason in its details):
    the client does not connect. Between re-pins every call goes over a connection to the
    holder of the pinned key.
    """

    def __init__(
        self,
        address: str,
        credentials: ClientCredentials,
        *,
        client_certificate: Path,
        client_key: Path,
        accept: Callable[[bytes], bytes],
        timeout_s: float = 10.0,
    ) -> None:
        _host_port(address)
        self.address = address
        self.credentials = credentials
        self._context = fetch_context(client_certificate, client_key)
        self._accept = accept
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._pinned: bytes | None = None
        self._stale = True

    def pin(self) -> grpc.Channel:
        """The channel to the pinned certificate, fetching and checking it first if none is
        pinned yet or the last call could not reach the server. PinFailed otherwise."""
        with self._lock:
            if self._channel is not None and not self._stale:
                return self._channel
            try:
                der = fetch_server_certificate(
                    self.address, self._context, timeout_s=self._timeout_s
                )
            except OSError as exc:
                raise PinFailed(
                    grpc.StatusCode.UNAVAILABLE,
                    f"cannot fetch the server's TLS certificate from {self.address}: {exc}",
                ) from exc
            try:
                # Checked at every fetch, not only when it changed: a revocation published
                # meanwhile is seen at the next reconnection.
                pem = self._accept(der)
            except VeilError as exc:
                log.warning(
                    json.dumps(
                        {
                            "event": "server certificate refused",
                            "server": self.address,
                            "reason": str(exc),
                        }
                    )
                )
                raise PinFailed(
                    grpc.StatusCode.UNAUTHENTICATED, f"server certificate refused: {exc}"
                ) from exc
            if self._channel is None or der != self._pinned:
                previous = self._channel
                self._channel = open_channel(self.address, self.credentials, server_certificate=pem)
                self._pinned = der
                if previous is not None:
                    previous.close()
            self._stale = False
            return self._channel

    def failed(self, exc: grpc.RpcError) -> None:
        """Note a failed call: after UNAVAILABLE the next call fetches the certificate again."""
        code = getattr(exc, "code", None)
        if callable(code) and code() == grpc.StatusCode.UNAVAILABLE:
            with self._lock:
                self._stale = True

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> _PinnedMethod:
        return _PinnedMethod(self, "unary_unary", method, args, kwargs)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> _PinnedMethod:
        return _PinnedMethod(self, "unary_stream", method, args, kwargs)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> _PinnedMethod:
        return _PinnedMethod(self, "stream_unary", method, args, kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> _PinnedMethod:
        return _PinnedMethod(self, "stream_stream", method, args, kwargs)

    def subscribe(self, callback: Callable[[Any], None], try_to_connect: bool = False) -> None:
        self.pin().subscribe(callback, try_to_connect=try_to_connect)

    def unsubscribe(self, callback: Callable[[Any], None]) -> None:
        if self._channel is not None:
            self._channel.unsubscribe(callback)

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
            self._channel, self._pinned, self._stale = None, None, True

    def __enter__(self) -> PinnedChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _PinnedMethod:
    """A method of a `PinnedChannel`: each call goes over the channel pinned at that time."""

    def __init__(
        self,
        owner: PinnedChannel,
        kind: str,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self._owner = owner
        self._kind = kind
        self._method = method
        self._args = args
        self._kwargs = kwargs

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        channel = self._owner.pin()
        call = getattr(channel, self._kind)(self._method, *self._args, **self._kwargs)
        try:
            result = call(*args, **kwargs)
        except grpc.RpcError as exc:
            self._owner.failed(exc)
            raise
        if self._kind.endswith("_stream"):
            return self._watch(result)
        return result

    def _watch(self, stream: Iterator[Any]) -> Iterator[Any]:
        try:
            yield from stream
        except grpc.RpcError as exc:
            self._owner.failed(exc)
            raise


def _host_port(address: str) -> tuple[str, int]:
    """(host, port) of ``host:port`` or ``[v6 address]:port``; UserError otherwise."""
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit():
        raise UserError(f"the server address must be host:port, got '{address}'")
    return host, int(port)


class Reconnection:
    """What a member does when a call to the coordinator fails (`run_client`'s policy).

    `failed(exc)` after a failed call: a refusal (any status but UNAVAILABLE,
    DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED, which waits a second) raises `ConnectionFailed`
    at once, in one line. Otherwise `diagnose`
    looks at the `endpoint` (when given): a certificate problem (whose certificate, and why)
    raises `ConnectionFailed` at once; a coordinator that does not answer gets one log line per
    attempt (``cannot reach the coordinator at HOST:PORT (connection refused); retry 3 in
    4.0 s, giving up in 110 s``) and a wait, doubling with jitter up to a cap, until
    `timeout_s` have passed since the last contact (`reached`), and then `ConnectionFailed`.
    """

    def __init__(self, endpoint: Endpoint | None, timeout_s: float) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._where = f"the coordinator at {endpoint.address}" if endpoint else "the coordinator"
        self.reached()

    def reached(self) -> None:
        """Note a call that reached the coordinator: the next failure starts afresh."""
        self._last_contact = time.monotonic()
        self._attempt = 0
        self._wait_s = _FIRST_RETRY_S

    def failed(self, exc: grpc.RpcError) -> None:
        """Return when it is time to call again; raise `ConnectionFailed` when retrying cannot
        help (PinFailed as it is, for a refused pinned certificate)."""
        self.refused(exc)
        found = diagnose(self.endpoint) if self.endpoint is not None else None
        if found is not None and not found.retry:
            raise ConnectionFailed(found.reason, exc.code()) from None
        reason = found.reason if found else f"cannot reach {self._where} ({_last_error(exc)})"
        left = self.timeout_s - (time.monotonic() - self._last_contact)
        if left <= 0:
            raise ConnectionFailed(
                f"{reason}; gave up after {self.timeout_s:g} s without reaching it: check that "
                "the coordinator runs at that address and this machine can reach it, or raise "
                "[deployment] reconnect_timeout_s",
                exc.code(),
            ) from None
        self._attempt += 1
        wait_s = min(left, random.uniform(self._wait_s / 2, self._wait_s))
        log.warning(f"{reason}; retry {self._attempt} in {wait_s:.1f} s, giving up in {left:.0f} s")
        self._wait_s = min(self._wait_s * 2, _MAX_RETRY_S)
        time.sleep(wait_s)

    def refused(self, exc: grpc.RpcError) -> None:
        """Raise `ConnectionFailed` if `exc` is a refusal that retrying cannot fix."""
        code = exc.code()
        if code in _RETRYABLE:
            return
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            # The coordinator still holds this member's earlier call (an upload cut mid-stream
            # stays open on its side until its idle timeout): not a refusal, wait and retry.
            log.warning(f"{self._where} is busy with this member's earlier call; retrying")
            time.sleep(random.uniform(_FIRST_RETRY_S / 2, _FIRST_RETRY_S))
            return
        if isinstance(exc, PinFailed):
            raise exc
        details = exc.details() or ""
        if "revoked" in details:
            raise ConnectionFailed(
                f"{self._where} refuses this member's certificate: it is revoked; ask the CA "
                "operator for a new one (`veil pki request`, then `veil pki sign`)",
                code,
            ) from None
        raise ConnectionFailed(
            f"{self._where} refuses this member ({code.name}: {details})", code
        ) from None


def _last_error(exc: grpc.RpcError) -> str:
    """The end of gRPC's details ("...; last error: ...: Socket closed" -> "socket closed")."""
    details = str(exc.details() or exc.code().name).rsplit(": ", 1)[-1]
    return details[:1].lower() + details[1:]


class JoinRefused(UserError):
    """The coordinator refused this member at `Join`: its model layout, data schema or config
    differs from the coordinator's (the message names what, in one line). Not retried."""


class _Member:
    """A member's calls to the coordinator: `Join` before its first task (and again when the
    coordinator answers a task poll with "join first", e.g. after a restart), and a heartbeat
    every `heartbeat_s` from a background thread until `stop`, also while the member trains
    (at least three per the coordinator's `liveness_s`, which it states at join)."""

    def __init__(
        self,
        channel: grpc.Channel,
        name: str,
        fingerprint: Fingerprint | None,
        heartbeat_s: float | None,
    ) -> None:
        self._stub = pb_grpc.FederationStub(channel)  # type: ignore[no-untyped-call]
        self.name = name
        self._fingerprint = json.dumps(fingerprint.to_json() if fingerprint else None)
        self._joined = False
        self._interval = heartbeat_s
        self._stopped = threading.Event()
        if heartbeat_s is not None:
            threading.Thread(target=self._beat, name=f"heartbeat-{name}", daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()

    def GetTask(self, request: pb.TaskRequest) -> Iterator[pb.Chunk]:
        """The task stream, after joining if the member has not joined yet."""
        if not self._joined:
            self.join()
        stream = self._stub.GetTask(request)
        try:
            first = next(stream, None)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            self._joined = False  # the coordinator does not know this member (any more)
            self.join()
            stream = self._stub.GetTask(request)
            first = next(stream, None)
        if first is not None:
            yield first
            yield from stream

    def Upload(self, chunks: Iterator[pb.Chunk]) -> pb.UploadReply:
        return self._stub.Upload(chunks)  # type: ignore[no-any-return]

    def join(self) -> None:
        """Join with this member's fingerprint; `JoinRefused` with the coordinator's reason."""
        request = pb.JoinRequest(client=self.name, json=self._fingerprint)
        reply = self._stub.Join(request, timeout=30)
        if not reply.accepted:
            reason = " ".join(reply.reason.split())[:2000]  # one line, whatever it sent
            raise JoinRefused(
                f"the coordinator refused '{self.name}' at join: {reason}; make this "
                "member's data, model and config match the federation's"
            )
        self._joined = True
        if reply.liveness_s > 0 and self._interval is not None:
            self._interval = min(self._interval, reply.liveness_s / 3)
        log.info(json.dumps({"event": "joined", "client": self.name}))

    def _beat(self) -> None:
        while self._interval is not None and not self._stopped.wait(self._interval):
            try:
                reply = self._stub.Heartbeat(
                    pb.HeartbeatRequest(client=self.name), timeout=max(1.0, self._interval)
                )
                if self._joined and not reply.joined:
                    # The coordinator restarted: join again now, not after the task loop's
                    # backoff, or a live member is dropped from every step as "not joined".
                    self._joined = False
                    self.join()
            except JoinRefused:
                return  # the task loop joins again and reports the refusal
            except grpc.RpcError:
                pass  # the task loop reports a coordinator it cannot reach
            except ValueError:
                return  # the channel was closed


def run_client(
    channel: grpc.Channel,
    runner: ClientRunner,
    model: nn.Module,
    identity: IdentityKey,
    *,
    poll_s: float = 10.0,
    reconnect_timeout_s: float = 120.0,
    on_revocations: Callable[[bytes], object] | None = None,
    endpoint: Endpoint | None = None,
    fingerprint: Fingerprint | None = None,
    heartbeat_s: float | None = 2.0,
    task_guard: TaskCheck | None = None,
) -> int:
    """Serve tasks until the server says the run is done; returns the number of tasks done.

    The member first joins with its `fingerprint` (`veil.federation.fingerprint`; a coordinator
    that checks them refuses a member without one): `JoinRefused` (a UserError, not retried)
    when the coordinator's differs. It joins again when the coordinator no longer knows it (a
    restarted coordinator), and sends a heartbeat every `heartbeat_s` (None: none) from a
    background thread until it returns, also while it trains.

    `on_revocations` receives the revocation list (PEM) that comes with each task before the
    task is done (a member's `veil.crypto.trust.TrustStore.accept_revocations`); a VeilError
    from it (a list the CA did not sign, or older than one already seen) refuses the task.
    `task_guard` then sees each task's kind and metadata before it is done (a site's
    `veil.sites.policy.TaskGuard`); a VeilError from it refuses the task with its message.

    `endpoint` (the channel's address and the member's TLS files) lets a failed connection be
    diagnosed (`Reconnection`); without it only "cannot reach" is reported, and a
    `PinnedChannel`'s address is probed. Raises `ConnectionFailed` (a UserError, one line) for
    a refusal or a certificate problem, at once, or after `reconnect_timeout_s` without
    reaching the server; `PinFailed` when a pinned server certificate is refused.
    """
    member = _Member(channel, runner.name, fingerprint, heartbeat_s)
    try:
        return _serve_tasks(
            member,
            channel,
            runner,
            model,
            identity,
            poll_s=poll_s,
            reconnect_timeout_s=reconnect_timeout_s,
            on_revocations=on_revocations,
            endpoint=endpoint,
            task_guard=task_guard,
        )
    finally:
        member.stop()


def _serve_tasks(
    stub: _Member,
    channel: grpc.Channel,
    runner: ClientRunner,
    model: nn.Module,
    identity: IdentityKey,
    *,
    poll_s: float,
    reconnect_timeout_s: float,
    on_revocations: Callable[[bytes], object] | None,
    endpoint: Endpoint | None,
    task_guard: TaskCheck | None = None,
) -> int:
    """`run_client`'s task loop, its calls made through `stub`."""
    done = 0
    if endpoint is None and isinstance(channel, PinnedChannel):
        endpoint = Endpoint(channel.address, pinned=True)
    connection = Reconnection(endpoint, reconnect_timeout_s)
    # The signed answer whose upload has not been acknowledged, by its task's nonce: when the
    # connection breaks mid-upload the coordinator hands out the same task again, and the member
    # sends the same bytes rather than computing it again (a SecAgg step runs once per round).
    unsent: tuple[str, list[pb.Chunk]] | None = None
    while True:
        try:
            task = decode(stub.GetTask(pb.TaskRequest(client=runner.name, wait_s=poll_s)))
        except grpc.RpcError as exc:
            connection.failed(exc)
            continue
        connection.reached()
        if task.kind == "done":
            log.info(json.dumps({"event": "done", "client": runner.name, "tasks": done}))
            return done
        if task.kind == "wait":
            continue
        nonce = str(task.meta.get("nonce"))
        if unsent is not None and unsent[0] == nonce:
            upload = unsent[1]
            log.info(json.dumps({"event": "resending", "client": runner.name}))
        else:
            upload = _answer(task, runner, model, identity, on_revocations, task_guard)
        unsent = (nonce, upload)
        try:
            reply = stub.Upload(iter(upload))
        except grpc.RpcError as exc:
            connection.refused(exc)
            continue  # the server went away mid-round; the next task comes after it is back
        unsent = None
        done += 1
        log.info(
            json.dumps(
                {
                    "event": "uploaded",
                    "client": runner.name,
                    "round": task.meta.get("round"),
                    "accepted": reply.accepted,
                    "reason": reply.reason,
                }
            )
        )


def _answer(
    task: Message,
    runner: ClientRunner,
    model: nn.Module,
    identity: IdentityKey,
    on_revocations: Callable[[bytes], object] | None = None,
    task_guard: TaskCheck | None = None,
) -> list[pb.Chunk]:
    meta = task.meta
    base = {
        "run_id": meta["run_id"],
        "round": meta["round"],
        "nonce": meta["nonce"],
        "client": runner.name,
    }
    try:
        revocations = meta.get("revocations")
        if on_revocations is not None and isinstance(revocations, str):
            on_revocations(revocations.encode("ascii"))
        if task_guard is not None:
            task_guard(task.kind, meta)
        kind, out_meta, arrays = _work(task, runner, model)
    except VeilError as exc:
        # Refuse out loud (e.g. a SecAgg step that would be unsafe): the server records why at
        # once instead of waiting for the round's deadline.
        log.warning(json.dumps({"event": "refused", "task": task.kind, "reason": str(exc)}))
        kind, out_meta, arrays = "refused", {"reason": str(exc)}, {}
    out_meta = {**base, **out_meta}
    signature = identity.sign(signing_payload("veil-message", kind, digest(kind, out_meta, arrays)))
    return list(encode(kind, out_meta, arrays, signature=signature))


def _work(
    task: Message, runner: ClientRunner, model: nn.Module
) -> tuple[str, dict[str, Any], dict[str, np.ndarray]]:
    """Do one task; returns the reply's kind, metadata (beyond run, round, nonce, client) and
    tensors."""
    meta = task.meta
    params = dict(task.arrays)
    if task.kind == "protocol":
        stage = str(meta["stage"])
        instruction = ProtocolInstruction(
            meta["run_id"], meta["round"], stage, params["body"].tobytes()
        )
        reply = runner.handle(instruction)
        return "protocol_result", {"stage": stage}, {"body": np.frombuffer(reply.body, np.uint8)}
    if task.kind == "fit":
        plan = TrainingPlan(**meta["plan"])
        result = runner.fit(model, FitInstruction(meta["run_id"], meta["round"], params, plan))
        out = {
            "weight": result.weight,
            "num_examples": result.num_examples,
            "metrics": result.metrics,
            "sums": result.sums,
        }
        return "fit_result", out, dict(result.update)
    ev = runner.evaluate(model, EvaluateInstruction(meta["run_id"], meta["round"], params))
    return "evaluate_result", {"num_examples": ev.num_examples, "metrics": ev.metrics}, {}
