"""LoRA aggregation (`veil.federation.lora_aggregation`, `lora_stacking`, `veil.models.lora_setup`):
averaging A and B separately is not the mean of the clients' updates B·A; FFA-LoRA and stacking
are, to float32 precision.

Model: a small nn.Linear (12 → 8) with peft rank-2 LoRA and a trainable head; two clients whose
labels come from different linear rules (non-IID), trained from the same global model.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from extras import require
from veil.federation.fedavg import FedAvg
from veil.federation.lora_aggregation import (
    is_factor,
    is_merged,
    lora_pairs,
    mean_of_products,
    product_of_means,
    relative_error,
    stack_factors,
)
from veil.federation.lora_stacking import DropMergedStage, StackingAggregator
from veil.federation.messages import FitResult, TrainingPlan
from veil.federation.pipeline import RoundContext, WeightedSum
from veil.federation.training import train_epochs
from veil.models import get_parameters, set_parameters
from veil.models.lora_setup import lora_layers, prepare_lora
from veil.models.parameters import frozen_fingerprint
from veil.privacy.dp.dpsgd import DPSGDTrainer
from veil.privacy.dp.randomness import SeededRandom
from veil.tensors import NamedArrays

require("peft")

RANK, ALPHA = 2, 4
SCALE = ALPHA / RANK
PLAN = TrainingPlan(epochs=4, batch_size=16, learning_rate=0.3, momentum=0.9)
WEIGHTS = (96.0, 160.0)
TIGHT = 1e-5


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(12, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(torch.tanh(self.q(x)))
        return logits


def _model(aggregation: str = "average", seed: int = 7) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(_Net(), LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q"]))
    for p in model.get_submodule("base_model.model.head").parameters():
        p.requires_grad_(True)
    return prepare_lora(model, aggregation, seed)  # type: ignore[arg-type]


def _client_data(rule_seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(rule_seed)
    x = torch.randn(n, 12, generator=g)
    rule = torch.randn(12, 3, generator=g)
    return x, (x @ rule).argmax(dim=1)


CLIENTS = [_client_data(1, int(WEIGHTS[0])), _client_data(2, int(WEIGHTS[1]))]


def _train(model: nn.Module, start: NamedArrays) -> list[NamedArrays]:
    """Each client's parameters after local training from `start`."""
    trained = []
    for i, (x, y) in enumerate(CLIENTS):
        set_parameters(model, start)
        train_epochs(model, x, y, PLAN, torch.Generator().manual_seed(i))
        trained.append(get_parameters(model))
    return trained


def _a(module: nn.Module) -> torch.Tensor:
    """The A factor of a LoRA layer's default adapter."""
    factors = module.lora_A
    assert isinstance(factors, nn.ModuleDict)
    weight = factors["default"].weight
    assert isinstance(weight, torch.Tensor)
    return weight


def _factors(params: NamedArrays) -> NamedArrays:
    return {n: a for n, a in params.items() if is_factor(n)}


def _round(aggregator: object, start: NamedArrays, trained: list[NamedArrays]) -> NamedArrays:
    """One FedAvg step through `aggregator` from the clients' trained parameters."""
    context = RoundContext("run", 1, clients=("a", "b"))
    accumulator = aggregator.start(start, context)  # type: ignore[attr-defined]
    for name, params, w in zip(("a", "b"), trained, WEIGHTS, strict=True):
        update = {n: params[n] - start[n] for n in start}
        result = FitResult(name, 1, update, weight=w, num_examples=int(w))
        if isinstance(aggregator, StackingAggregator):
            result = DropMergedStage().apply(result, context)
            assert not any(is_merged(n) for n in result.update)  # only factors and head go up
        accumulator.add(result)
    return FedAvg().update_global(start, accumulator.finish())


def test_averaging_the_factors_is_not_the_mean_of_the_updates() -> None:
    model = _model()
    start = get_parameters(model)
    trained = _train(model, start)
    target = mean_of_products([_factors(t) for t in trained], WEIGHTS, SCALE)
    assert relative_error(target, {k: np.zeros_like(v) for k, v in target.items()}) > 0
    new = _round(WeightedSum(), start, trained)
    averaged = product_of_means([_factors(new)], [1.0], SCALE)
    # Today's FedAvg of A and B is exactly the product of the averaged factors ...
    assert relative_error(averaged, product_of_means(trained, WEIGHTS, SCALE)) < TIGHT
    # ... which misses the mean of the clients' updates by a measured few per cent.
    error = relative_error(averaged, target)
    print(f"factor averaging: relative error {error:.4f} against mean(s·B·A)")
    assert error > 0.1  # measured: 0.585


