"""Batched plain aggregation: a stack of updates trained together is checked and summed at
once, with the outcome of adding each update alone (same rejections, same sum to 1e-6)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace

import numpy as np
import pytest
import torch

from veil.data import ClientData, make_synthetic_logistic
from veil.federation import (
    ClientFailure,
    ClientRunner,
    FedAvg,
    FederatedServer,
    FitInstruction,
    FitResult,
    TrainingPlan,
    UpdatePipeline,
)
from veil.federation import pipeline as pipeline_module
from veil.federation.pipeline import (
    MAX_WEIGHT,
    Aggregate,
    MappedAggregator,
    RoundContext,
    StackedUpdates,
    UpdateRejected,
    WeightedSum,
    check_update,
    update_problems,
)
from veil.federation.robust import CoordinateMedian
from veil.federation.vectorised import VectorisedTrainer
from veil.models import LogisticRegression, get_parameters
from veil.tensors import NamedArrays
from veil.transport import LocalTransport

REFERENCE: NamedArrays = {
    "w": np.zeros((2, 3), np.float32),
    "b": np.zeros(2, np.float32),
}
PLAN = TrainingPlan(epochs=1, batch_size=4, learning_rate=0.1)
#: Row -> how it is made hostile (None: an honest update).
HOSTILE: list[str | None] = [
    None,
    "nan update",
    "inf bias",
    "negative weight",
    "nan weight",
    "zero weight",
    "weight over the bound",
    None,
    "nan sum",
    "nan update and nan weight",
    None,
]


def _stack(rows: list[str | None], *, w_shape: tuple[int, ...] = (2, 3)) -> StackedUpdates:
    """A stack of `rows` updates (one client each), hostile as `rows` says."""
    rng = np.random.default_rng(5)
    count = len(rows)
    w = rng.normal(size=(count, *w_shape)).astype(np.float32)
    b = rng.normal(size=(count, 2)).astype(np.float32)
    weights = rng.integers(1, 60, size=count).astype(np.float64)
    sums = rng.integers(0, 2, size=count).astype(np.float64)
    for i, kind in enumerate(rows):
        if kind in ("nan update", "nan update and nan weight"):
            w.reshape(count, -1)[i, 1] = np.nan
        if kind == "inf bias":
            b[i, 0] = np.inf
        if kind == "negative weight":
            weights[i] = -3.0
        if kind in ("nan weight", "nan update and nan weight"):
            weights[i] = np.nan
        if kind == "zero weight":
            weights[i] = 0.0
        if kind == "weight over the bound":
            weights[i] = MAX_WEIGHT * 2
        if kind == "nan sum":
            sums[i] = np.nan
    results = tuple(
        FitResult(
            client=f"c{i}",
            round=1,
            update={"w": w[i], "b": b[i]},
            weight=float(weights[i]),
            num_examples=i + 1,
            metrics={"train_loss": 0.5 + i},
            sums={"unclipped": float(sums[i])},
        )
        for i in range(count)
    )
    return StackedUpdates(results, {"w": w, "b": b}, weights, {"unclipped": sums})


def _alone(result: FitResult) -> str | None:
    try:
        check_update(REFERENCE, result)
    except UpdateRejected as exc:
        return str(exc.args[0])
    return None


def test_each_row_is_rejected_for_the_reason_it_would_be_alone() -> None:
    stack = _stack(HOSTILE)
    problems = update_problems(REFERENCE, stack)
    assert problems == [_alone(r) for r in stack.results]
    assert [p is None for p in problems] == [kind is None for kind in HOSTILE]
    assert "weight must be a positive number" in str(problems[9])  # the weight rule comes first
    assert problems[1] == "parameter 'w' contains NaN or Inf"
    assert problems[2] == "parameter 'b' contains NaN or Inf"
    assert problems[8] == "a summed scalar is NaN or Inf"


def test_a_stack_of_the_wrong_shape_is_rejected_whole_as_each_update_alone() -> None:
    stack = _stack([None, None, "nan weight"], w_shape=(3, 2))
    problems = update_problems(REFERENCE, stack)
    assert problems == [_alone(r) for r in stack.results]
    assert all(p is not None and "has shape (3, 2), expected (2, 3)" in p for p in problems)


def _accumulate(stack: StackedUpdates, *, stacked: bool) -> tuple[Aggregate, dict[str, str]]:
    """Add every result of `stack` (told of the stack first when `stacked`): the aggregate and
    the rejected clients' reasons."""
    accumulator = WeightedSum().start(REFERENCE, RoundContext("t", 1))
    if stacked:
        accumulator.expect(stack)  # type: ignore[attr-defined]
    rejected = {}
    for result in stack.results:
        try:
            accumulator.add(result)
        except UpdateRejected as exc:
            rejected[result.client] = str(exc)
    return accumulator.finish(), rejected


