"""A hostile member over real loopback TLS: every malformed or out-of-range upload is refused at
once with a reason (never gRPC UNKNOWN, never a wait for the deadline), and its nonce stays
open, so an honest retry of the same task is still accepted."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import test_grpc_gateway as base
from test_grpc_gateway import (
    DEADLINE_S,
    REFERENCE,
    credentials,
    identity,
    ready,
    signed_upload,
    start_round,
)

from veil.crypto.identity import IdentityKey, signing_payload
from veil.federation import ClientFailure, FitResult
from veil.transport.grpc import veil_pb2 as pb
from veil.transport.grpc import veil_pb2_grpc as pb_grpc
from veil.transport.grpc.client import open_channel
from veil.transport.grpc.codec import MAX_EMPTY_CHUNKS, _digest_start, decode, digest, encode
from veil.transport.grpc.server import MAX_REFUSED_UPLOADS

# The fixtures of the gateway's own tests: a CA, alice and bob, and a gateway over loopback TLS.
federation = base.federation
gateway = base.gateway

HONEST = {k: np.full_like(v, 0.1) for k, v in REFERENCE.items()}
MISSING = object()


def hostile_upload(task_meta: dict[str, Any], key: IdentityKey, **fields: Any) -> list[pb.Chunk]:
    """A correctly signed fit_result for the open task, with metadata fields replaced (or
    removed, for MISSING)."""
    meta: dict[str, Any] = {
        "run_id": task_meta["run_id"],
        "round": task_meta["round"],
        "nonce": task_meta["nonce"],
        "client": task_meta["client"],
        "weight": 10.0,
        "num_examples": 10,
        "metrics": {},
        "sums": {},
    }
    for name, value in fields.items():
        if value is MISSING:
            del meta[name]
        else:
            meta[name] = value
    sig = key.sign(
        signing_payload("veil-message", "fit_result", digest("fit_result", meta, HONEST))
    )
    return list(encode("fit_result", meta, HONEST, signature=sig))


def overflowing_shape_upload(task_meta: dict[str, Any], key: IdentityKey) -> list[pb.Chunk]:
    """A signed header announcing tensors whose element count (2^64) overflows int64."""
    meta = {
        "run_id": task_meta["run_id"],
        "round": task_meta["round"],
        "nonce": task_meta["nonce"],
        "client": task_meta["client"],
        "weight": 10.0,
        "num_examples": 10,
    }
    meta_json = json.dumps(meta, sort_keys=True)
    specs = [
        pb.TensorSpec(name="w", dtype="<f4", shape=[2**32, 2**32]),
        pb.TensorSpec(name="b", dtype="<f4", shape=[2]),
    ]
    h = _digest_start("fit_result", meta_json, specs)
    sig = key.sign(signing_payload("veil-message", "fit_result", h.digest()))
    header = pb.Header(kind="fit_result", json=meta_json, tensors=specs, signature=sig)
    return [pb.Chunk(header=header)]


def empty_chunks_upload(task_meta: dict[str, Any], key: IdentityKey) -> Iterator[pb.Chunk]:
    """The honest upload's header, then 200,000 zero-length data chunks."""
    chunks = signed_upload(task_meta, key, HONEST)
    yield chunks[0]
    for _ in range(200_000):
        yield pb.Chunk(data=b"")


