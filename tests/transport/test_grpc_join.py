"""Join-time agreement: a member states fingerprints of its model layout, data schema and
config when it connects; the coordinator computes its own with the same function and refuses a
member that differs, with one line on both sides naming what differs. A member that has not
joined gets no task (FAILED_PRECONDITION "join first") and fails every step at once, so a
misconfigured member never stalls a SecAgg round."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from deployment_processes import deployed
from test_grpc_gateway import credentials, identity

from support import EXAMPLES, issue_federation
from veil.config import RunConfig
from veil.crypto import pki
from veil.crypto.identity import IdentityPublicKey
from veil.deployment import DATA_FILE, DeploymentFiles
from veil.errors import UserError
from veil.federation import ClientFailure, FitInstruction, TrainingPlan
from veil.federation.fingerprint import (
    Declared,
    Fingerprint,
    MalformedFingerprint,
    describe,
    differences,
    fingerprint,
)
from veil.models import build_model, get_parameters
from veil.transport.grpc import veil_pb2 as pb
from veil.transport.grpc import veil_pb2_grpc as pb_grpc
from veil.transport.grpc.client import JoinRefused, open_channel, run_client
from veil.transport.grpc.codec import decode
from veil.transport.grpc.server import GrpcGateway, ServerCredentials

BASE = {
    "mode": "deployment",
    "data": {"dataset": "breast_cancer"},
    "model": {"name": "logistic"},
    "federation": {"clients": 2, "rounds": 1, "learning_rate": 0.1},
}


def config(**sections: dict[str, Any]) -> RunConfig:
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in BASE.items()}
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return RunConfig.from_dict(raw)


def print_of(run: RunConfig, n_features: int = 22, **meta: Any) -> Fingerprint:
    """A process's fingerprint for `run` with `n_features` columns of data."""
    model = build_model(run.model, n_features=n_features, n_classes=2)
    features = np.zeros((5, n_features), np.float32)
    return fingerprint(run, get_parameters(model), features, {"n_classes": 2, **meta})


# -- the fingerprints ------------------------------------------------------------------------


def test_equal_processes_agree_and_per_process_keys_do_not_count() -> None:
    coordinator = print_of(config())
    member = print_of(
        config(
            deployment={"address": "0.0.0.0:7443", "round_deadline_s": 5, "heartbeat_s": 1},
            federation={"torch_threads": 4},
        )
    )
    assert differences(member, coordinator) == []
    assert Fingerprint.from_json(json.loads(json.dumps(member.to_json()))) == member


def test_a_different_number_of_features_is_named_on_both_sides() -> None:
    found = differences(print_of(config(), 19), print_of(config(), 22))
    assert describe(found, "member", "bank-b") == (
        "data schema differs: n_features 19 here, 22 at the coordinator; "
        "model layout differs: parameter 'linear.weight' shape [2, 19] here, [2, 22] at the "
        "coordinator"
    )
    assert describe(found, "coordinator", "bank-b").startswith(
        "data schema differs: n_features 19 at bank-b, 22 here;"
    )


def test_config_differences_name_the_section_and_keys() -> None:
    member = print_of(config(federation={"learning_rate": 0.5, "rounds": 3}))
    coordinator = print_of(config(compression={"kind": "int8"}))
    line = describe(differences(member, coordinator), "member", "bank-b")
    assert line == (
        "configuration differs: [compression] not set here, set at the coordinator; "
        "[federation] learning_rate, rounds"
    )
    names = print_of(config(), feature_names=["a"] * 22)
    other = print_of(config(), feature_names=["b"] * 22)
    assert differences(names, print_of(config())) == []  # compared only when both know them
    assert "feature_names" in describe(differences(names, other), "member", "m")


