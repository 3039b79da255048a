"""Local training and evaluation of a model on in-memory tensors.

One implementation serves a client's local training, the centralized (pooled-data) baseline, and
evaluation on the server and on the clients.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from veil.devices import model_device
from veil.federation.messages import TrainingPlan
from veil.federation.objective import (
    CROSS_ENTROPY,
    Objective,
    regression_metrics,
    token_metrics,
    token_sums,
)


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
    """Plain mini-batch SGD through `train_epochs`: no privacy protection of the records.

    `objective` is the loss it minimises (default cross-entropy; squared or Huber for
    regression, `veil.federation.objective`)."""

    name = "sgd"

    def __init__(self, objective: Objective = CROSS_ENTROPY) -> None:
        self.objective = objective

    def train(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        plan: TrainingPlan,
        generator: torch.Generator,
    ) -> TrainStats:
        loss = train_epochs(model, x, y, plan, generator, self.objective)
        steps = plan.epochs * math.ceil(int(x.shape[0]) / plan.batch_size)
        return TrainStats(loss=loss, steps=steps)


def train_epochs(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    plan: TrainingPlan,
    generator: torch.Generator,
    objective: Objective = CROSS_ENTROPY,
) -> float:
    """Train `model` in place with mini-batch SGD on (x, y) to minimise `objective` (default
    cross-entropy); return the mean training loss. `x` and `y` may stay in host memory: each
    batch is moved to the model's device (`veil.devices`).

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
    device = model_device(model)
    model.train()
    total, batches = 0.0, 0
    for _ in range(plan.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, plan.batch_size):
            idx = order[start : start + plan.batch_size]
            # The data stays in host memory; one batch at a time moves to the model's device.
            loss = objective(model(x[idx].to(device)), y[idx].to(device))
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
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    n_classes: int,
    objective: Objective = CROSS_ENTROPY,
) -> dict[str, float]:
    """Accuracy and cross-entropy loss of `model` on (x, y); ROC AUC too for two classes.
    For a regression `objective`: its loss, MSE, MAE and R² (`regression_metrics`); for a causal
    LM's token objective: loss, perplexity and token accuracy (`evaluate_tokens`).

    The AUC is omitted when only one class is present, since it is undefined then, and when
    the model's scores are not finite (a diverged model, e.g. under attack).
    """
    if x.shape[0] == 0:
        return {}
    if objective.tokens:
        return evaluate_tokens(model, x, y)
    return logit_metrics(predict_logits(model, x), y, n_classes, objective)


#: Rows per forward pass when a causal LM is evaluated: its logits are (rows, vocab, L), far
#: larger than a classifier's, so they are reduced chunk by chunk and never concatenated.
TOKEN_EVAL_ROWS = 16


