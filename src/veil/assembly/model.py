"""A run's model, its objective and training plan, from `[model]`, `[data]` and
`[federation]`."""

from __future__ import annotations

from torch import nn

from veil.config import RunConfig
from veil.data import FederatedData
from veil.devices import place_model, resolve_device
from veil.federation import TrainingPlan
from veil.federation.objective import TOKEN_CROSS_ENTROPY, Objective
from veil.models import build_model
from veil.seeding import Purpose, derive_seed


def model(config: RunConfig, fed: FederatedData, seed: int | None = None) -> nn.Module:
    """A fresh model of the run's architecture for `fed`'s features and classes; with `seed`
    its initial weights depend on the seed only (the run seeds the global model with
    `Purpose.MODEL_INIT`). A LoRA model is shaped for `[model.lora] aggregation`. The model
    lives on `[federation] device` (`veil.devices.place_model`: a frozen base in bfloat16 on a
    GPU that supports it)."""
    built = member_model(
        config,
        n_features=fed.n_features,
        n_classes=fed.n_classes,
        image_shape=fed.image_shape,
        seed=seed,
    )
    return place_model(built, resolve_device(config.federation.device))


#: The key of FFA-LoRA's shared A under `Purpose.MODEL_INIT` (0 is the global model's init).
SHARED_LORA_A = 1


def member_model(
    config: RunConfig,
    *,
    n_features: int,
    n_classes: int,
    image_shape: tuple[int, int, int] | None = None,
    seed: int | None = None,
) -> nn.Module:
    """`model` from the data's shapes alone (what a Ray worker gets): `build_model`, then
    `prepare_lora` for the run's LoRA aggregation, whose shared A every party draws from the
    run seed, whatever `seed` is."""
    built = build_model(
        config.model,
        n_features=n_features,
        n_classes=n_classes,
        image_shape=image_shape,
        seed=seed,
    )
    aggregation = config.model.lora.aggregation
    if aggregation == "average":
        return built
    from veil.models.lora_setup import prepare_lora

    return prepare_lora(
        built, aggregation, derive_seed(config.seed, Purpose.MODEL_INIT, SHARED_LORA_A)
    )


def objective(
    config: RunConfig, task: str, target_bounds: tuple[float, float] | None = None
) -> Objective:
    """The loss every member trains with and every evaluation scores by: cross-entropy for
    classification; for regression `[model] loss` (squared by default, or Huber with
    `huber_delta`) on the target mapped by its declared `target_bounds`, ``(y - centre) /
    ((upper - lower) / 6)``, or on the raw target without bounds (docs/regression.md); for a
    causal LM next-token cross-entropy on response tokens (`TOKEN_CROSS_ENTROPY`)."""
    if config.model.name == "causal_lm":
        return TOKEN_CROSS_ENTROPY
    loss = config.model.resolved_loss(task)
    if task != "regression":
        return Objective(loss)
    delta = config.model.huber_delta if config.model.huber_delta is not None else 1.0
    if target_bounds is None:
        return Objective(loss, huber_delta=delta)
    lower, upper = target_bounds
    return Objective(
        loss, huber_delta=delta, centre=(lower + upper) / 2.0, scale=(upper - lower) / 6.0
    )


def run_objective(config: RunConfig, fed: FederatedData) -> Objective:
    """`objective` for the data `fed` holds (its task and declared target bounds)."""
    return objective(config, fed.task, fed.target_bounds)


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
