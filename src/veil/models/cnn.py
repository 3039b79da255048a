"""A small convolutional network for small images such as scikit-learn's 8x8 digits."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class SmallCNN(nn.Module):
    """3x3 convolutions with ReLU (the second and later halve the resolution), then a linear head.

    No batch normalisation: its running statistics are per-client state that FedAvg would average
    incorrectly, and DP-SGD cannot give per-sample gradients through it.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        n_classes: int,
        channels: Sequence[int] = (16, 32),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.image_shape = image_shape
        in_channels, height, width = image_shape
        layers: list[nn.Module] = []
        for i, out_channels in enumerate(channels):
            stride = 1 if i == 0 else 2
            layers += [
                nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1),
                nn.ReLU(),
            ]
            if stride == 2:
                height, width = (height + 1) // 2, (width + 1) // 2
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(in_channels * height * width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], *self.image_shape)
        return self.head(self.dropout(self.features(x).flatten(1)))  # type: ignore[no-any-return]
