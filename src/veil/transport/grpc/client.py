"""The client side of the deployment transport: poll for tasks, train, upload signed results.

The same `ClientRunner` as in simulation does the work. A client survives a server restart or a
network cut: it retries with backoff and rejoins at the next task, until `reconnect_timeout_s`
pass without reaching the server.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from torch import nn

from veil.crypto.identity import IdentityKey, signing_payload
from veil.errors import VeilError
from veil.federation.client import ClientRunner
from veil.federation.messages import (
    EvaluateInstruction,
    FitInstruction,
    ProtocolInstruction,
    TrainingPlan,
)
from veil.transport.grpc import veil_pb2 as pb
from veil.transport.grpc import veil_pb2_grpc as pb_grpc
from veil.transport.grpc.codec import Message, decode, digest, encode

log = logging.getLogger("veil.client")

_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


@dataclass(frozen=True)
class ClientCredentials:
    """PEM bytes for mutual TLS."""

    certificate: bytes
    private_key: bytes
    ca_certificate: bytes


def open_channel(address: str, credentials: ClientCredentials | None) -> grpc.Channel:
    """A channel to the server: mutual TLS, or plaintext when `credentials` is None (dev only)."""
    options = [
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.max_receive_message_length", 8 << 20),
    ]
    if credentials is None:
        return grpc.insecure_channel(address, options=options)
    creds = grpc.ssl_channel_credentials(
        root_certificates=credentials.ca_certificate,
        private_key=credentials.private_key,
        certificate_chain=credentials.certificate,
    )
    return grpc.secure_channel(address, creds, options=options)


def run_client(
    channel: grpc.Channel,
    runner: ClientRunner,
    model: nn.Module,
    identity: IdentityKey,
    *,
    poll_s: float = 10.0,
    reconnect_timeout_s: float = 120.0,
) -> int:
    """Serve tasks until the server says the run is done; returns the number of tasks done.

    Raises `grpc.RpcError` for a refusal that retrying cannot fix (e.g. a rejected certificate),
    or after `reconnect_timeout_s` without reaching the server.
    """
    stub = pb_grpc.FederationStub(channel)  # type: ignore[no-untyped-call]
    done = 0
    last_contact = time.monotonic()
    backoff = 0.2
    while True:
        try:
            task = decode(stub.GetTask(pb.TaskRequest(client=runner.name, wait_s=poll_s)))
        except grpc.RpcError as exc:
            code = exc.code()
            if code not in _RETRYABLE or time.monotonic() - last_contact > reconnect_timeout_s:
                raise
            time.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
            continue
        last_contact, backoff = time.monotonic(), 0.2
        if task.kind == "done":
            log.info(json.dumps({"event": "done", "client": runner.name, "tasks": done}))
            return done
        if task.kind == "wait":
            continue
        upload = _answer(task, runner, model, identity)
        try:
            reply = stub.Upload(iter(upload))
        except grpc.RpcError as exc:
            if exc.code() not in _RETRYABLE:
                raise
            continue  # the server went away mid-round; the next task comes after it is back
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
    task: Message, runner: ClientRunner, model: nn.Module, identity: IdentityKey
) -> list[pb.Chunk]:
    meta = task.meta
    base = {
        "run_id": meta["run_id"],
        "round": meta["round"],
        "nonce": meta["nonce"],
        "client": runner.name,
    }
    try:
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
