"""What a model is trained to minimise and how it is scored: cross-entropy for classification,
squared or Huber loss for regression (docs/regression.md).

A regression model has one output. When the run declares public bounds for the target
(`[data] target_bounds`, or the data set's own, e.g. diabetes), the model predicts the target
on a fixed scale, ``t = (y - centre) / scale`` with ``centre`` the middle of the bounds and
``scale = (upper - lower) / 6`` (the map `FeatureBounds` uses for features): the loss is
computed there, so gradients and learning rates do not depend on the target's units, and every
prediction is mapped back, ``ŷ = centre + scale · output``, before it is scored. The map
depends on the declared bounds only, never on a record. Without declared bounds the model
predicts the raw target (centre 0, scale 1).

Scores of a regression model (`regression_metrics`) are on the target's original scale: MSE,
MAE and R² = 1 - Σ(y - ŷ)² / Σ(y - ȳ)². ``loss`` is the training objective on the model's
scale (for the squared loss, MSE / scale²).

A causal language model (``"token_cross_entropy"``) scores next-token logits ``(n, vocab, L)``
against token labels ``(n, L)`` in which every position that is not a response token holds
`IGNORE_INDEX` (-100: the prompt, the padding): only response tokens count, in the loss and in
`token_metrics` (perplexity = exp(mean token loss), token accuracy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, Literal, get_args

import torch
import torch.nn.functional as F

__all__ = [
    "CROSS_ENTROPY",
    "IGNORE_INDEX",
    "LOSSES",
    "REGRESSION_LOSSES",
    "TOKEN_CROSS_ENTROPY",
    "LossName",
    "Objective",
    "regression_metrics",
    "token_metrics",
    "token_sums",
]

LossName = Literal["cross_entropy", "squared", "huber", "token_cross_entropy"]
LOSSES: Final[tuple[str, ...]] = get_args(LossName)
#: The losses of a regression model (one output, a real-valued target).
REGRESSION_LOSSES: Final[tuple[str, ...]] = ("squared", "huber")
#: The label of a position that no loss or metric counts (torch's default `ignore_index`).
IGNORE_INDEX: Final[int] = -100


@dataclass(frozen=True)
class Objective:
    """A training loss and, for regression, the fixed map between target and model output.

    Attributes:
        loss: ``"cross_entropy"`` (classification: logits, int64 labels), ``"squared"``
            (``(output - t)²``) or ``"huber"`` (torch's Huber loss on ``output - t``).
        huber_delta: Where the Huber loss turns from quadratic to linear, in the target's own
            units (divided by `scale` on the model's scale).
        centre: The target value the model's output 0 stands for.
        scale: Target units per unit of model output, > 0.
    """

    loss: LossName = "cross_entropy"
    huber_delta: float = 1.0
    centre: float = 0.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if not self.huber_delta > 0 or not self.scale > 0:
            raise ValueError(f"huber_delta and scale must be > 0: {self}")

    @property
    def regression(self) -> bool:
        """True for a regression loss (one output, a float32 target)."""
        return self.loss in REGRESSION_LOSSES

    @property
    def tokens(self) -> bool:
        """True for a causal LM's token-level loss (labels ``(n, L)``)."""
        return self.loss == "token_cross_entropy"

    def per_example(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss of each example, shape ``(n,)`` (DP-SGD clips each one's gradient). For
        tokens: the mean over the example's own response tokens (0 for an example without one),
        so that one record (one instruction pair) is one example whatever its length."""
        if self.tokens:
            losses = F.cross_entropy(output, y, reduction="none", ignore_index=IGNORE_INDEX)
            counted = (y != IGNORE_INDEX).sum(dim=1).clamp(min=1)
            return losses.sum(dim=1) / counted.to(losses.dtype)
        if not self.regression:
            return F.cross_entropy(output, y, reduction="none")
        residual = output.reshape(-1) - (y.to(output.dtype) - self.centre) / self.scale
        if self.loss == "squared":
            return residual.square()
        delta = self.huber_delta / self.scale
        return F.huber_loss(residual, torch.zeros_like(residual), reduction="none", delta=delta)

    def __call__(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean loss over the batch (what local training minimises); for tokens the mean
        over the batch's response tokens (0 for a batch without one)."""
        if self.tokens:
            losses = F.cross_entropy(output, y, reduction="none", ignore_index=IGNORE_INDEX)
            return losses.sum() / (y != IGNORE_INDEX).sum().clamp(min=1).to(losses.dtype)
        if not self.regression:
            return F.cross_entropy(output, y)
        return self.per_example(output, y).mean()

    def predictions(self, output: torch.Tensor) -> torch.Tensor:
        """A regression model's outputs as predictions of the target, on its original scale."""
        return output.reshape(-1) * self.scale + self.centre


#: Classification's objective (the default everywhere).
CROSS_ENTROPY: Final[Objective] = Objective()
#: A causal language model's objective: next-token cross-entropy on response tokens only.
TOKEN_CROSS_ENTROPY: Final[Objective] = Objective("token_cross_entropy")


def token_metrics(loss_sum: float, correct: int, counted: int) -> dict[str, float]:
    """``loss`` (mean cross-entropy per counted token, nats), ``perplexity`` (exp of it) and
    ``token_accuracy`` (greedy next token right) from sums over a set's response tokens;
    ``{}`` when no token counted."""
    if counted == 0:
        return {}
    loss = loss_sum / counted
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),  # exp(709) is float64's ceiling
        "token_accuracy": correct / counted,
    }


def token_sums(output: torch.Tensor, y: torch.Tensor) -> tuple[float, int, int]:
    """(summed cross-entropy, correct greedy predictions, counted tokens) of logits
    ``(n, vocab, L)`` on labels ``(n, L)``, response tokens only: `token_metrics`' inputs."""
    keep = y != IGNORE_INDEX
    losses = F.cross_entropy(output.float(), y, reduction="sum", ignore_index=IGNORE_INDEX)
    correct = ((output.argmax(dim=1) == y) & keep).sum()
    return float(losses), int(correct), int(keep.sum())


def regression_metrics(
    output: torch.Tensor, y: torch.Tensor, objective: Objective
) -> dict[str, float]:
    """``loss`` (the objective, model scale), ``mse``, ``mae`` and ``r2`` (original scale) of a
    regression model's `output` on targets `y`.

    R² is 1 - SSE / SST with SST the spread around the mean of `y` itself (scikit-learn's
    ``r2_score``); it is left out when `y` is constant (SST = 0) or when the outputs are not
    finite (a diverged model), where ``mse`` and ``mae`` are inf or NaN as computed. Empty `y`
    gives ``{}``.
    """
    if y.numel() == 0:
        return {}
    target = y.to(torch.float64).reshape(-1)
    predicted = objective.predictions(output.to(torch.float64))
    error = predicted - target
    sse = float(error.square().sum())
    metrics = {
        "loss": float(objective(output, y)),
        "mse": sse / target.numel(),
        "mae": float(error.abs().mean()),
    }
    sst = float((target - target.mean()).square().sum())
    if sst > 0 and bool(torch.isfinite(predicted).all()):
        metrics["r2"] = 1.0 - sse / sst
    return metrics
