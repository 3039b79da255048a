"""A deployment member asked for a round it already trained (a coordinator that restarted runs
the interrupted round again) sends the same update and draws no new randomness; asked for that
round with another global model, it refuses. A simulation's runners keep nothing."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from veil.data import ClientData
from veil.errors import UserError
from veil.federation import ClientRunner, FitInstruction, TrainingPlan, UpdatePipeline
from veil.federation.training import SGDTrainer, TrainStats
from veil.models import LogisticRegression, get_parameters

PLAN = TrainingPlan(epochs=1, batch_size=4, learning_rate=0.5)


class NoisyTrainer(SGDTrainer):
    """SGD plus fresh noise on the weights after training (a stand-in for DP-SGD's noise, drawn
    from the OS's randomness), counting its calls."""

    calls = 0

    def train(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, plan: TrainingPlan,
              generator: torch.Generator) -> TrainStats:  # fmt: skip
        NoisyTrainer.calls += 1
        stats = super().train(model, x, y, plan, generator)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.from_numpy(np.random.default_rng().normal(size=p.shape)).float())
        return stats


def runner(remember: bool) -> tuple[ClientRunner, nn.Module]:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    data = ClientData("bank_a", x[:12], y[:12], x[12:], y[12:])
    r = ClientRunner("bank_a", data, n_classes=2, pipeline=UpdatePipeline(), seed=3,
                     trainer=NoisyTrainer())  # fmt: skip
    r.remember_last = remember
    return r, LogisticRegression(3, 2)


def instruction(model: nn.Module, round_: int) -> FitInstruction:
    return FitInstruction("run-1", round_, get_parameters(model), PLAN)


def test_a_repeated_round_gets_the_same_update_without_training_again() -> None:
    r, model = runner(remember=True)
    round_1 = instruction(model, 1)
    first = r.fit(model, round_1)
    calls = NoisyTrainer.calls
    again = r.fit(model, FitInstruction("run-1", 1, dict(round_1.parameters), PLAN))
    assert NoisyTrainer.calls == calls  # no second training, so no second noise draw
    for name in first.update:
        np.testing.assert_array_equal(again.update[name], first.update[name])
    later = r.fit(model, instruction(model, 2))  # the next round trains
    assert NoisyTrainer.calls == calls + 1
    assert not np.array_equal(later.update["linear.weight"], first.update["linear.weight"])


def test_the_same_round_with_another_model_or_plan_is_refused() -> None:
    r, model = runner(remember=True)
    round_1 = instruction(model, 1)
    r.fit(model, round_1)
    moved = {k: v + np.float32(0.25) for k, v in round_1.parameters.items()}
    with pytest.raises(UserError, match="refuses to train that round twice"):
        r.fit(model, replace(round_1, parameters=moved))
    other_plan = replace(round_1, plan=replace(PLAN, epochs=5))
    with pytest.raises(UserError, match="refuses to train that round twice"):
        r.fit(model, other_plan)


def test_without_remembering_a_repeated_round_trains_again() -> None:
    r, model = runner(remember=False)
    round_1 = instruction(model, 1)
    first = r.fit(model, round_1)
    again = r.fit(model, round_1)
    assert not np.array_equal(again.update["linear.weight"], first.update["linear.weight"])
