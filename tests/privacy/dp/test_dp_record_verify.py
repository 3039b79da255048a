"""The privacy record is recomputable (`veil privacy verify`) and states its neighbouring relation
truthfully; a non-private pooled baseline is marked as outside the guarantee."""

from __future__ import annotations

import importlib
import json
import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

import veil
from support import EXAMPLES
from veil.cli import main
from veil.config import RunConfig, load_config
from veil.privacy.dp.accountant import (
    VERIFY_TOLERANCE,
    Accountant,
    Composition,
    distributed_noise_multiplier,
    dpsgd_epsilon,
    independent_epsilon,
    state_compositions,
)
from veil.report.console import summary_table
from veil.report.html import REPORT_FILE
from veil.store import load_checkpoint

DP_EXAMPLES = sorted(
    p.stem for p in EXAMPLES.glob("*.toml") if "privacy" in tomllib.loads(p.read_text())
)
DELTA = 1e-5


def config(**overrides: Any) -> RunConfig:
    raw: dict[str, Any] = {
        "name": "verify-test",
        "seed": 3,
        "data": {"dataset": "breast_cancer", "scaling": "none", "validation_fraction": 0.0},
        "model": {"name": "logistic"},
        "federation": {
            "clients": 3,
            "rounds": 2,
            "batch_size": 32,
            "learning_rate": 0.1,
            "fraction_evaluate": 0.0,
        },
        "privacy": {"delta": DELTA, "production": False, "noise_seed": 1},
    }
    for key, value in overrides.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and key in raw else value
    return RunConfig.from_dict(raw)


def verify(path: Path, *extra: str) -> int:
    return main(["privacy", "verify", str(path), *extra])


def edited(source: Path, tmp_path: Path, change: Any) -> Path:
    """A copy of `source` (a result.json) with `change(result)` applied."""
    result = json.loads(source.read_text())
    change(result)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(result))
    return path


@pytest.fixture(scope="module")
def record_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Record level, plain aggregation, with the pooled baseline asked for."""
    out = tmp_path_factory.mktemp("record")
    veil.run(
        config(
            privacy={"unit": "record", "epsilon": 2.0},
            federation={"centralized_baseline": True},
        ),
        out,
    )
    return out / "result.json"


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Client level under SecAgg: the clients add distributed discrete Gaussian noise."""
    out = tmp_path_factory.mktemp("distributed")
    veil.run(
        config(
            secure_aggregation="secagg",
            secagg={"max_weight": 1000},
            federation={"clients": 6, "rounds": 3},
            privacy={"unit": "client", "epsilon": 8.0, "clip_norm": 0.5},
        ),
        out,
    )
    return out / "result.json"


# --------------------------------------------------------------------------- the accountant


@pytest.mark.parametrize(
    ("sigma", "q", "steps", "relation"),
    [
        (1.0, 0.05, 200, "add_or_remove"),
        (2.0, 0.1, 50, "replace"),
        (1.5, 1.0, 10, "add_or_remove"),
        (3.0, 1.0, 10, "replace"),
    ],
)
def test_the_independent_accountant_agrees_with_the_runs_pld(
    sigma: float, q: float, steps: int, relation: Any
) -> None:
    eps, label = independent_epsilon([Composition(sigma, q, steps)], DELTA, neighbouring=relation)
    assert label.startswith("prv-accountant")
    pld = dpsgd_epsilon(sigma, q, steps, DELTA, neighbouring=relation)
    assert abs(eps - pld) <= VERIFY_TOLERANCE
    assert eps <= pld + 1e-3  # the run's PLD is pessimistic: never below the truth


def test_without_prv_accountant_it_falls_back_to_rdp_and_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = importlib.import_module

    def no_prv(name: str, package: str | None = None) -> Any:
        if name == "prv_accountant":
            raise ImportError(name)
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", no_prv)
    eps, label = independent_epsilon([Composition(1.0, 0.05, 200)], DELTA)
    assert label.startswith("dp-accounting RDP") and "not installed" in label
    assert eps == dpsgd_epsilon(1.0, 0.05, 200, DELTA, kind="rdp")


def test_a_composition_too_large_for_the_prv_grid_falls_back_to_rdp_at_once() -> None:
    # ε in the thousands: the PRV grid would need about 10⁸ points (minutes of FFT).
    eps, label = independent_epsilon([Composition(0.5, 0.3, 5000)], DELTA)
    assert label.startswith("dp-accounting RDP") and "grid points" in label
    assert eps == dpsgd_epsilon(0.5, 0.3, 5000, DELTA, kind="rdp")


