"""Vectorised simulation: clients trained together give the per-client loop's results."""

from __future__ import annotations

from collections.abc import Callable

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
from veil.federation import vectorised as vectorised_module
from veil.federation.compression import CompressionStage, Int8Compressor
from veil.federation.vectorised import (
    VectorisedTrainer,
    derive_seeds,
    randperms,
    vectorisable,
)
from veil.models import MLP, LinearRegression, LogisticRegression, SmallCNN, get_parameters
from veil.seeding import Purpose, derive_seed
from veil.transport import LocalTransport

FEATURES = 6


def _clients(sizes: list[int], classes: int = 2) -> dict[str, ClientData]:
    data = make_synthetic_logistic(max(sum(sizes), 1), FEATURES, seed=3)
    labels = data.labels % classes
    empty_x, empty_y = np.zeros((0, FEATURES), np.float32), np.zeros(0, np.int64)
    out, at = {}, 0
    for i, size in enumerate(sizes):
        rows = slice(at, at + size)
        out[f"c{i}"] = ClientData(f"c{i}", data.features[rows], labels[rows], empty_x, empty_y)
        at += size
    return out


def _server(
    data: dict[str, ClientData],
    plan: TrainingPlan,
    make_model: Callable[[], torch.nn.Module],
    *,
    vectorised: bool,
    classes: int = 2,
    pipeline: UpdatePipeline | None = None,
    dropout: float = 0.0,
) -> FederatedServer:
    pipeline = pipeline or UpdatePipeline()
    runners = {
        name: ClientRunner(name, c, n_classes=classes, pipeline=pipeline, seed=100 + i)
        for i, (name, c) in enumerate(data.items())
    }
    torch.manual_seed(0)
    model = make_model()
    batched = VectorisedTrainer(model, runners, data) if vectorised else None
    gateway = LocalTransport(runners, lambda: model, seed=1, dropout=dropout, vectorised=batched)
    return FederatedServer(
        run_id="t",
        clients=list(runners),
        parameters=get_parameters(model),
        strategy=FedAvg(fraction_fit=0.8, fraction_evaluate=0.0),
        gateway=gateway,
        plan=plan,
        pipeline=pipeline,
        seed=2,
    )


def _assert_same_rounds(loop: FederatedServer, batched: FederatedServer, rounds: int) -> None:
    for rnd in range(1, rounds + 1):
        a = loop.run_round(rnd, evaluate=False)
        b = batched.run_round(rnd, evaluate=False)
        assert a.selected_clients == b.selected_clients
        assert a.completed == b.completed
        assert [f.client for f in a.failures] == [f.client for f in b.failures]
        assert a.metrics["train_loss"] == pytest.approx(b.metrics["train_loss"], abs=1e-6)
        for name, value in loop.parameters.items():
            np.testing.assert_allclose(batched.parameters[name], value, rtol=0, atol=1e-6)
    # the runs moved the model: equality is not two untouched copies
    assert loop.parameters != {}


RAGGED = [1, 5, 16, 17, 31, 40, 64, 3, 50, 0]

CONFIGS = [
    ("equal sizes", [50] * 12, TrainingPlan(epochs=1, batch_size=32, learning_rate=0.1), None),
    ("ragged, 3 epochs", RAGGED, TrainingPlan(epochs=3, batch_size=16, learning_rate=0.2), None),
    (
        "ragged, momentum and weight decay",
        RAGGED,
        TrainingPlan(epochs=2, batch_size=8, learning_rate=0.1, momentum=0.9, weight_decay=0.01),
        None,
    ),
    (
        "ragged, FedProx",
        RAGGED,
        TrainingPlan(epochs=2, batch_size=16, learning_rate=0.1, proximal_mu=0.5),
        None,
    ),
    (
        "MLP, ragged, momentum, 3 classes",
        RAGGED,
        TrainingPlan(epochs=2, batch_size=16, learning_rate=0.05, momentum=0.5),
        3,
    ),
]


