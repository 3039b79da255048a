"""`veil query` and `veil budget`, through their own argparse registration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import veil.privacy.dp.queries as queries
from support import veil
from veil.errors import UserError
from veil.privacy.dp.ledger import BudgetExceeded, PrivacyLedger


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "patients.csv"
    ages = np.random.default_rng(5).integers(20, 80, 500)
    path.write_text("id,age\n" + "".join(f"{i},{a}\n" for i, a in enumerate(ages)))
    return path


def query(data: Path, ledger: Path, *extra: str) -> int:
    return veil(
        "query", str(data), "--column", "age", "--kind", "mean", "--lower", "0",
        "--upper", "100", "--ledger", str(ledger), "--dataset", "patients", *extra,
    )  # fmt: skip


def test_budget_set_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ledger = tmp_path / "ledger.db"
    assert veil("budget", "set", "patients", "--epsilon", "2", "--delta", "1e-6", "--ledger",
                str(ledger)) == 0  # fmt: skip
    assert "budget of 'patients': ε 2" in capsys.readouterr().out
    assert veil("budget", "show", "--ledger", str(ledger), "--json") == 0
    (shown,) = json.loads(capsys.readouterr().out)
    assert shown["dataset_id"] == "patients" and shown["epsilon_remaining"] == 2.0
    assert veil("budget", "show", "--ledger", str(ledger)) == 0
    assert "patients" in capsys.readouterr().out
    with pytest.raises(UserError, match="no privacy ledger"):
        veil("budget", "show", "--ledger", str(tmp_path / "other.db"))


def test_a_query_charges_the_ledger_before_it_computes_and_prints(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger_path = tmp_path / "ledger.db"
    with PrivacyLedger(ledger_path) as ledger:
        ledger.set_budget("patients", epsilon=1.0, delta=0.0)
    real_answer = queries.answer
    seen: list[float] = []

    def answer_after_charge(values: np.ndarray, spec: queries.QuerySpec) -> queries.QueryAnswer:
        with PrivacyLedger(ledger_path) as other:  # another reader sees the committed charge
            seen.append(other.budget("patients").epsilon_spent)
        return real_answer(values, spec)

    monkeypatch.setattr(queries, "answer", answer_after_charge)
    assert query(data, ledger_path, "--epsilon", "0.25", "--who", "carol") == 0
    assert seen == [0.25]
    out = capsys.readouterr().out
    assert out.startswith("mean of 'age': ")
    assert "ε 0.75 of 1 left" in out
    with PrivacyLedger(ledger_path) as ledger:
        (charge,) = ledger.charges("patients")
        assert charge.epsilon == 0.25 and charge.delta == 0.0 and charge.who == "carol"
        assert charge.released_at is not None
        assert charge.parameters["kind"] == "mean" and charge.parameters["upper"] == 100

    assert veil("budget", "show", "patients", "--ledger", str(ledger_path)) == 0
    assert "mean(age)" in capsys.readouterr().out


def test_a_gaussian_sum_with_large_sensitivity_is_answered(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger_path = tmp_path / "ledger.db"
    with PrivacyLedger(ledger_path) as ledger:
        ledger.set_budget("patients", epsilon=1.0, delta=1e-5)
    assert veil("query", str(data), "--column", "age", "--kind", "sum", "--lower", "0", "--upper",
                "100", "--decimals", "2", "--epsilon", "0.3", "--delta", "1e-7", "--mechanism",
                "gaussian", "--ledger", str(ledger_path), "--dataset", "patients") == 0  # fmt: skip
    assert capsys.readouterr().out.startswith("sum of 'age': ")
    with PrivacyLedger(ledger_path) as ledger:
        (charge,) = ledger.charges("patients")
        assert charge.released_at is not None


def test_json_output_and_gaussian(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger_path = tmp_path / "ledger.db"
    with PrivacyLedger(ledger_path) as ledger:
        ledger.set_budget("patients", epsilon=1.0, delta=1e-5)
    assert query(data, ledger_path, "--epsilon", "0.5", "--delta", "1e-6", "--mechanism",
                 "gaussian", "--json") == 0  # fmt: skip
    payload = json.loads(capsys.readouterr().out)
    assert payload["answer"]["kind"] == "mean" and 20 <= payload["answer"]["value"] <= 80
    assert payload["budget"]["delta_spent"] == pytest.approx(1e-6)


def test_an_over_budget_query_is_refused_and_prints_no_answer(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger_path = tmp_path / "ledger.db"
    with PrivacyLedger(ledger_path) as ledger:
        ledger.set_budget("patients", epsilon=1.0, delta=0.0)
    assert query(data, ledger_path, "--epsilon", "0.75") == 0
    capsys.readouterr()
    with pytest.raises(BudgetExceeded, match=r"short by ε=0\.25"):
        query(data, ledger_path, "--epsilon", "0.5")
    assert capsys.readouterr().out == ""
    with PrivacyLedger(ledger_path) as ledger:
        assert [c.epsilon for c in ledger.charges("patients")] == [0.75]


def test_bad_input_is_refused_before_anything_is_charged(data: Path, tmp_path: Path) -> None:
    ledger_path = tmp_path / "ledger.db"
    with PrivacyLedger(ledger_path) as ledger:
        ledger.set_budget("patients", epsilon=1.0, delta=0.0)
    with pytest.raises(UserError, match="no column 'height'"):
        veil("query", str(data), "--column", "height", "--kind", "count", "--lower", "0",
             "--upper", "1", "--epsilon", "0.1", "--ledger", str(ledger_path), "--dataset",
             "patients")  # fmt: skip
    with pytest.raises(UserError, match="gaussian mechanism needs δ"):
        query(data, ledger_path, "--epsilon", "0.1", "--mechanism", "gaussian")
    with pytest.raises(UserError, match="veil budget set census"):
        veil("query", str(data), "--column", "age", "--kind", "count", "--lower", "0",
             "--upper", "1", "--epsilon", "0.1", "--ledger", str(ledger_path), "--dataset",
             "census")  # fmt: skip
    with PrivacyLedger(ledger_path) as ledger:
        assert ledger.charges() == []
