"""`veil run` with mode = "deployment": a server and one process per organisation on loopback,
mutual TLS, the same result as simulation."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

import veil
from support import EXAMPLES, client_credentials, spawn_veil, wait_for_port
from veil import deployment
from veil.config import load_config
from veil.transport.grpc import veil_pb2 as pb
from veil.transport.grpc import veil_pb2_grpc as pb_grpc
from veil.transport.grpc.client import open_channel

if TYPE_CHECKING:
    from conftest import Deploy


CONFIG = """
name = "deployed"
mode = "deployment"
seed = 7
[data]
dataset = "breast_cancer"
[data.partition]
kind = "dirichlet"
alpha = 0.5
[model]
name = "logistic"
[federation]
clients = 3
rounds = 2
learning_rate = 0.1
[deployment]
round_deadline_s = 60
timeout_s = 300
"""


@pytest.mark.slow
def test_deployment_matches_simulation(deploy: Deploy) -> None:
    run = deploy(CONFIG)
    deployed, out = run.result, run.out
    assert deployed["mode"] == "deployment"
    assert [r["clients"] for r in deployed["rounds"]] == [3, 3]
    # Every process left a log; the server accepted signed uploads from every client.
    server_log = (out / "logs" / "server.log").read_text()
    for name in ("client-0", "client-1", "client-2"):
        assert f'"client": "{name}"' in server_log
        assert '"event": "done"' in (out / "logs" / f"{name}.log").read_text()
    # Private keys stay private.
    assert (
        out / "orgs" / "client-0" / "nodes" / "client-0" / "node.key"
    ).stat().st_mode & 0o077 == 0

    simulated = veil.run(load_config(run.config_path).model_copy(update={"mode": "simulation"}))
    assert abs(simulated.final["accuracy"] - deployed["final"]["accuracy"]) <= 0.01


def test_the_deployed_server_speaks_only_mutual_tls(tmp_path: Path) -> None:
    """`veil server` as `veil run` starts it: a plaintext connection and a TLS connection
    without a client certificate are refused; a member's certificate gets an answer."""
    config_path = tmp_path / "run.toml"
    config_path.write_text(CONFIG)
    files = deployment.prepare_deployment(
        load_config(config_path), tmp_path / "out", config_path=config_path
    )
    server = spawn_veil(files.server_args(), files.logs / "server.log")
    try:
        address = f"localhost:{wait_for_port(files.port_file, server, 120)}"
        member = client_credentials(files.orgs_dir / "client-0", "client-0")

        def status(channel: grpc.Channel) -> str:
            with channel:
                reply = pb_grpc.FederationStub(channel).Status(pb.StatusRequest(), timeout=10)
                return str(reply.json)

        for stranger in (
            grpc.insecure_channel(address),
            grpc.secure_channel(address, grpc.ssl_channel_credentials(member.ca_certificate)),
        ):
            with pytest.raises(grpc.RpcError) as info:
                status(stranger)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert '"run_id"' in status(open_channel(address, member))
    finally:
        server.kill()
        server.wait()


@pytest.mark.slow
@pytest.mark.parametrize(
    "neighbours",
    [None, 2],
    ids=["secagg", "secagg+"],
)
def test_secure_aggregation_deployment_matches_plain(
    deploy: Deploy, neighbours: int | None
) -> None:
    """The medical SecAgg example as real processes (6 of its 20 rounds, to keep the suite
    short): SecAgg's extra steps (signed views, the consistency round) travel through the same
    signed, nonce-bound gRPC tasks; peers' identity keys come from their CA-signed
    certificates, relayed by the server. The accuracy is plain aggregation's, within 0.01."""
    example = (EXAMPLES / "medical_diagnosis_secagg.toml").read_text()
    assert "rounds = 20" in example
    text = example.replace("rounds = 20", "rounds = 6").replace(
        'mode = "simulation"', 'mode = "deployment"'
    )
    if neighbours is not None:
        text = text.replace("[secagg]", f"[secagg]\nneighbours = {neighbours}")
    text += "\n[deployment]\nround_deadline_s = 60\ntimeout_s = 300\n"
    run = deploy(text)
    deployed = run.result
    assert deployed["privacy"]["aggregation"] == "secagg"
    assert deployed["privacy"]["secure_aggregation"]["neighbours"] == neighbours
    for r in deployed["rounds"]:
        assert r["clients"] == 5 and r["aggregation"]["survivors"] == 5
    server_log = run.log()
    assert '"kind": "protocol_result"' in server_log and '"kind": "fit_result"' in server_log
    # Seven tasks a round: set-up, keys, shares, fit, the consistency signature, unmask, evaluate.
    assert '"event": "done", "client": "client-0", "tasks": 42' in run.log("client-0")
    config = load_config(run.config_path)
    plain = veil.run(
        config.model_copy(
            update={"mode": "simulation", "secure_aggregation": "plain", "secagg": None}
        )
    )
    assert abs(plain.final["accuracy"] - deployed["final"]["accuracy"]) <= 0.01


