"""The global model can never become non-finite: a hostile weight is refused, and a round whose
aggregate (or new model, or optimiser state) would be NaN or Inf is discarded and recorded, never
applied or checkpointed."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from torch import nn

from veil.data import ClientData
from veil.errors import StoreError
from veil.federation import (
    ClientFailure,
    ClientRunner,
    EvaluateInstruction,
    EvaluateResult,
    FedAvg,
    FederatedServer,
    FitInstruction,
    FitResult,
    RoundRecord,
    Strategy,
    TrainingPlan,
    UpdatePipeline,
)
from veil.federation.fedopt import FedOpt
from veil.federation.pipeline import RoundContext
from veil.models import LogisticRegression
from veil.store.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from veil.tensors import NamedArrays
from veil.transport import LocalTransport

N_FEATURES, N_CLASSES = 3, 2
PLAN = TrainingPlan(epochs=1, batch_size=8, learning_rate=0.1)
CLIENTS = ["c0", "c1", "c2"]


class Poison:
    """A hostile client stage (the last one, as `veil.federation.attacks.ModelPoisoning` is):
    the named clients replace their weight and/or fill their update with one value."""

    name = "attack:test"

    def __init__(
        self, clients: Sequence[str], *, weight: float | None = None, fill: float | None = None
    ) -> None:
        self.clients = set(clients)
        self.weight = weight
        self.fill = fill

    def apply(self, result: FitResult, context: RoundContext) -> FitResult:
        if result.client not in self.clients:
            return result
        if self.weight is not None:
            result = replace(result, weight=self.weight)
        if self.fill is not None:
            update = {k: np.full_like(a, self.fill) for k, a in result.update.items()}
            result = replace(result, update=update)
        return result


class Without:
    """A gateway whose named clients drop out of every round (the run without their rounds)."""

    def __init__(self, inner: LocalTransport, absent: Sequence[str]) -> None:
        self.inner = inner
        self.absent = set(absent)

    def fit(
        self, clients: Sequence[str], instruction: FitInstruction
    ) -> Iterator[FitResult | ClientFailure]:
        for name in clients:
            if name in self.absent:
                yield ClientFailure(name, instruction.round, "absent")
            else:
                yield from self.inner.fit([name], instruction)

    def evaluate(
        self, clients: Sequence[str], instruction: EvaluateInstruction
    ) -> Iterator[EvaluateResult | ClientFailure]:
        yield from self.inner.evaluate(clients, instruction)


class Checkpointer:
    """Checkpoints after every round, as a run does."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_round_start(self, round_: int, selected: int) -> None:
        pass

    def on_client_done(self, round_: int, client: str) -> None:
        pass

    def on_round_end(
        self, record: RoundRecord, parameters: NamedArrays, strategy: Strategy
    ) -> None:
        save_checkpoint(
            self.path, Checkpoint("test-run", record.round, parameters, strategy.state(), {})
        )


def model_factory() -> nn.Module:
    return LogisticRegression(N_FEATURES, N_CLASSES)


def runners(stages: Sequence[object] = ()) -> dict[str, ClientRunner]:
    pipeline = UpdatePipeline(client_stages=list(stages))  # type: ignore[arg-type]
    out = {}
    for i, name in enumerate(CLIENTS):
        rng = np.random.default_rng(100 + i)
        n = 12 + i
        y = rng.integers(0, N_CLASSES, size=n).astype(np.int64)
        x = (rng.normal(size=(n, N_FEATURES)) + y[:, None]).astype(np.float32)
        data = ClientData(name, x[: n - 4], y[: n - 4], x[n - 4 :], y[n - 4 :])
        out[name] = ClientRunner(name, data, n_classes=N_CLASSES, pipeline=pipeline, seed=1000 + i)
    return out


def initial_parameters() -> NamedArrays:
    rng = np.random.default_rng(0)
    return {
        "linear.weight": rng.normal(size=(N_CLASSES, N_FEATURES)).astype(np.float32),
        "linear.bias": np.zeros(N_CLASSES, np.float32),
    }