@pytest.mark.parametrize(
    "raw",
    [
        None,
        {"model": [], "data": {}, "config": {}},
        {"model": [["w", [-1], "<f4"]], "data": {}, "config": {}},
        {"model": "w", "data": {}, "config": {}, "extra": 1},
        {
            "model": [],
            "data": {
                "n_features": "22",
                "n_classes": 2,
                "image_shape": None,
                "feature_names": None,
            },
            "config": {},
        },
    ],
)
def test_a_malformed_fingerprint_is_refused(raw: object) -> None:
    with pytest.raises(MalformedFingerprint):
        Fingerprint.from_json(raw)


# -- the gateway -----------------------------------------------------------------------------

REFERENCE = {"w": np.zeros((3, 2), np.float32)}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return issue_federation(tmp_path_factory.mktemp("pki"), ("alice", "bob"))


@pytest.fixture
def gateway(root: Path) -> Iterator[tuple[GrpcGateway, str, list[dict[str, Any]]]]:
    server = pki.node_files(root, "server")
    events: list[dict[str, Any]] = []
    gw = GrpcGateway(
        run_id="run-1",
        identities={
            n: IdentityPublicKey.load(pki.node_files(root, n).identity_pub)
            for n in ("alice", "bob")
        },
        reference=REFERENCE,
        deadline_s=30.0,
        liveness_s=10.0,
        fingerprint=print_of(config()),
        on_event=events.append,
    )
    port = gw.start(
        "127.0.0.1:0",
        ServerCredentials(
            server.cert.read_bytes(), server.key.read_bytes(), server.ca_cert.read_bytes()
        ),
    )
    yield gw, f"localhost:{port}", events
    gw.stop(0)


def join(stub: Any, name: str, print_: Fingerprint | None) -> Any:
    text = json.dumps(print_.to_json()) if print_ is not None else "not json"
    return stub.Join(pb.JoinRequest(client=name, json=text), timeout=10)


def test_a_member_must_join_with_an_equal_fingerprint_before_it_gets_tasks(
    root: Path, gateway: tuple[GrpcGateway, str, list[dict[str, Any]]]
) -> None:
    gw, address, events = gateway
    with open_channel(address, credentials(root, "alice")) as channel:
        stub = pb_grpc.FederationStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            decode(stub.GetTask(pb.TaskRequest(client="alice", wait_s=0), timeout=10))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "join first" in (info.value.details() or "")
        bad = join(stub, "alice", None)
        assert not bad.accepted and bad.reason.startswith("malformed join request")
        refused = join(stub, "alice", print_of(config(), 19))
        assert not refused.accepted
        assert refused.reason.startswith("data schema differs: n_features 19 here, 22 at the")
        [logged] = [e for e in events if e["event"] == "join refused"][-1:]
        assert logged["reason"].startswith("data schema differs: n_features 19 at alice, 22 here")
        # Refused: a step fails for alice at once, with the reason, and she gets no task.
        started = time.monotonic()
        instruction = FitInstruction("run-1", 1, REFERENCE, TrainingPlan(1, 4, 0.1))
        [failure] = list(gw.fit(["alice"], instruction))
        assert time.monotonic() - started < 1.0
        assert isinstance(failure, ClientFailure)
        assert "Join was refused (data schema differs" in failure.reason
        accepted = join(stub, "alice", print_of(config()))
        assert accepted.accepted and accepted.liveness_s == 10.0
        task = decode(stub.GetTask(pb.TaskRequest(client="alice", wait_s=0), timeout=10))
        assert task.kind == "wait"
        status = json.loads(stub.Status(pb.StatusRequest(), timeout=5).json)["clients"]
        assert status["alice"]["joined"] and not status["bob"]["joined"]


def test_run_client_stops_at_a_refused_join_without_retrying(
    root: Path, gateway: tuple[GrpcGateway, str, list[dict[str, Any]]]
) -> None:
    _, address, _ = gateway

    class Runner:  # never asked to work: the join is refused
        name = "bob"

    started = time.monotonic()
    with (
        open_channel(address, credentials(root, "bob")) as channel,
        pytest.raises(JoinRefused) as info,
    ):
        run_client(
            channel,
            Runner(),  # type: ignore[arg-type]
            None,  # type: ignore[arg-type]
            identity(root, "bob"),
            fingerprint=print_of(config(federation={"learning_rate": 0.5})),
            reconnect_timeout_s=60,
        )
    assert time.monotonic() - started < 10  # at once, not after retrying for 60 s
    assert isinstance(info.value, UserError)
    message = str(info.value)
    assert "configuration differs: [federation] learning_rate" in message
    assert "\n" not in message


