"""The server side of the deployment transport: a `ClientGateway` served over gRPC.

Clients long-poll `GetTask`; the federation loop (on its own thread) puts a task in a client's
mailbox and waits for its `Upload` until the round's deadline. Every upload must come over a
connection whose certificate names the client (mutual TLS), carry the nonce of that client's
current task (so a replayed or stale upload is refused), be signed with the client's Ed25519
identity key, and pass the update checks (names, shapes, dtypes, finite values, norm bound).
The reason for a refusal goes back to the client and into the log.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
import numpy as np
from cryptography import x509

from veil.crypto.identity import IdentityPublicKey, SignatureRejected
from veil.crypto.revocation import load_revocations
from veil.errors import VeilError
from veil.federation.messages import (
    ClientFailure,
    EvaluateInstruction,
    EvaluateResult,
    FitInstruction,
    FitResult,
    ProtocolInstruction,
    ProtocolReply,
)
from veil.federation.pipeline import MAX_WEIGHT
from veil.tensors import NamedArrays, check_compatible, l2_norm
from veil.transport.grpc import veil_pb2 as pb
from veil.transport.grpc import veil_pb2_grpc as pb_grpc
from veil.transport.grpc.codec import (
    MalformedMessage,
    Message,
    data_chunks,
    decode,
    encode,
    header_chunk,
)

log = logging.getLogger("veil.server")

#: gRPC keeps a connection alive with pings; without them an idle long-poll may be cut.
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


#: The tensor that carries a protocol step's body (raw bytes as uint8).
PROTOCOL_BODY = "body"
#: The largest number of examples, and magnitude of a metric or summed scalar, an upload may
#: state.
MAX_COUNT = 1 << 40
MAX_SCALAR = 1e15
#: At most this many metrics or summed scalars per upload.
MAX_SCALARS = 64
#: Signed answers to one task refused for their content before the task is closed (the client
#: is then dropped from the round at once, with the reason).
MAX_REFUSED_UPLOADS = 3


class UploadRefused(ValueError):
    """An answer to an open task whose content the server refuses (the reason)."""


Reply = FitResult | EvaluateResult | ProtocolReply | ClientFailure
#: A task's tensors: float32 parameters, or a protocol step's uint8 body.
Arrays = Mapping[str, np.ndarray]


@dataclass
class _Task:
    kind: str  # "fit" | "evaluate" | "protocol" | "done"
    round: int
    nonce: str
    meta: dict[str, Any]
    arrays: Arrays
    #: The arrays' data chunks, built once per round and shared by every client's task.
    data: list[pb.Chunk] = field(default_factory=list)
    #: Signed answers to this task refused for their content, and the last reason.
    refusals: int = 0
    last_refusal: str = ""


@dataclass
class _ClientState:
    task: _Task | None = None
    last_seen: float = 0.0
    used_nonces: set[str] = field(default_factory=set)


@dataclass
class ServerCredentials:
    """PEM bytes for mutual TLS, and the serials of revoked client certificates."""

    certificate: bytes
    private_key: bytes
    ca_certificate: bytes
    revoked: frozenset[int] = frozenset()


class GrpcGateway(pb_grpc.FederationServicer):
    """Serves clients over gRPC and implements the federation's `ClientGateway`."""

    def __init__(
        self,
        *,
        run_id: str,
        identities: Mapping[str, IdentityPublicKey],
        reference: NamedArrays,
        deadline_s: float,
        max_update_norm: float | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        revocations: Callable[[], bytes | None] | None = None,
    ) -> None:
        self.run_id = run_id
        self.identities = dict(identities)
        self.reference = reference
        self.deadline_s = deadline_s
        self.max_update_norm = max_update_norm
        self._clients = {name: _ClientState() for name in identities}
        self._lock = threading.Condition()
        self._results: queue.Queue[Reply] = queue.Queue()
        self._round = 0
        self._deadline = 0.0
        self._revoked: frozenset[int] = frozenset()
        self._secure = False
        self._server: grpc.Server | None = None
        self._on_event = on_event or (lambda event: None)
        #: Reads the CA's newest revocation list (PEM), handed to every member with every task.
        self._revocations = revocations
        self._checked_revocations = b""
        self._ca: x509.Certificate | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, address: str, credentials: ServerCredentials | None) -> int:
        """Listen on `address` (port 0: any free port); returns the port. Without credentials
        the channel is plaintext: development only."""
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max(8, 2 * len(self._clients) + 4)),
            options=[*CHANNEL_OPTIONS, ("grpc.max_receive_message_length", 8 << 20)],
        )
        pb_grpc.add_FederationServicer_to_server(self, server)  # type: ignore[no-untyped-call]
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            self._secure = True
            self._revoked = credentials.revoked
            self._ca = x509.load_pem_x509_certificate(credentials.ca_certificate)
            creds = grpc.ssl_server_credentials(
                [(credentials.private_key, credentials.certificate)],
                root_certificates=credentials.ca_certificate,
                require_client_auth=True,
            )
            port = server.add_secure_port(address, creds)
        server.start()
        self._server = server
        return int(port)

    def wait_for_clients(self, timeout_s: float) -> list[str]:
        """Block until every client has polled once, or `timeout_s` pass; returns the missing."""
        end = time.monotonic() + timeout_s
        with self._lock:
            while True:
                missing = [n for n, s in self._clients.items() if not s.last_seen]
                remaining = end - time.monotonic()
                if not missing or remaining <= 0:
                    return missing
                self._lock.wait(timeout=min(remaining, 0.5))

    def stop(self, grace_s: float = 2.0) -> None:
        if self._server is not None:
            self._server.stop(grace_s).wait()

    def finish(self, linger_s: float = 5.0) -> None:
        """Tell every client the run is over, and give them a moment to hear it."""
        with self._lock:
            for state in self._clients.values():
                state.task = _Task("done", self._round, "", {"run_id": self.run_id}, {})
            self._lock.notify_all()
        end = time.monotonic() + linger_s
        while time.monotonic() < end:
            with self._lock:
                if all(s.task is None for s in self._clients.values()):
                    return
            time.sleep(0.05)

    # -- ClientGateway ---------------------------------------------------------------------

    def fit(
        self, clients: Sequence[str], instruction: FitInstruction
    ) -> Iterator[FitResult | ClientFailure]:
        meta = {"run_id": instruction.run_id, "plan": asdict(instruction.plan)}
        shared = list(data_chunks(instruction.parameters))
        tasks = {name: (meta, instruction.parameters, shared) for name in clients}
        yield from self._dispatch("fit", instruction.round, tasks)  # type: ignore[misc]

    def evaluate(
        self, clients: Sequence[str], instruction: EvaluateInstruction
    ) -> Iterator[EvaluateResult | ClientFailure]:
        meta = {"run_id": instruction.run_id}
        shared = list(data_chunks(instruction.parameters))
        tasks = {name: (meta, instruction.parameters, shared) for name in clients}
        yield from self._dispatch("evaluate", instruction.round, tasks)  # type: ignore[misc]

    def exchange(
        self, instructions: Mapping[str, ProtocolInstruction]
    ) -> Iterator[ProtocolReply | ClientFailure]:
        """One step of an aggregation protocol: each client gets its own body, carried as a
        uint8 tensor through the same signed, nonce-bound task and upload as a fit."""
        tasks: dict[str, tuple[dict[str, Any], Arrays, list[pb.Chunk]]] = {}
        rounds = {i.round for i in instructions.values()}
        if len(rounds) > 1:
            raise ValueError(f"one protocol step spans rounds {sorted(rounds)}")
        for name, ins in instructions.items():
            arrays = {PROTOCOL_BODY: np.frombuffer(ins.body, dtype=np.uint8)}
            meta = {"run_id": ins.run_id, "stage": ins.stage}
            tasks[name] = (meta, arrays, list(data_chunks(arrays)))
        if tasks:
            yield from self._dispatch("protocol", rounds.pop(), tasks)  # type: ignore[misc]

    def _dispatch(
        self,
        kind: str,
        round_: int,
        tasks: Mapping[str, tuple[dict[str, Any], Arrays, list[pb.Chunk]]],
    ) -> Iterator[Reply]:
        revocations = self._current_revocations()
        with self._lock:
            self._round = round_
            self._deadline = time.monotonic() + self.deadline_s
            for name, (meta, arrays, chunks) in tasks.items():
                nonce = secrets.token_hex(16)
                task_meta = {**meta, "round": round_, "nonce": nonce, "client": name}
                if revocations is not None:
                    task_meta["revocations"] = revocations
                self._clients[name].task = _Task(kind, round_, nonce, task_meta, arrays, chunks)
            self._lock.notify_all()
        pending = set(tasks)
        while pending:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                reply = self._results.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            if reply.client in pending and reply.round == round_:
                pending.discard(reply.client)
                yield reply
        refused: dict[str, str] = {}
        with self._lock:
            for name in tasks:
                task = self._clients[name].task
                if task is not None and task.round == round_ and task.kind == kind:
                    self._clients[name].task = None
                    self._clients[name].used_nonces.add(task.nonce)
                    if task.last_refusal:
                        refused[name] = task.last_refusal
        for name in sorted(pending):
            reason = f"missed the deadline: no {kind} result within {self.deadline_s:g} s"
            if name in refused:
                reason += f" (its last upload was refused: {refused[name]})"
            self._event("dropped", client=name, round=round_, reason=reason)
            yield ClientFailure(name, round_, reason)

    # -- RPCs ------------------------------------------------------------------------------

    def GetTask(self, request: pb.TaskRequest, context: grpc.ServicerContext) -> Iterator[pb.Chunk]:
        name = self._authenticate(request.client, context)
        wait = min(max(request.wait_s, 0.0), 30.0)
        end = time.monotonic() + wait
        with self._lock:
            state = self._clients[name]
            state.last_seen = time.time()
            self._lock.notify_all()  # wakes `wait_for_clients`
            while state.task is None and time.monotonic() < end:
                self._lock.wait(timeout=max(0.0, end - time.monotonic()))
            task = state.task
            if task is not None and task.kind == "done":
                state.task = None
        if task is None:
            yield from encode("wait", {"run_id": self.run_id})
            return
        yield header_chunk(task.kind, task.meta, task.arrays)
        yield from task.data

    def Upload(
        self, request_iterator: Iterator[pb.Chunk], context: grpc.ServicerContext
    ) -> pb.UploadReply:
        name = self._authenticate(None, context)  # aborts the call for a stranger
        try:
            return self._upload(name, request_iterator)
        except Exception as exc:  # never gRPC UNKNOWN: every failure is a refusal with a reason
            log.exception("upload from %s could not be checked", name)
            return self._refuse(name, f"upload could not be checked: {type(exc).__name__}: {exc}")

    def _upload(self, name: str, request_iterator: Iterator[pb.Chunk]) -> pb.UploadReply:
        """Check one upload; only an accepted one consumes its task's nonce, so a refused
        upload may be retried (at most `MAX_REFUSED_UPLOADS` times per task)."""
        try:
            message = decode(request_iterator, max_bytes=_limit(self.reference))
        except MalformedMessage as exc:
            return self._refuse(name, f"malformed upload: {exc}")
        meta = message.meta
        if meta.get("client") != name:
            return self._refuse(name, f"upload names client {str(meta.get('client'))[:100]!r}")
        try:
            self.identities[name].verify(message.signature, message.signed_payload())
        except SignatureRejected:
            return self._refuse(name, "signature does not verify with the client's identity key")
        with self._lock:
            state = self._clients[name]
            task = state.task
            nonce = meta.get("nonce")
            if not isinstance(nonce, str):
                return self._refuse(name, "the upload carries no nonce")
            if nonce in state.used_nonces:
                return self._refuse(name, "replayed upload (nonce already used)")
            if task is None or task.kind == "done" or nonce != task.nonce:
                return self._refuse(name, "stale or unknown task (no open task with this nonce)")
            answers = {f"{task.kind}_result", "refused"}
            if message.kind not in answers or meta.get("round") != task.round:
                return self._refuse(name, f"a {message.kind} does not answer a {task.kind} task")
        # The signed answer to the open task: check its content before it consumes the nonce.
        try:
            reply = self._reply(name, task, message)
        except UploadRefused as exc:
            return self._refuse_attempt(name, task, str(exc))
        with self._lock:
            if state.task is not task or task.nonce in state.used_nonces:
                return self._refuse(name, "stale or unknown task (no open task with this nonce)")
            state.used_nonces.add(task.nonce)
            state.task = None
            state.last_seen = time.time()
            self._results.put(reply)
        if isinstance(reply, ClientFailure):
            self._event("client refused", client=name, round=task.round, reason=reply.reason)
        else:
            self._event("accepted", client=name, round=task.round, kind=message.kind)
        return pb.UploadReply(accepted=True, reason="")

    def _reply(self, name: str, task: _Task, message: Message) -> Reply:
        """What a signed answer to `task` says, after checking every tensor and metadata
        number; `UploadRefused` with the reason otherwise."""
        meta = message.meta
        if message.kind == "refused":
            what = task.meta["stage"] if task.kind == "protocol" else task.kind
            return ClientFailure(
                name, task.round, f"refused {what}: {str(meta.get('reason', ''))[:500]}"
            )
        if message.kind == "protocol_result":
            body = message.arrays.get(PROTOCOL_BODY)
            if (
                meta.get("stage") != task.meta["stage"]
                or set(message.arrays) != {PROTOCOL_BODY}
                or body is None
                or body.dtype != np.uint8
                or body.ndim != 1
            ):
                raise UploadRefused(f"not an answer to the '{task.meta['stage']}' step")
            return ProtocolReply(name, task.round, task.meta["stage"], body.tobytes())
        if message.kind == "fit_result":
            problem = self._check_update(message.arrays)
            if problem:
                raise UploadRefused(f"update rejected: {problem}")
            return FitResult(
                client=name,
                round=task.round,
                update=dict(message.arrays),
                weight=_number(meta, "weight", low=0.0, high=MAX_WEIGHT),
                num_examples=_count(meta, "num_examples"),
                metrics=_scalars(meta, "metrics"),
                sums=_scalars(meta, "sums"),
            )
        if message.arrays:
            raise UploadRefused("an evaluate result carries no tensors")
        return EvaluateResult(
            client=name,
            round=task.round,
            num_examples=_count(meta, "num_examples"),
            metrics=_scalars(meta, "metrics"),
        )

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusReply:
        # Members only: the member list and their liveness are not for any CA-signed stranger.
        self._authenticate(None, context)
        now = time.time()
        with self._lock:
            status = {
                "run_id": self.run_id,
                "round": self._round,
                "deadline_in_s": max(0.0, self._deadline - time.monotonic()),
                "clients": {
                    name: {
                        "connected": now - s.last_seen < 45,
                        "last_seen_s_ago": round(now - s.last_seen, 1) if s.last_seen else None,
                        "task": s.task.kind if s.task else None,
                    }
                    for name, s in self._clients.items()
                },
            }
        return pb.StatusReply(json=json.dumps(status))

    # -- checks ----------------------------------------------------------------------------

    def _current_revocations(self) -> str | None:
        """The newest revocation list as text for a task, after checking the CA signed it; the
        server also refuses the certificates on it from now on. Read on every task and every
        authentication, so a list published mid-run takes effect at the next call; checked
        only when its bytes change."""
        if self._revocations is None or self._ca is None:
            return None
        pem = self._revocations()
        if pem is None:
            return None
        if pem == self._checked_revocations:
            return pem.decode("ascii")
        try:
            listed = load_revocations(pem, self._ca)
        except VeilError as exc:
            self._event("revocation list refused", reason=str(exc))
            return None
        with self._lock:
            self._revoked = self._revoked | listed.serials
            self._checked_revocations = pem
        return pem.decode("ascii")

    def _authenticate(
        self, claimed: str | None, context: grpc.ServicerContext, *, allow_any: bool = False
    ) -> str:
        if self._secure:
            self._current_revocations()
            auth = context.auth_context()
            pem = (auth.get("x509_pem_cert") or [b""])[0]
            try:
                cert = x509.load_pem_x509_certificate(pem)
            except ValueError:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "no client certificate")
            names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
            name = str(names[0].value) if names else ""
            if cert.serial_number in self._revoked:
                self._event("refused", client=name, reason="revoked certificate")
                context.abort(grpc.StatusCode.PERMISSION_DENIED, "certificate revoked")
            if claimed and claimed != name:
                context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"certificate is for '{name}', request claims '{claimed}'",
                )
        else:
            name = claimed or ""
        if allow_any:
            return name
        if name not in self._clients:
            self._event("refused", client=name, reason="unknown client")
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"client '{name}' is not in this federation"
            )
        return name

    def _check_update(self, arrays: Mapping[str, np.ndarray]) -> str | None:
        for name, arr in arrays.items():
            expected = self.reference[name].dtype if name in self.reference else np.float32
            if arr.dtype != expected:
                return f"parameter '{name}' has dtype {arr.dtype}, expected {expected}"
        try:
            check_compatible(self.reference, arrays)
        except ValueError as exc:
            return str(exc)
        for name, arr in arrays.items():
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                return f"parameter '{name}' contains NaN or Inf"
        if self.max_update_norm is not None:
            norm = l2_norm(arrays)
            if norm > self.max_update_norm:
                return f"update norm {norm:.4g} exceeds the bound {self.max_update_norm:g}"
        return None

    def _refuse_attempt(self, name: str, task: _Task, reason: str) -> pb.UploadReply:
        """Refuse a signed answer to the open `task` whose content is unusable. The nonce stays
        open for a retry; after `MAX_REFUSED_UPLOADS` such refusals the task is closed and the
        client dropped from the round at once, with the reason."""
        with self._lock:
            state = self._clients[name]
            if state.task is task:
                task.refusals += 1
                task.last_refusal = reason
                if task.refusals >= MAX_REFUSED_UPLOADS:
                    state.task = None
                    state.used_nonces.add(task.nonce)
                    failure = f"{reason} ({task.refusals} uploads refused)"
                    self._results.put(ClientFailure(name, task.round, failure))
        return self._refuse(name, reason)

    def _refuse(self, name: str, reason: str) -> pb.UploadReply:
        reason = reason[:1000]
        self._event("refused", client=name, reason=reason)
        return pb.UploadReply(accepted=False, reason=reason)

    def _event(self, event: str, **fields: Any) -> None:
        record = {"event": event, "time": time.time(), **fields}
        log.info(json.dumps(record))
        self._on_event(record)


