"""A coordinator and three long-lived sites as real processes (mutual TLS), running jobs one
after another as a bank consortium would: a plain job, a SecAgg + DP job during which one site
is cut off (killed, started again) and the coordinator is killed and restarted, and a CKKS job;
then a job that one site's policy forbids.

What must hold (issue: long-lived sites):
- each job's final model is the model `veil run` computes from the same config (to 1e-5), its
  ε the same;
- each site's own ledger holds exactly its own charges: one, for the DP job, of the ε the
  coordinator's result states for it, released once the job finished;
- the job that breaks bank_c's policy is refused by bank_c, and the reason reaches the
  submitter through `veil job status`;
- the restarted job records every round once.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from data.banks import BANKS, Banks, federation_config, write_banks
from sites.site_federation import SiteFederation, free_port, policy_text, site_federation
from support import veil, wait_until
from veil.crypto.envelope import load_key_file
from veil.privacy.dp.ledger import PrivacyLedger
from veil.store import load_checkpoint

pytestmark = pytest.mark.slow

DP = """
[privacy]
unit = "record"
epsilon = 3.0
delta = 1e-5
clip_norm = 1.0
production = false
noise_seed = 5
"""


def job_configs(banks: Banks) -> dict[str, Path]:
    """The four jobs' configs, as the submitter writes them next to the banks' files."""

    def config(name: str, rounds: int, *, aggregation: str = "plain", extra: str = "") -> Path:
        path = federation_config(banks, rounds=rounds, test=False, name=name, extra=extra)
        text = path.read_text().replace(
            f'name = "{name}"', f'name = "{name}"\nsecure_aggregation = "{aggregation}"'
        )
        path.write_text(text)
        return path

    return {
        "plain": config("plain", 3, extra="fraction_evaluate = 1.0"),
        "dp": config("dp", 5, aggregation="secagg", extra="fraction_evaluate = 0.0\n" + DP),
        "ckks": config("ckks", 3, aggregation="ckks", extra="fraction_evaluate = 1.0"),
        "greedy": config("greedy", 12, extra="fraction_evaluate = 1.0"),
    }


def set_up(fed: SiteFederation, banks: Banks) -> None:
    for bank in BANKS:
        fed.give_data(bank, banks.files[bank])
        rules: dict[str, Any] = {
            "submitters": ["risk-team"],
            "send_evaluation_metrics": True,
            "allow_test_noise": True,  # the DP job's noise is seeded so that it can be compared
        }
        if bank == "bank_c":
            rules["max_rounds"] = 10
        fed.set_policy(bank, policy_text([f"{bank}.csv"], **rules))
        fed.set_budget(bank, f"{bank}.csv", epsilon=10.0, delta=1e-4)


def final_model(path: Path, key: bytes | None = None) -> dict[str, np.ndarray]:
    return dict(load_checkpoint(path / "checkpoint.safetensors", key=key).parameters)


def rounds_recorded(run_dir: Path) -> list[int]:
    with closing(sqlite3.connect(run_dir / "veil.db")) as conn:
        return [r[0] for r in conn.execute("SELECT round FROM rounds ORDER BY round")]


def run_dp_job_through_a_cut_and_a_restart(fed: SiteFederation, config: Path) -> str:
    """Submit the DP job while bank_b's site is down; bring it back; kill -9 the coordinator
    once the job has finished a round, and start it again."""
    fed.kill("bank_b")
    job = fed.submit(config)

    def others_answered() -> bool:
        sites = fed.status(job).get("sites", {})
        return sites.get("bank_a") == "accepted" and sites.get("bank_c") == "accepted"

    wait_until(others_answered, 60, "bank_a and bank_c to accept the DP job")
    status = fed.status(job)
    assert status["state"] == "offered" and status["sites"]["bank_b"] == "waiting", status
    fed.start_site("bank_b")

    def mid_job() -> bool:
        return int(fed.status(job).get("rounds_done", 0)) >= 1

    wait_until(mid_job, 120, "the DP job's first round")
    fed.kill("server")  # its job server dies with it: no round boundary, no goodbye
    fed.start_coordinator()
    return job


def test_three_sites_run_jobs_through_a_cut_and_a_coordinator_restart(tmp_path: Path) -> None:
    banks = write_banks(tmp_path / "submitter", rows_per_bank=300, holdout=100)
    configs = job_configs(banks)
    jobs: dict[str, str] = {}
    with site_federation(tmp_path / "federation", list(BANKS)) as fed:
        set_up(fed, banks)
        fed.metrics_ports = {"server": free_port(), "bank_a": free_port()}
        fed.start_coordinator()
        for bank in BANKS:
            fed.start_site(bank)
        jobs["plain"] = fed.submit(configs["plain"])
        assert fed.wait_state(jobs["plain"], ("finished", "failed"), 120)["state"] == "finished"
        jobs["dp"] = run_dp_job_through_a_cut_and_a_restart(fed, configs["dp"])
        assert fed.wait_state(jobs["dp"], ("finished", "failed"), 240)["state"] == "finished"
        jobs["ckks"] = fed.submit(configs["ckks"])
        assert fed.wait_state(jobs["ckks"], ("finished", "failed"), 180)["state"] == "finished"
        jobs["greedy"] = fed.submit(configs["greedy"])
        refused = fed.wait_state(jobs["greedy"], ("refused", "finished", "failed"), 60)
        code, shown = fed.job("status", jobs["greedy"])
        journals = {bank: fed.site_journal(bank) for bank in BANKS}
        _, dp_logs = fed.job("logs", jobs["dp"])
        metrics = {name: fed.metrics(name) for name in ("server", "bank_a")}
        site_status = subprocess.run(
            [sys.executable, "-m", "veil.cli", "site", "status", "--home", str(fed.home("bank_a"))],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        coordinator_home = fed.home("server")
        ledgers = {bank: fed.home(bank) / "ledger.db" for bank in BANKS}

    # The policy-violating job: refused by bank_c alone, its reason shown to the submitter.
    assert refused["state"] == "refused", refused
    assert refused["sites"]["bank_a"] == refused["sites"]["bank_b"] == "accepted"
    assert refused["sites"]["bank_c"].startswith("refused: policy max_rounds = 10")
    assert code == 4 and "bank_c: refused: policy max_rounds = 10" in shown, shown
    greedy = next(e for e in journals["bank_c"] if e["job_id"] == jobs["greedy"])
    assert greedy["state"] == "refused" and "max_rounds" in greedy["reason"]

    # Every job: the model `veil run` computes from the same config.
    key = load_key_file(coordinator_home / "checkpoint.key")
    for name in ("plain", "dp", "ckks"):
        alone = tmp_path / f"veil-run-{name}"
        assert veil("run", str(configs[name]), "--out", str(alone)) == 0
        run_dir = coordinator_home / "jobs" / jobs[name] / "run"
        expected, got = final_model(alone), final_model(run_dir, key)
        assert expected.keys() == got.keys()
        for param in expected:
            np.testing.assert_allclose(got[param], expected[param], atol=1e-5, err_msg=name)
        ours = json.loads((run_dir / "result.json").read_text())
        theirs = json.loads((alone / "result.json").read_text())
        assert ours["privacy"]["epsilon"] == pytest.approx(theirs["privacy"]["epsilon"])
    assert rounds_recorded(coordinator_home / "jobs" / jobs["dp"] / "run") == [1, 2, 3, 4, 5]
    assert "server started: port" in dp_logs and "resumed from its checkpoint" in dp_logs, dp_logs

    # Each site's ledger: exactly its own charge for the DP job, released.
    dp_result = json.loads(
        (coordinator_home / "jobs" / jobs["dp"] / "run" / "result.json").read_text()
    )
    for bank in BANKS:
        with PrivacyLedger(ledgers[bank]) as ledger:
            charges = ledger.charges()
        assert [(c.dataset_id, c.what) for c in charges] == [
            (f"{bank}.csv", f"job {jobs['dp']} (dp)")
        ]
        assert charges[0].epsilon == pytest.approx(dp_result["privacy"]["epsilon"], rel=1e-6)
        assert charges[0].delta == pytest.approx(1e-5)
        assert charges[0].released_at is not None
        states = {e["job_id"]: e["state"] for e in journals[bank]}
        assert [states[jobs[n]] for n in ("plain", "dp", "ckks")] == ["finished"] * 3

    # Operations: what the coordinator and a site expose, and `veil site status`.
    assert 'veil_jobs{state="finished"} 3' in metrics["server"]
    assert 'veil_jobs{state="refused"} 1' in metrics["server"]
    assert 'veil_refusals_total{site="bank_c"} 1' in metrics["server"]
    spent = float(
        metrics["bank_a"].split('veil_site_epsilon_spent{dataset="bank_a.csv"} ')[1].split()[0]
    )
    assert spent == pytest.approx(dp_result["privacy"]["epsilon"], rel=1e-6)
    assert "coordinator 127.0.0.1" in site_status and "connected" in site_status
    assert (
        "bank_a.csv: ε this year" in site_status and f"job {jobs['dp']} dp: finished" in site_status
    )
