"""The run store: runs, rounds and their metrics in one SQLite database (`RUN_DIR/veil.db`).

Each round is committed as it finishes, so a crashed run still shows what it did. The database is
SQLite, embedded, so that a run needs no database server; the privacy ledger is its own SQLite
file (`veil.privacy.dp.ledger`).

A run's status is `running`, `finished`, `failed` (an error stopped it) or `interrupted` (a
signal stopped it; `veil run --resume` continues it). A store written before `interrupted`
existed, or before rounds kept their aggregation summary, is migrated when it is opened. A full
disk or a refused write is raised as `DiskFullError` / `WritePermissionError` naming the
database, never as "not a run store".
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from veil.atomic import writing
from veil.database import open_database
from veil.errors import StoreError

DB_NAME = "veil.db"

#: Every status a run can have.
STATUSES = ("running", "finished", "failed", "interrupted")

_RUNS = """
CREATE TABLE IF NOT EXISTS {name} (
    run_id      TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    mode        TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('running', 'finished', 'failed', 'interrupted')),
    started_at  TEXT NOT NULL,
    finished_at TEXT,
    config      TEXT NOT NULL,
    final       TEXT,
    out_dir     TEXT
);
"""

_SCHEMA = (
    _RUNS.format(name="runs")
    + """
CREATE TABLE IF NOT EXISTS rounds (
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
    aggregation TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (run_id, round)
);
"""
)


@dataclass(frozen=True)
class RunSummary:
    """One row of `veil runs list`."""

    run_id: str
    name: str
    mode: str
    status: str
    started_at: str
    finished_at: str | None
    rounds: int
    final: dict[str, Any] | None
    out_dir: str | None


class RunStore:
    """A SQLite database of runs. Open one per process; every write commits at once."""

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise StoreError(f"no run store at '{self.path}'; pass a run folder or a veil.db file")
        self._db = open_database(
            self.path, _SCHEMA, what="run store", autocommit=False, migrate=_migrate
        )

    @classmethod
    def locate(cls, where: str | Path) -> RunStore:
        """Open an existing store given a run folder or the database file itself."""
        where = Path(where)
        return cls(where / DB_NAME if where.is_dir() else where, create=False)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with writing(self.path), self._db:
            yield self._db

    def start_run(
        self, run_id: str, *, name: str, mode: str, config: dict[str, Any], out_dir: str | None
    ) -> None:
        """Record a new run as running."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO runs (run_id, name, mode, status, started_at, config, out_dir) "
                "VALUES (?, ?, ?, 'running', ?, ?, ?)",
                (run_id, name, mode, _now(), json.dumps(config, sort_keys=True), out_dir),
            )

    def record_round(self, run_id: str, record: dict[str, Any]) -> None:
        """Insert (or replace, on resume) one round of a run."""
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO rounds (run_id, round, clients, dropped, selected, applied,"
                " metrics, epsilon, bytes_up, bytes_down, duration_s, failures, aggregation)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    record["round"],
                    record["clients"],
                    record["dropped"],
                    record.get("selected", record["clients"] + record["dropped"]),
                    int(record.get("applied", True)),
                    json.dumps(record["metrics"], sort_keys=True),
                    record.get("epsilon"),
                    record.get("bytes_up", 0),
                    record.get("bytes_down", 0),
                    record.get("duration_s", 0.0),
                    json.dumps(record.get("failures", [])),
                    json.dumps(record.get("aggregation", {}), sort_keys=True),
                ),
            )

    def resume_run(self, run_id: str) -> None:
        """Mark an existing run as running again (after a crash); `StoreError` if unknown."""
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE runs SET status = 'running', finished_at = NULL WHERE run_id = ?",
                (run_id,),
            )
        if cursor.rowcount == 0:
            raise StoreError(f"no run '{run_id}' in '{self.path}' to resume")

    def finish_run(self, run_id: str, *, status: str, final: dict[str, Any] | None) -> None:
        """Mark a run finished, failed or interrupted, with its final metrics (None if none)."""
        if status not in STATUSES[1:]:
            raise ValueError(f"a run ends finished, failed or interrupted, not '{status}'")
        with self._tx() as db:
            db.execute(
                "UPDATE runs SET status = ?, finished_at = ?, final = ? WHERE run_id = ?",
                (status, _now(), json.dumps(final) if final is not None else None, run_id),
            )

    def list_runs(self) -> list[RunSummary]:
        """All runs, newest first."""
        rows = self._db.execute(
            "SELECT r.*, (SELECT COUNT(*) FROM rounds WHERE rounds.run_id = r.run_id) AS n_rounds"
            " FROM runs r ORDER BY started_at DESC, run_id DESC"
        ).fetchall()
        return [_summary(row) for row in rows]

    def get_run(self, run_id: str) -> tuple[RunSummary, dict[str, Any], list[dict[str, Any]]]:
        """A run's summary, config and rounds; `StoreError` naming the known runs if absent."""
        row = self._db.execute(
            "SELECT r.*, (SELECT COUNT(*) FROM rounds WHERE rounds.run_id = r.run_id) AS n_rounds"
            " FROM runs r WHERE run_id = ?",
            (run_id,),
        ).fetchone()
        if row is None:
            known = [r.run_id for r in self.list_runs()[:5]]
            hint = f"; known runs: {', '.join(known)}" if known else "; the store has no runs"
            raise StoreError(f"no run '{run_id}' in '{self.path}'{hint}")
        rounds = [
            {
                "round": r["round"],
                "clients": r["clients"],
                "dropped": r["dropped"],
                "selected": r["selected"],
                "applied": bool(r["applied"]),
                "metrics": json.loads(r["metrics"]),
                "epsilon": r["epsilon"],
                "bytes_up": r["bytes_up"],
                "bytes_down": r["bytes_down"],
                "duration_s": r["duration_s"],
                "failures": json.loads(r["failures"]),
                "aggregation": json.loads(r["aggregation"]),
            }
            for r in self._db.execute(
                "SELECT * FROM rounds WHERE run_id = ? ORDER BY round", (run_id,)
            )
        ]
        return _summary(row), json.loads(row["config"]), rounds


