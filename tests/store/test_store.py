"""Tests for `veil.store`: atomic writes, checkpoints and the SQLite run store."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from veil.errors import StoreError, UserError
from veil.store import (
    DB_NAME,
    Checkpoint,
    RunStore,
    atomic_write_bytes,
    atomic_write_text,
    load_checkpoint,
    save_checkpoint,
)

# --- atomic writes ---------------------------------------------------------------------------


def test_atomic_write_creates_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file.bin"
    atomic_write_bytes(target, b"first")
    assert target.read_bytes() == b"first"
    atomic_write_bytes(target, b"second, longer content")
    assert target.read_bytes() == b"second, longer content"
    atomic_write_text(target, "três")
    assert target.read_text(encoding="utf-8") == "três"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]


def test_atomic_write_sets_mode(tmp_path: Path) -> None:
    target = tmp_path / "secret"
    atomic_write_bytes(target, b"x", mode=0o600)
    assert target.stat().st_mode & 0o777 == 0o600


def test_failed_replace_keeps_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "file.bin"
    atomic_write_bytes(target, b"old content")

    def broken_replace(src: object, dst: object) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        atomic_write_bytes(target, b"new content")
    assert target.read_bytes() == b"old content"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_failed_write_keeps_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "file.bin"
    atomic_write_bytes(target, b"old content")

    def broken_fsync(fd: int) -> None:
        raise OSError("fsync failed")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="fsync failed"):
        atomic_write_bytes(target, b"new content")
    assert target.read_bytes() == b"old content"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


# --- checkpoints -----------------------------------------------------------------------------


def make_checkpoint() -> Checkpoint:
    rng = np.random.default_rng(0)
    return Checkpoint(
        run_id="run-123",
        round=7,
        parameters={
            "layers.0.weight": rng.normal(size=(4, 3)).astype(np.float32),
            "layers.0.bias": rng.normal(size=(4,)).astype(np.float32),
        },
        strategy_state={
            "m/layers.0.weight": rng.normal(size=(4, 3)).astype(np.float32),
            "v/layers.0.weight": rng.random(size=(4, 3)).astype(np.float32),
        },
        meta={"strategy": "fedadam", "seed": 42, "nested": {"a": [1, 2]}},
    )


def assert_checkpoints_equal(a: Checkpoint, b: Checkpoint) -> None:
    assert (a.run_id, a.round, a.meta) == (b.run_id, b.round, b.meta)
    for mine, theirs in ((a.parameters, b.parameters), (a.strategy_state, b.strategy_state)):
        assert sorted(mine) == sorted(theirs)
        for k in mine:
            assert theirs[k].dtype == mine[k].dtype
            np.testing.assert_array_equal(theirs[k], mine[k])


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "ckpt" / "latest.safetensors"
    ckpt = make_checkpoint()
    save_checkpoint(path, ckpt)
    assert path.stat().st_mode & 0o777 == 0o600
    assert_checkpoints_equal(load_checkpoint(path), ckpt)


def test_checkpoint_without_strategy_state(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    ckpt = Checkpoint("r", 1, make_checkpoint().parameters, {}, {})
    save_checkpoint(path, ckpt)
    loaded = load_checkpoint(path)
    assert loaded.strategy_state == {}
    assert_checkpoints_equal(loaded, ckpt)


def test_checkpoint_overwrite_keeps_latest(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, make_checkpoint())
    newer = Checkpoint("run-123", 8, make_checkpoint().parameters, {}, {"x": 1})
    save_checkpoint(path, newer)
    assert load_checkpoint(path).round == 8
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


def test_missing_checkpoint_raises_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no checkpoint"):
        load_checkpoint(tmp_path / "absent.safetensors")
    assert issubclass(StoreError, UserError)


@pytest.mark.parametrize("keep", [0, 5, 8, 40, -9, -1])
def test_truncated_checkpoint_raises_store_error(tmp_path: Path, keep: int) -> None:
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, make_checkpoint())
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(StoreError, match="unreadable"):
        load_checkpoint(path)


def test_garbage_checkpoint_raises_store_error(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    path.write_bytes(os.urandom(64) + b"not a checkpoint")
    with pytest.raises(StoreError, match="unreadable"):
        load_checkpoint(path)


def test_corrupted_header_raises_store_error(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, make_checkpoint())
    data = bytearray(path.read_bytes())
    data[10:20] = b"\xff" * 10  # inside the JSON header
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="unreadable"):
        load_checkpoint(path)


def test_safetensors_without_veil_metadata_raises_store_error(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    path = tmp_path / "c.safetensors"
    save_file({"parameters/w": np.zeros(2, np.float32)}, str(path))
    with pytest.raises(StoreError, match="unreadable"):
        load_checkpoint(path)


# --- run store -------------------------------------------------------------------------------


def round_record(rnd: int, **overrides: object) -> dict[str, object]:
    record: dict[str, object] = {
        "round": rnd,
        "clients": 5,
        "dropped": 1,
        "applied": True,
        "metrics": {"accuracy": 0.5 + rnd / 100, "loss": 1.0 / rnd},
        "epsilon": None,
        "bytes_up": 100 * rnd,
        "bytes_down": 200 * rnd,
        "duration_s": 0.25,
        "failures": [{"client": "c1", "reason": "dropout"}],
    }
    record.update(overrides)
    return record


def test_run_store_round_trip(tmp_path: Path) -> None:
    config = {"federation": {"clients": 5, "rounds": 2}, "seed": 1}
    with RunStore(tmp_path / DB_NAME) as store:
        store.start_run("run-a", name="demo", mode="simulation", config=config, out_dir="/out/a")
        summary, got_config, rounds = store.get_run("run-a")
        assert summary.status == "running"
        assert summary.finished_at is None
        assert summary.rounds == 0
        assert rounds == []

        store.record_round("run-a", round_record(1))
        store.record_round("run-a", round_record(2, applied=False, epsilon=1.5))
        store.finish_run("run-a", status="finished", final={"accuracy": 0.9})

    with RunStore.locate(tmp_path) as store:  # reopened from the run folder
        summary, got_config, rounds = store.get_run("run-a")
    assert got_config == config
    assert summary.run_id == "run-a"
    assert summary.name == "demo"
    assert summary.mode == "simulation"
    assert summary.status == "finished"
    assert summary.finished_at is not None
    assert summary.rounds == 2
    assert summary.final == {"accuracy": 0.9}
    assert summary.out_dir == "/out/a"
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["applied"] is True
    assert rounds[1]["applied"] is False
    assert rounds[1]["epsilon"] == 1.5
    assert rounds[0]["epsilon"] is None
    assert rounds[1]["metrics"] == {"accuracy": 0.52, "loss": 0.5}
    assert rounds[1]["bytes_up"] == 200
    assert rounds[1]["bytes_down"] == 400
    assert rounds[0]["duration_s"] == 0.25


def test_record_round_replaces_on_resume(tmp_path: Path) -> None:
    with RunStore(tmp_path / DB_NAME) as store:
        store.start_run("r", name="n", mode="simulation", config={}, out_dir=None)
        store.record_round("r", round_record(1))
        store.record_round("r", round_record(1, clients=9))
        summary, _, rounds = store.get_run("r")
    assert summary.rounds == 1
    assert rounds[0]["clients"] == 9


def test_list_runs(tmp_path: Path) -> None:
    with RunStore(tmp_path / DB_NAME) as store:
        assert store.list_runs() == []
        for run_id in ("run-1", "run-2", "run-3"):
            store.start_run(run_id, name=run_id, mode="simulation", config={}, out_dir=None)
        store.record_round("run-2", round_record(1))
        store.finish_run("run-3", status="failed", final=None)
        runs = store.list_runs()
    assert sorted(r.run_id for r in runs) == ["run-1", "run-2", "run-3"]
    by_id = {r.run_id: r for r in runs}
    assert by_id["run-2"].rounds == 1
    assert by_id["run-1"].rounds == 0
    assert by_id["run-3"].status == "failed"
    assert by_id["run-3"].final is None
    # Newest first; runs started within the same second are ordered by id, descending.
    assert [r.started_at for r in runs] == sorted((r.started_at for r in runs), reverse=True)


def test_duplicate_run_id_is_refused(tmp_path: Path) -> None:
    with RunStore(tmp_path / DB_NAME) as store:
        store.start_run("r", name="n", mode="simulation", config={}, out_dir=None)
        with pytest.raises(sqlite3.IntegrityError):
            store.start_run("r", name="n", mode="simulation", config={}, out_dir=None)


def test_get_unknown_run_lists_known_runs(tmp_path: Path) -> None:
    with RunStore(tmp_path / DB_NAME) as store:
        with pytest.raises(StoreError, match="no runs"):
            store.get_run("missing")
        store.start_run("alpha", name="a", mode="simulation", config={}, out_dir=None)
        store.start_run("beta", name="b", mode="simulation", config={}, out_dir=None)
        with pytest.raises(StoreError) as info:
            store.get_run("gamma")
    message = str(info.value)
    assert "gamma" in message
    assert "alpha" in message
    assert "beta" in message


def test_locate_missing_path_raises_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no run store"):
        RunStore.locate(tmp_path / "nowhere")
    # An existing folder without a database is refused too, and nothing is created in it.
    with pytest.raises(StoreError, match="no run store"):
        RunStore.locate(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_locate_accepts_database_file(tmp_path: Path) -> None:
    with RunStore(tmp_path / DB_NAME) as store:
        store.start_run("r", name="n", mode="simulation", config={}, out_dir=None)
    with RunStore.locate(tmp_path / DB_NAME) as store:
        assert [r.run_id for r in store.list_runs()] == ["r"]


def test_non_sqlite_file_raises_store_error(tmp_path: Path) -> None:
    path = tmp_path / DB_NAME
    path.write_bytes(b"this is not a database, just some text that is long enough " * 20)
    with pytest.raises(StoreError, match="not a Veil run store"):
        RunStore(path)
    with pytest.raises(StoreError, match="not a Veil run store"):
        RunStore.locate(tmp_path)
    # The file was not touched.
    assert path.read_bytes().startswith(b"this is not a database")
