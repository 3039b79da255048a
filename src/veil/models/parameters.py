"""Moving parameters between a `torch.nn.Module` and `NamedArrays`.

Only trainable parameters travel (`requires_grad=True`): frozen weights, such as a pretrained base
model under LoRA, stay where they are.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from veil.tensors import NamedArrays, check_compatible


def get_parameters(model: nn.Module) -> NamedArrays:
    """Copies of the model's trainable parameters as float32 NumPy arrays, by name."""
    return {
        name: p.detach().cpu().to(torch.float32).numpy().copy()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def set_parameters(model: nn.Module, arrays: NamedArrays) -> None:
    """Load `arrays` into the model's trainable parameters; names, shapes and dtype must match."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    check_compatible({n: _as_array_spec(p) for n, p in params.items()}, arrays)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(torch.from_numpy(arrays[name]))


def _as_array_spec(p: torch.Tensor) -> np.ndarray:
    # check_compatible needs only shape and dtype: a zero-strided view costs no memory.
    return np.broadcast_to(np.float32(0), tuple(p.shape))


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts: what travels versus the whole model."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