def test_stacking_merges_exactly_the_mean_of_the_updates() -> None:
    model = _model("stack")
    ((_, module),) = lora_layers(model)
    start = get_parameters(model)
    (pair,) = lora_pairs(start)
    assert pair.merged in start and not start[pair.merged].any()
    trained = _train(model, start)
    assert all(np.array_equal(t[pair.merged], start[pair.merged]) for t in trained)  # never trains
    target = mean_of_products([_factors(t) for t in trained], WEIGHTS, SCALE)
    stacked = stack_factors([_factors(t) for t in trained], WEIGHTS)
    assert stacked[pair.b].shape == (8, 2 * RANK) and stacked[pair.a].shape == (2 * RANK, 12)
    np.testing.assert_allclose(
        SCALE * stacked[pair.b] @ stacked[pair.a], target[pair.merged], atol=TIGHT
    )
    new = _round(StackingAggregator(SCALE), start, trained)
    np.testing.assert_allclose(new[pair.merged], target[pair.merged], atol=TIGHT)
    assert not new[pair.b].any() and np.array_equal(new[pair.a], start[pair.a])  # restart
    heads = [n for n in start if not is_factor(n) and not is_merged(n)]
    for n in heads:
        mean = sum(w * t[n] for w, t in zip(WEIGHTS, trained, strict=True)) / sum(WEIGHTS)
        np.testing.assert_allclose(new[n], mean, atol=TIGHT)
    # The model with the merged delta computes the base layer plus the mean update.
    set_parameters(model, new)
    x = CLIENTS[0][0][:5]
    base = module.get_submodule("base_layer")
    assert isinstance(base, nn.Linear)
    want = F.linear(x, base.weight + torch.from_numpy(target[pair.merged]), base.bias)
    with torch.no_grad():
        torch.testing.assert_close(module(x), want, atol=TIGHT, rtol=TIGHT)


def test_ffa_freezes_a_shared_a_and_averaging_b_is_exact() -> None:
    model = _model("ffa", seed=7)
    start = get_parameters(model)
    assert not any(".lora_A." in n for n in start)  # A never travels: half the factor upload
    ((_, module),) = lora_layers(model)
    a = _a(module).detach().numpy().copy()
    again, other = _model("ffa", seed=7), _model("ffa", seed=8)
    assert frozen_fingerprint(again) == frozen_fingerprint(model)  # every party, one A
    assert frozen_fingerprint(other) != frozen_fingerprint(model)
    trained = _train(model, start)
    np.testing.assert_array_equal(_a(module).detach().numpy(), a)
    b_name = next(n for n in start if ".lora_B." in n)
    a_name = b_name.replace(".lora_B.", ".lora_A.")
    clients = [{b_name: t[b_name], a_name: a} for t in trained]
    target = mean_of_products(clients, WEIGHTS, SCALE)
    new = _round(WeightedSum(), start, trained)
    got = product_of_means([{b_name: new[b_name], a_name: a}], [1.0], SCALE)
    assert relative_error(got, target) < TIGHT
    np.testing.assert_allclose(next(iter(got.values())), next(iter(target.values())), atol=TIGHT)


def test_dp_sgd_under_ffa_noises_b_only_and_a_stays() -> None:
    model = _model("ffa")
    ((_, module),) = lora_layers(model)
    a = _a(module).detach().clone()
    trainer = DPSGDTrainer(
        noise_multiplier=1.0, clip_norm=1.0, source=SeededRandom(0), production=False
    )
    start = get_parameters(model)
    plan = TrainingPlan(epochs=1, batch_size=16, learning_rate=0.1)
    for round_ in range(3):  # three rounds from the moving global model
        x, y = CLIENTS[round_ % 2]
        trainer.train(model, x, y, plan, torch.Generator().manual_seed(round_))
        assert torch.equal(_a(module), a)
    after = get_parameters(model)
    assert after.keys() == start.keys()
    assert all(not np.array_equal(after[n], start[n]) for n in start)  # B and head moved


def test_a_model_without_lora_refuses_exact_aggregation() -> None:
    from veil.errors import UserError

    with pytest.raises(UserError, match="needs a model with LoRA adapters"):
        prepare_lora(_Net(), "ffa", 0)
    assert prepare_lora(copy.deepcopy(_Net()), "average", 0) is not None


def test_pairs_refuse_a_lonely_factor() -> None:
    with pytest.raises(ValueError, match="has no B factor"):
        lora_pairs(["x.lora_A.default.weight"])
    with pytest.raises(ValueError, match="has no A factor"):
        lora_pairs(["x.lora_B.default.weight"])
