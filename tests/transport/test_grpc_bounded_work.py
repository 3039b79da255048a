"""What one member can cost the coordinator is bounded (real gateway, real gRPC, mutual TLS):
one upload at a time per member (a second is refused at once, before its body), a bounded
number of task polls, an idle and a total deadline per stream, and a worker pool sized from
these limits, so that a member opening 24 stalled uploads neither starves the honest members'
rounds nor grows the server's memory."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from test_grpc_gateway import credentials, identity, signed_upload

from veil.crypto import pki
from veil.crypto.identity import IdentityPublicKey
from veil.federation import FitInstruction, TrainingPlan
from veil.transport.grpc import veil_pb2 as pb
from veil.transport.grpc import veil_pb2_grpc as pb_grpc
from veil.transport.grpc.client import open_channel
from veil.transport.grpc.codec import data_chunks, decode, encode
from veil.transport.grpc.server import CALL_LIMITS, GrpcGateway, ServerCredentials

MEMBERS = ("alice", "bob", "mallory")
SMALL = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}
PLAN = TrainingPlan(epochs=1, batch_size=4, learning_rate=0.1)
IDLE_S = 1.0
TOTAL_S = 2.5
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pki")
    pki.init_ca(root)
    pki.issue(root, "server", role="server")
    for name in MEMBERS:
        pki.issue(root, name, role="client")
    return root


def start_gateway(
    root: Path,
    reference: dict[str, np.ndarray],
    *,
    idle_s: float = IDLE_S,
    total_s: float = TOTAL_S,
) -> tuple[GrpcGateway, str]:
    server = pki.node_files(root, "server")
    gw = GrpcGateway(
        run_id="run-1",
        identities={
            n: IdentityPublicKey.load(pki.node_files(root, n).identity_pub) for n in MEMBERS
        },
        reference=reference,
        deadline_s=30.0,
        upload_idle_s=idle_s,
        upload_timeout_s=total_s,
    )
    port = gw.start(
        "127.0.0.1:0",
        ServerCredentials(
            server.cert.read_bytes(), server.key.read_bytes(), server.ca_cert.read_bytes()
        ),
    )
    return gw, f"localhost:{port}"


@pytest.fixture
def gateway(root: Path) -> Iterator[tuple[GrpcGateway, str]]:
    gw, address = start_gateway(root, SMALL)
    yield gw, address
    gw.stop(0)


def open_round(gw: GrpcGateway, reference: dict[str, np.ndarray]) -> threading.Thread:
    instruction = FitInstruction("run-1", 1, reference, PLAN)
    thread = threading.Thread(target=lambda: list(gw.fit(["alice"], instruction)), daemon=True)
    thread.start()
    return thread


def stalled(first: list[pb.Chunk], release: threading.Event) -> Iterator[pb.Chunk]:
    """`first`, then nothing until `release` is set (a member that stops mid-upload)."""
    yield from first
    release.wait(30)


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_a_second_concurrent_upload_is_refused_at_once_before_its_body(
    root: Path, gateway: tuple[GrpcGateway, str]
) -> None:
    gw, address = gateway
    open_round(gw, SMALL)
    key = identity(root, "alice")
    release = threading.Event()
    with open_channel(address, credentials(root, "alice")) as channel:
        stub = pb_grpc.FederationStub(channel)
        task = decode(stub.GetTask(pb.TaskRequest(client="alice", wait_s=5), timeout=10))
        honest = signed_upload(task.meta, key, {k: np.full_like(v, 0.1) for k, v in SMALL.items()})
        first = stub.Upload.future(stalled(honest[:1], release))  # the header, then nothing
        wait_for(lambda: gw._clients["alice"].calls.get("upload") == 1)  # it is being read
        started = time.monotonic()
        # The second sends nothing at all: a refusal can only come before its body is read.
        second = stub.Upload(stalled([], release), timeout=10)
        elapsed = time.monotonic() - started
        assert not second.accepted and "another upload" in second.reason, second.reason
        assert elapsed < IDLE_S  # at once, not when the first one is cancelled
        release.set()  # the first upload ends: its slot is free again
        refused = first.result(timeout=10)  # its header announced tensors that never came
        assert not refused.accepted and "fewer tensor bytes" in refused.reason
        retry = stub.Upload(iter(honest), timeout=10)
        assert retry.accepted, retry.reason


def test_an_idle_upload_is_cancelled_with_the_reason_and_frees_its_slot(
    root: Path, gateway: tuple[GrpcGateway, str]
) -> None:
    gw, address = gateway
    open_round(gw, SMALL)
    events: list[dict[str, Any]] = []
    gw._on_event = events.append
    release = threading.Event()
    key = identity(root, "alice")
    with open_channel(address, credentials(root, "alice")) as channel:
        stub = pb_grpc.FederationStub(channel)
        task = decode(stub.GetTask(pb.TaskRequest(client="alice", wait_s=5), timeout=10))
        honest = signed_upload(task.meta, key, {k: np.full_like(v, 0.1) for k, v in SMALL.items()})
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            stub.Upload(stalled(honest[:1], release), timeout=20)
        elapsed = time.monotonic() - started
        release.set()
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "idle" in (info.value.details() or ""), info.value.details()
        assert IDLE_S <= elapsed < IDLE_S + 2.0
        wait_for(lambda: any("upload cancelled: upload idle" in str(e["reason"]) for e in events))
        wait_for(lambda: gw._clients["alice"].calls["upload"] == 0)  # the handler has ended
        # The slot is free and the task still open: the honest answer is accepted.
        retry = stub.Upload(iter(honest), timeout=10)
        assert retry.accepted, retry.reason


def test_a_slow_drip_upload_is_cut_at_the_total_deadline(
    root: Path, gateway: tuple[GrpcGateway, str]
) -> None:
    """One byte every 0.3 s never trips the idle timeout; the total deadline ends it."""
    gw, address = gateway
    open_round(gw, SMALL)
    key = identity(root, "alice")
    with open_channel(address, credentials(root, "alice")) as channel:
        stub = pb_grpc.FederationStub(channel)
        task = decode(stub.GetTask(pb.TaskRequest(client="alice", wait_s=5), timeout=10))
        honest = signed_upload(task.meta, key, {k: np.full_like(v, 0.1) for k, v in SMALL.items()})
        body = b"".join(c.data for c in honest[1:])

        def drip() -> Iterator[pb.Chunk]:
            yield honest[0]
            for i in range(len(body)):
                time.sleep(0.3)
                yield pb.Chunk(data=body[i : i + 1])

        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            stub.Upload(drip(), timeout=30)
        elapsed = time.monotonic() - started
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "longer than" in (info.value.details() or ""), info.value.details()
    assert TOTAL_S <= elapsed < TOTAL_S + 2.0  # the whole drip would take 12 s


def test_task_polls_per_member_are_bounded(root: Path) -> None:
    """A newer poll ends the member's older waiting ones; polls stuck streaming a task to a
    member that does not read hold at most `CALL_LIMITS["poll"]` threads, a further poll is
    refused, and the stuck ones are cancelled once idle. Another member is served all along."""
    big = {"w": np.zeros((1024, 2048), np.float32)}  # 8 MiB: more than the flow-control window
    # Stuck streams are cancelled only after 3 s idle, well after the third poll's one-second
    # wait for a slot has ended in a refusal (with 1 s they raced it on a loaded machine).
    gw, address = start_gateway(root, big, idle_s=3.0, total_s=6.0)
    try:
        with (
            open_channel(address, credentials(root, "alice")) as alice,
            open_channel(address, credentials(root, "bob")) as bob,
        ):
            stub = pb_grpc.FederationStub(alice)
            waiting = []
            for i in range(4):
                waiting.append(stub.GetTask(pb.TaskRequest(client="alice", wait_s=20)))
                wait_for(lambda i=i: gw._clients["alice"].polls == i + 1)  # it reached the server
            # Only the newest still waits; the others were told to poll again at once.
            started = time.monotonic()
            for call in waiting[:-1]:
                assert decode(call).kind == "wait"
            assert time.monotonic() - started < 5.0
            open_round(gw, big)
            assert decode(waiting[-1]).kind == "fit"
            # Two polls that never read their task stream, then a third.
            stuck = [stub.GetTask(pb.TaskRequest(client="alice", wait_s=5)) for _ in range(2)]
            for call in stuck:
                next(call)  # the header arrived; the 8 MiB behind it are not read
            with pytest.raises(grpc.RpcError) as info:
                decode(stub.GetTask(pb.TaskRequest(client="alice", wait_s=5), timeout=10))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"at most {CALL_LIMITS['poll']}" in (info.value.details() or "")
            other = pb_grpc.FederationStub(bob)
            assert decode(other.GetTask(pb.TaskRequest(client="bob", wait_s=0), timeout=5))
            # The stuck streams are cancelled when idle; alice can poll again.
            wait_for(lambda: gw._clients["alice"].calls["poll"] == 0)
            for call in stuck:
                with pytest.raises(grpc.RpcError) as cut:
                    list(call)
                assert cut.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            task = decode(stub.GetTask(pb.TaskRequest(client="alice", wait_s=5), timeout=10))
            assert task.kind == "fit"
    finally:
        gw.stop(0)


# -- the attack against a gateway in its own process -------------------------------------------

ROWS, COLS = 2048, 4096  # a 32 MiB model
ATTACK_STREAMS = 24


def run_gateway(root: Path, tmp: Path, attack: bool) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Three rounds of alice and bob on a gateway in its own process, with mallory's 24 stalled
    uploads open all along when `attack`; the rounds' records and the process's memory."""
    port_file = tmp / f"port-{attack}"
    proc = subprocess.Popen(
        [
            sys.executable, str(HERE / "gateway_process.py"), str(root), str(port_file),
            "--members", ",".join(MEMBERS), "--train", "alice,bob",
            "--rows", str(ROWS), "--cols", str(COLS), "--rounds", "3", "--idle", "2",
        ],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    stop = threading.Event()
    threads: list[threading.Thread] = []
    errors: list[BaseException] = []
    try:
        end = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text()):
            assert proc.poll() is None and time.monotonic() < end, "the gateway did not start"
            time.sleep(0.05)
        address = f"localhost:{port_file.read_text()}"
        attempts = [0] * ATTACK_STREAMS
        if attack:
            threads += [
                threading.Thread(target=mallory, args=(root, address, stop, attempts, i))
                for i in range(ATTACK_STREAMS)
            ]
        else:
            threads.append(threading.Thread(target=poll_once, args=(root, address, "mallory")))
        threads += [
            threading.Thread(target=honest, args=(root, address, n, stop, errors))
            for n in ("alice", "bob")
        ]
        for thread in threads:
            thread.start()
        end = time.monotonic() + 60
        while attack and min(attempts) < 1:  # every stalled upload has been opened
            assert time.monotonic() < end, "the attack did not start"
            time.sleep(0.05)
        if attack:
            with open_channel(address, credentials(root, "alice")) as channel:
                stub = pb_grpc.FederationStub(channel)
                status = json.loads(stub.Status(pb.StatusRequest(), timeout=5).json)
            assert status["clients"]["mallory"]["connected"]
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        lines = [json.loads(line) for line in proc.stdout]
        assert proc.wait(timeout=60) == 0, lines
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not errors, errors
    return lines[:-1], lines[-1]


