"""Opacus DP-SGD in hooks mode, the peer that `dpsgd.py` and `llm.py` measure Veil against.

One shared runner, so both benchmarks give Opacus the same treatment: Poisson sampling through
its `DPDataLoader` (`poisson_sampling=True`), `torch.optim.SGD` on the trainable parameters
only (a LoRA model's frozen base is left out; Opacus's hooks attach to the layers that train),
cross-entropy, warnings from Opacus silenced. Needs `pip install -e .[bench]`.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn


def train_opacus(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch: int,
    learning_rate: float,
    noise_multiplier: float,
    clip: float,
    epochs: int = 1,
) -> None:
    """Train `model` in place for `epochs` with Opacus (hooks mode, expected batch `batch`)."""
    from opacus import PrivacyEngine

    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=True
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=learning_rate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = PrivacyEngine()
        model, optimizer, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=clip,
            poisson_sampling=True,
            grad_sample_mode="hooks",
        )
        model.train()
        for _ in range(epochs):
            for xb, yb in loader:
                optimizer.zero_grad()
                F.cross_entropy(model(xb), yb).backward()  # type: ignore[no-untyped-call]
                optimizer.step()