def assert_key_custody(out: Path) -> None:
    """Every private key is in its owner's folder and nowhere else; the coordinator's folder
    holds no CA key and no member's private key; raw data is 0600 in 0700 folders."""
    every_file = [p for p in out.rglob("*") if p.is_file()]
    orgs = sorted(p.name for p in (out / "orgs").iterdir())
    assert orgs == ["client-0", "client-1", "client-2", "server"]
    secrets: dict[Path, bytes] = {out / "ca" / "ca.key": (out / "ca" / "ca.key").read_bytes()}
    for org in orgs:
        node = out / "orgs" / org / "nodes" / org
        for key in ("node.key", "identity.key", "encryption.key"):
            secrets[node / key] = (node / key).read_bytes()
            assert (node / key).stat().st_mode & 0o077 == 0
        assert (node / "request.csr").is_file()  # the CA signed a request, not a key it made
    for owner, blob in secrets.items():
        assert [p for p in every_file if blob in p.read_bytes()] == [owner], owner
    server_dir = out / "orgs" / "server"
    for path in server_dir.rglob("*"):
        if path.is_file() and path.name.endswith(".key"):
            assert path.parent == server_dir / "nodes" / "server" or path.name == "checkpoint.key"
    assert not (server_dir / "he" / "sealed").exists()
    for org in orgs:
        assert (out / "orgs" / org).stat().st_mode & 0o077 == 0
    for data in [*(out / "orgs").glob("client-*/data.npz"), server_dir / "server-test.npz"]:
        assert data.stat().st_mode & 0o077 == 0
    # The coordinator's command line names its own folder and the run folder, nothing else.
    files = deployment.DeploymentFiles(
        config_path=out / "run.toml", run_dir=out, ca_dir=out / "ca", orgs_dir=out / "orgs",
        logs=out / "logs", key_file=server_dir / "checkpoint.key",
        port_file=out / "server.port", clients=orgs[:-1],
    )  # fmt: skip
    paths = [Path(a) for a in files.server_args() if "/" in a]
    for path in paths:
        assert path in (out, server_dir) or server_dir in path.parents or path.parent == out, path


@pytest.mark.slow
def test_client_level_dp_under_secure_aggregation_in_deployment(deploy: Deploy) -> None:
    """The clients clip and add the noise (distributed discrete Gaussian); the server accounts.
    Every organisation made its own keys and had the CA sign a request (the loopback run plays
    each party in its own folder): no folder but its owner's holds a private key."""
    text = CONFIG.replace("seed = 7", 'seed = 7\nsecure_aggregation = "secagg"')
    text = text.replace(
        'dataset = "breast_cancer"',
        'dataset = "breast_cancer"\nscaling = "bounds"\nvalidation_fraction = 0.0',
    )
    text = text.replace("learning_rate = 0.1", "learning_rate = 0.1\nfraction_evaluate = 0.0")
    text += "[privacy]\nunit = 'client'\nepsilon = 5.0\ndelta = 1e-5\nclip_norm = 1.0\n"
    run = deploy(text)
    deployed = run.result
    privacy = deployed["privacy"]
    assert privacy["aggregation"] == "secagg" and privacy["unit"] == "client"
    assert 0 < privacy["epsilon"] <= 5.0 + 1e-9
    assert "added by the clients" in privacy["mechanism"]["noise"]
    assert all(r["applied"] and r["aggregation"]["survivors"] == 3 for r in deployed["rounds"])
    assert_key_custody(run.out)


@pytest.mark.slow
def test_record_level_dp_in_deployment_is_accounted_as_in_simulation(deploy: Deploy) -> None:
    """Each organisation plans DP-SGD from the shared config and its own data (the same σ, q
    and steps the coordinator accounts for it from the size it declared); the per-organisation
    record equals simulation's."""
    text = CONFIG.replace(
        'dataset = "breast_cancer"',
        'dataset = "breast_cancer"\nscaling = "none"\nvalidation_fraction = 0.0',
    )
    text = text.replace("learning_rate = 0.1", "learning_rate = 0.1\nfraction_evaluate = 0.0")
    text += "[privacy]\nunit = 'record'\nepsilon = 2.0\ndelta = 1e-5\nclip_norm = 1.0\n"
    run = deploy(text)
    deployed = run.result["privacy"]
    assert deployed["unit"] == "record" and 0 < deployed["epsilon"] <= 2.0 + 1e-9
    simulated = veil.run(load_config(run.config_path).model_copy(update={"mode": "simulation"}))
    record = simulated.privacy.model_dump()
    assert deployed["epsilon"] == pytest.approx(record["epsilon"], abs=1e-9)
    by_name = {o["name"]: o for o in deployed["per_organisation"]}
    for org in record["per_organisation"]:
        assert by_name[org["name"]]["epsilon"] == pytest.approx(org["epsilon"], abs=1e-9)
        assert by_name[org["name"]]["mechanism"] == org["mechanism"]
    assert all(r["applied"] and r["clients"] == 3 for r in run.result["rounds"])