def honest(
    root: Path, address: str, name: str, stop: threading.Event, errors: list[BaseException]
) -> None:
    key = identity(root, name)
    try:
        with open_channel(address, credentials(root, name)) as channel:
            stub = pb_grpc.FederationStub(channel)
            while not stop.is_set():
                task = decode(stub.GetTask(pb.TaskRequest(client=name, wait_s=2), timeout=60))
                if task.kind == "done":
                    return
                if task.kind == "fit":
                    update = {k: np.full_like(v, 0.001) for k, v in task.arrays.items()}
                    reply = stub.Upload(iter(signed_upload(task.meta, key, update)), timeout=60)
                    assert reply.accepted, reply.reason
    except BaseException as exc:
        errors.append(exc)


def poll_once(root: Path, address: str, name: str) -> None:
    with open_channel(address, credentials(root, name)) as channel:
        stub = pb_grpc.FederationStub(channel)
        decode(stub.GetTask(pb.TaskRequest(client=name, wait_s=0), timeout=30))


#: The stalled uploads' chunks: a header announcing the whole model, then 30 of its 32 MiB.
_STALLED: list[pb.Chunk] = []


def mallory(root: Path, address: str, stop: threading.Event, attempts: list[int], i: int) -> None:
    """Open an upload that stalls after 30 MiB, again and again until `stop`."""
    if not _STALLED:
        body = {"w": np.zeros((ROWS, COLS), np.float32)}
        meta = {"run_id": "run-1", "round": 1, "nonce": "0" * 32, "client": "mallory"}
        header = next(encode("fit_result", meta, body, signature=b"\0" * 64))
        _STALLED[:] = [header, *list(data_chunks(body))[:30]]
    with open_channel(address, credentials(root, "mallory")) as channel:
        stub = pb_grpc.FederationStub(channel)
        while not stop.is_set():
            attempts[i] += 1
            ended = threading.Event()  # the call is over: its request stream may stop too
            call = stub.Upload.future(stalled(_STALLED, ended), timeout=60)
            call.add_done_callback(lambda _, ended=ended: ended.set())
            try:
                reply = call.result()
            except grpc.RpcError:
                continue  # cancelled when idle: open another
            assert not reply.accepted
            stop.wait(0.1)  # refused at once; go again (a pause only to spare the test's CPU)


@pytest.mark.slow
def test_24_stalled_uploads_from_one_member_neither_starve_rounds_nor_grow_memory(
    root: Path, tmp_path: Path
) -> None:
    """The done-when test of issue 20's bounded work: before the bounds, 24 stalled uploads
    held every worker thread (honest rounds missed their deadline, `Status` timed out) and up
    to 2x the model each in memory."""
    quiet_rounds, quiet = run_gateway(root, tmp_path, attack=False)
    rounds, attacked = run_gateway(root, tmp_path, attack=True)
    normal = max(r["seconds"] for r in quiet_rounds)
    for record in rounds:
        assert record["accepted"] == ["alice", "bob"], record
        assert record["seconds"] < max(5.0, 3 * normal), (record, normal)  # deadline: 30 s
    assert attacked["VmHWM_kB"] < 1.5 * quiet["VmHWM_kB"], (attacked, quiet)
