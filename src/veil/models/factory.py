"""Build the configured model for a data set's shape."""

from __future__ import annotations

import torch
from torch import nn

from veil.config import ModelConfig
from veil.models.cnn import SmallCNN
from veil.models.tabular import MLP, LogisticRegression


def build_model(
    config: ModelConfig,
    *,
    n_features: int,
    n_classes: int,
    image_shape: tuple[int, int, int] | None = None,
    seed: int | None = None,
) -> nn.Module:
    """A fresh model; with `seed`, its initial weights depend only on the seed."""
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_model(
                config, n_features=n_features, n_classes=n_classes, image_shape=image_shape
            )
    if config.name == "logistic":
        return LogisticRegression(n_features, n_classes)
    if config.name == "mlp":
        return MLP(n_features, config.hidden, n_classes, config.dropout)
    if image_shape is None:
        raise ValueError("the CNN needs image data (a data set with an image shape)")
    return SmallCNN(image_shape, n_classes, config.channels, config.dropout)