def test_the_distributed_multiplier_is_kairouz_et_al_theorem_1() -> None:
    # τ = 0 and n = t shares of σ_c: the sum's multiplier is √t·σ_c/Δ.
    z = distributed_noise_multiplier(
        sensitivity=100.0, client_stddev=50.0, shares=6, tau=0.0, dimension=10
    )
    assert z == pytest.approx(math.sqrt(6) * 50.0 / 100.0)
    worse = distributed_noise_multiplier(
        sensitivity=100.0, client_stddev=50.0, shares=6, tau=1e-3, dimension=10
    )
    assert worse < z
    with pytest.raises(ValueError, match="σ_c >= 1/2"):
        distributed_noise_multiplier(
            sensitivity=1.0, client_stddev=0.4, shares=2, tau=0.0, dimension=1
        )


# --------------------------------------------------------------------------- the record


def test_the_record_holds_each_organisations_dp_events_and_states_zero_out(
    record_run: Path,
) -> None:
    privacy = json.loads(record_run.read_text())["privacy"]
    assert privacy["neighbouring"] == "zero_out"  # the organisations' sizes are published
    for org in privacy["per_organisation"]:
        state = org["accounting"]
        assert state["kind"] == "pld" and state["neighbouring"] == "add_or_remove"
        event = state["events"][0]["event"]
        assert event["class_name"] == "SelfComposedDpEvent"
        assert event["event"]["class_name"] == "PoissonSampledDpEvent"
        # One event per round (run-length coded), the organisation's σ, q and steps.
        steps = state_compositions(state)
        assert len(steps) == 2
        mechanism = org["mechanism"]
        assert sum(s.count for s in steps) == mechanism["steps"]
        assert {(s.noise_multiplier, s.sampling_rate) for s in steps} == {
            (mechanism["noise_multiplier"], mechanism["sampling_rate"])
        }
        # The same serialisation a checkpoint uses: composing it again gives the recorded ε.
        assert Accountant.from_state(state).epsilon(DELTA) == pytest.approx(org["epsilon"])


def test_the_distributed_record_lists_every_rounds_parameters(distributed_run: Path) -> None:
    result = json.loads(distributed_run.read_text())
    privacy = result["privacy"]
    assert privacy["neighbouring"] == "zero_out"
    dist = privacy["distributed_dp"]
    z, clip, d = dist["noise_multiplier"], dist["clip_norm"], dist["dimension"]
    assert d == 62 and clip == 0.5  # logistic regression on 30 features, 2 classes
    assert [r["round"] for r in dist["rounds"]] == [1, 2, 3]
    for row, reported in zip(dist["rounds"], result["rounds"], strict=True):
        aggregation = reported["aggregation"]
        assert row["step"] == aggregation["step"]  # γ
        assert row["threshold"] == aggregation["threshold"]  # t
        assert row["modulus_bits"] == aggregation["modulus_bits"]
        assert row["survivors"] == aggregation["survivors"] == row["clients"] == 6  # n
        delta_sens = clip / row["step"] + math.sqrt(d)
        assert row["sensitivity"] == pytest.approx(delta_sens)
        assert row["client_stddev"] == pytest.approx(z * delta_sens / math.sqrt(row["threshold"]))
        assert row["tau"] * d <= 1e-12
    assert len(state_compositions(privacy["accounting"])) == 3


def test_a_checkpoint_keeps_the_distributed_rounds_for_a_resume(tmp_path: Path) -> None:
    veil.run(
        config(
            secure_aggregation="secagg",
            secagg={"max_weight": 1000},
            federation={"clients": 4, "rounds": 2},
            privacy={"unit": "client", "epsilon": 8.0},
        ),
        tmp_path,
    )
    checkpoint = load_checkpoint(tmp_path / "checkpoint.safetensors")
    assert checkpoint.privacy is not None
    rounds = checkpoint.privacy["account"]["distributed_rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all("step" in r and "threshold" in r for r in rounds)


# --------------------------------------------------------------------------- veil privacy verify


def test_verify_accepts_an_honest_record(
    record_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert verify(record_run) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"verified: {record_run}")
    assert "prv-accountant" in out and "zero_out" in out
    assert out.count(" ok\n") == 3 + 2  # three organisations, the run, the last round
    assert verify(record_run.parent) == 0  # the run folder works too


def test_verify_prints_json(record_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert verify(record_run, "--json") == 0
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["ok"] is True and verdict["neighbouring"] == "zero_out"
    assert verdict["tolerance"] == VERIFY_TOLERANCE
    assert {c["who"] for c in verdict["checks"]} >= {"client-0", "the run (privacy.epsilon)"}


def lower_run(result: dict[str, Any]) -> None:
    result["privacy"]["epsilon"] -= 0.05


def lower_organisation(result: dict[str, Any]) -> None:
    result["privacy"]["per_organisation"][1]["epsilon"] *= 0.9


def lower_last_round(result: dict[str, Any]) -> None:
    result["rounds"][-1]["epsilon"] -= 0.05


def claim_replace(result: dict[str, Any]) -> None:
    # The same noise gives a larger ε for replacement: claiming it with these figures
    # under-reports.
    result["privacy"]["neighbouring"] = "replace"


@pytest.mark.parametrize("change", [lower_run, lower_organisation, lower_last_round, claim_replace])
def test_verify_flags_a_hand_edited_record_in_one_line(
    record_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], change: Any
) -> None:
    path = edited(record_run, tmp_path, change)
    assert verify(path) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"veil: under-reported: {path}: recomputed from its record by ")
    assert "prv-accountant" in lines[0]