def find_stores(where: str | Path) -> list[Path]:
    """The run stores at `where`: a veil.db file, a run folder, or a folder of run folders.

    Raises `StoreError` (saying what to pass) when there is none.
    """
    where = Path(where)
    if where.is_file():
        return [where]
    if (where / DB_NAME).is_file():
        return [where / DB_NAME]
    if where.is_dir():
        found = sorted(where.glob(f"*/{DB_NAME}"))
        if found:
            return found
    raise StoreError(
        f"no run store at '{where}': pass a run folder (one holding {DB_NAME}), "
        "a folder of run folders, or a veil.db file"
    )


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a store written by an earlier Veil to the current schema, rows kept: add the
    rounds' `aggregation` column, and rebuild a `runs` table whose status CHECK predates
    `interrupted` (SQLite cannot alter a constraint) as a copy that replaces it in one
    transaction."""
    rounds_columns = {r[1] for r in db.execute("PRAGMA table_info(rounds)")}
    if "aggregation" not in rounds_columns:
        with db:
            try:
                db.execute("ALTER TABLE rounds ADD COLUMN aggregation TEXT NOT NULL DEFAULT '{}'")
            except sqlite3.OperationalError as exc:
                if "duplicate column" not in str(exc):  # another process added it meanwhile
                    raise

    def outdated() -> bool:
        row = db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'runs'")
        sql = row.fetchone()
        return sql is not None and "'interrupted'" not in sql[0]

    if not outdated():
        return
    # The rounds' references to runs stay as they are while the table is swapped.
    db.execute("PRAGMA foreign_keys=OFF")
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            if outdated():  # another process may have migrated it meanwhile
                columns = ", ".join(r[1] for r in db.execute("PRAGMA table_info(runs)"))
                db.execute(_RUNS.format(name="runs_migrated"))
                db.execute(f"INSERT INTO runs_migrated ({columns}) SELECT {columns} FROM runs")
                db.execute("DROP TABLE runs")
                db.execute("ALTER TABLE runs_migrated RENAME TO runs")
                broken = db.execute("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise sqlite3.IntegrityError(f"{len(broken)} rounds lost their run")
        except BaseException:
            db.rollback()
            raise
        db.commit()
    finally:
        db.execute("PRAGMA foreign_keys=ON")


def _summary(row: sqlite3.Row) -> RunSummary:
    return RunSummary(
        run_id=row["run_id"],
        name=row["name"],
        mode=row["mode"],
        status=row["status"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        rounds=row["n_rounds"],
        final=json.loads(row["final"]) if row["final"] else None,
        out_dir=row["out_dir"],
    )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
