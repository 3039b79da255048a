"""Membership inference: was this record in the training data of this model?

Two attacks, both scored as "higher means more likely a member":

- **Loss threshold** (Yeom, Giacomelli, Fredrikson & Jha 2018, "Privacy Risk in Machine Learning:
  Analyzing the Connection to Overfitting"): the negated loss of the record under the model.
- **LiRA**, the likelihood-ratio attack of Carlini, Chien, Nasr, Song, Terzis & Tramèr 2022
  ("Membership Inference Attacks From First Principles"), online variant: shadow models are
  trained on random halves of a population, each record in exactly half of them; the record's
  logit-scaled confidence φ = log(p_y / (1 − p_y)) is modelled as Gaussian over the shadows that
  trained on it ("in") and those that did not ("out"), and the target model's φ is scored by the
  log-likelihood ratio of the two Gaussians. With few shadows the variances are global (one per
  side, across records), as the paper recommends below 64 shadows.

Metrics follow Carlini et al.: ROC AUC, and the true-positive rate at 0.1 % and 1 % false
positives (the attacks that matter are those that are confident about a few records). With n
non-members the false-positive rate has resolution 1/n, so with fewer than 1000 non-members
"TPR at 0.1 % FPR" is the TPR at zero false positives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn

from veil.federation.training import as_tensors

__all__ = [
    "AttackMetrics",
    "attack_metrics",
    "example_losses",
    "lira",
    "logit_confidence",
    "loss_threshold",
]

#: A shadow trainer: (boolean mask of the population to train on, shadow index) -> trained model.
ShadowTrainer = Callable[[np.ndarray, int], nn.Module]


@dataclass(frozen=True)
class AttackMetrics:
    """How well an attack separates members from non-members."""

    auc: float
    tpr_at_0_1_percent_fpr: float
    tpr_at_1_percent_fpr: float
    members: int
    non_members: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _tpr_at(fpr: np.ndarray, tpr: np.ndarray, level: float) -> float:
    return float(tpr[np.flatnonzero(fpr <= level)[-1]])


def attack_metrics(scores: np.ndarray, is_member: np.ndarray) -> AttackMetrics:
    """ROC AUC and TPR at 0.1 % / 1 % FPR of `scores` (higher: member) against the truth."""
    truth = np.asarray(is_member, dtype=bool)
    if truth.all() or not truth.any():
        raise ValueError("attack metrics need both members and non-members")
    fpr, tpr, _ = roc_curve(truth, scores)
    return AttackMetrics(
        auc=float(roc_auc_score(truth, scores)),
        tpr_at_0_1_percent_fpr=_tpr_at(fpr, tpr, 1e-3),
        tpr_at_1_percent_fpr=_tpr_at(fpr, tpr, 1e-2),
        members=int(truth.sum()),
        non_members=int((~truth).sum()),
    )


@torch.no_grad()
def _logits(model: nn.Module, x: np.ndarray) -> torch.Tensor:
    model.train(False)
    xt = as_tensors(x, np.zeros(x.shape[0], dtype=np.int64))[0]
    return torch.cat([model(chunk) for chunk in torch.split(xt, 8192)])


def example_losses(model: nn.Module, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each record's cross-entropy loss under `model`."""
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
    loss = F.cross_entropy(_logits(model, x), labels, reduction="none")
    return loss.numpy().astype(np.float64)


def logit_confidence(model: nn.Module, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """φ = log(p_y / (1 − p_y)) per record, computed stably as z_y − logsumexp_{k≠y} z_k."""
    logits = _logits(model, x).double()
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
    own = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return (own - torch.logsumexp(others, dim=1)).numpy()


def loss_threshold(
    model: nn.Module, x: np.ndarray, y: np.ndarray, is_member: np.ndarray
) -> AttackMetrics:
    """The loss-threshold attack of Yeom et al. 2018 against `model`."""
    return attack_metrics(-example_losses(model, x, y), is_member)


def lira(
    target: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    is_member: np.ndarray,
    *,
    train_shadow: ShadowTrainer,
    shadows: int,
    rng: np.random.Generator,
    on_shadow: Callable[[], None] | None = None,
) -> AttackMetrics:
    """Online LiRA (Carlini et al. 2022) against `target` over the population (x, y).

    `train_shadow(mask, index)` must train a fresh model the way the target was trained, on the
    records where `mask` is true. Every record is "in" for exactly `shadows`/2 shadows.
    """
    if shadows < 2 or shadows % 2:
        raise ValueError(f"LiRA needs an even number of shadow models >= 2, got {shadows}")
    n = int(x.shape[0])
    keep = np.argsort(rng.random((shadows, n)), axis=0) < shadows // 2
    phi = np.empty((shadows, n))
    for index in range(shadows):
        phi[index] = logit_confidence(train_shadow(keep[index], index), x, y)
        if on_shadow is not None:
            on_shadow()
    half = shadows // 2
    mu_in = np.where(keep, phi, 0.0).sum(0) / half
    mu_out = np.where(~keep, phi, 0.0).sum(0) / half
    # Global variances: one per side, pooled over records (few shadows per record).
    var_in = max(float(np.mean(np.where(keep, (phi - mu_in) ** 2, 0.0).sum(0) / half)), 1e-12)
    var_out = max(float(np.mean(np.where(~keep, (phi - mu_out) ** 2, 0.0).sum(0) / half)), 1e-12)
    t = logit_confidence(target, x, y)
    score = (
        -((t - mu_in) ** 2) / (2 * var_in)
        + (t - mu_out) ** 2 / (2 * var_out)
        - 0.5 * np.log(var_in / var_out)
    )
    return attack_metrics(score, is_member)
