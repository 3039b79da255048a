"""The regression objective: its metrics against scikit-learn's, its losses against torch's,
and the fixed target scale that the model predicts on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score
from torch import nn

from veil.federation import TrainingPlan
from veil.federation.objective import CROSS_ENTROPY, Objective, regression_metrics
from veil.federation.training import as_tensors, evaluate, train_epochs

Y = np.array([3.0, -0.5, 2.0, 7.0, 4.2, 1.1], dtype=np.float64)
PREDICTED = np.array([2.5, 0.0, 2.0, 8.0, 3.0, 1.5], dtype=np.float64)


@pytest.mark.parametrize("centre, scale", [(0.0, 1.0), (200.0, 400.0 / 6)])
def test_metrics_equal_scikit_learns_on_the_original_scale(centre: float, scale: float) -> None:
    objective = Objective("squared", centre=centre, scale=scale)
    # The model's outputs for these predictions on its scale.
    output = torch.tensor((PREDICTED - centre) / scale).reshape(-1, 1)
    metrics = regression_metrics(output, torch.tensor(Y, dtype=torch.float32), objective)
    assert metrics["mse"] == pytest.approx(mean_squared_error(Y, PREDICTED), rel=1e-6)
    assert metrics["mae"] == pytest.approx(mean_absolute_error(Y, PREDICTED), rel=1e-6)
    assert metrics["r2"] == pytest.approx(r2_score(Y, PREDICTED), rel=1e-6)
    # The loss is the squared error on the model's scale: MSE / scale².
    assert metrics["loss"] == pytest.approx(metrics["mse"] / scale**2, rel=1e-5)


def test_r2_is_left_out_where_undefined_and_empty_targets_give_nothing() -> None:
    objective = Objective("squared")
    constant = torch.full((4,), 2.0)
    metrics = regression_metrics(torch.ones(4, 1), constant, objective)
    assert "r2" not in metrics and metrics["mse"] == pytest.approx(1.0)
    diverged = regression_metrics(
        torch.tensor([[np.inf], [0.0]]), torch.tensor([0.0, 1.0]), objective
    )
    assert "r2" not in diverged
    assert regression_metrics(torch.zeros(0, 1), torch.zeros(0), objective) == {}


@pytest.mark.parametrize("delta", [0.5, 1.0, 3.0])
def test_huber_equals_torchs_huber_loss(delta: float) -> None:
    generator = torch.Generator().manual_seed(0)
    output = torch.randn(50, 1, generator=generator) * 3
    y = torch.randn(50, generator=generator) * 3
    objective = Objective("huber", huber_delta=delta)
    expected = F.huber_loss(output.reshape(-1), y, delta=delta, reduction="none")
    torch.testing.assert_close(objective.per_example(output, y), expected)
    torch.testing.assert_close(objective(output, y), expected.mean())


def test_huber_delta_is_in_the_targets_units() -> None:
    """On a scaled target, the Huber loss on the model's scale is the loss in target units
    divided by scale²: delta means the same residual whatever the scale."""
    output = torch.tensor([[0.1], [2.0], [-1.5]])
    y = torch.tensor([10.0, 90.0, -80.0])
    scaled = Objective("huber", huber_delta=20.0, scale=50.0)
    in_units = F.huber_loss(output.reshape(-1) * 50.0, y, delta=20.0, reduction="none")
    torch.testing.assert_close(scaled.per_example(output, y), in_units / 50.0**2)


def test_squared_loss_is_torchs_mse_and_cross_entropy_is_unchanged() -> None:
    output, y = torch.tensor([[1.0], [2.0], [0.5]]), torch.tensor([0.0, 2.5, 0.5])
    torch.testing.assert_close(Objective("squared")(output, y), F.mse_loss(output.reshape(-1), y))
    logits, labels = torch.tensor([[2.0, -1.0], [0.0, 1.0]]), torch.tensor([0, 1])
    torch.testing.assert_close(CROSS_ENTROPY(logits, labels), F.cross_entropy(logits, labels))
    assert not CROSS_ENTROPY.regression and Objective("huber").regression


def test_as_tensors_keeps_a_float_target_and_int_classes() -> None:
    x = np.zeros((3, 2))
    assert as_tensors(x, np.array([0, 1, 1]))[1].dtype == torch.int64
    assert as_tensors(x, np.array([0.5, 1.5, 2.5], dtype=np.float32))[1].dtype == torch.float32


def test_sgd_on_the_squared_loss_fits_a_linear_target() -> None:
    """A linear model trained by `train_epochs` with the squared objective recovers y = 3x - 1
    (on a scaled target) and its R² on fresh data is near 1."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(400, 1, generator=generator)
    y = (3 * x[:, 0] - 1 + 0.01 * torch.randn(400, generator=generator)).float()
    objective = Objective("squared", centre=0.0, scale=3.0)
    model = nn.Linear(1, 1)
    plan = TrainingPlan(epochs=20, batch_size=20, learning_rate=0.1)
    train_epochs(model, x, y, plan, torch.Generator().manual_seed(2), objective)
    predicted = objective.predictions(model(torch.tensor([[1.0]])).detach())
    assert float(predicted[0]) == pytest.approx(2.0, abs=0.05)
    assert evaluate(model, x, y, 1, objective)["r2"] > 0.99
