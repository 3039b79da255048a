"""Tests for `veil.federation.training`: local SGD, FedProx, determinism and evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from veil.federation import TrainingPlan
from veil.federation.training import as_tensors, evaluate, train_epochs
from veil.models import MLP, LogisticRegression, get_parameters, set_parameters


def separable(n: int = 200, d: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two well-separated Gaussian blobs (classes 0 and 1)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    x = rng.normal(size=(n, d)) + np.where(y[:, None] == 1, 2.0, -2.0)
    return as_tensors(x, y)


def fresh_model(seed: int = 0, d: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return MLP(d, [8], 2)


def gen(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum((a[k] - b[k]) ** 2)) for k in a))


def test_as_tensors_dtypes() -> None:
    x, y = as_tensors(np.zeros((3, 2), np.float64), np.array([0, 1, 1], np.int32))
    assert x.dtype == torch.float32
    assert y.dtype == torch.int64
    assert tuple(x.shape) == (3, 2)


def test_train_epochs_reduces_loss() -> None:
    x, y = separable()
    model = fresh_model()
    before = evaluate(model, x, y, 2)["loss"]
    plan = TrainingPlan(epochs=5, batch_size=16, learning_rate=0.1)
    mean_loss = train_epochs(model, x, y, plan, gen())
    after = evaluate(model, x, y, 2)
    assert math.isfinite(mean_loss)
    # Separated blobs: training must at least halve the loss and classify nearly everything.
    assert after["loss"] < 0.5 * before
    assert after["loss"] < before - 0.2
    assert after["accuracy"] > 0.95


def test_returned_loss_is_mean_of_batch_losses() -> None:
    x, y = separable(n=10)
    model = fresh_model()
    # One batch covering everything, learning rate 0: the loss is that of the untouched model.
    plan = TrainingPlan(epochs=3, batch_size=64, learning_rate=0.0)
    loss = train_epochs(model, x, y, plan, gen())
    assert loss == pytest.approx(evaluate(model, x, y, 2)["loss"], rel=1e-5)


def test_fedprox_keeps_parameters_closer_to_start() -> None:
    x, y = separable()
    start = get_parameters(fresh_model())
    moved = {}
    for mu in (0.0, 5.0):
        model = fresh_model()
        plan = TrainingPlan(epochs=3, batch_size=16, learning_rate=0.1, proximal_mu=mu)
        train_epochs(model, x, y, plan, gen())
        moved[mu] = distance(get_parameters(model), start)
    assert moved[0.0] > 0
    assert moved[5.0] < 0.7 * moved[0.0]


def test_same_generator_seed_gives_identical_parameters() -> None:
    x, y = separable()
    plan = TrainingPlan(epochs=2, batch_size=8, learning_rate=0.1, momentum=0.9)
    results = []
    for seed in (3, 3, 4):
        model = fresh_model()
        train_epochs(model, x, y, plan, gen(seed))
        results.append(get_parameters(model))
    for k in results[0]:
        np.testing.assert_array_equal(results[0][k], results[1][k])
    # A different shuffling seed changes the batches and therefore the result.
    assert any(not np.array_equal(results[0][k], results[2][k]) for k in results[0])


def test_empty_data_returns_nan_and_leaves_parameters() -> None:
    model = fresh_model()
    before = get_parameters(model)
    x = torch.zeros((0, 4), dtype=torch.float32)
    y = torch.zeros((0,), dtype=torch.int64)
    plan = TrainingPlan(epochs=2, batch_size=8, learning_rate=0.5, proximal_mu=1.0)
    assert math.isnan(train_epochs(model, x, y, plan, gen()))
    after = get_parameters(model)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])
    assert evaluate(model, x, y, 2) == {}


@pytest.mark.parametrize(
    "momentum, weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.0, 0.01), (0.5, 0.05)]
)
def test_sgd_matches_torch_optim(momentum: float, weight_decay: float) -> None:
    x, y = separable(n=50)
    plan = TrainingPlan(
        epochs=2, batch_size=8, learning_rate=0.05, momentum=momentum, weight_decay=weight_decay
    )
    ours = fresh_model()
    train_epochs(ours, x, y, plan, gen(11))

    theirs = fresh_model()
    optimiser = torch.optim.SGD(
        theirs.parameters(), lr=0.05, momentum=momentum, weight_decay=weight_decay
    )
    g = gen(11)
    for _ in range(plan.epochs):
        order = torch.randperm(50, generator=g)
        for start in range(0, 50, plan.batch_size):
            idx = order[start : start + plan.batch_size]
            optimiser.zero_grad()
            nn.functional.cross_entropy(theirs(x[idx]), y[idx]).backward()
            optimiser.step()

    a, b = get_parameters(ours), get_parameters(theirs)
    assert distance(a, get_parameters(fresh_model())) > 1e-3  # training moved something
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6, err_msg=k)


def test_frozen_parameters_are_not_trained() -> None:
    x, y = separable(n=40)
    model = fresh_model()
    model.layers[0].weight.requires_grad_(False)
    frozen = model.layers[0].weight.detach().clone()
    plan = TrainingPlan(epochs=1, batch_size=8, learning_rate=0.1, weight_decay=0.1)
    train_epochs(model, x, y, plan, gen())
    assert torch.equal(model.layers[0].weight, frozen)


def _logistic_with(weights: list[list[float]], bias: list[float]) -> nn.Module:
    model = LogisticRegression(len(weights[0]), len(weights))
    set_parameters(
        model,
        {
            "linear.weight": np.array(weights, np.float32),
            "linear.bias": np.array(bias, np.float32),
        },
    )
    return model


def test_evaluate_accuracy_loss_and_auc() -> None:
    # Logit of class 1 minus class 0 equals the single feature x.
    model = _logistic_with([[0.0], [1.0]], [0.0, 0.0])
    xs = np.array([[-2.0], [-1.0], [0.5], [1.0], [3.0]], np.float32)
    ys = np.array([0, 1, 0, 1, 1])
    x, y = as_tensors(xs, ys)
    metrics = evaluate(model, x, y, 2)
    assert set(metrics) == {"loss", "accuracy", "auc"}
    # Predictions: 0, 0, 1, 1, 1 → 3 of 5 right.
    assert metrics["accuracy"] == pytest.approx(0.6)
    p1 = 1 / (1 + np.exp(-xs[:, 0].astype(np.float64)))
    expected_loss = -np.mean(np.log(np.where(ys == 1, p1, 1 - p1)))
    assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-5)
    # AUC by counting pairs: positives' scores {-1, 1, 3}, negatives' {-2, 0.5}: 5 of 6 pairs.
    assert metrics["auc"] == pytest.approx(5 / 6)


def test_evaluate_omits_auc_when_one_class_present() -> None:
    model = _logistic_with([[0.0], [1.0]], [0.0, 0.0])
    x, y = as_tensors(np.array([[1.0], [2.0]], np.float32), np.array([1, 1]))
    metrics = evaluate(model, x, y, 2)
    assert "auc" not in metrics
    assert metrics["accuracy"] == 1.0


def test_evaluate_omits_auc_for_more_than_two_classes() -> None:
    model = LogisticRegression(3, 3)
    x, y = as_tensors(np.eye(3, dtype=np.float32), np.array([0, 1, 2]))
    metrics = evaluate(model, x, y, 3)
    assert set(metrics) == {"loss", "accuracy"}
    with torch.no_grad():
        predicted = model(x).argmax(dim=1)
    assert metrics["accuracy"] == pytest.approx(float((predicted == y).float().mean()))


def test_evaluate_puts_model_in_eval_mode_and_is_deterministic() -> None:
    torch.manual_seed(0)
    model = MLP(4, [16], 2, dropout=0.5)
    x, y = separable(n=64)
    first = evaluate(model, x, y, 2)
    second = evaluate(model, x, y, 2)
    assert not model.training
    assert first == second
