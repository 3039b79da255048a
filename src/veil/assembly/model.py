"""A run's model and training plan, from `[model]` and `[federation]`."""

from __future__ import annotations

from torch import nn

from veil.config import RunConfig
from veil.data import FederatedData
from veil.federation import TrainingPlan
from veil.models import build_model


def model(config: RunConfig, fed: FederatedData, seed: int | None = None) -> nn.Module:
    """A fresh model of the run's architecture for `fed`'s features and classes; with `seed`
    its initial weights depend on the seed only (the run seeds the global model with
    `Purpose.MODEL_INIT`)."""
    return build_model(
        config.model,
        n_features=fed.n_features,
        n_classes=fed.n_classes,
        image_shape=fed.image_shape,
        seed=seed,
    )


def training_plan(config: RunConfig) -> TrainingPlan:
    """Every client's local training plan (epochs, batch size, optimiser) of `[federation]`."""
    f = config.federation
    return TrainingPlan(
        epochs=f.local_epochs,
        batch_size=f.batch_size,
        learning_rate=f.learning_rate,
        momentum=f.momentum,
        weight_decay=f.weight_decay,
    )
