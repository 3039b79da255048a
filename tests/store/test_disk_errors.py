"""A full disk or a read-only one is named as such, on real file systems (a small tmpfs; mounting
needs root, so the tests skip elsewhere): one line naming the file, never "not a Veil run
store", and after space is freed `veil run --resume` finishes the run with every round once."""

from __future__ import annotations

import errno
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import veil
from veil.atomic import atomic_write_text, disk_error
from veil.errors import DiskFullError, WritePermissionError
from veil.federation import RoundRecord, Strategy
from veil.privacy.dp.ledger import PrivacyLedger
from veil.result import Result
from veil.store import Checkpoint, RunStore, save_checkpoint
from veil.store.lock import run_directory
from veil.tensors import NamedArrays

CONFIG = """
name = "full"
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


def mount(*args: str) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({proc.stderr.strip()}); needs root")


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A fresh 2 MiB tmpfs, unmounted afterwards."""
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    where = tmp_path / "disk"
    where.mkdir()
    mount("-t", "tmpfs", "-o", "size=2M", "tmpfs", str(where))
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk: Path) -> Path:
    """Write a file until the disk has no page left; returns it (delete it to free space)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 16, 1 << 12):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def stored(out: Path) -> tuple[list[str], list[int]]:
    with sqlite3.connect(out / "veil.db") as db:
        statuses = [r[0] for r in db.execute("SELECT status FROM runs")]
        return statuses, [r[0] for r in db.execute("SELECT round FROM rounds ORDER BY round")]


class FillAfter:
    """Fills the disk once round `round_` is checkpointed and recorded."""

    def __init__(self, disk: Path, round_: int) -> None:
        self.disk, self.round = disk, round_

    def on_round_start(self, round_: int, selected: int) -> None:
        pass

    def on_client_done(self, round_: int, client: str) -> None:
        pass

    def on_round_end(
        self, record: RoundRecord, parameters: NamedArrays, strategy: Strategy
    ) -> None:
        if record.round == self.round:
            fill(self.disk)


def veil_run(config: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "veil.cli", "run", str(config), "--out", str(out), "--quiet",
         *extra],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.slow
def test_a_disk_that_fills_mid_run_is_named_and_resume_finishes_once_freed(
    tmp_path: Path, disk: Path
) -> None:
    config = tmp_path / "run.toml"
    config.write_text(CONFIG)
    out = disk / "out"
    with pytest.raises(DiskFullError) as raised:
        veil.run(config, out, observers=[FillAfter(disk, 3)])
    assert str(raised.value).startswith(f"disk full writing '{out / 'checkpoint.safetensors'}'")
    assert isinstance(raised.value, OSError) and raised.value.errno == errno.ENOSPC
    statuses, recorded = stored(out)
    assert recorded == [1, 2, 3]
    # Marked failed where the full disk still let SQLite write, else left as it was.
    assert statuses in (["failed"], ["running"])

    # Resuming on the still-full disk: one line that names the file and says what to do.
    proc = veil_run(config, out, "--resume")
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert len(line.splitlines()) == 1, line
    assert line.startswith(f"veil: error: disk full writing '{out}/")
    assert line.endswith(f"free space and run `veil run {config} --out {out} --resume`")
    assert "not a Veil run store" not in line

    (disk / "filler").unlink()
    proc = veil_run(config, out, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert stored(out) == (["finished"], list(range(1, 9)))
    result = veil.run(config)
    assert Result.model_validate_json((out / "result.json").read_text()).final == result.final


def test_a_store_on_a_full_disk_is_not_called_corrupt(disk: Path) -> None:
    fill(disk)
    db = re.escape(str(disk / "veil.db"))
    with pytest.raises(DiskFullError, match=f"^disk full writing '{db}'"):
        RunStore(disk / "veil.db")
    with pytest.raises(DiskFullError, match=r"result\.json"):
        atomic_write_text(disk / "result.json", "{}" * 10_000)
    assert sorted(p.name for p in disk.iterdir() if p.name.endswith(".tmp")) == []


def test_a_ledger_and_a_run_folder_on_a_full_disk_are_named(disk: Path) -> None:
    fill(disk)
    ledger = re.escape(str(disk / "ledger.db"))
    with pytest.raises(DiskFullError, match=f"^disk full writing '{ledger}'"):
        PrivacyLedger(disk / "ledger.db")
    # The lock file's pid (a few bytes in a fresh file) does not fit either.
    with pytest.raises(DiskFullError, match=r"\.veil\.lock"), run_directory(disk / "out"):
        pass


def test_a_ledger_that_fills_the_disk_mid_charge_is_named_and_keeps_its_charges(
    disk: Path,
) -> None:
    with PrivacyLedger(disk / "ledger.db") as ledger:
        ledger.set_budget("patients", epsilon=10.0, delta=1e-5)
        filler = fill(disk)
        with pytest.raises(DiskFullError, match=r"ledger\.db"):
            # Big enough that SQLite must grow the WAL file beyond its free pages.
            for _ in range(1000):
                ledger.set_budget("patients" + "x" * 2000, epsilon=10.0, delta=1e-5)
        filler.unlink()
        assert ledger.budget("patients").epsilon_limit == 10.0


def test_a_read_only_store_and_folder_are_named(disk: Path) -> None:
    with RunStore(disk / "veil.db") as store:
        store.start_run("r", name="n", mode="simulation", config={}, out_dir=None)
    mount("-o", "remount,ro", str(disk))
    db = re.escape(str(disk / "veil.db"))
    with pytest.raises(
        WritePermissionError, match=rf"^no permission to write '{db}' \(read-only file system\)"
    ):
        RunStore(disk / "veil.db")
    checkpoint = Checkpoint("r", 1, {"w": np.zeros(3, np.float32)}, {}, {})
    with pytest.raises(WritePermissionError, match=r"checkpoint\.safetensors"):
        save_checkpoint(disk / "checkpoint.safetensors", checkpoint)
    with pytest.raises(WritePermissionError, match=r"result\.json' \(read-only file system\)"):
        atomic_write_text(disk / "result.json", "{}")


def test_other_errors_are_not_renamed() -> None:
    assert disk_error(FileNotFoundError(errno.ENOENT, "gone"), "x") is None
    assert disk_error(sqlite3.DatabaseError("file is not a database"), "x") is None
    assert disk_error(ValueError("no"), "x") is None
    named = disk_error(OSError(errno.EACCES, "denied"), "/a/b")
    assert isinstance(named, WritePermissionError) and "'/a/b' (permission denied)" in str(named)