def _number(meta: Mapping[str, Any], key: str, *, low: float, high: float) -> float:
    """`meta[key]` as a float: a JSON number (not a string, not a bool), finite, in [low, high]."""
    value = meta.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UploadRefused(f"'{key}' must be a number, got {str(value)[:50]!r}")
    number = float(value) if isinstance(value, float) or abs(value) < 1 << 63 else math.inf
    if not math.isfinite(number) or not low <= number <= high:
        raise UploadRefused(f"'{key}' must be a finite number in [{low:g}, {high:g}], got {number}")
    return number


def _count(meta: Mapping[str, Any], key: str) -> int:
    """`meta[key]` as a non-negative JSON integer of at most `MAX_COUNT`."""
    value = meta.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise UploadRefused(
            f"'{key}' must be an integer in [0, {MAX_COUNT}], got {str(value)[:50]!r}"
        )
    return value


def _scalars(meta: Mapping[str, Any], key: str) -> dict[str, float]:
    """`meta[key]` (absent: empty) as named finite numbers of magnitude at most `MAX_SCALAR`."""
    values = meta.get(key, {})
    if not isinstance(values, dict) or len(values) > MAX_SCALARS:
        raise UploadRefused(f"'{key}' must be an object of at most {MAX_SCALARS} numbers")
    return {str(k): _number(values, k, low=-MAX_SCALAR, high=MAX_SCALAR) for k in values}


def _limit(reference: NamedArrays) -> int:
    # An honest update is as large as the model; allow float64 plus headroom, refuse more.
    return 2 * sum(a.nbytes for a in reference.values()) + (1 << 20)