@torch.no_grad()
def evaluate_tokens(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """A causal LM's `loss`, `perplexity` and `token_accuracy` on token labels `y` (n, L),
    response tokens only (`veil.federation.objective.token_metrics`), in chunks of
    `TOKEN_EVAL_ROWS` rows moved to the model's device."""
    device = model_device(model)
    model.train(False)
    loss_sum, correct, counted = 0.0, 0, 0
    chunks = zip(torch.split(x, TOKEN_EVAL_ROWS), torch.split(y, TOKEN_EVAL_ROWS), strict=True)
    for xb, yb in chunks:
        part = token_sums(model(xb.to(device)), yb.to(device))
        loss_sum, correct, counted = loss_sum + part[0], correct + part[1], counted + part[2]
    return token_metrics(loss_sum, correct, counted)


def predict_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`model`'s logits on `x`, in evaluation mode (dropout off, no gradients), in chunks of
    8192 rows moved to the model's device; returned in host memory."""
    device = model_device(model)
    model.train(False)
    with torch.no_grad():  # evaluation only: no graph to keep
        return torch.cat([model(chunk.to(device)).cpu() for chunk in torch.split(x, 8192)])


def logit_metrics(
    logits: torch.Tensor,
    y: torch.Tensor,
    n_classes: int,
    objective: Objective = CROSS_ENTROPY,
) -> dict[str, float]:
    """`evaluate`'s metrics from logits (a regression model's outputs) already computed (one
    forward pass serves several summaries)."""
    if objective.regression:
        return regression_metrics(logits, y, objective)
    if objective.tokens:
        return token_metrics(*token_sums(logits, y))
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


#: Most points kept of the ROC curve in result.json (enough to draw it, far fewer than scores).
ROC_POINTS = 50
#: Equal-width bins of predicted probability in the calibration (reliability) curve.
CALIBRATION_BINS = 10


@torch.no_grad()
def classification_summary(
    logits: torch.Tensor, y: torch.Tensor, class_names: Sequence[str]
) -> dict[str, Any] | None:
    """The classification section of `result.json` for a model's `logits` on labels `y`
    (`predict_logits`).

    Returns macro and weighted F1 (over the classes present in the labels or the predictions,
    as scikit-learn's default), per class the precision, recall, F1, support and one-vs-rest
    AUC, the confusion matrix (rows = true class, columns = predicted, in `class_names` order)
    and, for two classes, the ROC curve (at most `ROC_POINTS` points) and the calibration curve
    (`CALIBRATION_BINS` bins; empty bins left out). AUCs are None where undefined (a class
    absent from the labels) or where the model's scores are not finite. Returns None for an
    empty test set.
    """
    from sklearn.metrics import (  # lazy: scikit-learn's metrics cost ~0.5 s to import
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
        roc_curve,
    )

    if logits.shape[0] == 0:
        return None
    n_classes = len(class_names)
    probs = torch.softmax(logits, dim=1).numpy().astype(np.float64)
    labels = y.numpy()
    predicted = logits.argmax(dim=1).numpy()
    finite_scores = bool(np.isfinite(probs).all())
    every = list(range(n_classes))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=every, zero_division=0
    )
    classes: list[dict[str, Any]] = []
    aucs: list[float] = []
    for k, name in enumerate(class_names):
        truth = labels == k
        auc: float | None = None
        if finite_scores and 0 < truth.sum() < truth.size:
            auc = float(roc_auc_score(truth, probs[:, k]))
            aucs.append(auc)
        classes.append(
            {
                "name": str(name),
                "precision": float(precision[k]),
                "recall": float(recall[k]),
                "f1": float(f1[k]),
                "support": int(support[k]),
                "auc": auc,
            }
        )
    summary: dict[str, Any] = {
        "macro_f1": float(f1_score(labels, predicted, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(labels, predicted, average="weighted", zero_division=0)),
        "classes": classes,
        "confusion_matrix": confusion_matrix(labels, predicted, labels=every).tolist(),
    }
    summary["auc_ovr_macro"] = float(np.mean(aucs)) if len(aucs) == n_classes else None
    if n_classes == 2 and finite_scores and np.unique(labels).size == 2:
        fpr, tpr, _ = roc_curve(labels, probs[:, 1])
        keep = np.unique(np.linspace(0, fpr.size - 1, min(fpr.size, ROC_POINTS)).round())
        summary["roc"] = [
            {"fpr": float(fpr[i]), "tpr": float(tpr[i])} for i in keep.astype(np.int64)
        ]
        summary["calibration"] = _calibration(probs[:, 1], labels == 1)
    return summary


def _calibration(scores: np.ndarray, positive: np.ndarray) -> list[dict[str, float]]:
    bins = np.minimum((scores * CALIBRATION_BINS).astype(np.int64), CALIBRATION_BINS - 1)
    curve = []
    for b in range(CALIBRATION_BINS):
        inside = bins == b
        count = int(inside.sum())
        if count:
            curve.append(
                {
                    "predicted": float(scores[inside].mean()),
                    "observed": float(positive[inside].mean()),
                    "count": count,
                }
            )
    return curve


def as_tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Features as float32 torch tensors; labels as int64 (class labels), or as float32 when
    `y` holds floating-point values (a regression target). Memory is shared where possible."""
    label_type = np.float32 if np.issubdtype(y.dtype, np.floating) else np.int64
    return (
        torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(y, dtype=label_type)),
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
