"""The server side of the deployment transport: a `ClientGateway` served over gRPC.

Clients long-poll `GetTask`; the federation loop (on its own thread) puts a task in a client's
mailbox and waits for its `Upload` until the round's deadline. Every upload must come over a
connection whose certificate names the client (mutual TLS), carry the nonce of that client's
current task (so a replayed or stale upload is refused), be signed with the client's Ed25519
identity key, and pass the update checks (names, shapes, dtypes, finite values, norm bound).
The reason for a refusal goes back to the client and into the log.

What one member can cost the server is bounded, so that a hostile or broken member cannot take
the honest members' turn: at most `CALL_LIMITS` concurrent calls of each kind per member (a call
over the limit is refused at once, before its body is read), a worker thread for each of them
(`CALL_LIMITS` times the members, plus spares), an idle and a total deadline per stream (a
watchdog thread cancels a stream that goes `upload_idle_s` without a chunk or runs longer than
`upload_timeout_s`), and at most the reference's size plus `HEADER_ALLOWANCE` bytes reserved per
upload. A member must `Join` first (its fingerprints must equal the coordinator's, see
`veil.federation.fingerprint`), and one that has not joined, or has been silent (no call, no
heartbeat) for `liveness_s`, is dropped from a step at once instead of at the round's deadline.
"""

from __future__ import annotations

import contextlib
import functools
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
from typing import Any, TypeVar

import grpc
import numpy as np
from cryptography import x509

from veil.crypto import pki
from veil.crypto.identity import IdentityPublicKey, SignatureRejected
from veil.crypto.revocation import load_revocations
from veil.errors import VeilError
from veil.federation.fingerprint import (
    Declared,
    Fingerprint,
    MalformedFingerprint,
    describe,
    differences,
)
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
#: Concurrent calls one member may have open, by kind: one upload; two task polls (one may be a
#: poll the member gave up on that the server has not yet seen end); two short calls (Join,
#: Heartbeat, Status). A call over its limit is refused at once.
CALL_LIMITS = {"upload": 1, "poll": 2, "short": 2}
#: Worker threads beyond the members' limits: for calls that are refused at once (strangers,
#: calls over a limit) and the server's own bookkeeping.
SPARE_WORKERS = 8
#: Bytes an upload may announce beyond the reference's size: a protocol step's body (SecAgg's
#: keys and shares) when the model is tiny.
HEADER_ALLOWANCE = 1 << 20
#: The largest single message the server reads (data chunks are 1 MiB).
MAX_MESSAGE_BYTES = 4 << 20
#: How often a step re-checks its pending members' liveness, at most.
LIVENESS_CHECK_S = 0.25


class UploadRefused(VeilError, ValueError):
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
    #: `time.monotonic()` of the member's latest call of any kind; None: it never called.
    last_seen: float | None = None
    used_nonces: set[str] = field(default_factory=set)
    #: Whether its latest Join was accepted, and else why it was refused.
    joined: bool = False
    join_refused: str = ""
    #: What the member declared about its data when it joined (None: not declared).
    declared: Declared | None = None
    #: Calls open now, by `CALL_LIMITS` kind.
    calls: dict[str, int] = field(default_factory=dict)
    #: Task polls started so far: a poll still waiting when a newer one starts ends at once.
    polls: int = 0


class _Slot:
    """One of a member's `CALL_LIMITS` slots, held by one call; `release` is idempotent (a call
    releases it when its handler ends and again when the RPC terminates, whichever is first)."""

    def __init__(self, gateway: GrpcGateway, name: str, kind: str) -> None:
        self._gateway, self._name, self._kind = gateway, name, kind
        self._held = True

    def release(self) -> None:
        with self._gateway._lock:
            if self._held:
                self._held = False
                self._gateway._clients[self._name].calls[self._kind] -= 1
                if self._kind == "poll":
                    self._gateway._lock.notify_all()  # a newer poll may wait for this slot


class _Watch:
    """A stream the watchdog cancels once it is idle for `idle_s` or open for `total_s`."""

    def __init__(self, context: grpc.ServicerContext, what: str, idle_s: float, total_s: float):
        self.context = context
        self.what = what
        self.idle_s = idle_s
        self.total_s = total_s
        self.started = self.last = time.monotonic()
        #: Why the watchdog cancelled the stream ("" while it has not).
        self.fired = ""

    def touch(self) -> None:
        self.last = time.monotonic()

    def overdue(self, now: float) -> str:
        if now - self.last > self.idle_s:
            return f"{self.what} idle: nothing for {self.idle_s:g} s (upload_idle_s)"
        if now - self.started > self.total_s:
            return f"{self.what} took longer than {self.total_s:g} s (upload_timeout_s)"
        return ""

    def chunks(self, stream: Iterator[pb.Chunk]) -> Iterator[pb.Chunk]:
        """`stream`, noting each chunk's arrival; `StreamCancelled` if the watchdog cut it (a
        cut stream may look like one that ended)."""
        for chunk in stream:
            self.touch()
            yield chunk
        if self.fired:
            raise StreamCancelled(self.fired)


