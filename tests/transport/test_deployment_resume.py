"""A deployment survives the server's SIGKILL: `veil server --resume` finishes the run with every
round recorded once, and the clients, which kept retrying, rejoin. A member killed mid-run is
dropped and the run completes.

Both kills are deterministic: the process kills itself at a chosen round (`support.DYING_CLI`),
so no test watches for a round and races the run to it. The server comes back at the address
the members retry; that port stays reserved for the test in between (`ReservedPort`), so no
other process can take it while the server is down.
"""

from __future__ import annotations

import json
import signal
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

import veil
from support import ReservedPort, spawn_veil, wait_for_port
from veil.config import load_config
from veil.deployment import DeploymentFiles, prepare_deployment
from veil.store import load_checkpoint
from veil.store.checkpoint import StoreError

CONFIG = """
name = "resumed"
mode = "deployment"
seed = 3
[data]
dataset = "breast_cancer"
[model]
name = "logistic"
[federation]
clients = 2
rounds = 12
learning_rate = 0.1
[deployment]
round_deadline_s = 60
reconnect_timeout_s = 120
"""

#: The server kills itself right after writing this round's checkpoint.
SERVER_DIES_AFTER = 4
#: The member `VICTIM` kills itself when handed this round's fit task.
VICTIM_DIES_AT = 3
VICTIM = "client-2"


def rounds_recorded(db: Path) -> list[int]:
    with closing(sqlite3.connect(db)) as conn:
        return [r[0] for r in conn.execute("SELECT round FROM rounds ORDER BY round")]


def prepare(tmp_path: Path, text: str, port: ReservedPort) -> DeploymentFiles:
    """The files `veil run` would prepare; the server is to listen on the reserved port."""
    config_path = tmp_path / "run.toml"
    config_path.write_text(text)
    config = load_config(config_path)
    return prepare_deployment(config, tmp_path / "out", config_path=config_path)


def server_args(files: DeploymentFiles, port: ReservedPort) -> list[str]:
    args = files.server_args()
    assert "127.0.0.1:0" in args
    return [port.address() if a == "127.0.0.1:0" else a for a in args]


@pytest.mark.slow
def test_server_killed_and_resumed_finishes_every_round_once(tmp_path: Path) -> None:
    with ReservedPort() as port:
        files = prepare(tmp_path, CONFIG, port)
        out, logs = files.run_dir, files.logs
        args = server_args(files, port)
        server = spawn_veil(args, logs / "server.log", die=("checkpoint", SERVER_DIES_AFTER))
        clients = []
        try:
            assert wait_for_port(files.port_file, server, 120) == port.port
            clients = [
                spawn_veil(files.client_args(n, f"localhost:{port.port}"), logs / f"{n}.log")
                for n in files.clients
            ]
            assert server.wait(timeout=240) == -signal.SIGKILL, (logs / "server.log").read_text()
            # Killed after writing round 4's checkpoint, before round 4 reached the run store.
            assert rounds_recorded(out / "veil.db") == list(range(1, SERVER_DIES_AFTER))
            # The checkpoint on disk is sealed: unreadable without the key.
            with pytest.raises(StoreError, match="encrypted"):
                load_checkpoint(out / "checkpoint.safetensors")
            # Back at the same address, which the members keep retrying.
            server = spawn_veil([*args, "--resume"], logs / "server.log")
            assert server.wait(timeout=240) == 0, (logs / "server.log").read_text()
            for proc in clients:
                assert proc.wait(timeout=60) == 0
        finally:
            for proc in [server, *clients]:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    result = json.loads((out / "result.json").read_text())
    assert [r["round"] for r in result["rounds"]] == list(range(1, 13))
    assert rounds_recorded(out / "veil.db") == list(range(1, 13))
    config = load_config(files.config_path)
    reference = veil.run(config.model_copy(update={"mode": "simulation"}))
    assert abs(result["final"]["accuracy"] - reference.final["accuracy"]) <= 0.03


@pytest.mark.slow
def test_a_client_killed_mid_run_is_dropped_and_the_run_completes(tmp_path: Path) -> None:
    text = CONFIG.replace("clients = 2", "clients = 3").replace("rounds = 12", "rounds = 6")
    text = text.replace("round_deadline_s = 60", "round_deadline_s = 2")
    with ReservedPort() as port:
        files = prepare(tmp_path, text, port)
        out, logs = files.run_dir, files.logs
        server = spawn_veil(server_args(files, port), logs / "server.log")
        clients = []
        try:
            wait_for_port(files.port_file, server, 120)
            address = f"localhost:{port.port}"
            clients = [
                spawn_veil(
                    files.client_args(n, address),
                    logs / f"{n}.log",
                    die=("fit", VICTIM_DIES_AT) if n == VICTIM else None,
                )
                for n in files.clients
            ]
            assert server.wait(timeout=240) == 0, (logs / "server.log").read_text()
            victim = clients[files.clients.index(VICTIM)]
            assert victim.wait(timeout=10) == -signal.SIGKILL
        finally:
            for proc in [server, *clients]:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    result = json.loads((out / "result.json").read_text())
    rounds = result["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, 7))
    # Everyone took part until the victim died, handed its round-3 task; it is dropped from
    # that round on, and the run completes with the other two.
    for r in rounds:
        alive = r["round"] < VICTIM_DIES_AT
        assert (r["clients"], r["dropped"]) == ((3, 0) if alive else (2, 1)), r
        assert r["applied"]
    server_log = (logs / "server.log").read_text()
    assert '"event": "dropped"' in server_log and f'"client": "{VICTIM}"' in server_log
    assert result["final"]["accuracy"] > 0.85
