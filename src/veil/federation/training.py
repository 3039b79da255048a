"""Local training and evaluation of a model on in-memory tensors.

One implementation serves a client's local training, the centralized (pooled-data) baseline, and
evaluation on the server and on the clients.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from veil.federation.messages import TrainingPlan


@dataclass(frozen=True)
class TrainStats:
    """What local training reports: the mean loss (None where reporting it would leak) and the
    number of optimiser steps taken."""

    loss: float | None
    steps: int


class LocalTrainer(Protocol):
    """How a client trains in place; DP-SGD is another implementation."""

    #: Human-readable name, for logs and result.json.
    name: str

    def train(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        plan: TrainingPlan,
        generator: torch.Generator,
    ) -> TrainStats: ...


class SGDTrainer:
    """Plain mini-batch SGD through `train_epochs`: no privacy protection of the records."""

    name = "sgd"

    def train(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        plan: TrainingPlan,
        generator: torch.Generator,
    ) -> TrainStats:
        loss = train_epochs(model, x, y, plan, generator)
        steps = plan.epochs * math.ceil(int(x.shape[0]) / plan.batch_size)
        return TrainStats(loss=loss, steps=steps)


def train_epochs(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    plan: TrainingPlan,
    generator: torch.Generator,
) -> float:
    """Train `model` in place with mini-batch SGD on (x, y); return the mean training loss.

    Each epoch visits the examples in a fresh random order from `generator`. With
    `plan.proximal_mu > 0` the loss gets FedProx's proximal term (Li et al. 2020) around the
    parameters the model had on entry.
    """
    n = int(x.shape[0])
    if n == 0:
        return math.nan
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if plan.proximal_mu > 0 else []
    velocity = [torch.zeros_like(p) for p in params] if plan.momentum > 0 else []
    model.train()
    total, batches = 0.0, 0
    for _ in range(plan.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, plan.batch_size):
            idx = order[start : start + plan.batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            total += float(loss.detach())
            batches += 1
            if anchor:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
                loss = loss + 0.5 * plan.proximal_mu * prox
            for p in params:
                p.grad = None
            loss.backward()  # type: ignore[no-untyped-call]
            sgd_step(params, velocity, plan)
    return total / batches


@torch.no_grad()
def sgd_step(
    params: Sequence[torch.Tensor], velocity: Sequence[torch.Tensor], plan: TrainingPlan
) -> None:
    """SGD with optional momentum and weight decay (the update rule of `torch.optim.SGD`).

    Written out because `torch.optim` imports TorchDynamo on first use, which costs seconds per
    process, and because thousands of simulated clients each build a fresh optimiser per round.
    """
    for i, p in enumerate(params):
        if p.grad is None:
            continue
        grad = p.grad
        if plan.weight_decay:
            grad = grad.add(p, alpha=plan.weight_decay)
        if velocity:
            velocity[i].mul_(plan.momentum).add_(grad)
            grad = velocity[i]
        p.add_(grad, alpha=-plan.learning_rate)


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, n_classes: int
) -> dict[str, float]:
    """Accuracy and cross-entropy loss of `model` on (x, y); ROC AUC too for two classes.

    The AUC is omitted when only one class is present, since it is undefined then, and when
    the model's scores are not finite (a diverged model, e.g. under attack).
    """
    if x.shape[0] == 0:
        return {}
    model.train(False)  # evaluation mode (dropout off)
    logits = torch.cat([model(chunk) for chunk in torch.split(x, 8192)])
    metrics = {
        "loss": float(F.cross_entropy(logits, y)),
        "accuracy": float((logits.argmax(dim=1) == y).float().mean()),
    }
    if n_classes == 2:
        labels = y.numpy()
        if np.unique(labels).size == 2:
            scores = torch.softmax(logits, dim=1)[:, 1].numpy()
            if np.isfinite(scores).all():
                metrics["auc"] = float(roc_auc_score(labels, scores))
    return metrics


def as_tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Features as float32 and labels as int64 torch tensors (sharing memory where possible)."""
    return (
        torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)),
    )


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with torch using `n` threads (`[federation] torch_threads`), then restore
    the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