class StreamCancelled(VeilError):
    """The watchdog cancelled the stream being read (the reason)."""


_Request = TypeVar("_Request")
_Reply = TypeVar("_Reply")
_Handler = Callable[["GrpcGateway", _Request, grpc.ServicerContext], _Reply]


def _refusing(handler: _Handler[_Request, _Reply]) -> _Handler[_Request, _Reply]:
    """`handler`, with a `VeilError` it raises turned into a refusal: FAILED_PRECONDITION with
    the error's message, not gRPC's UNKNOWN and a traceback in the server's log."""

    @functools.wraps(handler)
    def refusing(self: GrpcGateway, request: _Request, context: grpc.ServicerContext) -> _Reply:
        try:
            return handler(self, request, context)
        except VeilError as exc:
            self._event("refused", reason=str(exc)[:1000])
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc)[:1000])
            raise  # unreachable: abort raises

    return refusing


def _refusing_stream(
    handler: _Handler[_Request, Iterator[_Reply]],
) -> _Handler[_Request, Iterator[_Reply]]:
    """`_refusing` for a handler that streams its reply."""

    @functools.wraps(handler)
    def refusing(
        self: GrpcGateway, request: _Request, context: grpc.ServicerContext
    ) -> Iterator[_Reply]:
        try:
            yield from handler(self, request, context)
        except VeilError as exc:
            self._event("refused", reason=str(exc)[:1000])
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc)[:1000])

    return refusing


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
        upload_idle_s: float = 10.0,
        upload_timeout_s: float = 300.0,
        liveness_s: float | None = None,
        fingerprint: Fingerprint | None = None,
    ) -> None:
        """`liveness_s`: drop a member silent this long from a step at once (None: only the
        deadline drops members). `fingerprint`: the coordinator's own (`veil.federation.
        fingerprint`); with it every member must `Join` with an equal one before it gets a
        task (None: no join needed, for tests of the transport alone)."""
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
        self.upload_idle_s = upload_idle_s
        self.upload_timeout_s = upload_timeout_s
        self.liveness_s = liveness_s
        self.fingerprint = fingerprint
        self._watches: set[_Watch] = set()
        self._watch_lock = threading.Lock()
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, address: str, credentials: ServerCredentials | None) -> int:
        """Listen on `address` (port 0: any free port); returns the port. Without credentials
        the channel is plaintext: development only."""
        # A thread for every call the members' limits allow: a member can only wait for its
        # own calls, never for a thread that another member holds.
        workers = len(self._clients) * sum(CALL_LIMITS.values()) + SPARE_WORKERS
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers),
            options=[*CHANNEL_OPTIONS, ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)],
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
        self._watchdog = threading.Thread(target=self._watch_streams, daemon=True)
        self._watchdog.start()
        return int(port)

    def declarations(self) -> dict[str, Declared]:
        """What each member that joined declared about its data (`Declared`), by name."""
        with self._lock:
            return {n: s.declared for n, s in self._clients.items() if s.declared is not None}

    def wait_for_clients(self, timeout_s: float) -> list[str]:
        """Block until every client has polled once (joined, when fingerprints are checked),
        or `timeout_s` pass; returns the missing. A heartbeat alone does not count: a member
        that has not joined yet would be dropped from the first step."""
        end = time.monotonic() + timeout_s
        with self._lock:
            while True:
                missing = [
                    n
                    for n, s in self._clients.items()
                    if s.last_seen is None or (self.fingerprint is not None and not s.joined)
                ]
                remaining = end - time.monotonic()
                if not missing or remaining <= 0:
                    return missing
                self._lock.wait(timeout=min(remaining, 0.5))

    def stop(self, grace_s: float = 2.0) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.stop(grace_s).wait()

    def finish(self, linger_s: float = 5.0) -> None:
        """Tell every client the run is over, and give those that are still there (joined, not
        silent) a moment to hear it."""
        with self._lock:
            for state in self._clients.values():
                state.task = _Task("done", self._round, "", {"run_id": self.run_id}, {})
            self._lock.notify_all()
        end = time.monotonic() + linger_s
        while time.monotonic() < end:
            with self._lock:
                now = time.monotonic()
                if all(
                    s.task is None or self._unreachable(n, now) for n, s in self._clients.items()
                ):
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
        """Give each member its task and yield the replies until the deadline. A member that
        has not joined or is silent gets no task and fails at once; one that falls silent while
        the step waits for it is dropped as soon as it has been silent for `liveness_s`."""
        revocations = self._current_revocations()
        absent: dict[str, str] = {}
        with self._lock:
            self._round = round_
            self._deadline = time.monotonic() + self.deadline_s
            now = time.monotonic()
            for name, (meta, arrays, chunks) in tasks.items():
                why = self._unreachable(name, now)
                if why:
                    absent[name] = why
                    continue
                nonce = secrets.token_hex(16)
                task_meta = {**meta, "round": round_, "nonce": nonce, "client": name}
                if revocations is not None:
                    task_meta["revocations"] = revocations
                self._clients[name].task = _Task(kind, round_, nonce, task_meta, arrays, chunks)
            self._lock.notify_all()
        for name in sorted(absent):
            yield self._drop(name, round_, absent[name])
        pending = set(tasks) - set(absent)
        while pending:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                break
            with contextlib.suppress(queue.Empty):
                reply = self._results.get(timeout=min(remaining, LIVENESS_CHECK_S))
                if reply.client in pending and reply.round == round_:
                    pending.discard(reply.client)
                    yield reply
            for name, why in self._lost(pending, kind, round_):
                pending.discard(name)
                yield self._drop(name, round_, why)
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

    def _unreachable(self, name: str, now: float) -> str:
        """Why member `name` cannot take a task now ("" if it can): it has not joined, or it
        has been silent for longer than `liveness_s`. Call with the lock held."""
        state = self._clients[name]
        if self.fingerprint is not None and not state.joined:
            if state.join_refused:
                return f"not joined: its Join was refused ({state.join_refused})"
            return "not joined: it has not called Join"
        if self.liveness_s is None:
            return ""
        if state.last_seen is None:
            return "silent: it never called"
        silence = now - state.last_seen
        if silence > self.liveness_s:
            return f"silent for {silence:.1f} s (liveness_s = {self.liveness_s:g})"
        return ""

    def _lost(self, pending: set[str], kind: str, round_: int) -> list[tuple[str, str]]:
        """The pending members that became unreachable, with the reason; their open tasks are
        closed (a member whose answer was accepted has no open task: its reply is queued)."""
        lost = []
        with self._lock:
            now = time.monotonic()
            for name in sorted(pending):
                state = self._clients[name]
                task = state.task
                if task is None or task.round != round_ or task.kind != kind:
                    continue
                why = self._unreachable(name, now)
                if why:
                    state.task = None
                    state.used_nonces.add(task.nonce)
                    lost.append((name, why))
        return lost

    def _drop(self, name: str, round_: int, reason: str) -> ClientFailure:
        self._event("dropped", client=name, round=round_, reason=reason)
        return ClientFailure(name, round_, reason)

    # -- RPCs ------------------------------------------------------------------------------

    @_refusing
    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        """Accept member `request.client` when its fingerprints equal the coordinator's; else
        refuse it with one line naming what differs (and log the coordinator's side of it)."""
        name = self._authenticate(request.client, context)
        with self._call(name, "short", context):
            here, there = "", ""
            declared = None
            if self.fingerprint is not None:
                try:
                    member = Fingerprint.from_json(json.loads(request.json))
                except (ValueError, MalformedFingerprint) as exc:
                    here = there = f"malformed join request: {str(exc)[:200]}"
                else:
                    declared = member.declared
                    found = differences(member, self.fingerprint)
                    if found:
                        here = describe(found, "coordinator", name)
                        there = describe(found, "member", name)
            with self._lock:
                state = self._clients[name]
                state.joined, state.join_refused = not here, here
                if not here and declared is not None:
                    state.declared = declared
            if here:
                self._event("join refused", client=name, reason=here)
                return pb.JoinReply(accepted=False, reason=there)
            self._event("joined", client=name)
            return pb.JoinReply(accepted=True, liveness_s=self.liveness_s or 0.0)

    @_refusing
    def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.ServicerContext
    ) -> pb.HeartbeatReply:
        """Proof of life: the call itself refreshes the member's `last_seen`."""
        name = self._authenticate(request.client, context)
        with self._call(name, "short", context), self._lock:
            joined = self.fingerprint is None or self._clients[name].joined
        return pb.HeartbeatReply(joined=joined)

    @_refusing_stream
    def GetTask(self, request: pb.TaskRequest, context: grpc.ServicerContext) -> Iterator[pb.Chunk]:
        name = self._authenticate(request.client, context)
        slot, poll = self._start_poll(name, context)
        try:
            task = self._poll(name, poll, min(max(request.wait_s, 0.0), 30.0), context)
            if task is None:
                yield from encode("wait", {"run_id": self.run_id})
                return
            watch = self._watch(context, "task stream")
            try:
                yield header_chunk(task.kind, task.meta, task.arrays)
                for chunk in task.data:
                    watch.touch()
                    yield chunk
            finally:
                self._unwatch(watch)
        finally:
            slot.release()

    def _start_poll(self, name: str, context: grpc.ServicerContext) -> tuple[_Slot, int]:
        """A poll slot and this poll's number. A newer poll supersedes the member's older ones
        that still wait (a member polls once at a time; an older poll is one it gave up on,
        e.g. across a network cut, that the server has not yet seen end): they end, and this
        one takes a slot as soon as one is free (RESOURCE_EXHAUSTED after a second)."""
        with self._lock:
            state = self._clients[name]
            state.polls += 1
            poll = state.polls
            self._lock.notify_all()
            end = time.monotonic() + 1.0
            while state.calls.get("poll", 0) >= CALL_LIMITS["poll"] and time.monotonic() < end:
                self._lock.wait(timeout=0.1)
            return self._acquire(name, "poll", context), poll

    def _poll(
        self, name: str, poll: int, wait_s: float, context: grpc.ServicerContext
    ) -> _Task | None:
        """The member's task, waiting up to `wait_s` for one (None: none came, the member went
        away, or polled again); FAILED_PRECONDITION for a member that has not joined."""
        end = time.monotonic() + wait_s
        with self._lock:
            state = self._clients[name]
            joined = self.fingerprint is None or state.joined
        if not joined:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "join first: call Join with this member's fingerprints before asking for tasks",
            )
        context.add_callback(self._wake)  # a member that goes away stops waiting at once
        with self._lock:
            while (
                state.task is None
                and state.polls == poll
                and time.monotonic() < end
                and context.is_active()
            ):
                self._lock.wait(timeout=max(0.0, end - time.monotonic()))
            if state.polls != poll:
                return None
            task = state.task
            if task is not None and task.kind == "done":
                state.task = None
        return task

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def Upload(
        self, request_iterator: Iterator[pb.Chunk], context: grpc.ServicerContext
    ) -> pb.UploadReply:
        name = self._authenticate(None, context)  # aborts the call for a stranger
        slot = self._try_acquire(name, "upload", context)
        if slot is None:  # refused before a byte of it is read
            return self._refuse(
                name, "another upload from this member is still open: one upload at a time"
            )
        watch = self._watch(context, "upload")
        try:
            return self._upload(name, watch.chunks(request_iterator))
        except Exception as exc:  # never gRPC UNKNOWN: every failure is a refusal with a reason
            if watch.fired:  # the client already has this reason, in the cancelled call's status
                return self._refuse(name, f"upload cancelled: {watch.fired}")
            if isinstance(exc, VeilError):  # refused on purpose: the message is the reason
                return self._refuse(name, str(exc))
            log.exception("upload from %s could not be checked", name)
            return self._refuse(name, f"upload could not be checked: {type(exc).__name__}: {exc}")
        finally:
            self._unwatch(watch)
            slot.release()

    def _upload(self, name: str, request_iterator: Iterator[pb.Chunk]) -> pb.UploadReply:
        """Check one upload; only an accepted one consumes its task's nonce, so a refused
        upload may be retried (at most `MAX_REFUSED_UPLOADS` times per task)."""
        try:
            message = decode(request_iterator, max_bytes=upload_limit(self.reference))
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
        except VeilError as exc:  # UploadRefused, or any deliberate refusal of the content
            return self._refuse_attempt(name, task, str(exc))
        with self._lock:
            if state.task is not task or task.nonce in state.used_nonces:
                return self._refuse(name, "stale or unknown task (no open task with this nonce)")
            state.used_nonces.add(task.nonce)
            state.task = None
            state.last_seen = time.monotonic()
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

    @_refusing
    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusReply:
        """The round and every member's state: `connected` (not silent: seen within
        `liveness_s`, or 45 s without a liveness bound), `joined`, and `absent`: why the member
        would be dropped from a step now (not joined, silent), or null."""
        # Members only: the member list and their liveness are not for any CA-signed stranger.
        name = self._authenticate(None, context)
        with self._call(name, "short", context), self._lock:
            now = time.monotonic()
            clients = {}
            for member, s in self._clients.items():
                ago = None if s.last_seen is None else now - s.last_seen
                absent = self._unreachable(member, now)
                silent = ago is None or ago > (self.liveness_s or 45.0)
                clients[member] = {
                    "connected": not silent,
                    "last_seen_s_ago": None if ago is None else round(ago, 1),
                    "joined": self.fingerprint is None or s.joined,
                    "absent": absent or None,
                    "task": s.task.kind if s.task else None,
                }
            status = {
                "run_id": self.run_id,
                "round": self._round,
                "deadline_in_s": max(0.0, self._deadline - now),
                "clients": clients,
            }
        return pb.StatusReply(json=json.dumps(status))

    # -- bounds ----------------------------------------------------------------------------

    def _try_acquire(self, name: str, kind: str, context: grpc.ServicerContext) -> _Slot | None:
        """One of member `name`'s `kind` slots for this call, released when the handler ends
        or the RPC terminates; None when all are taken."""
        with self._lock:
            calls = self._clients[name].calls
            if calls.get(kind, 0) >= CALL_LIMITS[kind]:
                return None
            calls[kind] = calls.get(kind, 0) + 1
        slot = _Slot(self, name, kind)
        if not context.add_callback(slot.release):
            slot.release()  # the RPC has already ended
        return slot

    def _acquire(self, name: str, kind: str, context: grpc.ServicerContext) -> _Slot:
        """`_try_acquire`, or RESOURCE_EXHAUSTED at once when all the slots are taken."""
        slot = self._try_acquire(name, kind, context)
        if slot is None:
            self._event("refused", client=name, reason=f"too many concurrent {kind} calls")
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"at most {CALL_LIMITS[kind]} concurrent {kind} calls per member",
            )
        return slot  # type: ignore[return-value]  # abort raises

    @contextlib.contextmanager
    def _call(self, name: str, kind: str, context: grpc.ServicerContext) -> Iterator[None]:
        slot = self._acquire(name, kind, context)
        try:
            yield
        finally:
            slot.release()

    def _watch(self, context: grpc.ServicerContext, what: str) -> _Watch:
        watch = _Watch(context, what, self.upload_idle_s, self.upload_timeout_s)
        with self._watch_lock:
            self._watches.add(watch)
        return watch

    def _unwatch(self, watch: _Watch) -> None:
        with self._watch_lock:
            self._watches.discard(watch)

    def _watch_streams(self) -> None:
        """The watchdog: cancels every watched stream that is overdue, with the reason."""
        period = min(0.25, self.upload_idle_s / 4)
        while not self._stopping.wait(period):
            now = time.monotonic()
            with self._watch_lock:
                overdue = [
                    (w, why) for w in self._watches if not w.fired and (why := w.overdue(now))
                ]
                for watch, why in overdue:
                    watch.fired = why
            for watch, why in overdue:
                _cancel(watch.context, grpc.StatusCode.DEADLINE_EXCEEDED, why)

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
            if not allow_any and _role(cert) != "client":
                # A submitter's (or a server's) certificate under a member's name: never a member.
                self._event("refused", client=name, reason="not a member certificate")
                context.abort(grpc.StatusCode.PERMISSION_DENIED, "a member certificate is required")
        else:
            name = claimed or ""
        if allow_any:
            return name
        if name not in self._clients:
            self._event("refused", client=name, reason="unknown client")
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"client '{name}' is not in this federation"
            )
        with self._lock:  # any call from a member is a sign of life
            state = self._clients[name]
            first = state.last_seen is None
            state.last_seen = time.monotonic()
            if first:
                self._lock.notify_all()  # wakes `wait_for_clients`
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


def upload_limit(reference: NamedArrays) -> int:
    """The most tensor bytes an upload may announce: the reference's size (an update must have
    its dtypes and shapes exactly) plus `HEADER_ALLOWANCE` for a protocol step's body."""
    return sum(a.nbytes for a in reference.values()) + HEADER_ALLOWANCE


def _cancel(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    """End a call from another thread than its handler's, with a status the peer sees.

    grpc's sync server has no public way to do this: `abort` only works on the handler's own
    thread, which is the one blocked reading the stream, and `cancel()` ends the call with a
    bare CANCELLED. The core call under the context can cancel with a status and details
    (grpc_call_cancel_with_status: the client sees `code` and the reason); where that is not
    available, plain `cancel()`. Either way the handler's read raises and its thread is free.
    """
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    try:
        call.cancel(code.value[0], details)  # type: ignore[union-attr]
    except Exception:  # another grpc version: the reason then stays in the server's log
        context.cancel()


def _role(cert: x509.Certificate) -> str | None:
    """The certificate's role (subject OU), None when it names none."""
    try:
        return pki.certificate_role(cert)
    except pki.CertificateRejected:
        return None
