"""`veil run` in deployment mode as an operator stops it: SIGTERM is forwarded to the server,
which stops at a round boundary, tells the clients the run is over and records it interrupted;
`--resume` finishes it with every round once and the metrics of an uninterrupted run. A kill -9
of `veil run` leaves no server or client behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import veil
from veil.config import load_config

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's"
)

CONFIG = """
name = "lifecycle"
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


def stored(out: Path) -> tuple[list[str], list[int]]:
    try:
        with sqlite3.connect(out / "veil.db") as db:
            statuses = [r[0] for r in db.execute("SELECT status FROM runs")]
            return statuses, [r[0] for r in db.execute("SELECT round FROM rounds ORDER BY round")]
    except sqlite3.OperationalError:  # not created yet
        return [], []


def start(tmp_path: Path, *extra: str) -> tuple[Path, Path, subprocess.Popen[str]]:
    config = tmp_path / "run.toml"
    if not config.is_file():
        config.write_text(CONFIG)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "veil.cli", "run", str(config), "--out", str(out), "--quiet",
         *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    return config, out, proc


def wait_for_rounds(out: Path, n: int, proc: subprocess.Popen[str], timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if len(stored(out)[1]) >= n:
            return
        assert proc.poll() is None, "veil run ended before it could be stopped"
        time.sleep(0.01)
    raise AssertionError(f"fewer than {n} rounds recorded within {timeout} s")


def children(pid: int) -> list[int]:
    """The live processes whose parent is `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    """Running, and not a zombie waiting for an init that may never reap it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_sigterm_stops_the_deployment_at_a_round_boundary_and_resume_finishes_it(
    tmp_path: Path,
) -> None:
    config, out, proc = start(tmp_path)
    try:
        wait_for_rounds(out, 2, proc, timeout=180)
        spawned = children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err + (out / "logs" / "server.log").read_text()
    assert len(spawned) == 3 and not any(alive(p) for p in spawned)  # server and two clients
    statuses, recorded = stored(out)
    assert statuses == ["interrupted"] and recorded == list(range(1, len(recorded) + 1))
    assert len(recorded) < 40
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "interrupted" and result["interrupted_by"] == "SIGTERM"
    assert [r["round"] for r in result["rounds"]] == recorded
    # The server told every client that the run is over: each left on its own.
    for name in ("client-0", "client-1"):
        assert '"event": "done"' in (out / "logs" / f"{name}.log").read_text()
    assert f"continue with `veil run {config} --out {out} --resume`" in err

    _, _, proc = start(tmp_path, "--resume")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err + (out / "logs" / "server.log").read_text()
    assert stored(out) == (["finished"], list(range(1, 41)))
    result = json.loads((out / "result.json").read_text())
    assert [r["round"] for r in result["rounds"]] == list(range(1, 41))
    reference = veil.run(load_config(config).model_copy(update={"mode": "simulation"}))
    assert result["final"] == pytest.approx(reference.final, abs=1e-6)


@pytest.mark.slow
def test_kill_9_of_veil_run_leaves_no_server_or_client(tmp_path: Path) -> None:
    _, out, proc = start(tmp_path)
    spawned: list[int] = []
    try:
        wait_for_rounds(out, 1, proc, timeout=180)
        spawned = children(proc.pid)
        assert len(spawned) == 3
        proc.kill()
        proc.wait()
        end = time.monotonic() + 15
        while any(alive(p) for p in spawned) and time.monotonic() < end:
            time.sleep(0.05)
        assert not [p for p in spawned if alive(p)], "children outlived veil run"
    finally:
        for pid in spawned:  # never leave them running, even when the test fails
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    # The server heard its parent die (SIGHUP) and recorded the run as interrupted.
    statuses, recorded = stored(out)
    assert statuses == ["interrupted"] and 1 <= len(recorded) < 40
