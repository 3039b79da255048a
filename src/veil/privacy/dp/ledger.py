"""The privacy ledger: one SQLite database per data owner recording every (ε, δ) spent.

A data owner sets a budget per data set (`veil budget set`); every differentially private
release is charged against it *before* it is computed (docs/privacy.md): `charge` commits the charge
durably (WAL, `synchronous=FULL`) before it returns, so a crash after the charge can only
over-count, never under-count. A request that would exceed the budget is refused with
`BudgetExceeded`, and nothing is recorded.

Composition in the ledger is *basic*: the ε of all charges add up, and so do the δ. Basic
composition is valid for any sequence of (ε, δ)-DP releases, adaptive ones included, and it is
conservative: advanced or privacy-loss-distribution accounting would give a smaller total. Tighter
accounting belongs in the accountant, which composes the steps of one run (DP-SGD rounds, say)
into a single (ε, δ) *before* it is charged here as one line.

Concurrency: every charge runs in one `BEGIN IMMEDIATE` transaction, which takes SQLite's write
lock before reading what is spent, so two processes charging the same data set are serialised
and their total never exceeds the limit.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from veil.atomic import writing
from veil.database import open_database
from veil.errors import StoreError, UserError

#: Slack for floating-point sums: a request exceeding the limit by less than this is allowed.
TOLERANCE = 1e-12

_SCHEMA = """
CREATE TABLE IF NOT EXISTS budgets (
    dataset_id TEXT PRIMARY KEY,
    epsilon    REAL NOT NULL CHECK (epsilon >= 0),
    delta      REAL NOT NULL CHECK (delta >= 0 AND delta < 1),
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS charges (
    id          INTEGER PRIMARY KEY,
    dataset_id  TEXT NOT NULL REFERENCES budgets(dataset_id),
    who         TEXT NOT NULL,
    what        TEXT NOT NULL,
    mechanism   TEXT NOT NULL,
    parameters  TEXT NOT NULL,
    epsilon     REAL NOT NULL CHECK (epsilon >= 0),
    delta       REAL NOT NULL CHECK (delta >= 0),
    charged_at  TEXT NOT NULL,
    released_at TEXT
);
CREATE INDEX IF NOT EXISTS charges_by_dataset ON charges(dataset_id);
"""


class BudgetExceeded(UserError):
    """A charge would take a data set past its privacy budget; nothing was charged.

    The message names the data set, the (ε, δ) requested, what remains, the shortfall, and what
    to do next; the same numbers are attributes for programs.
    """

    def __init__(
        self,
        dataset_id: str,
        *,
        requested: tuple[float, float],
        remaining: tuple[float, float],
    ) -> None:
        self.dataset_id = dataset_id
        self.requested = requested
        self.remaining = remaining
        self.shortfall = (
            max(0.0, requested[0] - remaining[0]),
            max(0.0, requested[1] - remaining[1]),
        )
        short = ", ".join(
            f"{name}={value:.6g}"
            for name, value in zip(("ε", "δ"), self.shortfall, strict=True)
            if value > TOLERANCE
        )
        super().__init__(
            f"privacy budget of data set '{dataset_id}' exceeded: requested "
            f"(ε={requested[0]:.6g}, δ={requested[1]:.6g}) but only "
            f"(ε={remaining[0]:.6g}, δ={remaining[1]:.6g}) remain (short by {short}); "
            f"nothing was charged. Raise the budget with `veil budget set {dataset_id} "
            "--epsilon E --delta D --ledger PATH`, or ask for less"
        )


@dataclass(frozen=True)
class Budget:
    """A data set's limit and what has been charged against it (basic composition)."""

    dataset_id: str
    epsilon_limit: float
    delta_limit: float
    epsilon_spent: float
    delta_spent: float

    @property
    def epsilon_remaining(self) -> float:
        return max(0.0, self.epsilon_limit - self.epsilon_spent)

    @property
    def delta_remaining(self) -> float:
        return max(0.0, self.delta_limit - self.delta_spent)


@dataclass(frozen=True)
class Charge:
    """One line of the ledger. `released_at` is None until the release is known to be done;
    an unreleased charge still counts (it may be a release that crashed half-way)."""

    id: int
    dataset_id: str
    who: str
    what: str
    mechanism: str
    parameters: dict[str, Any]
    epsilon: float
    delta: float
    charged_at: str
    released_at: str | None


class PrivacyLedger:
    """A privacy ledger in one SQLite file. Open one per process; safe across processes."""

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise StoreError(
                f"no privacy ledger at '{self.path}'; create one with "
                f"`veil budget set DATASET --epsilon E --delta D --ledger {self.path}`"
            )
        # Autocommit: every write below opens its own transaction; FULL: a commit is on disk
        # (WAL fsynced) before `COMMIT` returns.
        self._db = open_database(self.path, _SCHEMA, what="privacy ledger")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> PrivacyLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _immediate(self) -> Iterator[sqlite3.Connection]:
        """One write transaction holding SQLite's write lock from its first statement."""
        with writing(self.path):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def set_budget(self, dataset_id: str, *, epsilon: float, delta: float) -> Budget:
        """Create or change a data set's budget. Lowering it below what is spent is refused."""
        _check_name(dataset_id, "data set id")
        if not (math.isfinite(epsilon) and epsilon > 0):
            raise UserError(f"budget ε must be a positive finite number, got {epsilon}")
        if not (math.isfinite(delta) and 0 <= delta < 1):
            raise UserError(f"budget δ must be in [0, 1), got {delta}")
        with self._immediate() as db:
            eps_spent, delta_spent = self._spent(db, dataset_id)
            if epsilon + TOLERANCE < eps_spent or delta + TOLERANCE < delta_spent:
                raise UserError(
                    f"cannot set the budget of '{dataset_id}' to (ε={epsilon:.6g}, "
                    f"δ={delta:.6g}): (ε={eps_spent:.6g}, δ={delta_spent:.6g}) is already "
                    "spent, and a budget cannot go below what was spent"
                )
            db.execute(
                "INSERT INTO budgets (dataset_id, epsilon, delta, updated_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT(dataset_id) DO UPDATE SET epsilon = excluded.epsilon,"
                " delta = excluded.delta, updated_at = excluded.updated_at",
                (dataset_id, float(epsilon), float(delta), _now()),
            )
        return self.budget(dataset_id)

    def budget(self, dataset_id: str) -> Budget:
        """A data set's budget and spending; `UserError` if it has none."""
        row = self._db.execute(
            "SELECT epsilon, delta FROM budgets WHERE dataset_id = ?", (dataset_id,)
        ).fetchone()
        if row is None:
            known = [b.dataset_id for b in self.budgets()][:5]
            hint = f" (known: {', '.join(known)})" if known else ""
            raise UserError(
                f"data set '{dataset_id}' has no privacy budget in '{self.path}'{hint}; set one "
                f"with `veil budget set {dataset_id} --epsilon E --delta D --ledger {self.path}`"
            )
        eps_spent, delta_spent = self._spent(self._db, dataset_id)
        return Budget(dataset_id, row["epsilon"], row["delta"], eps_spent, delta_spent)

    def budgets(self) -> list[Budget]:
        """Every data set's budget, by id."""
        ids = [
            r["dataset_id"]
            for r in self._db.execute("SELECT dataset_id FROM budgets ORDER BY dataset_id")
        ]
        return [self.budget(i) for i in ids]

    def charge(
        self,
        dataset_id: str,
        *,
        epsilon: float,
        delta: float,
        who: str,
        what: str,
        mechanism: str,
        parameters: Mapping[str, object],
    ) -> Charge:
        """Charge (ε, δ) to a data set, durably, or refuse with `BudgetExceeded`.

        Reading the spent total, the check and the insert happen in one `BEGIN IMMEDIATE`
        transaction, committed (and fsynced) before this returns. `parameters` must be JSON.
        """
        if not (math.isfinite(epsilon) and epsilon >= 0):
            raise UserError(f"a charge's ε must be a non-negative finite number, got {epsilon}")
        if not (math.isfinite(delta) and 0 <= delta < 1):
            raise UserError(f"a charge's δ must be in [0, 1), got {delta}")
        try:
            params_json = json.dumps(dict(parameters), sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise UserError(f"charge parameters must be JSON-serialisable: {exc}") from None
        charged_at = _now()
        with self._immediate() as db:
            row = db.execute(
                "SELECT epsilon, delta FROM budgets WHERE dataset_id = ?", (dataset_id,)
            ).fetchone()
            if row is None:
                raise UserError(
                    f"data set '{dataset_id}' has no privacy budget in '{self.path}'; set one "
                    f"with `veil budget set {dataset_id} --epsilon E --delta D "
                    f"--ledger {self.path}`"
                )
            eps_spent, delta_spent = self._spent(db, dataset_id)
            if (
                eps_spent + epsilon > row["epsilon"] + TOLERANCE
                or delta_spent + delta > row["delta"] + TOLERANCE
            ):
                raise BudgetExceeded(
                    dataset_id,
                    requested=(epsilon, delta),
                    remaining=(
                        max(0.0, row["epsilon"] - eps_spent),
                        max(0.0, row["delta"] - delta_spent),
                    ),
                )
            cursor = db.execute(
                "INSERT INTO charges (dataset_id, who, what, mechanism, parameters, epsilon,"
                " delta, charged_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    dataset_id,
                    who,
                    what,
                    mechanism,
                    params_json,
                    float(epsilon),
                    float(delta),
                    charged_at,
                ),
            )
            charge_id = cursor.lastrowid
        assert charge_id is not None
        return Charge(
            id=charge_id,
            dataset_id=dataset_id,
            who=who,
            what=what,
            mechanism=mechanism,
            parameters=json.loads(params_json),
            epsilon=float(epsilon),
            delta=float(delta),
            charged_at=charged_at,
            released_at=None,
        )

    def mark_released(self, charge_id: int) -> None:
        """Record that a charged release finished. Marking twice keeps the first time."""
        with self._immediate() as db:
            if db.execute("SELECT 1 FROM charges WHERE id = ?", (charge_id,)).fetchone() is None:
                raise UserError(f"no charge {charge_id} in the ledger '{self.path}'")
            db.execute(
                "UPDATE charges SET released_at = ? WHERE id = ? AND released_at IS NULL",
                (_now(), charge_id),
            )

    def charges(self, dataset_id: str | None = None) -> list[Charge]:
        """All charges (of one data set, if given), oldest first."""
        if dataset_id is None:
            rows = self._db.execute("SELECT * FROM charges ORDER BY id").fetchall()
        else:
            rows = self._db.execute(
                "SELECT * FROM charges WHERE dataset_id = ? ORDER BY id", (dataset_id,)
            ).fetchall()
        return [
            Charge(
                id=r["id"],
                dataset_id=r["dataset_id"],
                who=r["who"],
                what=r["what"],
                mechanism=r["mechanism"],
                parameters=json.loads(r["parameters"]),
                epsilon=r["epsilon"],
                delta=r["delta"],
                charged_at=r["charged_at"],
                released_at=r["released_at"],
            )
            for r in rows
        ]

    @contextmanager
    def spend(
        self,
        dataset_id: str,
        *,
        epsilon: float,
        delta: float,
        who: str,
        what: str,
        mechanism: str,
        parameters: Mapping[str, object],
    ) -> Iterator[Charge]:
        """Charge first (committed), then run the body that computes and shows the release.

        The charge is marked released only when the body finishes. If the body raises, or the
        process dies inside it, the charge stays: by then noise may have been drawn and the
        result shown, logged or sent, and the ledger cannot know that it was not. Counting a
        release that did not happen wastes budget; not counting one that did breaks the privacy
        guarantee. The ledger always errs on the side of over-counting.
        """
        charge = self.charge(
            dataset_id,
            epsilon=epsilon,
            delta=delta,
            who=who,
            what=what,
            mechanism=mechanism,
            parameters=parameters,
        )
        yield charge
        self.mark_released(charge.id)

    @staticmethod
    def _spent(db: sqlite3.Connection, dataset_id: str) -> tuple[float, float]:
        rows = db.execute(
            "SELECT epsilon, delta FROM charges WHERE dataset_id = ?", (dataset_id,)
        ).fetchall()
        return math.fsum(r["epsilon"] for r in rows), math.fsum(r["delta"] for r in rows)


def _check_name(value: str, what: str) -> None:
    if not value or value != value.strip():
        raise UserError(f"{what} must be a non-empty name without surrounding spaces: {value!r}")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")