@pytest.mark.parametrize("batch_draws_from", [1, vectorised_module.BATCH_DRAWS_FROM])
@pytest.mark.parametrize(
    ("label", "sizes", "plan", "mlp_classes"), CONFIGS, ids=[c[0] for c in CONFIGS]
)
def test_batched_rounds_equal_the_loop(
    label: str,
    sizes: list[int],
    plan: TrainingPlan,
    mlp_classes: int | None,
    batch_draws_from: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the permutations drawn by `randperms` (from 1 client-epoch) or by torch."""
    monkeypatch.setattr(vectorised_module, "BATCH_DRAWS_FROM", batch_draws_from)
    classes = mlp_classes or 2
    data = _clients(sizes, classes)

    def make_model() -> torch.nn.Module:
        if mlp_classes:
            return MLP(FEATURES, [12, 7], classes)
        return LogisticRegression(FEATURES, classes)

    loop = _server(data, plan, make_model, vectorised=False, classes=classes)
    batched = _server(data, plan, make_model, vectorised=True, classes=classes)
    _assert_same_rounds(loop, batched, rounds=3)


def test_each_update_and_loss_equal_the_loop_with_simulated_dropouts() -> None:
    """Per client, not only the average: the same failures, updates, weights and losses (an
    empty client, not eligible for the batch, trains through the loop in the same reply
    order)."""
    data = _clients(RAGGED)
    plan = TrainingPlan(epochs=2, batch_size=16, learning_rate=0.3, momentum=0.9)
    replies = []
    for vectorised in (False, True):
        server = _server(
            data,
            plan,
            lambda: LogisticRegression(FEATURES, 2),
            vectorised=vectorised,
            dropout=0.3,
        )
        got = []
        for rnd in (1, 2):
            instruction = FitInstruction("t", rnd, server.parameters, plan)
            got.append(list(server.gateway.fit(list(data), instruction)))
        replies.append(got)
    loop, batched = replies
    assert any(isinstance(r, ClientFailure) for r in loop[0])
    for a_round, b_round in zip(loop, batched, strict=True):
        for a, b in zip(a_round, b_round, strict=True):
            assert type(a) is type(b) and a.client == b.client
            if isinstance(a, FitResult):
                assert isinstance(b, FitResult)
                assert (a.weight, a.num_examples) == (b.weight, b.num_examples)
                assert sorted(a.update) == sorted(b.update)
                for key in a.update:
                    np.testing.assert_allclose(b.update[key], a.update[key], rtol=0, atol=1e-6)
                if np.isnan(a.metrics["train_loss"]):
                    assert np.isnan(b.metrics["train_loss"])
                else:
                    assert b.metrics["train_loss"] == pytest.approx(
                        a.metrics["train_loss"], abs=1e-6
                    )


def test_derive_seeds_equals_derive_seed_for_every_width_of_root_and_key() -> None:
    roots = [0, 1, 2**32 - 1, 2**32, 2**63 - 1, 2**64 - 1, 12345]
    roots += [int(r) for r in np.random.default_rng(0).integers(0, 2**63 - 1, size=200)]
    for keys in [(), (0,), (7,), (2**32 + 5,), (1, 2, 3, 4)]:
        expected = [derive_seed(r, Purpose.LOCAL_TRAINING, *keys) for r in roots]
        assert derive_seeds(roots, Purpose.LOCAL_TRAINING, *keys) == expected


def test_unsupported_models_and_trainers_are_not_vectorised() -> None:
    data = _clients([10, 12])
    pipeline = UpdatePipeline()
    runners = [ClientRunner(n, c, n_classes=2, pipeline=pipeline, seed=0) for n, c in data.items()]
    assert vectorisable(LogisticRegression(FEATURES, 2), runners) is None
    assert vectorisable(MLP(FEATURES, [4], 2), runners) is None
    # dropout draws from the global generator: not reproducible in a batch
    assert vectorisable(MLP(FEATURES, [4], 2, dropout=0.1), runners) is not None
    assert vectorisable(LinearRegression(FEATURES), runners) is not None
    assert vectorisable(SmallCNN((1, 8, 8), 2), runners) is not None
    frozen = LogisticRegression(FEATURES, 2)
    frozen.linear.bias.requires_grad_(False)
    assert vectorisable(frozen, runners) is not None

    class Other:
        name = "dp-sgd"

    staged = UpdatePipeline(client_stages=[CompressionStage(Int8Compressor())])
    runners[0].pipeline = staged  # int8 rounding would turn 1e-8 into a whole quantum
    assert "transforms" in (vectorisable(LogisticRegression(FEATURES, 2), runners) or "")
    runners[0].pipeline = pipeline
    runners[1].trainer = Other()  # type: ignore[assignment]
    assert "dp-sgd" in (vectorisable(LogisticRegression(FEATURES, 2), runners) or "")
    with pytest.raises(ValueError, match="cannot vectorise"):
        VectorisedTrainer(LogisticRegression(FEATURES, 2), {r.name: r for r in runners}, data)


@pytest.mark.parametrize("epochs", [1, 2, 3])
def test_randperms_draws_what_torch_randperm_draws_client_by_client(epochs: int) -> None:
    rng = np.random.default_rng(epochs)
    sizes = np.concatenate([[1, 2, 3], rng.integers(1, 70, size=60)])
    seeds = [int(s) for s in rng.integers(0, 2**63 - 1, size=len(sizes), dtype=np.int64)]
    seeds[:3] = [0, 2**32 + 1, 2**63 - 1]  # low words 0 and 1: the seed's high bits unused
    drawn = randperms(seeds, sizes, epochs)
    assert drawn is not None and len(drawn) == epochs
    generator = torch.Generator()
    for c, (seed, size) in enumerate(zip(seeds, sizes.tolist(), strict=True)):
        generator.manual_seed(seed)
        for epoch in range(epochs):
            expected = torch.randperm(size, generator=generator).numpy()
            np.testing.assert_array_equal(drawn[epoch][c, :size], expected)
            assert (drawn[epoch][c, size:] == 0).all()  # padded with row 0, as pad_sequence


def test_clients_too_large_for_one_batch_of_draws_train_from_torch_randperm() -> None:
    """Past one mt19937 twist `randperms` declines, and torch draws: the same results."""
    assert randperms([1, 2], np.array([120, 5]), 2) is None
    data = _clients([120, 5, 60, 118])
    plan = TrainingPlan(epochs=2, batch_size=32, learning_rate=0.1)

    def make_model() -> torch.nn.Module:
        return LogisticRegression(FEATURES, 2)

    loop = _server(data, plan, make_model, vectorised=False)
    batched = _server(data, plan, make_model, vectorised=True)
    _assert_same_rounds(loop, batched, rounds=2)
