"""Opacus DP-SGD, the peer that `dpsgd.py` and `llm.py` measure Veil against.

One shared runner, so both benchmarks give Opacus the same treatment: `PrivacyEngine.make_private`
with `torch.optim.SGD` on the trainable parameters only (a LoRA model's frozen base is left out;
Opacus's hooks attach to the layers that train), cross-entropy, warnings from Opacus silenced.
Needs `pip install -e .[bench]` (Opacus >= 1.5 for ghost clipping).

Two per-sample modes (`grad_sample_mode`):

* ``"hooks"``: per-sample gradients materialised by Opacus's hooks, then clipped.
* ``"ghost"``: ghost clipping (Li et al. 2022; Opacus' `DPLossFastGradientClipping`): per-sample
  norms without per-sample gradients for the layers that allow it, then a second backward pass
  on the reweighted loss.

Two ways to feed it (`feed`):

* ``"loader"``: the typical route of Opacus' tutorials: a `DataLoader` over a `TensorDataset`
  that `make_private` turns into its `DPDataLoader` (Poisson sampling, one `__getitem__` per
  example and a collate per batch).
* ``"tensors"``: the same tensor batches Veil's trainer gathers, with no per-example Python:
  per epoch, ⌈n/b⌉ Poisson masks with rate q = b/n are drawn at once (what Opacus's
  `UniformWithReplacementSampler` draws, one `torch.rand(n) < q` per step) and each batch is
  one index gather. The optimizer's expected batch size is set to b, as `DPDataLoader` implies.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from veil.errors import UserError


def _tensor_batches(
    x: torch.Tensor, y: torch.Tensor, batch: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of Poisson-sampled batches (rate b/n, ⌈n/b⌉ steps) as gathered tensors."""
    n = len(x)
    masks = torch.rand(math.ceil(n / batch), n) < min(1.0, batch / n)
    out = []
    for mask in masks:
        idx = mask.nonzero().squeeze(1)
        out.append((x[idx], y[idx]))
    return out


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
    grad_sample_mode: str = "hooks",
    feed: str = "loader",
) -> None:
    """Train `model` in place for `epochs` with Opacus (expected batch `batch`).

    `grad_sample_mode` is ``"hooks"`` or ``"ghost"``; `feed` is ``"loader"`` (Opacus'
    `DPDataLoader`) or ``"tensors"`` (Poisson-sampled tensor batches, no DataLoader).
    """
    from opacus import PrivacyEngine

    if grad_sample_mode not in ("hooks", "ghost") or feed not in ("loader", "tensors"):
        raise UserError(
            f"unknown grad_sample_mode {grad_sample_mode!r} or feed {feed!r}: use "
            "grad_sample_mode 'hooks' or 'ghost' and feed 'loader' or 'tensors'"
        )
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=True
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=learning_rate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private: Any = PrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            criterion=nn.CrossEntropyLoss(),
            noise_multiplier=noise_multiplier,
            max_grad_norm=clip,
            poisson_sampling=feed == "loader",
            grad_sample_mode=grad_sample_mode,
        )
        if grad_sample_mode == "ghost":
            module, dp_optimizer, criterion, dp_loader = private
        else:
            (module, dp_optimizer, dp_loader), criterion = private, F.cross_entropy
        if feed == "tensors":
            dp_optimizer.expected_batch_size = batch
        module.train()
        for _ in range(epochs):
            batches = dp_loader if feed == "loader" else _tensor_batches(x, y, batch)
            for xb, yb in batches:
                dp_optimizer.zero_grad()
                criterion(module(xb), yb).backward()
                dp_optimizer.step()
