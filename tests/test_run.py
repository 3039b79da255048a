"""`veil.run` end to end in simulation: schema, accuracy, determinism, store and checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import veil
from support import EXAMPLES
from veil.config import RunConfig
from veil.result import Result
from veil.store import RunStore, load_checkpoint


def small_config(**federation: Any) -> RunConfig:
    raw: dict[str, Any] = {
        "seed": 5,
        "data": {"dataset": "breast_cancer", "partition": {"kind": "dirichlet", "alpha": 0.5}},
        "model": {"name": "logistic"},
        "federation": {"clients": 4, "rounds": 3, "learning_rate": 0.1, **federation},
    }
    return RunConfig.from_dict(raw)


@pytest.fixture(scope="module")
def medical(tmp_path_factory: pytest.TempPathFactory) -> tuple[Result, Path]:
    out = tmp_path_factory.mktemp("medical")
    return veil.run(EXAMPLES / "medical_diagnosis.toml", out), out


def test_medical_example_is_accurate_and_matches_the_schema(medical: tuple[Result, Path]) -> None:
    result, out = medical
    assert result.final["accuracy"] >= 0.95
    assert 0.9 <= result.final["auc"] <= 1.0
    assert result.centralized_baseline is not None
    assert result.centralized_baseline.accuracy >= 0.9
    on_disk = json.loads((out / "result.json").read_text())
    assert Result.model_validate(on_disk) == result
    for key in ("run_id", "mode", "final", "centralized_baseline", "rounds", "privacy"):
        assert key in on_disk
    assert on_disk["privacy"] == {
        "unit": None,
        "epsilon": None,
        "delta": None,
        "accountant": None,
        "aggregation": "plain",
        "attestation": None,
        "mechanism": None,
    }
    assert [r["round"] for r in on_disk["rounds"]] == list(range(1, 21))
    assert all(r["epsilon"] is None for r in on_disk["rounds"])
    assert on_disk["communication"]["bytes_up"] > 0
    assert on_disk["communication"]["bytes_down"] >= on_disk["communication"]["bytes_up"]
    assert on_disk["timing"]["total_s"] > 0


def test_rounds_and_checkpoint_are_persisted(medical: tuple[Result, Path]) -> None:
    result, out = medical
    with RunStore.locate(out) as store:
        summary, config, rounds = store.get_run(result.run_id)
    assert summary.status == "finished"
    assert summary.final == result.final
    assert config["name"] == "medical-diagnosis"
    assert [r["metrics"] for r in rounds] == [r.metrics for r in result.rounds]
    checkpoint = load_checkpoint(out / "checkpoint.safetensors")
    assert checkpoint.run_id == result.run_id
    assert checkpoint.round == 20


def test_same_seed_same_metrics_and_other_seed_differs() -> None:
    a, b = veil.run(small_config()), veil.run(small_config())
    assert [r.metrics for r in a.rounds] == [r.metrics for r in b.rounds]
    assert a.final == b.final
    assert a.run_id != b.run_id
    other = veil.run(RunConfig.from_dict({**small_config().to_dict(), "seed": 6}))
    assert other.final != a.final


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad"])
def test_every_strategy_learns(strategy: str) -> None:
    raw = small_config(rounds=5).to_dict()
    raw["strategy"] = {"name": strategy}
    if strategy in ("fedadam", "fedyogi", "fedadagrad"):
        raw["strategy"]["server_learning_rate"] = 0.1
    result = veil.run(RunConfig.from_dict(raw))
    assert result.strategy == strategy
    assert result.final["accuracy"] > 0.85  # majority class is 0.63


def test_partial_participation_and_dropout_are_counted() -> None:
    result = veil.run(small_config(clients=10, fraction_fit=0.5, simulated_dropout=0.3, rounds=6))
    selected = [r.clients + r.dropped for r in result.rounds]
    assert selected == [5] * 6
    assert [r.selected for r in result.rounds] == selected
    assert sum(r.dropped for r in result.rounds) > 0
    assert all(len(r.failures) == r.dropped for r in result.rounds)


def test_too_few_survivors_leave_the_model_unchanged() -> None:
    result = veil.run(small_config(clients=4, min_clients=4, simulated_dropout=0.5, rounds=4))
    skipped = [r for r in result.rounds if not r.applied]
    assert skipped, "with p=0.5 dropout and all 4 required, some round must be skipped"
    for r in skipped:
        previous = [p for p in result.rounds if p.round == r.round - 1]
        if previous:
            assert r.metrics["loss"] == previous[0].metrics["loss"]


def test_credit_example_beats_the_majority_class(tmp_path: Path) -> None:
    result = veil.run(EXAMPLES / "credit_scoring.toml", tmp_path)
    assert result.final["accuracy"] > 0.70  # 70% of the applicants are good risks
    assert result.final["auc"] > 0.65


@pytest.mark.slow
def test_digits_example_with_cnn(tmp_path: Path) -> None:
    result = veil.run(EXAMPLES / "digits.toml", tmp_path)
    assert result.final["accuracy"] > 0.9
