"""SIGTERM and Ctrl-C stop a run at a round boundary: the run is marked interrupted, its finished
rounds, result.json and report are kept, and `veil run --resume` finishes it with every round once
and the metrics of an uninterrupted run. A second Ctrl-C aborts at once. Stores written before
the `interrupted` status existed are migrated."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import veil
from veil.federation import RoundRecord, Strategy
from veil.result import Result
from veil.store import Checkpoint, RunStore, load_checkpoint, save_checkpoint
from veil.tensors import NamedArrays

CONFIG = """
name = "stopped"
seed = 5
[data]
dataset = "breast_cancer"
[model]
name = "logistic"
[federation]
clients = 3
rounds = {rounds}
local_epochs = {epochs}
learning_rate = 0.1
"""


def write_config(tmp_path: Path, rounds: int, *, epochs: int = 1) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(CONFIG.format(rounds=rounds, epochs=epochs))
    return path


def stored(out: Path) -> tuple[list[str], list[int]]:
    """The statuses of the runs in `out`'s store and the rounds recorded, in order."""
    try:
        with sqlite3.connect(out / "veil.db") as db:
            statuses = [r[0] for r in db.execute("SELECT status FROM runs")]
            return statuses, [r[0] for r in db.execute("SELECT round FROM rounds ORDER BY round")]
    except sqlite3.OperationalError:  # not created yet
        return [], []


