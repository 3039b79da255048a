"""mode = "ray": the same client code in a fixed pool of Ray actors on a local Ray instance gives
the same rounds and final metrics as the in-process simulation, and leaves no actor behind."""

from __future__ import annotations

import time
import tomllib
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest

from extras import require
from support import EXAMPLES
from veil.assembly.data import federated_data as _federated_data
from veil.config import RunConfig
from veil.federation import (
    ClientRunner,
    FedAvg,
    FederatedServer,
    RoundRecord,
    Strategy,
    TrainingPlan,
    UpdatePipeline,
)
from veil.models import build_model, get_parameters
from veil.result import Result
from veil.run import run
from veil.tensors import NamedArrays
from veil.transport.ray import RaySettings, RayTransport

ray = require("ray")

CLUSTER_CPUS = 4


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One local instance for the module (a run reuses a running instance and leaves it up)."""
    ray.init(
        num_cpus=CLUSTER_CPUS,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=100 * 1024 * 1024,
    )
    yield
    ray.shutdown()


class PoolWatch:
    """Records the CPUs the Ray cluster has in use at the end of every round.

    `ray.available_resources()` is eventually consistent: it may still show an actor that is
    gone, or not yet one that started. So each round's figure is polled (with a deadline) until
    it shows the expected pool; a pool of another size never does, and its size is recorded.
    """

    def __init__(self, expected: float = 2.0) -> None:
        self.expected = expected
        self.cpus_in_use: list[float] = []

    def on_round_start(self, round_: int, selected: int) -> None:
        pass

    def on_client_done(self, round_: int, client: str) -> None:
        pass

    def on_round_end(self, record: RoundRecord, parameters: NamedArrays, s: Strategy) -> None:
        free = wait_for_free_cpus(CLUSTER_CPUS - self.expected, timeout_s=5.0)
        self.cpus_in_use.append(CLUSTER_CPUS - free)


def config(mode: str, **sections: Any) -> RunConfig:
    raw = tomllib.loads((EXAMPLES / "medical_diagnosis_ray.toml").read_text())
    raw["federation"] = {**raw["federation"], **sections.pop("federation", {})}
    return RunConfig.from_dict({**raw, **sections, "mode": mode})


def both(**sections: Any) -> tuple[Result, Result, PoolWatch]:
    simulated = run(config("simulation", **sections))
    watch = PoolWatch()
    on_ray = run(config("ray", **sections), observers=[watch])
    return simulated, on_ray, watch


def wait_for_free_cpus(expected: float, timeout_s: float = 10.0) -> float:
    deadline = time.monotonic() + timeout_s
    free = 0.0
    while time.monotonic() < deadline:
        free = float(ray.available_resources().get("CPU", 0.0))
        if free == expected:
            break
        time.sleep(0.05)
    return free


def assert_same_run(simulated: Result, on_ray: Result) -> None:
    assert on_ray.mode == "ray" and simulated.mode == "simulation"
    for key in ("accuracy", "loss"):
        assert abs(on_ray.final[key] - simulated.final[key]) <= 0.01
    for a, b in zip(simulated.rounds, on_ray.rounds, strict=True):
        assert (a.clients, a.dropped, a.selected) == (b.clients, b.dropped, b.selected)
        assert sorted(f["client"] for f in a.failures) == sorted(f["client"] for f in b.failures)


def test_ray_runs_match_simulation_in_a_bounded_pool(local_ray: None) -> None:
    # The example as it is: the done-when of issue 11.
    simulated, on_ray, watch = both()
    assert_same_run(simulated, on_ray)
    assert abs(on_ray.final["accuracy"] - simulated.final["accuracy"]) < 1e-6
    # Two workers of one CPU each, in every round: no actor per client.
    assert watch.cpus_in_use == [2.0] * 20
    assert wait_for_free_cpus(CLUSTER_CPUS) == CLUSTER_CPUS  # the pool is gone after the run
    assert ray.is_initialized()  # a run leaves an instance it did not start running


@pytest.mark.slow
def test_ray_matches_simulation_with_faults_attacks_and_robust_aggregation(
    local_ray: None,
) -> None:
    """Selection, dropout and stragglers are decided on the server, the attack travels to the
    workers as a client stage, the robust aggregator stays on the server: same rounds."""
    simulated, on_ray, watch = both(
        federation={"rounds": 6, "fraction_fit": 0.8, "simulated_dropout": 0.2},
        stragglers={"deadline_s": 0.3, "seconds_per_example": 0.002},
        attack={"kind": "sign_flip", "fraction": 0.2, "scale": 10.0},
        robust={"method": "median"},
    )
    assert_same_run(simulated, on_ray)
    assert on_ray.pipeline == ["client:attack:sign_flip", "aggregate:median"]
    kinds = {k for r in on_ray.rounds for k in r.failure_counts}
    assert kinds == {"simulated dropout", "straggler"}
    assert max(watch.cpus_in_use) == 2.0
    assert wait_for_free_cpus(CLUSTER_CPUS) == CLUSTER_CPUS


@pytest.mark.slow
def test_a_lost_worker_fails_its_clients_once_and_is_replaced(local_ray: None) -> None:
    cfg = config("ray")
    fed = _federated_data(cfg)
    pipeline = UpdatePipeline()
    runners = {
        c.name: ClientRunner(c.name, c, n_classes=fed.n_classes, pipeline=pipeline, seed=i)
        for i, c in enumerate(fed.clients)
    }
    factory = partial(build_model, cfg.model, n_features=fed.n_features, n_classes=2)
    settings = RaySettings(workers=2, clients_per_task=1)
    with RayTransport(runners, factory, settings=settings) as transport:
        server = FederatedServer(
            run_id="loss",
            clients=list(runners),
            parameters=get_parameters(factory()),
            strategy=FedAvg(fraction_evaluate=0.0),
            gateway=transport,
            plan=TrainingPlan(epochs=1, batch_size=16, learning_rate=0.05),
            pipeline=pipeline,
        )
        assert server.run_round(1, evaluate=False).dropped == 0
        lost = transport.workers[0]
        ray.kill(lost)
        second = server.run_round(2, evaluate=False)
        assert 1 <= second.dropped <= 2  # the calls that were queued on the lost worker
        assert all(f.reason.startswith("Ray worker lost") for f in second.failures)
        assert transport.workers[0] is not lost
        assert server.run_round(3, evaluate=False).dropped == 0
        assert len(transport.workers) == 2
    assert transport.workers == []
    assert wait_for_free_cpus(CLUSTER_CPUS) == CLUSTER_CPUS
