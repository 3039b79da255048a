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

Every figure comes with a two-sided confidence interval (default 95 %), since a few hundred
records give wide ones: the AUC by DeLong's variance (DeLong, DeLong & Clarke-Pearson 1988, the
normal approximation, computed with midranks as in Sun & Xu 2014), each TPR by the
Clopper–Pearson interval of its true positives among the members, and the false-positive rate
actually reached at that threshold by the Clopper–Pearson interval of its false positives among
the non-members (with 114 non-members and none of them flagged, the FPR can still be up to
3.2 %). The TPR interval treats the threshold as fixed; the FPR interval says how far the
threshold's true FPR may lie from its nominal level.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import norm, rankdata
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn

from veil.federation.training import as_tensors
from veil.privacy.audit.bounds import clopper_pearson_interval

__all__ = [
    "AttackMetrics",
    "attack_metrics",
    "auc_interval",
    "example_losses",
    "lira",
    "logit_confidence",
    "loss_threshold",
]

#: A shadow trainer: (boolean mask of the population to train on, shadow index) -> trained model.
ShadowTrainer = Callable[[np.ndarray, int], nn.Module]


#: What the intervals are, recorded next to them.
INTERVALS = (
    "two-sided: AUC by DeLong's variance (normal approximation); TPR and the FPR reached by "
    "Clopper-Pearson (exact binomial) over the members and the non-members"
)


@dataclass(frozen=True)
class AttackMetrics:
    """How well an attack separates members from non-members, with confidence intervals.

    `*_interval` are two-sided intervals at `confidence`; `fpr_at_*` is the false-positive rate
    actually reached at the threshold of the matching TPR (at most the nominal level).
    """

    auc: float
    tpr_at_0_1_percent_fpr: float
    tpr_at_1_percent_fpr: float
    members: int
    non_members: int
    confidence: float = 0.95
    auc_interval: tuple[float, float] = (0.0, 1.0)
    tpr_at_0_1_percent_fpr_interval: tuple[float, float] = (0.0, 1.0)
    tpr_at_1_percent_fpr_interval: tuple[float, float] = (0.0, 1.0)
    fpr_at_0_1_percent: float = 0.0
    fpr_at_0_1_percent_interval: tuple[float, float] = (0.0, 1.0)
    fpr_at_1_percent: float = 0.0
    fpr_at_1_percent_interval: tuple[float, float] = (0.0, 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()},
            "intervals": INTERVALS,
        }


def _operating_point(fpr: np.ndarray, tpr: np.ndarray, level: float) -> tuple[float, float]:
    """(TPR, FPR) of the ROC point with the largest TPR whose FPR is at most `level`."""
    index = np.flatnonzero(fpr <= level)[-1]
    return float(tpr[index]), float(fpr[index])


def auc_interval(
    scores: np.ndarray, is_member: np.ndarray, confidence: float = 0.95
) -> tuple[float, float]:
    """DeLong's two-sided confidence interval of the ROC AUC, clipped to [0, 1].

    The AUC's variance is estimated from its structural components (each member's share of
    non-members scored below it, ties counting one half, and each non-member's share of members
    scored above it; DeLong et al. 1988), computed with midranks (Sun & Xu 2014); the interval is
    AUC ± z·SE. At AUC 0 or 1 the estimated variance is 0 and the interval a single point.
    """
    truth = np.asarray(is_member, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    pos, neg = s[truth], s[~truth]
    m, n = pos.size, neg.size
    if m == 0 or n == 0:
        raise ValueError("an AUC interval needs both members and non-members")
    both = rankdata(np.concatenate([pos, neg]))
    v10 = (both[:m] - rankdata(pos)) / n  # per member: non-members below it
    v01 = 1.0 - (both[m:] - rankdata(neg)) / m  # per non-member: members above it
    auc = float(v10.mean())
    var = (float(v10.var(ddof=1)) / m if m > 1 else 0.0) + (
        float(v01.var(ddof=1)) / n if n > 1 else 0.0
    )
    half = float(norm.ppf(0.5 + confidence / 2.0)) * math.sqrt(max(var, 0.0))
    return max(0.0, auc - half), min(1.0, auc + half)


def attack_metrics(
    scores: np.ndarray, is_member: np.ndarray, *, confidence: float = 0.95
) -> AttackMetrics:
    """ROC AUC and TPR at 0.1 % / 1 % FPR of `scores` (higher: member) against the truth, each
    with its two-sided confidence interval at `confidence` (see the module docstring)."""
    truth = np.asarray(is_member, dtype=bool)
    if truth.all() or not truth.any():
        raise ValueError("attack metrics need both members and non-members")
    members, non_members = int(truth.sum()), int((~truth).sum())
    fpr, tpr, _ = roc_curve(truth, scores)
    points = {level: _operating_point(fpr, tpr, level) for level in (1e-3, 1e-2)}

    def interval(rate: float, total: int) -> tuple[float, float]:
        return clopper_pearson_interval(round(rate * total), total, confidence)

    return AttackMetrics(
        auc=float(roc_auc_score(truth, scores)),
        tpr_at_0_1_percent_fpr=points[1e-3][0],
        tpr_at_1_percent_fpr=points[1e-2][0],
        members=members,
        non_members=non_members,
        confidence=confidence,
        auc_interval=auc_interval(scores, truth, confidence),
        tpr_at_0_1_percent_fpr_interval=interval(points[1e-3][0], members),
        tpr_at_1_percent_fpr_interval=interval(points[1e-2][0], members),
        fpr_at_0_1_percent=points[1e-3][1],
        fpr_at_0_1_percent_interval=interval(points[1e-3][1], non_members),
        fpr_at_1_percent=points[1e-2][1],
        fpr_at_1_percent_interval=interval(points[1e-2][1], non_members),
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
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    is_member: np.ndarray,
    *,
    confidence: float = 0.95,
) -> AttackMetrics:
    """The loss-threshold attack of Yeom et al. 2018 against `model`."""
    return attack_metrics(-example_losses(model, x, y), is_member, confidence=confidence)


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
    confidence: float = 0.95,
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
    return attack_metrics(score, is_member, confidence=confidence)