def test_verify_checks_distributed_dp_from_kairouz_et_al_parameters(
    distributed_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert verify(distributed_run) == 0
    out = capsys.readouterr().out
    assert "distributed DP: 3 of 3 rounds released a sum" in out

    def less_noise(result: dict[str, Any]) -> None:  # the clients added half the noise
        for row in result["privacy"]["distributed_dp"]["rounds"]:
            row["client_stddev"] /= 2

    assert verify(edited(distributed_run, tmp_path, less_noise)) == 1
    assert "under-reported" in capsys.readouterr().err


def drop_accounting(result: dict[str, Any]) -> None:
    for org in result["privacy"]["per_organisation"]:
        del org["accounting"]


def break_event(result: dict[str, Any]) -> None:
    result["privacy"]["per_organisation"][0]["accounting"]["events"][0]["event"] = {
        "class_name": "LaplaceDpEvent"
    }


def drop_privacy(result: dict[str, Any]) -> None:
    del result["privacy"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (drop_accounting, "holds no accounting"),
        (break_event, "unsupported event"),
        (drop_privacy, "no privacy record"),
    ],
)
def test_verify_refuses_a_record_it_cannot_recompute(
    record_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: Any,
    message: str,
) -> None:
    assert verify(edited(record_run, tmp_path, change)) == 2
    err = capsys.readouterr().err
    assert err.startswith("veil: error: ") and message in err and len(err.splitlines()) == 1


def test_verify_refuses_unreadable_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "result.json"
    broken.write_text("{")
    assert verify(broken) == 2
    assert "cannot read" in capsys.readouterr().err
    assert verify(tmp_path / "missing.json") == 2
    assert "cannot read" in capsys.readouterr().err


def test_verify_has_nothing_to_check_without_dp(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = config(privacy={"unit": "record", "epsilon": 2.0}).to_dict()
    raw.pop("privacy")
    raw["federation"] = {**raw["federation"], "rounds": 1, "centralized_baseline": True}
    veil.run(RunConfig.from_dict(raw), tmp_path)
    assert verify(tmp_path / "result.json") == 0
    assert "nothing to verify" in capsys.readouterr().out
    # Without [privacy] there is no guarantee for the baseline to fall outside of.
    baseline = json.loads((tmp_path / "result.json").read_text())["centralized_baseline"]
    assert "outside_guarantee" not in baseline


# --------------------------------------------------------------------------- the pooled baseline


def test_the_pooled_baseline_is_off_by_default_under_privacy() -> None:
    assert config(privacy={"unit": "record", "epsilon": 2.0}).federation.centralized_baseline is (
        False
    )


def test_a_dp_runs_pooled_baseline_is_marked_outside_the_guarantee(record_run: Path) -> None:
    result = veil.Result.model_validate_json(record_run.read_text())
    assert result.centralized_baseline is not None
    assert json.loads(record_run.read_text())["centralized_baseline"]["outside_guarantee"] is True
    console = Console(width=200, record=True)
    console.print(summary_table(result))
    assert "without DP: outside the privacy guarantee" in console.export_text()
    html = (record_run.parent / REPORT_FILE).read_text()
    assert "without DP: outside the privacy guarantee" in html
    assert "pooled-data baseline outside_guarantee" not in html


# --------------------------------------------------------------------------- the examples


def test_every_dp_example_is_found() -> None:
    assert {"medical_diagnosis_dp", "hospitals_private", "vehicle_faults_synthetic"} <= set(
        DP_EXAMPLES
    )


@pytest.mark.parametrize("example", DP_EXAMPLES)
def test_every_dp_example_verifies_and_agrees_with_prv_accountant(
    example: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = load_config(EXAMPLES / f"{example}.toml")
    cfg = RunConfig.from_dict({**cfg.to_dict(), "mode": "simulation"})
    veil.run(cfg, tmp_path)
    path = tmp_path / "result.json"
    assert verify(path, "--json") == 0
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["accountant"].startswith("prv-accountant")
    for check in verdict["checks"]:
        assert abs(check["recorded"] - check["recomputed"]) <= VERIFY_TOLERANCE, check
    assert verify(edited(path, tmp_path, lower_run)) == 1
