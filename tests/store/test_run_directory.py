"""One run per output folder, stale temp files cleaned, and `veil run --resume` after a kill -9."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import veil
from veil.errors import UserError
from veil.store.lock import LOCK_FILE, run_directory

CONFIG = """
name = "locked"
seed = 5
[data]
dataset = "breast_cancer"
[model]
name = "logistic"
[federation]
clients = 3
rounds = 8
learning_rate = 0.1
"""

# Holds the folder's lock until it is told to stop (a line on stdin).
HOLDER = textwrap.dedent(
    """
    import sys
    from veil.store.lock import run_directory
    with run_directory(sys.argv[1]):
        print("held", flush=True)
        sys.stdin.readline()
    """
)

# A `veil run` that SIGKILLs itself after round 4 is recorded (and checkpointed).
KILLED = textwrap.dedent(
    """
    import os, signal, sys
    import veil

    class KillAfter:
        def on_round_start(self, round_, selected): pass
        def on_client_done(self, round_, client): pass
        def on_round_end(self, record, parameters, strategy):
            if record.round == 4:
                os.kill(os.getpid(), signal.SIGKILL)

    veil.run(sys.argv[1], sys.argv[2], observers=[KillAfter()])
    """
)


def test_a_second_run_in_the_same_folder_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(CONFIG)
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"another run is using .*process {holder.pid}"):
            veil.run(config, out)
        proc = subprocess.run(
            [sys.executable, "-m", "veil.cli", "run", str(config), "--out", str(out), "--quiet"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2
        assert len(proc.stderr.strip().splitlines()) == 1 and "another run" in proc.stderr
        assert not (out / "result.json").exists()
    finally:
        holder.communicate("\n", timeout=30)
    # Released with its process: the folder can be used again.
    assert veil.run(config, out).final["accuracy"] > 0.8


def test_a_killed_run_leaves_no_lock_and_its_temp_files_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == b"held"
    holder.kill()
    holder.wait()
    stale = out / ".checkpoint.safetensors.k3j2l1.tmp"
    stale.write_bytes(b"half a checkpoint")
    with run_directory(out):
        assert not stale.exists()
        assert (out / LOCK_FILE).read_text().strip().isdigit()


def test_veil_run_resume_after_kill_9_finishes_every_round_once(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(CONFIG)
    out = tmp_path / "out"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED, str(config), str(out)], capture_output=True, timeout=300
    )
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "result.json").exists()
    proc = subprocess.run(
        [sys.executable, "-m", "veil.cli", "run", str(config), "--out", str(out), "--resume",
         "--quiet"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "result.json").read_text())
    assert [r["round"] for r in result["rounds"]] == list(range(1, 9))
    uninterrupted = veil.run(config, tmp_path / "again")
    assert result["final"]["accuracy"] == pytest.approx(uninterrupted.final["accuracy"], abs=1e-9)