def wait_for_rounds(out: Path, n: int, proc: subprocess.Popen[str], timeout: float) -> None:
    """Poll the store until `n` rounds are recorded (the deadline starts here, after start-up
    began); fail if the run ends first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if len(stored(out)[1]) >= n:
            return
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.01)
    raise AssertionError(f"fewer than {n} rounds recorded within {timeout} s")


def veil_run(config: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "veil.cli", "run", str(config), "--out", str(out), "--quiet",
         *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def resume(config: Path, out: Path) -> None:
    proc = veil_run(config, out, "--resume")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_the_run_at_a_round_boundary_and_resume_finishes_it(
    tmp_path: Path, signum: signal.Signals, status: int
) -> None:
    rounds = 300  # ~10 ms each: the signal lands long before the last one
    config, out = write_config(tmp_path, rounds), tmp_path / "out"
    proc = veil_run(config, out)
    try:
        wait_for_rounds(out, 2, proc, timeout=120)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == status, err
    statuses, recorded = stored(out)
    assert statuses == ["interrupted"]
    assert recorded == list(range(1, len(recorded) + 1)) and len(recorded) < rounds
    # result.json holds exactly the finished rounds, says why it stopped; the report is there.
    result = Result.model_validate_json((out / "result.json").read_text())
    assert result.status == "interrupted" and result.interrupted_by == signum.name
    assert [r.round for r in result.rounds] == recorded and result.rounds_planned == rounds
    assert "interrupted" in (out / "report.html").read_text()
    # One line says how to continue.
    hint = [line for line in err.splitlines() if "--resume" in line]
    assert hint == [
        f"veil: interrupted by {signum.name} after round {recorded[-1]} of {rounds}; the "
        f"finished rounds are kept; continue with `veil run {config} --out {out} --resume`"
    ]
    listed = subprocess.run(
        [sys.executable, "-m", "veil.cli", "runs", "list", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert listed.returncode == 0 and "interrupted" in listed.stdout

    resume(config, out)
    assert stored(out) == (["finished"], list(range(1, rounds + 1)))
    finished = json.loads((out / "result.json").read_text())
    assert finished["status"] == "finished"
    assert [r["round"] for r in finished["rounds"]] == list(range(1, rounds + 1))
    assert finished["final"] == veil.run(config).final  # same seed, bit for bit


@pytest.mark.slow
def test_a_second_ctrl_c_aborts_at_once_and_the_run_can_still_be_resumed(tmp_path: Path) -> None:
    # ~1 s rounds: the second Ctrl-C, a few milliseconds after the first, lands mid-round.
    rounds = 5
    config, out = write_config(tmp_path, rounds, epochs=1000), tmp_path / "out"
    proc = veil_run(config, out)
    try:
        wait_for_rounds(out, 1, proc, timeout=120)
        proc.send_signal(signal.SIGINT)
        before = len(stored(out)[1])
        # Two signals sent at once may arrive as one: the second goes once the first is heard.
        assert proc.stderr is not None and "stopping after" in proc.stderr.readline()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "aborted by a second signal (SIGINT)" in err and "--resume" in err
    # Aborted mid-round, not at the boundary: that round and the result were not written,
    # yet the store says the run was interrupted.
    assert not (out / "result.json").exists()
    assert stored(out) == (["interrupted"], list(range(1, before + 1)))
    resume(config, out)
    assert stored(out) == (["finished"], list(range(1, rounds + 1)))


class StopAfter:
    """An observer standing in for the signal: asks the run to stop once `round_` is done."""

    def __init__(self, round_: int) -> None:
        self.round = round_
        self.requested = False
        self.signal_name = "SIGTERM"

    def __call__(self) -> bool:
        return self.requested

    def on_round_start(self, round_: int, selected: int) -> None:
        pass

    def on_client_done(self, round_: int, client: str) -> None:
        pass

    def on_round_end(
        self, record: RoundRecord, parameters: NamedArrays, strategy: Strategy
    ) -> None:
        self.requested = record.round >= self.round


def test_the_api_stops_when_asked_and_resume_gives_the_uninterrupted_metrics(
    tmp_path: Path,
) -> None:
    config, out = write_config(tmp_path, 8), tmp_path / "out"
    stop = StopAfter(3)
    result = veil.run(config, out, observers=[stop], stop=stop)
    assert result.status == "interrupted" and result.interrupted_by == "SIGTERM"
    assert [r.round for r in result.rounds] == [1, 2, 3]
    assert stored(out) == (["interrupted"], [1, 2, 3])
    assert json.loads((out / "result.json").read_text())["status"] == "interrupted"
    resumed = veil.run(config, out, resume=True)
    assert resumed.status == "finished" and [r.round for r in resumed.rounds] == list(range(1, 9))
    assert stored(out) == (["finished"], list(range(1, 9)))
    assert resumed.final == veil.run(config).final


def test_a_resumed_secure_run_keeps_each_restored_rounds_aggregation_summary(
    tmp_path: Path,
) -> None:
    """The SecAgg summary of the rounds before the stop (dropouts, threshold, ...) is in the
    resumed run's result as in the uninterrupted run's: the store and checkpoint keep it."""
    config = tmp_path / "secagg.toml"
    config.write_text(
        CONFIG.format(rounds=4, epochs=1)
        .replace("seed = 5", 'seed = 5\nsecure_aggregation = "secagg"')
        .replace('dataset = "breast_cancer"', 'dataset = "breast_cancer"\nscaling = "local"')
        + "[secagg]\nclip_range = 4.0\nmax_weight = 1000\n"
    )
    out = tmp_path / "out"
    stop = StopAfter(2)
    assert veil.run(config, out, observers=[stop], stop=stop).status == "interrupted"
    resumed = veil.run(config, out, resume=True)
    whole = veil.run(config)
    assert [r.aggregation for r in resumed.rounds] == [r.aggregation for r in whole.rounds]
    assert all(r.aggregation for r in whole.rounds), "SecAgg rounds carry a summary"
    # SecAgg's stochastic rounding draws from the CSPRNG: equal up to that rounding.
    assert resumed.final == pytest.approx(whole.final, abs=1e-5)


class InterruptAt(StopAfter):
    def on_round_end(
        self, record: RoundRecord, parameters: NamedArrays, strategy: Strategy
    ) -> None:
        if record.round == self.round:
            raise KeyboardInterrupt


def test_a_keyboard_interrupt_without_handlers_marks_the_run_interrupted(tmp_path: Path) -> None:
    config, out = write_config(tmp_path, 8), tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        veil.run(config, out, observers=[InterruptAt(2)])
    assert stored(out) == (["interrupted"], [1, 2])


# The runs table as Veil created it before the `interrupted` status existed.
OLD_SCHEMA = """
CREATE TABLE runs (
    run_id      TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    mode        TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('running', 'finished', 'failed')),
    started_at  TEXT NOT NULL,
    finished_at TEXT,
    config      TEXT NOT NULL,
    final       TEXT,
    out_dir     TEXT
);
CREATE TABLE rounds (
    run_id     TEXT NOT NULL REFERENCES runs(run_id),
    round      INTEGER NOT NULL,
    clients    INTEGER NOT NULL,
    dropped    INTEGER NOT NULL,
    selected   INTEGER NOT NULL DEFAULT 0,
    applied    INTEGER NOT NULL,
    metrics    TEXT NOT NULL,
    epsilon    REAL,
    bytes_up   INTEGER NOT NULL,
    bytes_down INTEGER NOT NULL,
    duration_s REAL NOT NULL,
    failures   TEXT NOT NULL,
    PRIMARY KEY (run_id, round)
);
"""


def old_store(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(OLD_SCHEMA)
        for run_id, status in (("old-1", "finished"), ("old-2", "running")):
            db.execute(
                "INSERT INTO runs VALUES (?, 'n', 'simulation', ?, '2025-01-01', NULL, '{}', "
                "'{\"accuracy\": 0.9}', NULL)",
                (run_id, status),
            )
            db.execute(
                "INSERT INTO rounds VALUES (?, 1, 3, 0, 3, 1, '{\"accuracy\": 0.9}', NULL, 10, "
                "20, 0.5, '[]')",
                (run_id,),
            )
        with pytest.raises(sqlite3.IntegrityError):
            db.execute("UPDATE runs SET status = 'interrupted' WHERE run_id = 'old-2'")


def test_a_store_from_before_the_interrupted_status_is_migrated_rows_kept(
    tmp_path: Path,
) -> None:
    db = tmp_path / "veil.db"
    old_store(db)
    with RunStore(db) as store:
        store.finish_run("old-2", status="interrupted", final=None)
        runs = {s.run_id: s for s in store.list_runs()}
        assert {k: (s.status, s.rounds) for k, s in runs.items()} == {
            "old-1": ("finished", 1),
            "old-2": ("interrupted", 1),
        }
        assert runs["old-1"].final == {"accuracy": 0.9}
        assert store.get_run("old-1")[2][0]["metrics"] == {"accuracy": 0.9}
        assert store.get_run("old-1")[2][0]["aggregation"] == {}  # the column added
        store.record_round("old-2", {"round": 2, "clients": 3, "dropped": 0, "metrics": {}})
        with pytest.raises(ValueError, match="not 'bogus'"):
            store.finish_run("old-1", status="bogus", final=None)
    with sqlite3.connect(db) as raw:
        # The constraint is still enforced, and the rounds still reference their runs.
        raw.execute("PRAGMA foreign_keys=ON")
        with pytest.raises(sqlite3.IntegrityError):
            raw.execute("UPDATE runs SET status = 'bogus'")
        with pytest.raises(sqlite3.IntegrityError):
            raw.execute(
                "INSERT INTO rounds (run_id, round, clients, dropped, selected, applied, "
                "metrics, epsilon, bytes_up, bytes_down, duration_s, failures) "
                "VALUES ('nobody', 1, 1, 0, 1, 1, '{}', NULL, 0, 0, 0, '[]')"
            )
        assert raw.execute("PRAGMA foreign_key_check").fetchall() == []
    RunStore(db).close()  # opening a migrated store again changes nothing


def test_a_result_json_from_before_status_reads_as_finished() -> None:
    old: dict[str, Any] = {
        "run_id": "r",
        "mode": "simulation",
        "final": {"accuracy": 0.9},
        "rounds": [],
        "privacy": {},
        "communication": {"bytes_up": 0, "bytes_down": 0},
        "timing": {"total_s": 1.0},
    }
    result = Result.model_validate_json(json.dumps(old))
    assert result.status == "finished" and result.rounds_planned is None
    assert result.interrupted_by is None


def test_a_checkpoint_gives_the_parameters_back_in_the_models_order(tmp_path: Path) -> None:
    # Safetensors keeps tensors by name; a resumed deployment's members check the order.
    parameters = {n: np.zeros(2, np.float32) for n in ("linear.weight", "linear.bias", "a")}
    state = {n: np.ones(1) for n in ("m", "b")}
    save_checkpoint(tmp_path / "c", Checkpoint("r", 1, parameters, state, {}))
    loaded = load_checkpoint(tmp_path / "c")
    assert list(loaded.parameters) == ["linear.weight", "linear.bias", "a"]
    assert list(loaded.strategy_state) == ["m", "b"]
