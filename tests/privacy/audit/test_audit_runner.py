"""`veil audit RUN_DIR`: the attacks against finished runs, recorded in result.json."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

import veil
from veil.cli import main
from veil.config import RunConfig
from veil.crypto.envelope import MAGIC, generate_key_file
from veil.errors import ConfigError, UserError
from veil.privacy.audit.runner import AuditSettings, audit_run
from veil.report import print_result
from veil.result import Result

#: Small settings: the point here is the wiring; the attacks' strength is tested elsewhere.
SMALL = {"shadows": 2, "gradient_canaries": 200, "input_canaries": 20, "inversion_iterations": 30}


def config(**overrides: Any) -> RunConfig:
    raw: dict[str, Any] = {
        "name": "audit-test",
        "seed": 3,
        "data": {"dataset": "breast_cancer", "scaling": "bounds", "validation_fraction": 0.0},
        "model": {"name": "logistic"},
        "federation": {
            "clients": 3,
            "rounds": 2,
            "batch_size": 32,
            "learning_rate": 0.5,
            "fraction_evaluate": 0.0,
        },
    }
    raw.update(overrides)
    return RunConfig.from_dict(raw)


def own_copy(run: Path, tmp_path: Path) -> Path:
    """A test's own copy of a module's finished run: auditing writes into result.json, so no
    test may see another's audit (the tests pass in any order)."""
    return Path(shutil.copytree(run, tmp_path / run.name))


@pytest.fixture(scope="module")
def dp_run_once(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dp-run")
    privacy = {
        "unit": "record",
        "epsilon": 1.0,
        "delta": 1e-5,
        "production": False,
        "noise_seed": 1,
    }
    veil.run(config(privacy=privacy), out)
    return out


@pytest.fixture
def dp_run(dp_run_once: Path, tmp_path: Path) -> Path:
    return own_copy(dp_run_once, tmp_path)


@pytest.fixture(scope="module")
def plain_run_once(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("plain-run")
    veil.run(config(), out)
    return out


@pytest.fixture
def plain_run(plain_run_once: Path, tmp_path: Path) -> Path:
    return own_copy(plain_run_once, tmp_path)


def test_audit_of_a_dp_run_is_recorded_next_to_its_epsilon(dp_run: Path) -> None:
    before = json.loads((dp_run / "result.json").read_text())
    assert "audit" not in before
    section = audit_run(dp_run, AuditSettings(quick=True, seed=0, **SMALL))
    result = Result.model_validate_json((dp_run / "result.json").read_text())
    audit = result.model_extra["audit"]  # type: ignore[index]
    assert audit == json.loads(json.dumps(section))
    assert audit["epsilon"] == before["privacy"]["epsilon"]
    assert audit["confidence"] == 0.95
    assert 0 <= audit["epsilon_lower"] <= audit["epsilon"]
    assert audit["exceeds_epsilon"] is False
    assert audit["canaries"]["canaries"] == {"gradient": 200, "input": 20}
    assert audit["canaries"]["mechanism"]["noise_multiplier"] == pytest.approx(
        before["privacy"]["mechanism"]["noise_multiplier"]
    )
    lira = audit["membership"]["lira"]
    members, non_members = audit["membership"]["members"], audit["membership"]["non_members"]
    assert members + non_members == 569 and lira["shadows"] == 2
    # ε-DP bounds any membership test's ROC curve by TPR ≤ e^ε·FPR (+ δ), so its AUC by
    # e^ε/(1 + e^ε) = 0.73 at ε = 1; the margin is five standard errors of an AUC over these
    # members and non-members (Hanley-McNeil at AUC 1/2: √((m + n + 1)/(12·m·n))).
    epsilon = before["privacy"]["epsilon"]
    margin = 5 * math.sqrt((members + non_members + 1) / (12 * members * non_members))
    assert lira["auc"] <= math.exp(epsilon) / (1 + math.exp(epsilon)) + margin
    assert "DP-SGD" in audit["inversion"]["server_sees"]
    assert "relative_error" in audit["inversion"]
    # Everything the run wrote is still there.
    kept = json.loads((dp_run / "result.json").read_text())
    assert {k: v for k, v in kept.items() if k != "audit"} == before
    # And the run's terminal report shows the audit.
    console = Console(width=140, record=True)
    print_result(result, console)
    assert "Privacy audit" in console.export_text()


def test_cli_prints_json_and_exits_zero_on_a_consistent_run(
    dp_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "audit",
            str(dp_run),
            "--quick",
            "--json",
            "--seed",
            "2",
            "--shadows",
            "2",
            "--attacks",
            "canaries",
            "--canaries",
            "100",
        ]
    )
    assert code == 0
    section = json.loads(capsys.readouterr().out)
    assert section["exceeds_epsilon"] is False and "membership" not in section


def test_a_claim_the_run_cannot_back_exits_three(
    plain_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run trained without DP whose result.json claims ε = 1: the canaries measure far more
    (plain SGD: ε ≥ 3 with 200 gradient canaries), so the audit flags it and exits with 3."""
    raw = json.loads((plain_run / "result.json").read_text())
    raw["privacy"].update(epsilon=1.0, delta=1e-5)
    (plain_run / "result.json").write_text(json.dumps(raw))
    code = main(
        [
            "audit",
            str(plain_run),
            "--attacks",
            "canaries",
            "--canaries",
            "200",
            "--input-canaries",
            "0",
            "--seed",
            "0",
            "--quiet",
        ]
    )
    out = capsys.readouterr().out
    assert code == 3
    assert "exceeds the accountant's ε" in out
    audit = json.loads((plain_run / "result.json").read_text())["audit"]
    assert audit["exceeds_epsilon"] is True and audit["epsilon_lower"] > 2


def test_secagg_run_with_a_sealed_checkpoint(tmp_path: Path) -> None:
    """The server's view under SecAgg is the sum of every client's update; the sealed
    checkpoint opens with the run's key file."""
    key = tmp_path / "checkpoint.key"
    generate_key_file(key)
    out = tmp_path / "run"
    veil.run(config(secure_aggregation="secagg", checkpoint={"key_file": str(key)}), out)
    section = audit_run(out, AuditSettings(attacks=("inversion",), seed=0, **SMALL))
    inversion = section["inversion"]
    assert "sum of 3 clients" in inversion["server_sees"]
    assert inversion["records_in_view"] > inversion["client_records"]
    # Sealed on disk: the envelope's magic, and no parameter name in the clear.
    sealed = (out / "checkpoint.safetensors").read_bytes()
    assert sealed.startswith(MAGIC) and b"weight" not in sealed
    key.unlink()
    with pytest.raises(UserError, match="no key file"):
        audit_run(out, AuditSettings(attacks=("inversion",), seed=0, **SMALL))


def test_not_a_run_folder_is_one_line_and_exit_two(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["audit", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no result.json" in err


def test_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="unknown attack"):
        AuditSettings(attacks=("membership", "telepathy"))
    with pytest.raises(ConfigError, match="even number"):
        AuditSettings(shadows=3)
    with pytest.raises(ConfigError, match="confidence"):
        AuditSettings(confidence=1.0)
