"""Shape a LoRA model for the way its adapters are aggregated (`[model.lora] aggregation`).

- "average": unchanged (every factor trains and travels).
- "ffa" (FFA-LoRA, Sun et al. 2024): every A is re-drawn from `seed` (peft's own init, Kaiming
  uniform: U(−1/√in, 1/√in)) and frozen, so that every party holds the same A and only B trains
  and travels. A frozen A is part of the model's `frozen_fingerprint`: a party whose A differs
  refuses to train.
- "stack" (FLoRA, Wang et al. 2024): each LoRA layer gets `lora_merged`, a dense delta
  (out × in) added to its output (`x·Dᵀ`), into which the server merges the stacked factors each
  round. It travels down with the global model but never trains here: the forward pass uses it
  detached, so it gets no gradient and the plain trainers leave it as it is.

`veil.federation.lora_aggregation` holds the arithmetic; this module only touches modules.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from veil.errors import UserError

Aggregation = Literal["average", "ffa", "stack"]


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, module) of every peft LoRA layer in `model`, in module order."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(getattr(module, "lora_A", None), nn.ModuleDict)
        and isinstance(getattr(module, "lora_B", None), nn.ModuleDict)
        and len(module.lora_A) > 0
    ]


def prepare_lora(model: nn.Module, aggregation: Aggregation, seed: int) -> nn.Module:
    """`model`, changed in place for `aggregation` (see the module); `seed` draws FFA's shared A.
    `UserError` if the model has no LoRA layer but the aggregation needs one."""
    if aggregation == "average":
        return model
    layers = lora_layers(model)
    if not layers:
        raise UserError(
            f"[model.lora] aggregation = '{aggregation}' needs a model with LoRA adapters; "
            "use a transformer model, or remove the setting"
        )
    if aggregation == "ffa":
        freeze_shared_a(layers, seed)
    else:
        add_merged_deltas(layers)
    return model


def _factor(module: nn.Module, which: str, adapter: str) -> torch.Tensor:
    """The weight of `module`'s LoRA factor `which` ("lora_A" or "lora_B") for `adapter`."""
    factors = getattr(module, which)
    assert isinstance(factors, nn.ModuleDict)
    weight = factors[adapter].weight
    assert isinstance(weight, torch.Tensor)
    return weight


def _adapters(module: nn.Module) -> list[str]:
    factors = module.lora_A
    assert isinstance(factors, nn.ModuleDict)
    return sorted(factors.keys())


def freeze_shared_a(layers: list[tuple[str, nn.Module]], seed: int) -> None:
    """Re-draw every A from one generator seeded with `seed` (in module order) and freeze it."""
    generator = torch.Generator().manual_seed(seed)
    for _, module in layers:
        for adapter in _adapters(module):
            weight = _factor(module, "lora_A", adapter)
            bound = 1.0 / math.sqrt(weight.shape[1])
            draw = torch.rand(tuple(weight.shape), generator=generator, dtype=torch.float32)
            with torch.no_grad():
                weight.copy_((draw * 2 - 1) * bound)
            weight.requires_grad_(False)


def add_merged_deltas(layers: list[tuple[str, nn.Module]]) -> None:
    """Give each LoRA layer a zero `lora_merged` delta (out × in) added to its output."""
    for _, module in layers:
        adapter = _adapters(module)[0]
        a, b = _factor(module, "lora_A", adapter), _factor(module, "lora_B", adapter)
        delta = torch.zeros(b.shape[0], a.shape[1], dtype=torch.float32, device=b.device)
        module.register_parameter("lora_merged", nn.Parameter(delta))
        module.register_forward_hook(_add_merged)


def _add_merged(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    merged = module.lora_merged
    assert isinstance(merged, torch.Tensor)
    delta = merged.detach()
    x = args[0]
    return output + F.linear(x.to(delta.dtype), delta).to(output.dtype)
