"""Models for tabular data: multinomial logistic regression and a multilayer perceptron."""

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
