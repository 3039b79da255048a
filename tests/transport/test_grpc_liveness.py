"""Liveness (real gateway, real gRPC, mutual TLS): a member silent for `liveness_s` (no call, no
heartbeat) is dropped from the step at once, not at the round's deadline; a member already
silent when a step starts gets a failure instead of a task; it rejoins with its next call. The
member's heartbeat thread keeps it alive while it trains. A member process killed mid-run
costs the run one liveness interval, not a deadline per step."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from deployment_processes import deployed
from test_grpc_gateway import credentials, identity, signed_upload

from support import EXAMPLES, issue_federation
from veil.config import RunConfig
from veil.crypto import pki
from veil.crypto.identity import IdentityPublicKey
from veil.errors import ConfigError
from veil.federation import ClientFailure, FitInstruction, FitResult, TrainingPlan
from veil.transport.grpc import veil_pb2 as pb
from veil.transport.grpc import veil_pb2_grpc as pb_grpc
from veil.transport.grpc.client import open_channel, run_client
from veil.transport.grpc.codec import decode
from veil.transport.grpc.server import GrpcGateway, ServerCredentials

REFERENCE = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}
PLAN = TrainingPlan(epochs=1, batch_size=4, learning_rate=0.1)
LIVENESS_S = 1.0
DEADLINE_S = 30.0


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return issue_federation(tmp_path_factory.mktemp("pki"), ("alice", "bob"))


@pytest.fixture
def gateway(root: Path) -> Iterator[tuple[GrpcGateway, str]]:
    server = pki.node_files(root, "server")
    gw = GrpcGateway(
        run_id="run-1",
        identities={
            n: IdentityPublicKey.load(pki.node_files(root, n).identity_pub)
            for n in ("alice", "bob")
        },
        reference=REFERENCE,
        deadline_s=DEADLINE_S,
        liveness_s=LIVENESS_S,
    )
    port = gw.start(
        "127.0.0.1:0",
        ServerCredentials(
            server.cert.read_bytes(), server.key.read_bytes(), server.ca_cert.read_bytes()
        ),
    )
    yield gw, f"localhost:{port}"
    gw.stop(0)


def fit_round(gw: GrpcGateway, round_: int) -> tuple[threading.Thread, list[Any]]:
    replies: list[Any] = []
    instruction = FitInstruction("run-1", round_, REFERENCE, PLAN)
    thread = threading.Thread(
        target=lambda: replies.extend(gw.fit(["alice", "bob"], instruction)), daemon=True
    )
    thread.start()
    return thread, replies


def test_a_silent_member_is_dropped_after_the_liveness_interval_and_rejoins(
    root: Path, gateway: tuple[GrpcGateway, str]
) -> None:
    gw, address = gateway
    with (
        open_channel(address, credentials(root, "alice")) as a,
        open_channel(address, credentials(root, "bob")) as b,
    ):
        alice, bob = pb_grpc.FederationStub(a), pb_grpc.FederationStub(b)
        for stub, name in ((alice, "alice"), (bob, "bob")):
            stub.Heartbeat(pb.HeartbeatRequest(client=name), timeout=10)
        # Round 1: both take their task; bob answers, alice falls silent with hers.
        started = time.monotonic()
        thread, replies = fit_round(gw, 1)
        decode(alice.GetTask(pb.TaskRequest(client="alice", wait_s=5), timeout=10))
        task = decode(bob.GetTask(pb.TaskRequest(client="bob", wait_s=5), timeout=10))
        update = {k: np.full_like(v, 0.1) for k, v in REFERENCE.items()}
        assert bob.Upload(iter(signed_upload(task.meta, identity(root, "bob"), update))).accepted
        thread.join(timeout=DEADLINE_S)
        elapsed = time.monotonic() - started
        by_client = {r.client: r for r in replies}
        assert isinstance(by_client["bob"], FitResult)
        assert isinstance(by_client["alice"], ClientFailure)
        assert "silent for" in by_client["alice"].reason, by_client["alice"].reason
        assert LIVENESS_S <= elapsed < LIVENESS_S + 2.0  # not the 30 s deadline
        status = json.loads(bob.Status(pb.StatusRequest(), timeout=5).json)["clients"]
        assert not status["alice"]["connected"] and "silent" in status["alice"]["absent"]
        # Round 2: alice is still silent: she fails at once and gets no task.
        started = time.monotonic()
        thread, replies = fit_round(gw, 2)
        task = decode(bob.GetTask(pb.TaskRequest(client="bob", wait_s=5), timeout=10))
        assert bob.Upload(iter(signed_upload(task.meta, identity(root, "bob"), update))).accepted
        thread.join(timeout=DEADLINE_S)
        assert time.monotonic() - started < 2.0
        [failure] = [r for r in replies if r.client == "alice"]
        assert isinstance(failure, ClientFailure) and "silent for" in failure.reason
        assert gw._clients["alice"].task is None
        # Alice comes back: her next call makes her reachable, and round 3 has her task.
        for stub, name in ((alice, "alice"), (bob, "bob")):
            stub.Heartbeat(pb.HeartbeatRequest(client=name), timeout=10)
        thread, replies = fit_round(gw, 3)
        for stub, name in ((alice, "alice"), (bob, "bob")):
            task = decode(stub.GetTask(pb.TaskRequest(client=name, wait_s=5), timeout=10))
            assert task.kind == "fit"
            assert stub.Upload(
                iter(signed_upload(task.meta, identity(root, name), update))
            ).accepted
        thread.join(timeout=DEADLINE_S)
        assert sorted(r.client for r in replies if isinstance(r, FitResult)) == ["alice", "bob"]


class SlowRunner:
    """A member whose training takes `train_s` (longer than the coordinator's liveness_s)."""

    def __init__(self, name: str, train_s: float) -> None:
        self.name, self.train_s = name, train_s

    def fit(self, model: object, instruction: FitInstruction) -> FitResult:
        time.sleep(self.train_s)
        update = {k: np.full_like(v, 0.1) for k, v in instruction.parameters.items()}
        return FitResult(self.name, instruction.round, update, 10.0, 10, {}, {})


def test_run_client_heartbeats_while_it_trains(
    root: Path, gateway: tuple[GrpcGateway, str]
) -> None:
    """Training for 3x liveness_s: the heartbeat thread keeps the member in the round."""
    gw, address = gateway
    results: list[int] = []
    with open_channel(address, credentials(root, "alice")) as channel:
        member = threading.Thread(
            target=lambda: results.append(
                run_client(
                    channel,
                    SlowRunner("alice", 3 * LIVENESS_S),  # type: ignore[arg-type]
                    None,  # type: ignore[arg-type]
                    identity(root, "alice"),
                    poll_s=1.0,
                    heartbeat_s=0.2,
                )
            ),
            daemon=True,
        )
        member.start()
        end = time.monotonic() + 10
        while not gw._clients["alice"].joined:  # the member has joined: the round may start
            assert time.monotonic() < end, "the member did not join"
            time.sleep(0.01)
        instruction = FitInstruction("run-1", 1, REFERENCE, PLAN)
        replies = list(gw.fit(["alice"], instruction))
        assert [type(r) for r in replies] == [FitResult], replies
        gw.finish(linger_s=10.0)
        member.join(timeout=10)
    assert results == [1]


def test_liveness_must_exceed_the_heartbeat_interval() -> None:
    raw = {
        "mode": "deployment",
        "data": {"dataset": "breast_cancer"},
        "federation": {"clients": 2, "rounds": 1},
        "deployment": {"heartbeat_s": 5, "liveness_s": 5},
    }
    with pytest.raises(ConfigError, match=r"liveness_s \(5\) must be greater than heartbeat_s"):
        RunConfig.from_dict(raw)


# -- a member process killed mid-run ---------------------------------------------------------

CONFIG = """
name = "liveness"
mode = "deployment"
seed = 7
[data]
dataset = "breast_cancer"
[model]
name = "logistic"
[federation]
clients = 3
rounds = 10
learning_rate = 0.1
[deployment]
round_deadline_s = 60
connect_timeout_s = 120
heartbeat_s = 0.5
liveness_s = 2
"""


def killed_at_round(tmp_path: Path, config: str, victim: str, at: int) -> list[dict[str, Any]]:
    """Run `config` as real processes, SIGKILL `victim` once it has uploaded its round-`at`
    update; the rounds of the run's `result.json`."""
    with deployed(config, tmp_path) as run:
        run.wait_for(
            victim,
            lambda e: e.get("event") == "uploaded" and e.get("round") == at,
            timeout_s=240,
        )
        run.members[victim].send_signal(signal.SIGKILL)
        result = run.result(timeout_s=240)
    rounds: list[dict[str, Any]] = result["rounds"]
    return rounds


def check_rounds_after_kill(
    rounds: list[dict[str, Any]], victim: str, at: int, liveness_s: float
) -> list[dict[str, Any]]:
    """The victim answers until it dies, in round `at` or soon after (it is killed once its
    round-`at` upload is in its log, and rounds are quick). The round it dies in takes at most
    one liveness interval (plus its check period) beyond a normal round; in every later round
    it fails at once: no step waits for the 60 s deadline. Returns the rounds after its death."""
    failed = [r["round"] for r in rounds if any(f["client"] == victim for f in r["failures"])]
    assert failed, rounds
    died = failed[0]
    assert at <= died <= at + 2, rounds
    before = [r for r in rounds if r["round"] < died]
    assert all(r["dropped"] == 0 for r in before)
    normal = max(r["duration_s"] for r in before[1:])  # the first round warms up
    after = [r for r in rounds if r["round"] >= died]
    for r in after:
        limit = 2 * normal + 1.0 + (liveness_s if r["round"] == died else 0.0)
        assert r["duration_s"] < limit, (r, normal)
        reasons = [f["reason"] for f in r["failures"] if f["client"] == victim]
        assert reasons and "silent for" in reasons[0], r
    return after


@pytest.mark.slow
def test_a_member_killed_mid_run_costs_one_liveness_interval_not_a_deadline_per_step(
    tmp_path: Path,
) -> None:
    rounds = killed_at_round(tmp_path, CONFIG, "client-1", at=6)
    after = check_rounds_after_kill(rounds, "client-1", at=6, liveness_s=2.0)
    assert all(r["dropped"] == 1 for r in after)


@pytest.mark.slow
def test_under_secagg_a_killed_member_costs_one_liveness_interval(tmp_path: Path) -> None:
    """The medical SecAgg example (5 hospitals, 6 of its rounds): a hospital killed at round
    3 is dropped after one liveness interval; SecAgg recovers its masks in that round if it
    can, and later rounds run with the four others, without waiting for any deadline."""
    example = (EXAMPLES / "medical_diagnosis_secagg.toml").read_text()
    text = example.replace("rounds = 20", "rounds = 6").replace(
        'mode = "simulation"', 'mode = "deployment"'
    )
    text += (
        "\n[deployment]\nround_deadline_s = 60\nconnect_timeout_s = 120\n"
        "heartbeat_s = 0.5\nliveness_s = 2\n"
    )
    rounds = killed_at_round(tmp_path, text, "client-2", at=3)
    after = check_rounds_after_kill(rounds, "client-2", at=3, liveness_s=2.0)
    for r in after[1:]:
        assert r["applied"] and r["aggregation"]["survivors"] == 4, r
