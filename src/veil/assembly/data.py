"""A run's data, its server-side evaluation and its pooled baseline, from `[data]`."""

from __future__ import annotations

from dataclasses import asdict

from veil.assembly.model import model as build_run_model
from veil.assembly.model import training_plan
from veil.config import TEXT_DATASETS, RunConfig
from veil.data import FederatedData, build_federated_data, declared_bounds, load_dataset
from veil.data.text import load_text_dataset
from veil.federation import TrainingPlan
from veil.federation.server import Evaluator
from veil.federation.training import (
    as_tensors,
    classification_summary,
    evaluate,
    logit_metrics,
    predict_logits,
    train_epochs,
)
from veil.models import set_parameters
from veil.models.transformer import SequenceClassifier, load_tokenizer
from veil.result import Baseline, Classification
from veil.seeding import Purpose, derive_seed, torch_generator
from veil.tensors import NamedArrays


def federated_data(config: RunConfig) -> FederatedData:
    """The data set of `[data]`, cut into the clients' training and validation data and the
    server's held-out test set (the partition is seeded from the run's seed)."""
    d = config.data
    if d.dataset in TEXT_DATASETS:
        tokenizer = load_tokenizer(config.model.model_dir)
        dataset = load_text_dataset(d.dataset, tokenizer, config.model.max_length)
    else:
        dataset = load_dataset(d.dataset, path=d.path, target=d.target, max_classes=d.max_classes)
    declared = d.feature_bounds
    return build_federated_data(
        dataset,
        n_clients=config.federation.clients,
        partition=d.partition.kind,
        alpha=d.partition.alpha,
        test_fraction=d.test_fraction,
        validation_fraction=d.validation_fraction,
        scaling=d.scaling,
        seed=derive_seed(config.seed, Purpose.PARTITION),
        min_examples=d.partition.min_examples,
        # Public bounds (the config's, else the schema's) clamp every value before scaling.
        bounds=declared_bounds(
            dataset,
            declared.lower if declared else None,
            declared.upper if declared else None,
            declared.centre if declared else None,
        ),
    )


def held_out_evaluator(config: RunConfig, fed: FederatedData) -> Evaluator:
    """The server's evaluation of a global model on `fed`'s held-out test set."""
    model = build_run_model(config, fed)
    x, y = as_tensors(fed.x_test, fed.y_test)

    def evaluate_on_test(parameters: NamedArrays) -> dict[str, float]:
        set_parameters(model, parameters)
        return evaluate(model, x, y, fed.n_classes)

    return evaluate_on_test


def final_evaluation(
    config: RunConfig, fed: FederatedData, parameters: NamedArrays
) -> tuple[dict[str, float], Classification | None]:
    """The final model's metrics on `fed`'s held-out test set: the per-round metrics plus
    `macro_f1` and `weighted_f1`, and the per-class `Classification` section of result.json
    (None for an empty test set)."""
    model = build_run_model(config, fed)
    set_parameters(model, parameters)
    x, y = as_tensors(fed.x_test, fed.y_test)
    if x.shape[0] == 0:
        return {}, None
    logits = predict_logits(model, x)  # one forward pass for the metrics and the summary
    metrics = logit_metrics(logits, y, fed.n_classes)
    # Fewer than two classes: no per-class section (a task without classes, e.g. regression).
    summary = classification_summary(logits, y, _class_names(fed)) if fed.n_classes >= 2 else None
    if summary is None:
        return metrics, None
    metrics |= {"macro_f1": summary["macro_f1"], "weighted_f1": summary["weighted_f1"]}
    return metrics, Classification.model_validate(summary)


def _class_names(fed: FederatedData) -> list[str]:
    names = [str(n) for n in fed.class_names]
    return names if len(names) == fed.n_classes else [str(k) for k in range(fed.n_classes)]


def centralized_baseline(
    config: RunConfig, fed: FederatedData, initial: NamedArrays
) -> dict[str, float]:
    """The same model, initial weights and epoch budget, trained on the pooled training data;
    for a transformer also a linear probe (the head alone on the frozen pretrained encoder)."""
    baseline = _train_pooled(config, fed, initial)
    if config.model.name == "transformer":
        probe = _train_pooled(config, fed, initial, head_only=True)
        baseline |= {f"linear_probe_{k}": v for k, v in probe.items()}
    return baseline


def baseline_record(config: RunConfig, metrics: dict[str, float] | None) -> Baseline | None:
    """The pooled baseline's record; under [privacy] marked as outside the guarantee: it is
    trained on the pooled records without DP, so its metrics are not private."""
    if not metrics:
        return None
    if config.privacy is None:
        return Baseline(**metrics)
    return Baseline(**metrics, outside_guarantee=True)


def _train_pooled(
    config: RunConfig, fed: FederatedData, initial: NamedArrays, *, head_only: bool = False
) -> dict[str, float]:
    model = build_run_model(config, fed)
    set_parameters(model, initial)
    if head_only:
        assert isinstance(model, SequenceClassifier)
        for p in model.encoder.parameters():
            p.requires_grad_(False)
    x, y = as_tensors(*fed.pooled_train())
    plan = training_plan(config)
    epochs = config.federation.rounds * config.federation.local_epochs
    train_epochs(
        model,
        x,
        y,
        TrainingPlan(**{**asdict(plan), "epochs": epochs}),
        torch_generator(config.seed, Purpose.BASELINE),
    )
    xt, yt = as_tensors(fed.x_test, fed.y_test)
    return evaluate(model, xt, yt, fed.n_classes)
