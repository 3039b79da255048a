"""Moving parameters between a `torch.nn.Module` and `NamedArrays`.

Only trainable parameters travel (`requires_grad=True`): frozen weights, such as a pretrained base
model under LoRA, stay where they are.
"""

from __future__ import annotations

import hashlib
import weakref

import numpy as np
import torch
from torch import nn

from veil.tensors import NamedArrays, check_compatible

#: One fingerprint per model object: its frozen parameters never change, and hashing a
#: transformer's base (about 90 MB) takes a noticeable fraction of a second.
_FINGERPRINTS: weakref.WeakKeyDictionary[nn.Module, str | None] = weakref.WeakKeyDictionary()


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


def frozen_fingerprint(model: nn.Module) -> str | None:
    """SHA-256 (hex) of the model's frozen parameters, names, shapes and dtypes included; None
    when every parameter trains.

    The updates of a LoRA run only make sense on top of one pretrained base: the server puts its
    fingerprint in each round's `TrainingPlan` and a client whose own base differs refuses to
    train. Computed once per model object (frozen parameters must stay frozen).
    """
    if model in _FINGERPRINTS:
        return _FINGERPRINTS[model]
    digest = hashlib.sha256()
    frozen = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            continue
        frozen += 1
        data = p.detach().cpu().contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    fingerprint = digest.hexdigest() if frozen else None
    _FINGERPRINTS[model] = fingerprint
    return fingerprint
