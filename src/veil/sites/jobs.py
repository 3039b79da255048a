"""The coordinator's job store: every submitted job, each site's answer, the job's events.

One SQLite file (``HOME/jobs.db``, WAL, `synchronous=FULL`) so that a coordinator killed at any
moment restarts with every job where it was. A job moves through the states of `TRANSITIONS`,
and only along them (`JobStore.move` refuses any other step, naming the job's state):

    offered ──▶ starting ──▶ running ──▶ finished
       │           │            │──────▶ failed
       ▼           ▼            ▼
    refused     failed      cancelled      (and offered / starting ──▶ cancelled)

- ``offered``: the sites it names are asked; each answers accept or refuse with a reason.
- ``starting``: every site answered and the job may run (all accepted, or it allows refusals
  and at least one accepted); under CKKS it waits here for the key material of its dealer.
- ``running``: its server process runs (after a coordinator restart: runs again, resumed
  from its checkpoint, on the same port).
"""

from __future__ import annotations

import functools
import json
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from veil.database import open_database
from veil.errors import UserError
from veil.sites.bundle import JobBundle

_T = TypeVar("_T")

State = Literal["offered", "starting", "running", "finished", "failed", "refused", "cancelled"]

#: Each state and the states a job may move to from it.
TRANSITIONS: dict[State, tuple[State, ...]] = {
    "offered": ("starting", "refused", "cancelled"),
    "starting": ("running", "failed", "cancelled"),
    "running": ("finished", "failed", "cancelled"),
    "finished": (),
    "failed": (),
    "refused": (),
    "cancelled": (),
}
FINAL: frozenset[State] = frozenset(s for s, nxt in TRANSITIONS.items() if not nxt)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id          TEXT PRIMARY KEY,
    seq         INTEGER NOT NULL,
    name        TEXT NOT NULL,
    submitter   TEXT NOT NULL,
    bundle      TEXT NOT NULL,
    state       TEXT NOT NULL,
    reason      TEXT,
    port        INTEGER,
    dropped     TEXT NOT NULL DEFAULT '[]',
    summary     TEXT,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS answers (
    job_id  TEXT NOT NULL REFERENCES jobs(id),
    site    TEXT NOT NULL,
    accept  INTEGER NOT NULL,
    reason  TEXT NOT NULL,
    at      TEXT NOT NULL,
    PRIMARY KEY (job_id, site)
);
CREATE TABLE IF NOT EXISTS events (
    id      INTEGER PRIMARY KEY,
    job_id  TEXT NOT NULL,
    at      TEXT NOT NULL,
    event   TEXT NOT NULL,
    detail  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS material (
    job_id  TEXT NOT NULL,
    name    TEXT NOT NULL,
    data    BLOB NOT NULL,
    PRIMARY KEY (job_id, name)
);
"""


class JobNotFound(UserError):
    """No job with that id."""


@dataclass(frozen=True)
class Answer:
    """A site's answer to an offered job."""

    site: str
    accept: bool
    reason: str
    at: str


@dataclass(frozen=True)
class Job:
    """One row of the store."""

    bundle: JobBundle
    seq: int
    state: State
    reason: str | None
    port: int | None
    dropped: list[str]
    summary: dict[str, Any] | None
    created_at: str
    updated_at: str

    @property
    def id(self) -> str:
        return self.bundle.job_id

    def members(self) -> list[str]:
        """The organisations that take part (those named, less those dropped)."""
        return [n for n in self.bundle.organisations() if n not in self.dropped]


def _serialised(method: Callable[..., _T]) -> Callable[..., _T]:
    """One call at a time on the store's connection (the control service's threads and the
    scheduler share it)."""

    @functools.wraps(method)
    def call(self: JobStore, *args: Any, **kwargs: Any) -> _T:
        with self._lock:
            return method(self, *args, **kwargs)

    return call


class JobStore:
    """The coordinator's jobs in one SQLite file, safe to share between threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._db = open_database(path, _SCHEMA, what="job store", threads=True)

    @_serialised
    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @_serialised
    def add(self, bundle: JobBundle) -> Job:
        """Store a newly submitted job as ``offered``; a job id seen before is refused."""
        now = _now()
        with self._write() as db:
            if db.execute("SELECT 1 FROM jobs WHERE id = ?", (bundle.job_id,)).fetchone():
                raise UserError(f"job {bundle.job_id} was submitted before; submit it anew")
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
            db.execute(
                "INSERT INTO jobs (id, seq, name, submitter, bundle, state, created_at, "
                "updated_at) VALUES (?, ?, ?, ?, ?, 'offered', ?, ?)",
                (bundle.job_id, seq, bundle.name, bundle.submitter,
                 json.dumps(bundle.to_json()), now, now),
            )  # fmt: skip
            self._event(db, bundle.job_id, "submitted", f"by {bundle.submitter}")
        return self.get(bundle.job_id)

    @_serialised
    def get(self, job_id: str) -> Job:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no job '{job_id}'; `veil job list` shows the jobs")
        return _job(row)

    @_serialised
    def jobs(self, *, states: tuple[State, ...] | None = None) -> list[Job]:
        """Every job (in these states), oldest first."""
        rows = self._db.execute("SELECT * FROM jobs ORDER BY seq").fetchall()
        jobs = [_job(r) for r in rows]
        return [j for j in jobs if states is None or j.state in states]

    @_serialised
    def move(self, job_id: str, state: State, *, reason: str | None = None, **fields: Any) -> Job:
        """Move a job to `state` (only along `TRANSITIONS`), with its reason and any of the
        columns port, dropped, summary."""
        with self._write() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFound(f"no job '{job_id}'")
            current: State = row["state"]
            if state != current and state not in TRANSITIONS[current]:
                raise UserError(f"job {job_id} is {current}; it cannot become {state}")
            sets = {"state": state, "updated_at": _now()}
            if reason is not None:
                sets["reason"] = reason
            for key in ("port", "dropped", "summary"):
                if key in fields:
                    value = fields[key]
                    sets[key] = value if key == "port" else json.dumps(value)
            db.execute(
                f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in sets)} WHERE id = ?",
                (*sets.values(), job_id),
            )
            if state != current:
                self._event(db, job_id, state, reason or "")
        return self.get(job_id)

    @_serialised
    def answer(self, job_id: str, site: str, *, accept: bool, reason: str) -> None:
        """Record a site's answer (its first answer stands)."""
        with self._write() as db:
            inserted = db.execute(
                "INSERT OR IGNORE INTO answers (job_id, site, accept, reason, at) "
                "VALUES (?, ?, ?, ?, ?)",
                (job_id, site, int(accept), reason, _now()),
            ).rowcount
            if not inserted:
                return  # a later answer changes nothing, so the job's events do not show it
            said = "accepted" if accept else f"refused: {reason}"
            self._event(db, job_id, "answer", f"{site} {said}")

    @_serialised
    def answers(self, job_id: str) -> dict[str, Answer]:
        rows = self._db.execute("SELECT * FROM answers WHERE job_id = ?", (job_id,)).fetchall()
        return {r["site"]: Answer(r["site"], bool(r["accept"]), r["reason"], r["at"]) for r in rows}

    @_serialised
    def event(self, job_id: str, event: str, detail: str = "") -> None:
        with self._write() as db:
            self._event(db, job_id, event, detail)

    @_serialised
    def events(self, job_id: str) -> list[dict[str, str]]:
        rows = self._db.execute(
            "SELECT at, event, detail FROM events WHERE job_id = ? ORDER BY id", (job_id,)
        ).fetchall()
        return [dict(r) for r in rows]

    @_serialised
    def put_material(self, job_id: str, files: Mapping[str, bytes]) -> None:
        """Store a job's key material (public key set, sealed boxes), once."""
        with self._write() as db:
            for name, data in files.items():
                db.execute(
                    "INSERT OR IGNORE INTO material (job_id, name, data) VALUES (?, ?, ?)",
                    (job_id, name, data),
                )
            self._event(db, job_id, "key material", ", ".join(sorted(files)))

    @_serialised
    def material(self, job_id: str) -> dict[str, bytes]:
        rows = self._db.execute(
            "SELECT name, data FROM material WHERE job_id = ?", (job_id,)
        ).fetchall()
        return {r["name"]: bytes(r["data"]) for r in rows}

    @staticmethod
    def _event(db: sqlite3.Connection, job_id: str, event: str, detail: str) -> None:
        db.execute(
            "INSERT INTO events (job_id, at, event, detail) VALUES (?, ?, ?, ?)",
            (job_id, _now(), event, detail),
        )


def open_store(path: Path) -> closing[JobStore]:
    """`JobStore(path)` as a context manager."""
    return closing(JobStore(path))


def _job(row: sqlite3.Row) -> Job:
    return Job(
        bundle=JobBundle.from_json(json.loads(row["bundle"])),
        seq=row["seq"],
        state=row["state"],
        reason=row["reason"],
        port=row["port"],
        dropped=json.loads(row["dropped"]),
        summary=json.loads(row["summary"]) if row["summary"] else None,
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
