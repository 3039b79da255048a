"""Every SQLite file Veil keeps opens one way (`veil.database.open_database`): durable (WAL,
synchronous=FULL), and a file that is not such a database is named as what it should have been,
never a bare sqlite3 error; a committed write survives the process being killed."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from veil.database import open_database
from veil.errors import StoreError
from veil.privacy.dp.ledger import PrivacyLedger
from veil.sites.jobs import JobStore
from veil.sites.journal import Journal
from veil.store import RunStore

OPENERS: dict[str, Callable[[Path], object]] = {
    "run store": RunStore,
    "privacy ledger": PrivacyLedger,
    "job store": JobStore,
    "site journal": Journal,
}


@pytest.mark.parametrize("what", sorted(OPENERS))
def test_a_file_that_is_not_a_database_is_named(tmp_path: Path, what: str) -> None:
    path = tmp_path / "not.db"
    path.write_bytes(b"these are not the rows you are looking for\n" * 100)
    with pytest.raises(StoreError, match=f"'{path}' is not a Veil {what}"):
        OPENERS[what](path)
    assert path.read_bytes().startswith(b"these are not")  # left as it was


@pytest.mark.parametrize("what", sorted(OPENERS))
def test_each_store_is_durable(tmp_path: Path, what: str) -> None:
    path = tmp_path / "sub" / "store.db"  # the folder is created
    OPENERS[what](path)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_a_committed_write_survives_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "kv.db"
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from veil.database import open_database\n"
        "schema = 'CREATE TABLE IF NOT EXISTS kv (k TEXT)'\n"
        "db = open_database(Path(sys.argv[1]), schema, what='t')\n"
        "db.execute('BEGIN IMMEDIATE'); db.execute(\"INSERT INTO kv VALUES ('kept')\")\n"
        "db.execute('COMMIT')\n"
        "db.execute('BEGIN IMMEDIATE'); db.execute(\"INSERT INTO kv VALUES ('lost')\")\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(path)], check=False)
    assert proc.returncode == -9
    db = open_database(path, "CREATE TABLE IF NOT EXISTS kv (k TEXT)", what="t")
    assert [r["k"] for r in db.execute("SELECT k FROM kv")] == ["kept"]
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    db.close()
    assert os.path.exists(path)