@pytest.mark.parametrize("rows", [HOSTILE, [None] * 7], ids=["hostile", "honest"])
def test_a_stack_sums_to_what_adding_each_update_alone_gives(rows: list[str | None]) -> None:
    batched, batched_rejected = _accumulate(_stack(rows), stacked=True)
    alone, alone_rejected = _accumulate(_stack(rows), stacked=False)
    assert batched_rejected == alone_rejected
    assert sorted(batched_rejected) == [f"c{i}" for i, k in enumerate(rows) if k is not None]
    assert (batched.count, batched.weight) == (alone.count, alone.weight)
    assert batched.sums == pytest.approx(alone.sums, abs=1e-9)
    for name in REFERENCE:
        assert np.isfinite(batched.total[name]).all()
        np.testing.assert_allclose(batched.total[name], alone.total[name], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(batched.mean()["w"], alone.mean()["w"], rtol=0, atol=1e-6)


def test_a_result_that_is_not_the_stacks_own_object_is_checked_and_summed_alone() -> None:
    stack = _stack([None, None])
    impostor = replace(stack.results[0], update={"w": np.full((2, 3), np.nan, np.float32)})
    accumulator = WeightedSum().start(REFERENCE, RoundContext("t", 1))
    accumulator.expect(stack)  # type: ignore[attr-defined]
    with pytest.raises(UpdateRejected, match="parameter names differ"):
        accumulator.add(impostor)
    accumulator.add(stack.results[1])
    aggregate = accumulator.finish()
    assert aggregate.count == 1
    expected = np.float32(stack.weights[1]) * stack.update["w"][1]
    np.testing.assert_allclose(aggregate.total["w"], expected, rtol=1e-6)


class _Gateway:
    """Replies with given results (and failures); `fit` only: the per-result path."""

    def __init__(self, stack: StackedUpdates, extra: Sequence[FitResult | ClientFailure]) -> None:
        self.stack = stack
        self.extra = list(extra)
        self.stacked_calls = 0

    def fit(
        self, clients: Sequence[str], instruction: FitInstruction
    ) -> Iterator[FitResult | ClientFailure]:
        yield from self.stack.results[:3]
        yield from self.extra
        yield from self.stack.results[3:]

    def evaluate(self, clients: Sequence[str], instruction: object) -> Iterator[object]:
        return iter(())

    def exchange(self, instructions: object) -> Iterator[object]:
        return iter(())


class _StackingGateway(_Gateway):
    def fit_stacked(
        self, clients: Sequence[str], instruction: FitInstruction
    ) -> tuple[list[StackedUpdates], Iterator[FitResult | ClientFailure]]:
        self.stacked_calls += 1
        return [self.stack], self.fit(clients, instruction)


class _IdentityStage:
    name = "identity"

    def apply(self, aggregate: Aggregate, context: RoundContext) -> Aggregate:
        return aggregate


def _fake_server(gateway: _Gateway, pipeline: UpdatePipeline | None = None) -> FederatedServer:
    names = [r.client for r in gateway.stack.results] + ["late"]
    return FederatedServer(
        run_id="t",
        clients=names,
        parameters={k: v.copy() for k, v in REFERENCE.items()},
        strategy=FedAvg(fraction_fit=1.0, fraction_evaluate=0.0),
        gateway=gateway,  # type: ignore[arg-type]
        plan=PLAN,
        pipeline=pipeline or UpdatePipeline(),
    )


def test_the_server_rejects_and_sums_a_stack_exactly_as_reply_by_reply() -> None:
    records, servers = [], []
    for kind in (_Gateway, _StackingGateway):
        stack = _stack(HOSTILE)
        # a second reply of a stacked client, a stale one, a failure: all refused as before
        extra: list[FitResult | ClientFailure] = [stack.results[0]]
        extra += [replace(stack.results[7], round=0), ClientFailure("late", 1, "dropout")]
        server = _fake_server(kind(stack, extra))
        records.append(server.run_round(1, evaluate=False))
        servers.append(server)
    alone, batched = records
    assert servers[1].gateway.stacked_calls == 1  # type: ignore[attr-defined]
    assert [(f.client, f.reason) for f in batched.failures] == [
        (f.client, f.reason) for f in alone.failures
    ]
    rejected = [f.client for f in alone.failures if f.reason.startswith("update rejected")]
    assert rejected == [f"c{i}" for i, kind in enumerate(HOSTILE) if kind is not None]
    assert (batched.completed, batched.applied) == (alone.completed, alone.applied) == (2, True)
    assert batched.metrics["train_loss"] == pytest.approx(alone.metrics["train_loss"], abs=1e-9)
    for name in REFERENCE:
        np.testing.assert_allclose(
            servers[1].parameters[name], servers[0].parameters[name], rtol=0, atol=1e-6
        )
    assert np.abs(servers[1].parameters["w"]).max() > 0.01


@pytest.mark.parametrize(
    "pipeline",
    [
        UpdatePipeline(server_stages=[_IdentityStage()]),
        UpdatePipeline(aggregator=CoordinateMedian()),
        UpdatePipeline(aggregator=MappedAggregator(WeightedSum(), "mapped", lambda ref: _NoMap())),
    ],
    ids=["server stage", "robust", "wrapped"],
)
def test_only_plain_aggregation_takes_the_stacked_path(pipeline: UpdatePipeline) -> None:
    gateway = _StackingGateway(_stack([None, None, None, None]), [])
    record = _fake_server(gateway, pipeline).run_round(1, evaluate=False)
    assert gateway.stacked_calls == 0
    assert record.completed == 4


class _NoMap:
    def apply(self, result: FitResult) -> FitResult:
        return result

    def report(self) -> dict[str, object]:
        return {}


FEATURES = 5


def _local_server(*, vectorised: bool, poisoned: str) -> FederatedServer:
    """Eight clients of logistic regression; `poisoned`'s features are NaN (a NaN update)."""
    data = make_synthetic_logistic(8 * 12, FEATURES, seed=4)
    empty_x, empty_y = np.zeros((0, FEATURES), np.float32), np.zeros(0, np.int64)
    clients = {}
    for i in range(8):
        x = np.array(data.features[i * 12 : (i + 1) * 12], np.float32)
        if f"c{i}" == poisoned:
            x[3, 1] = np.nan
        y = data.labels[i * 12 : (i + 1) * 12]
        clients[f"c{i}"] = ClientData(f"c{i}", x, y, empty_x, empty_y)
    pipeline = UpdatePipeline()
    runners = {
        name: ClientRunner(name, c, n_classes=2, pipeline=pipeline, seed=10 + i)
        for i, (name, c) in enumerate(clients.items())
    }
    torch.manual_seed(0)
    model = LogisticRegression(FEATURES, 2)
    batched = VectorisedTrainer(model, runners, clients) if vectorised else None
    return FederatedServer(
        run_id="t",
        clients=list(runners),
        parameters=get_parameters(model),
        strategy=FedAvg(fraction_fit=1.0, fraction_evaluate=0.0),
        gateway=LocalTransport(runners, lambda: model, vectorised=batched),
        plan=PLAN,
        pipeline=pipeline,
    )


def test_a_vectorised_round_checks_its_stack_once_and_rejects_a_nan_client_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []
    real = pipeline_module.update_problems

    def counted(reference: NamedArrays, stack: StackedUpdates) -> list[str | None]:
        calls.append(len(stack.results))
        return real(reference, stack)

    monkeypatch.setattr(pipeline_module, "update_problems", counted)
    loop = _local_server(vectorised=False, poisoned="c5")
    batched = _local_server(vectorised=True, poisoned="c5")
    for rnd in (1, 2):
        calls.clear()
        a = loop.run_round(rnd, evaluate=False)
        assert calls == [1] * 8  # one update at a time
        calls.clear()
        b = batched.run_round(rnd, evaluate=False)
        assert calls == [8]  # the whole stack in one pass
        assert [(f.client, f.reason) for f in b.failures] == [
            (f.client, f.reason) for f in a.failures
        ]
        assert [f.client for f in a.failures] == ["c5"]
        assert "contains NaN or Inf" in a.failures[0].reason
        assert a.completed == b.completed == 7
        for name, value in loop.parameters.items():
            np.testing.assert_allclose(batched.parameters[name], value, rtol=0, atol=1e-6)
