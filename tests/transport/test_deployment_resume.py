"""A deployment survives the server's SIGKILL: `veil server --resume` finishes the run with every
round recorded once, and the clients, which kept retrying, rejoin."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import veil
from veil.config import load_config
from veil.deployment import prepare_deployment
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
rounds = 40
learning_rate = 0.1
[deployment]
round_deadline_s = 60
reconnect_timeout_s = 120
"""


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "veil.cli", *args], stdout=handle, stderr=subprocess.STDOUT
        )


def wait_for(predicate, timeout: float) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("timed out")


def rounds_recorded(db: Path) -> list[int]:
    if not db.is_file():
        return []
    try:
        with sqlite3.connect(db) as conn:
            return [r[0] for r in conn.execute("SELECT round FROM rounds ORDER BY round")]
    except sqlite3.OperationalError:  # the server is still creating the tables
        return []


def prepare(tmp_path: Path, text: str) -> tuple[Any, ...]:
    """The files `veil run` would prepare, then the server and client processes by hand."""
    config_path = tmp_path / "run.toml"
    config_path.write_text(text)
    config = load_config(config_path)
    files = prepare_deployment(config, tmp_path / "out", config_path=config_path)
    server_args = files.server_args()
    server = spawn(server_args, files.logs / "server.log")
    wait_for(files.port_file.exists, 60)
    port = files.port_file.read_text()
    clients = [
        spawn(files.client_args(name, f"localhost:{port}"), files.logs / f"{name}.log")
        for name in files.clients
    ]
    return config, files.run_dir, files.logs, server_args, server, clients, port


def test_server_killed_and_resumed_finishes_every_round_once(tmp_path: Path) -> None:
    config, out, logs, server_args, server, clients, port = prepare(tmp_path, CONFIG)
    try:
        wait_for(lambda: len(rounds_recorded(out / "veil.db")) >= 2, 120)
        server.send_signal(signal.SIGKILL)
        server.wait()
        killed_at = rounds_recorded(out / "veil.db")
        assert killed_at and killed_at[-1] < 40
        # The checkpoint on disk is sealed: unreadable without the key.
        with pytest.raises(StoreError, match="encrypted"):
            load_checkpoint(out / "checkpoint.safetensors")
        # Restart on the same port, so the clients' retries reach it.
        resume_args = [a if a != "127.0.0.1:0" else f"127.0.0.1:{port}" for a in server_args]
        server = spawn([*resume_args, "--resume"], logs / "server.log")
        assert server.wait(timeout=240) == 0, (logs / "server.log").read_text()
        for proc in clients:
            assert proc.wait(timeout=60) == 0
    finally:
        for proc in [server, *clients]:
            if proc.poll() is None:
                proc.kill()
    result = json.loads((out / "result.json").read_text())
    assert [r["round"] for r in result["rounds"]] == list(range(1, 41))
    assert rounds_recorded(out / "veil.db") == list(range(1, 41))
    reference = veil.run(config.model_copy(update={"mode": "simulation"}))
    assert abs(result["final"]["accuracy"] - reference.final["accuracy"]) <= 0.03


def test_a_client_killed_mid_run_is_dropped_and_the_run_completes(tmp_path: Path) -> None:
    # The server waits for all three clients before round 1; rounds then take milliseconds, so
    # the kill lands within the first few of 12 rounds, and every later round waits out the
    # 1-second deadline for the dead client.
    text = CONFIG.replace("clients = 2", "clients = 3").replace("rounds = 40", "rounds = 12")
    text = text.replace("round_deadline_s = 60", "round_deadline_s = 1")
    _, out, logs, _, server, clients, _ = prepare(tmp_path, text)
    try:
        wait_for(lambda: len(rounds_recorded(out / "veil.db")) >= 1, 120)
        clients[2].send_signal(signal.SIGKILL)
        killed_after = len(rounds_recorded(out / "veil.db"))
        assert server.wait(timeout=240) == 0, (logs / "server.log").read_text()
    finally:
        for proc in [server, *clients]:
            if proc.poll() is None:
                proc.kill()
    result = json.loads((out / "result.json").read_text())
    assert [r["round"] for r in result["rounds"]] == list(range(1, 13))
    assert killed_after < 12
    assert result["rounds"][0]["clients"] == 3  # everyone was connected before round 1
    assert result["rounds"][-1]["dropped"] == 1 and result["rounds"][-1]["clients"] == 2
    assert "missed the deadline" in (logs / "server.log").read_text()
    assert result["final"]["accuracy"] > 0.85