def server(
    gateway: object, strategy: Strategy, observers: Sequence[object] = ()
) -> FederatedServer:
    return FederatedServer(
        run_id="test-run",
        clients=CLIENTS,
        parameters=initial_parameters(),
        strategy=strategy,
        gateway=gateway,  # type: ignore[arg-type]
        plan=PLAN,
        seed=5,
        observers=observers,  # type: ignore[arg-type]
    )


def finite(arrays: NamedArrays) -> bool:
    return all(np.isfinite(a).all() for a in arrays.values())


STRATEGIES: dict[str, Callable[[], Strategy]] = {
    "fedavg": lambda: FedAvg(fraction_evaluate=0.0),
    "fedadam": lambda: FedOpt("fedadam", server_learning_rate=0.1, fraction_evaluate=0.0),
}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("weight", [1e39, 1e300, float("inf")])
def test_a_huge_weight_is_refused_and_the_run_equals_the_run_without_that_member(
    tmp_path: Path, strategy: str, weight: float
) -> None:
    checkpoints = Checkpointer(tmp_path / "ckpt")
    hostile = server(
        LocalTransport(runners([Poison(["c1"], weight=weight)]), model_factory),
        STRATEGIES[strategy](),
        [checkpoints],
    )
    records = hostile.run(3)
    honest = server(
        Without(LocalTransport(runners(), model_factory), ["c1"]), STRATEGIES[strategy]()
    )
    honest.run(3)
    assert finite(hostile.parameters)
    for k, a in honest.parameters.items():
        np.testing.assert_array_equal(hostile.parameters[k], a, err_msg=k)
    for record in records:
        assert record.applied and record.completed == 2
        [failure] = record.failures
        assert failure.client == "c1" and "weight" in failure.reason
    saved = load_checkpoint(tmp_path / "ckpt")
    assert saved.round == 3 and finite(saved.parameters) and finite(saved.strategy_state)


def test_an_aggregate_that_overflows_float32_is_discarded_and_recorded(tmp_path: Path) -> None:
    # Two finite updates whose sum overflows float32 (3e38 + 3e38 = inf).
    stage = Poison(["c0", "c1"], weight=1.0, fill=3e38)
    srv = server(
        LocalTransport(runners([stage]), model_factory),
        FedAvg(fraction_evaluate=0.0),
        [Checkpointer(tmp_path / "ckpt")],
    )
    record = srv.run_round(1, evaluate=False)
    assert not record.applied
    assert record.completed == 3  # every update was accepted; their sum is what is refused
    assert record.discarded is not None and "not finite" in record.discarded
    assert record.aggregation["discarded"] == record.discarded
    for k, a in initial_parameters().items():
        np.testing.assert_array_equal(srv.parameters[k], a, err_msg=k)
    saved = load_checkpoint(tmp_path / "ckpt")
    assert finite(saved.parameters)
    # The next honest round moves the model as usual.
    stage.clients.clear()
    assert srv.run_round(2, evaluate=False).applied and finite(srv.parameters)


def test_a_step_that_would_poison_the_optimiser_state_is_rolled_back() -> None:
    # A finite mean of 1e30 squares to inf in FedAdam's second moment.
    stage = Poison(["c0", "c1", "c2"], fill=1e30)
    strategy = FedOpt("fedadam", server_learning_rate=0.1, fraction_evaluate=0.0)
    srv = server(LocalTransport(runners([stage]), model_factory), strategy)
    record = srv.run_round(1, evaluate=False)
    assert not record.applied
    assert record.discarded is not None and "strategy state" in record.discarded
    assert finite(strategy.state())
    for k, a in initial_parameters().items():
        np.testing.assert_array_equal(srv.parameters[k], a, err_msg=k)
    stage.clients.clear()
    assert srv.run_round(2, evaluate=False).applied
    assert finite(srv.parameters) and finite(strategy.state())


def test_a_nonfinite_model_is_never_checkpointed(tmp_path: Path) -> None:
    params = initial_parameters()
    params["linear.bias"][0] = np.nan
    with pytest.raises(StoreError, match="not finite"):
        save_checkpoint(tmp_path / "ckpt", Checkpoint("r", 1, params, {}, {}))
    assert not (tmp_path / "ckpt").exists()