# -- a member whose data has fewer columns, in a SecAgg deployment ----------------------------


def drop_columns(files: DeploymentFiles, name: str, drop: int) -> None:
    """Rewrite organisation `name`'s data file with `drop` fewer feature columns."""
    path = files.org_dir(name) / DATA_FILE
    with np.load(path, allow_pickle=False) as archive:
        arrays = {k: archive[k] for k in archive.files}
    meta = json.loads(arrays["meta"].tobytes().decode())
    meta["n_features"] -= drop
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    for key in ("x_train", "x_val"):
        arrays[key] = arrays[key][:, :-drop]
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]


@pytest.mark.slow
def test_a_member_with_fewer_features_is_refused_at_join_and_secagg_rounds_complete(
    tmp_path: Path,
) -> None:
    """The medical SecAgg example (5 hospitals, 3 rounds) with client-2's data three columns
    short: it is refused at join with one line in its log and one in the coordinator's, and
    exits; the four others complete every SecAgg round (before the join check it looped
    forever and stalled every round)."""
    example = (EXAMPLES / "medical_diagnosis_secagg.toml").read_text()
    text = example.replace("rounds = 20", "rounds = 3").replace(
        'mode = "simulation"', 'mode = "deployment"'
    )
    text += "\n[deployment]\nround_deadline_s = 60\nconnect_timeout_s = 120\n"
    with deployed(text, tmp_path, prepare=lambda f: drop_columns(f, "client-2", 3)) as run:
        assert run.members["client-2"].wait(timeout=120) == 2
        result = run.result(timeout_s=240)
        member_log = run.log("client-2")
        server_events = run.events()
    [line] = [line for line in member_log.splitlines() if "refused" in line]
    assert line.startswith(
        "veil: error: the coordinator refused 'client-2' at join: data schema differs: "
        "n_features 27 here, 30 at the coordinator"
    ), member_log
    [refusal] = [e for e in server_events if e["event"] == "join refused"]
    assert refusal["client"] == "client-2"
    assert refusal["reason"].startswith("data schema differs: n_features 27 at client-2, 30 here")
    assert len(result["rounds"]) == 3
    for r in result["rounds"]:
        assert r["applied"] and r["aggregation"]["survivors"] == 4, r
        [failure] = r["failures"]
        assert failure["client"] == "client-2" and "not joined" in failure["reason"]


def test_the_data_contract_and_the_declared_sizes_at_join(
    root: Path, gateway: tuple[GrpcGateway, str, list[dict[str, Any]]]
) -> None:
    """A member whose data contract differs is refused, naming the hash; one that declares a
    malformed row count is refused as malformed; an accepted member's declaration is kept."""
    gw, address, _ = gateway
    with open_channel(address, credentials(root, "bob")) as channel:
        stub = pb_grpc.FederationStub(channel)
        other = print_of(config(), schema_hash="ab" * 32)
        refused = join(stub, "bob", other)
        assert not refused.accepted and "schema_hash" in refused.reason
        hostile = print_of(config()).to_json() | {
            "declared": {"examples": -5, "validation": 0, "file": "x.csv"}
        }
        reply = stub.Join(pb.JoinRequest(client="bob", json=json.dumps(hostile)), timeout=10)
        assert not reply.accepted and reply.reason.startswith("malformed join request")
        assert gw.declarations() == {}
        honest = replace(print_of(config()), declared=Declared(560, 140, "bank_b.csv"))
        assert join(stub, "bob", honest).accepted
        assert gw.declarations() == {"bob": Declared(560, 140, "bank_b.csv")}
