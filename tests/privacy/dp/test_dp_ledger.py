"""The privacy ledger: arithmetic, refusals, crash safety and concurrent charges."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from veil.errors import UserError
from veil.privacy.dp.ledger import BudgetExceeded, Charge, PrivacyLedger

SRC = Path(__file__).resolve().parents[3] / "src"

# Subprocesses load `veil` as a bare package so that they do not pay for `veil/__init__.py`
# (which imports torch): the ledger needs only `veil.errors` and the standard library.
PRELUDE = f"""
import sys, types
pkg = types.ModuleType("veil")
pkg.__path__ = [{str(SRC / "veil")!r}]
sys.modules["veil"] = pkg
from veil.privacy.dp.ledger import BudgetExceeded, PrivacyLedger
"""


def _python(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _charge(ledger: PrivacyLedger, dataset: str, epsilon: float, delta: float = 0.0) -> int:
    return ledger.charge(
        dataset,
        epsilon=epsilon,
        delta=delta,
        who="alice",
        what="count(age)",
        mechanism="laplace",
        parameters={"kind": "count", "column": "age"},
    ).id


def test_charges_add_up_and_remaining_is_the_difference(tmp_path: Path) -> None:
    with PrivacyLedger(tmp_path / "ledger.db") as ledger:
        ledger.set_budget("patients", epsilon=1.0, delta=1e-5)
        _charge(ledger, "patients", 0.3, 1e-6)
        _charge(ledger, "patients", 0.2)
        b = ledger.budget("patients")
        assert b.epsilon_spent == pytest.approx(0.5)
        assert b.delta_spent == pytest.approx(1e-6)
        assert b.epsilon_remaining == pytest.approx(0.5)
        assert b.delta_remaining == pytest.approx(9e-6)
        charges = ledger.charges("patients")
        assert [c.epsilon for c in charges] == [0.3, 0.2]
        assert charges[0].parameters == {"kind": "count", "column": "age"}
        assert charges[0].who == "alice" and charges[0].released_at is None
    # Reopened: the same numbers, from disk.
    with PrivacyLedger(tmp_path / "ledger.db") as ledger:
        assert ledger.budget("patients").epsilon_spent == pytest.approx(0.5)
        assert [b.dataset_id for b in ledger.budgets()] == ["patients"]


def test_many_small_charges_fill_the_budget_exactly(tmp_path: Path) -> None:
    with PrivacyLedger(tmp_path / "ledger.db") as ledger:
        ledger.set_budget("d", epsilon=1.0, delta=0.0)
        for _ in range(10):
            _charge(ledger, "d", 0.1)  # 10 x 0.1 is not exactly 1.0 in floating point
        with pytest.raises(BudgetExceeded):
            _charge(ledger, "d", 1e-9)


def test_overspending_is_refused_naming_the_shortfall_and_records_nothing(tmp_path: Path) -> None:
    with PrivacyLedger(tmp_path / "ledger.db") as ledger:
        ledger.set_budget("patients", epsilon=1.0, delta=1e-6)
        _charge(ledger, "patients", 0.75)
        with pytest.raises(BudgetExceeded) as info:
            _charge(ledger, "patients", 0.5)
        message = str(info.value)
        assert "'patients'" in message
        assert "requested (ε=0.5, δ=0)" in message
        assert "(ε=0.25, δ=1e-06) remain" in message
        assert "short by ε=0.25" in message
        assert "veil budget set patients" in message and "ask for less" in message
        assert info.value.shortfall == pytest.approx((0.25, 0.0))
        assert isinstance(info.value, UserError)
        with pytest.raises(BudgetExceeded, match="short by δ=1e-06"):
            _charge(ledger, "patients", 0.1, 2e-6)
        assert len(ledger.charges("patients")) == 1
        assert ledger.budget("patients").epsilon_spent == pytest.approx(0.75)


def test_unknown_dataset_says_how_to_set_a_budget(tmp_path: Path) -> None:
    with PrivacyLedger(tmp_path / "ledger.db") as ledger:
        with pytest.raises(UserError, match="veil budget set census"):
            ledger.budget("census")
        with pytest.raises(UserError, match="veil budget set census"):
            _charge(ledger, "census", 0.1)


def test_invalid_amounts_are_refused(tmp_path: Path) -> None:
    with PrivacyLedger(tmp_path / "ledger.db") as ledger:
        with pytest.raises(UserError, match="ε"):
            ledger.set_budget("d", epsilon=0.0, delta=0.0)
        with pytest.raises(UserError, match="δ"):
            ledger.set_budget("d", epsilon=1.0, delta=1.0)
        ledger.set_budget("d", epsilon=1.0, delta=0.0)
        with pytest.raises(UserError, match="ε"):
            _charge(ledger, "d", float("nan"))
        with pytest.raises(UserError, match="JSON"):
            ledger.charge(
                "d", epsilon=0.1, delta=0, who="a", what="w", mechanism="m", parameters={"x": {1}}
            )
        assert ledger.charges() == []


def test_lowering_a_budget_below_what_is_spent_is_refused(tmp_path: Path) -> None:
    with PrivacyLedger(tmp_path / "ledger.db") as ledger:
        ledger.set_budget("d", epsilon=2.0, delta=1e-5)
        _charge(ledger, "d", 1.5, 1e-6)
        with pytest.raises(UserError, match=r"\(ε=1.5, δ=1e-06\) is already spent"):
            ledger.set_budget("d", epsilon=1.0, delta=1e-5)
        with pytest.raises(UserError, match="already spent"):
            ledger.set_budget("d", epsilon=2.0, delta=0.0)
        assert ledger.budget("d").epsilon_limit == 2.0
        assert ledger.set_budget("d", epsilon=1.5, delta=1e-6).epsilon_remaining == 0.0
        assert ledger.set_budget("d", epsilon=3.0, delta=1e-5).epsilon_remaining == 1.5


def test_spend_marks_released_only_when_the_body_finishes(tmp_path: Path) -> None:
    def spend(ledger: PrivacyLedger, epsilon: float) -> AbstractContextManager[Charge]:
        return ledger.spend(
            "d", epsilon=epsilon, delta=0.0, who="a", what="w", mechanism="m", parameters={}
        )

    with PrivacyLedger(tmp_path / "ledger.db") as ledger:
        ledger.set_budget("d", epsilon=1.0, delta=0.0)
        # Inside the body the charge is already committed and visible to another reader.
        with spend(ledger, 0.25) as charge, PrivacyLedger(tmp_path / "ledger.db") as other:
            assert other.budget("d").epsilon_spent == pytest.approx(0.25)
        with pytest.raises(RuntimeError, match="release failed"), spend(ledger, 0.5):
            raise RuntimeError("release failed")
        first, second = ledger.charges("d")
        assert first.id == charge.id and first.released_at is not None
        assert second.released_at is None  # still counted: over-count, never under-count
        assert ledger.budget("d").epsilon_spent == pytest.approx(0.75)
        with pytest.raises(BudgetExceeded), spend(ledger, 0.5):
            pytest.fail("the body must not run when the charge is refused")
        with pytest.raises(UserError, match="no charge 99"):
            ledger.mark_released(99)


def test_a_process_killed_between_charge_and_release_leaves_the_charge(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    with PrivacyLedger(db) as ledger:
        ledger.set_budget("d", epsilon=1.0, delta=1e-6)
    proc = _python(
        """
        import os, signal
        ledger = PrivacyLedger(sys.argv[1])
        with ledger.spend("d", epsilon=0.4, delta=1e-7, who="w", what="mean(x)",
                          mechanism="laplace", parameters={"n": 1}):
            print("charged", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        """,
        str(db),
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err
    assert out.strip() == "charged"
    with PrivacyLedger(db) as ledger:
        (charge,) = ledger.charges("d")
        assert charge.epsilon == 0.4 and charge.delta == 1e-7 and charge.released_at is None
        assert ledger.budget("d").epsilon_remaining == pytest.approx(0.6)


def test_concurrent_charges_from_two_processes_never_exceed_the_limit(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    with PrivacyLedger(db) as ledger:
        ledger.set_budget("d", epsilon=25.0, delta=0.0)
    go = tmp_path / "go"
    code = """
        import json, os, time
        ledger = PrivacyLedger(sys.argv[1])
        open(sys.argv[1] + "." + sys.argv[2] + ".ready", "w").close()
        while not os.path.exists(sys.argv[3]):  # start together
            time.sleep(0.001)
        ok = refused = 0
        for i in range(20):
            try:
                ledger.charge("d", epsilon=1.0, delta=0.0, who=sys.argv[2], what=f"q{i}",
                              mechanism="laplace", parameters={})
                ok += 1
            except BudgetExceeded:
                refused += 1
            time.sleep(0.002)  # let the other process in between charges
        print(json.dumps({"ok": ok, "refused": refused}))
        """
    procs = [_python(code, str(db), name, str(go)) for name in ("p1", "p2")]
    deadline = time.monotonic() + 60
    while not all(Path(f"{db}.{name}.ready").exists() for name in ("p1", "p2")):
        assert time.monotonic() < deadline, "the charging processes did not start"
        time.sleep(0.01)
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    assert sum(r["ok"] for r in results) == 25
    assert sum(r["refused"] for r in results) == 15
    with PrivacyLedger(db) as ledger:
        charges = ledger.charges("d")
        assert len(charges) == 25
        assert {c.who for c in charges} == {"p1", "p2"}  # both got some: they did compete
        assert ledger.budget("d").epsilon_spent == pytest.approx(25.0)
