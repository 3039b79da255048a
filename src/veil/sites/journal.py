"""A site's journal: every job it was offered, what it answered, what it charged, how it ended.

One SQLite file (``HOME/journal.db``, `synchronous=FULL`) in the site's own folder. The site
writes its answer here before it sends it, and its ledger charges' ids before it joins a job,
so a site killed at any moment and started again answers the same, never charges a job twice,
and rejoins the jobs it had joined (`veil.sites.site`).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from veil.database import open_database

Entry = Literal["accepted", "refused", "running", "finished", "failed", "cancelled"]
FINAL_ENTRIES: frozenset[str] = frozenset({"refused", "finished", "failed", "cancelled"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id     TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    submitter  TEXT NOT NULL,
    state      TEXT NOT NULL,
    reason     TEXT NOT NULL DEFAULT '',
    dataset    TEXT,
    charges    TEXT NOT NULL DEFAULT '[]',
    epsilon    REAL NOT NULL DEFAULT 0,
    delta      REAL NOT NULL DEFAULT 0,
    attempts   INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class JournalEntry:
    """One job as the site saw it."""

    job_id: str
    name: str
    submitter: str
    state: Entry
    reason: str
    dataset: str | None
    charges: list[int]
    epsilon: float
    delta: float
    attempts: int
    created_at: str
    updated_at: str

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Journal:
    """The site's journal in one SQLite file."""

    def __init__(self, path: Path) -> None:
        self._db = open_database(path, _SCHEMA, what="site journal")

    def close(self) -> None:
        self._db.close()

    def get(self, job_id: str) -> JournalEntry | None:
        row = self._db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return None if row is None else _entry(row)

    def entries(self) -> list[JournalEntry]:
        rows = self._db.execute("SELECT * FROM jobs ORDER BY created_at, job_id").fetchall()
        return [_entry(r) for r in rows]

    def answered(
        self, job_id: str, *, name: str, submitter: str, accept: bool, reason: str, dataset: str
    ) -> JournalEntry:
        """Record the site's answer to an offer (the first answer stands)."""
        now = _now()
        self._db.execute(
            "INSERT OR IGNORE INTO jobs (job_id, name, submitter, state, reason, dataset, "
            "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (job_id, name, submitter, "accepted" if accept else "refused", reason, dataset,
             now, now),
        )  # fmt: skip
        entry = self.get(job_id)
        assert entry is not None
        return entry

    def update(self, job_id: str, state: Entry, **fields: Any) -> None:
        """Move a job to `state`, with any of reason, charges, epsilon, delta, attempts."""
        sets: dict[str, Any] = {"state": state, "updated_at": _now()}
        for key in ("reason", "epsilon", "delta", "attempts"):
            if key in fields:
                sets[key] = fields[key]
        if "charges" in fields:
            sets["charges"] = json.dumps(list(fields["charges"]))
        self._db.execute(
            f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in sets)} WHERE job_id = ?",
            (*sets.values(), job_id),
        )


def _entry(row: sqlite3.Row) -> JournalEntry:
    return JournalEntry(
        job_id=row["job_id"],
        name=row["name"],
        submitter=row["submitter"],
        state=row["state"],
        reason=row["reason"],
        dataset=row["dataset"],
        charges=json.loads(row["charges"]),
        epsilon=row["epsilon"],
        delta=row["delta"],
        attempts=row["attempts"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
