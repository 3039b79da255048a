"""Simulated stragglers and client selection at scale: deterministic, deadline-bound, uniform,
and small in the run store."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from veil.config import RunConfig
from veil.federation import FedAvg, TrainingPlan
from veil.result import LISTED_FAILURES
from veil.run import run
from veil.seeding import Purpose, numpy_rng
from veil.transport.simulated import SimulatedFaults, Stragglers

NAMES = [f"c{i}" for i in range(200)]


def faults(stragglers: Stragglers, seed: int = 0, sizes: dict[str, int] | None = None):  # type: ignore[no-untyped-def]
    sizes = sizes or dict.fromkeys(NAMES, 100)
    return SimulatedFaults(NAMES, seed=seed, stragglers=stragglers, examples=sizes.__getitem__)


def late(f: SimulatedFaults, rnd: int, epochs: int = 1) -> set[str]:
    return {n for n in NAMES if f.failure(n, rnd, epochs=epochs) is not None}


def test_without_spread_every_client_takes_examples_times_epochs_times_the_rate() -> None:
    f = faults(Stragglers(deadline_s=1.0, seconds_per_example=0.004, speed_spread=0.0))
    assert f.simulated_seconds("c7", 3, epochs=2) == pytest.approx(100 * 2 * 0.004)
    assert late(f, 1, epochs=2) == set()  # 0.8 s < 1 s
    assert late(f, 1, epochs=3) == set(NAMES)  # 1.2 s > 1 s


def test_slow_clients_stay_slow_and_the_share_follows_the_lognormal() -> None:
    s = Stragglers(deadline_s=0.1 * math.exp(0.5), seconds_per_example=0.001, speed_spread=0.5)
    f = faults(s, seed=4)
    rounds = [late(f, r) for r in range(1, 6)]
    assert all(r == rounds[0] for r in rounds)  # no jitter: the same devices miss every round
    # P(exp(0.5 z) > e^0.5) = P(z > 1) = 0.159; 200 clients: sd 5.2, so ± 4 sd = ± 21.
    assert abs(len(rounds[0]) - 0.159 * len(NAMES)) <= 21
    assert late(faults(s, seed=4), 1) == rounds[0]  # reproducible from the seed
    assert late(faults(s, seed=5), 1) != rounds[0]


def test_jitter_varies_who_is_late_from_round_to_round() -> None:
    s = Stragglers(deadline_s=0.1, seconds_per_example=0.001, speed_spread=0.0, jitter=0.5)
    f = faults(s)
    first, second = late(f, 1), late(f, 2)
    assert first and second and first != second


def test_larger_clients_are_later() -> None:
    sizes = {n: (1000 if i % 2 else 10) for i, n in enumerate(NAMES)}
    f = faults(Stragglers(deadline_s=0.5, speed_spread=0.0), sizes=sizes)
    assert late(f, 1) == {n for n, size in sizes.items() if size == 1000}


def test_reason_names_the_deadline() -> None:
    f = faults(Stragglers(deadline_s=0.05, speed_spread=0.0))
    assert (
        f.failure("c1", 1, epochs=1)
        == "straggler: needed 0.1 s (simulated), past the deadline of 0.05 s"
    )


def test_stragglers_need_the_clients_sizes() -> None:
    with pytest.raises(ValueError, match="numbers of examples"):
        SimulatedFaults(NAMES, seed=0, stragglers=Stragglers(deadline_s=1.0))


def test_selection_is_without_replacement_and_uniform_across_rounds() -> None:
    """The server's per-round selection: k distinct clients, each client about equally often."""
    strategy = FedAvg(fraction_fit=0.1)
    plan = TrainingPlan(epochs=1, batch_size=1, learning_rate=0.1)
    counts = dict.fromkeys(NAMES, 0)
    rounds = 500
    for rnd in range(1, rounds + 1):
        chosen, _ = strategy.configure_fit(rnd, NAMES, numpy_rng(1, Purpose.SELECT_FIT, rnd), plan)
        assert len(chosen) == 20 and len(set(chosen)) == 20
        for name in chosen:
            counts[name] += 1
    # Each client: Binomial(500, 0.1), mean 50, variance 45; the sum of squared standardised
    # deviations over 200 clients is about chi-square with 199 degrees of freedom, whose 99.9%
    # quantile is 266.
    observed = np.array(list(counts.values()), float)
    chi2 = float(((observed - 50.0) ** 2 / 50.0).sum() * 0.9**-1)
    assert chi2 < 266


def test_a_large_simulation_with_stragglers_keeps_rounds_small(tmp_path: Path) -> None:
    config = RunConfig.from_dict(
        {
            "name": "stragglers",
            "seed": 3,
            "data": {"dataset": "synthetic_logistic", "validation_fraction": 0.0},
            "model": {"name": "logistic"},
            "federation": {"clients": 400, "rounds": 2, "fraction_evaluate": 0.0},
            "stragglers": {"deadline_s": 0.003, "seconds_per_example": 0.001},
        }
    )
    result = run(config, tmp_path)
    for r in result.rounds:
        assert r.dropped > LISTED_FAILURES  # many stragglers ...
        assert len(r.failures) == LISTED_FAILURES  # ... but only a few are listed
        assert r.failure_counts == {"straggler": r.dropped}
        assert r.clients + r.dropped == 400
        assert all(f["reason"].startswith("straggler: needed") for f in r.failures)
    with sqlite3.connect(tmp_path / "veil.db") as db:
        stored = [json.loads(row[0]) for row in db.execute("SELECT failures FROM rounds")]
    assert [len(s) for s in stored] == [LISTED_FAILURES] * 2
