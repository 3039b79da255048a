"""`benchmarks/load.py --quick` end to end: a coordinator process (`veil server`) and member
worker processes over mutual TLS on loopback, SecAgg+ then plain aggregation, 20 members."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_load_benchmark_quick_runs_both_aggregations_end_to_end() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "load.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ},
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["benchmark"] == "load"
    assert summary["members"] == 20
    secagg, plain = summary["results"]
    assert (secagg["aggregation"], plain["aggregation"]) == ("secagg", "plain")
    for row in (secagg, plain):
        # Every member took part in every round (warm-up + 1 timed), and every round applied.
        assert row["members"] == 20
        assert row["dropped_per_round"] == [0, 0]
        assert row["applied"] is True
        assert row["round_s_median"] == row["round_s"][1] > 0
        # The coordinator's memory was read from its own process: it only grows to its peak.
        assert 0 < row["coordinator_listening_rss_mb"] <= row["coordinator_before_round_1_hwm_mb"]
        assert row["coordinator_before_round_1_hwm_mb"] <= row["coordinator_peak_mb"]
        assert row["member_workers_peak_mb_total"] > 0
        assert row["coordinator_cpu_s"] > 0 and row["member_workers_cpu_s"] > 0
    # SecAgg+ really ran: a sparse graph (degree below the 19 other members) with a threshold
    # above two thirds of each share-holder set, and the protocol's messages on top of the
    # masked vector; plain aggregation has neither.
    assert 2 <= secagg["neighbours"] < 19
    assert secagg["threshold"] > 2 * (secagg["neighbours"] + 1) / 3
    assert plain["neighbours"] is None and plain["threshold"] is None
    assert secagg["bytes_up_per_member_round"] > plain["bytes_up_per_member_round"]
    assert secagg["bytes_down_per_member_round"] > plain["bytes_down_per_member_round"] > 0
    # The same federation learns about as well under either aggregation.
    assert secagg["accuracy"] == pytest.approx(plain["accuracy"], abs=0.05)
    ratio = secagg["round_s_median"] / plain["round_s_median"]
    assert summary["secagg_over_plain_round_time"] == pytest.approx(ratio, rel=0.02, abs=0.01)
