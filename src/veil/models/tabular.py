"""Models for tabular data: multinomial logistic regression, linear regression and a multilayer
perceptron (with one output, a regression model)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class LogisticRegression(nn.Module):
    """Multinomial logistic regression: one linear layer whose logits go to a softmax."""

    def __init__(self, n_features: int, n_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_features, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))  # type: ignore[no-any-return]


class LinearRegression(LogisticRegression):
    """Linear regression: one linear layer with one output, the prediction of the target (on
    the scale of `veil.federation.objective`), trained with a squared or Huber loss."""

    def __init__(self, n_features: int, n_outputs: int = 1) -> None:
        super().__init__(n_features, n_outputs)


class MLP(nn.Module):
    """A multilayer perceptron with ReLU activations and optional dropout."""

    def __init__(
        self, n_features: int, hidden: Sequence[int], n_classes: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = n_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, n_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.flatten(1))  # type: ignore[no-any-return]