CASES = {
    "weight 1e39": (lambda m, k: hostile_upload(m, k, weight=1e39), "'weight'"),
    "weight inf": (lambda m, k: hostile_upload(m, k, weight=float("inf")), "'weight'"),
    "weight text": (lambda m, k: hostile_upload(m, k, weight="ten"), "'weight' must be a number"),
    "weight missing": (lambda m, k: hostile_upload(m, k, weight=MISSING), "'weight'"),
    "num_examples text": (lambda m, k: hostile_upload(m, k, num_examples="10"), "'num_examples'"),
    "metric 'nan'": (
        lambda m, k: hostile_upload(m, k, metrics={"train_loss": "nan"}),
        "'train_loss' must be a number",
    ),
    "metric NaN": (
        lambda m, k: hostile_upload(m, k, metrics={"train_loss": float("nan")}),
        "'train_loss' must be a finite number",
    ),
    "metrics not an object": (lambda m, k: hostile_upload(m, k, metrics=[1]), "'metrics'"),
    "sum 1e308": (lambda m, k: hostile_upload(m, k, sums={"bit": 1e308}), "'bit'"),
    "shape overflows int64": (overflowing_shape_upload, "larger than the limit"),
    "200,000 empty chunks": (empty_chunks_upload, f"more than {MAX_EMPTY_CHUNKS} empty"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_hostile_upload_is_refused_at_once_and_an_honest_retry_is_accepted(
    federation: dict[str, Any], gateway: Any, case: str
) -> None:
    make, reason = CASES[case]
    gw, address = gateway
    thread, replies = start_round(gw, ["alice"])
    root = federation["root"]
    key = identity(root, "alice")
    with open_channel(address, credentials(root, "alice")) as channel:
        stub = pb_grpc.FederationStub(channel)
        task = decode(stub.GetTask(pb.TaskRequest(client="alice", wait_s=5)))
        started = time.monotonic()
        reply = stub.Upload(iter(make(task.meta, key)), timeout=10)  # not gRPC UNKNOWN
        elapsed = time.monotonic() - started
        assert not reply.accepted
        assert reason in reply.reason, reply.reason
        assert elapsed < DEADLINE_S / 3  # at once: the round's deadline is far off
        # The nonce was not consumed: the honest answer to the same task is accepted.
        retry = stub.Upload(iter(signed_upload(task.meta, key, HONEST)), timeout=10)
        assert retry.accepted, retry.reason
    thread.join(timeout=10)
    assert len(replies) == 1 and isinstance(replies[0], FitResult)
    assert replies[0].weight == 10.0


def test_a_member_refused_again_and_again_is_dropped_at_once_with_the_reason(
    federation: dict[str, Any], gateway: Any
) -> None:
    gw, address = gateway
    thread, replies = start_round(gw, ["alice"])
    root = federation["root"]
    key = identity(root, "alice")
    started = time.monotonic()
    with open_channel(address, credentials(root, "alice")) as channel:
        stub = pb_grpc.FederationStub(channel)
        task = decode(stub.GetTask(pb.TaskRequest(client="alice", wait_s=5)))
        for _ in range(MAX_REFUSED_UPLOADS):
            reply = stub.Upload(iter(hostile_upload(task.meta, key, weight=1e39)))
            assert not reply.accepted and "'weight'" in reply.reason
        thread.join(timeout=10)
        # The task is closed now: its nonce is spent.
        late = stub.Upload(iter(signed_upload(task.meta, key, HONEST)))
    assert time.monotonic() - started < DEADLINE_S / 2  # the round did not wait for its deadline
    assert not late.accepted and "replayed" in late.reason
    [failure] = replies
    assert isinstance(failure, ClientFailure)
    assert (
        "'weight'" in failure.reason and f"{MAX_REFUSED_UPLOADS} uploads refused" in failure.reason
    )


def test_a_member_that_gives_up_after_a_refusal_is_dropped_with_the_reason(
    federation: dict[str, Any], gateway: Any
) -> None:
    gw, address = gateway
    root = federation["root"]
    with open_channel(address, credentials(root, "alice")) as channel:
        ready(channel)  # the short deadline starts with the round, after the handshake
        gw.deadline_s = 3.0
        thread, replies = start_round(gw, ["alice"])
        stub = pb_grpc.FederationStub(channel)
        task = decode(stub.GetTask(pb.TaskRequest(client="alice", wait_s=5)))
        reply = stub.Upload(iter(hostile_upload(task.meta, identity(root, "alice"), weight="x")))
        assert not reply.accepted
    thread.join(timeout=30)
    assert not thread.is_alive()
    [failure] = replies
    assert isinstance(failure, ClientFailure)
    assert "within" in failure.reason and "'weight' must be a number" in failure.reason


def test_an_exception_inside_the_handler_is_a_refusal_not_unknown(
    federation: dict[str, Any], gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw, address = gateway

    def broken(arrays: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(gw, "_check_update", broken)
    root = federation["root"]
    with open_channel(address, credentials(root, "alice")) as channel:
        ready(channel)
        gw.deadline_s = 3.0  # the round ends at its deadline: the upload was refused
        thread, _ = start_round(gw, ["alice"])
        stub = pb_grpc.FederationStub(channel)
        task = decode(stub.GetTask(pb.TaskRequest(client="alice", wait_s=5)))
        try:
            reply = stub.Upload(iter(signed_upload(task.meta, identity(root, "alice"), HONEST)))
        except grpc.RpcError as exc:  # today's code: StatusCode.UNKNOWN
            pytest.fail(f"the handler raised {exc.code()}")
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert not reply.accepted and "RuntimeError: boom" in reply.reason
