"""A run's data, its server-side evaluation and its pooled baseline, from `[data]`."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from veil.assembly.model import model as build_run_model
from veil.assembly.model import run_objective, training_plan
from veil.config import INSTRUCTION_DATASETS, TEXT_DATASETS, RunConfig
from veil.data import FederatedData, build_federated_data, declared_bounds, load_dataset
from veil.data.contract import schema_hash
from veil.data.organisations import contract_dataset, organisations_data
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
from veil.result import Baseline, Classification, DataRecord, OrganisationData
from veil.seeding import Purpose, derive_seed, torch_generator
from veil.tensors import NamedArrays


def federated_data(config: RunConfig) -> FederatedData:
    """The data set of `[data]`, cut into the clients' training and validation data and the
    server's held-out test set (the partition is seeded from the run's seed)."""
    d = config.data
    if d.dataset in INSTRUCTION_DATASETS:
        from veil.assembly.language_model import instruction_data

        return instruction_data(config)
    schema = d.contract()
    if schema is not None and d.organisations is not None:
        return organisations_data(
            schema,
            d.organisations,
            test=d.test_file,
            validation_fraction=d.validation_fraction,
            seed=derive_seed(config.seed, Purpose.PARTITION),
            dataset_name=_contract_name(d.schema_file),
        )
    if d.dataset in TEXT_DATASETS:
        tokenizer = load_tokenizer(config.model.model_dir)
        dataset = load_text_dataset(d.dataset, tokenizer, config.model.max_length)
    elif schema is not None and d.path is not None:
        dataset = contract_dataset(schema, d.path)  # already clamped and scaled by the schema
    else:
        dataset = load_dataset(
            d.dataset, path=d.path, target=d.target, max_classes=d.max_classes, task=d.task
        )
    declared = d.feature_bounds
    target = d.target_bounds
    return build_federated_data(
        dataset,
        n_clients=config.federation.clients,
        partition=d.partition.kind,
        alpha=d.partition.alpha,
        test_fraction=d.test_fraction,
        validation_fraction=d.validation_fraction,
        scaling="none" if schema is not None else d.scaling,
        seed=derive_seed(config.seed, Purpose.PARTITION),
        min_examples=d.partition.min_examples,
        # Public bounds (the config's, else the schema's) clamp every value before scaling.
        bounds=declared_bounds(
            dataset,
            declared.lower if declared else None,
            declared.upper if declared else None,
            declared.centre if declared else None,
        ),
        target_bounds=(target.lower, target.upper) if target else None,
    )


def _contract_name(path: Path | None) -> str:
    """The data set's name in a run's records: the contract file's stem."""
    return path.stem if path is not None else "csv"


def data_record(config: RunConfig, fed: FederatedData) -> DataRecord:
    """result.json's `data`: the data set, the contract's hash, each organisation's rows and
    file name, the held-out test set."""
    d = config.data
    schema = d.contract()
    test = d.test_file
    return DataRecord(
        dataset=fed.dataset_name,
        synthetic=fed.synthetic,
        task=fed.task,
        schema_hash=schema_hash(schema) if schema is not None else None,
        schema_file=d.schema_file.name if d.schema_file is not None else None,
        organisations=[
            OrganisationData(
                name=c.name, rows=c.n_train, validation_rows=int(c.y_val.shape[0]), file=c.file
            )
            for c in fed.clients
        ],
        test_rows=int(fed.y_test.shape[0]),
        test_file=test.name if test is not None and fed.y_test.shape[0] else None,
    )


def held_out_evaluator(config: RunConfig, fed: FederatedData) -> Evaluator:
    """The server's evaluation of a global model on `fed`'s held-out test set."""
    model = build_run_model(config, fed)
    x, y = as_tensors(fed.x_test, fed.y_test)
    objective = run_objective(config, fed)

    def evaluate_on_test(parameters: NamedArrays) -> dict[str, float]:
        set_parameters(model, parameters)
        return evaluate(model, x, y, fed.n_classes, objective)

    return evaluate_on_test


def final_evaluation(
    config: RunConfig, fed: FederatedData, parameters: NamedArrays
) -> tuple[dict[str, float], Classification | None]:
    """The final model's metrics on `fed`'s held-out test set: the per-round metrics plus
    `macro_f1` and `weighted_f1`, and the per-class `Classification` section of result.json
    (None for an empty test set). Regression: its loss, `mse`, `mae` and `r2`, and no
    per-class section."""
    model = build_run_model(config, fed)
    set_parameters(model, parameters)
    x, y = as_tensors(fed.x_test, fed.y_test)
    if x.shape[0] == 0:
        return {}, None
    if config.model.name == "causal_lm":  # token metrics, chunk by chunk; no classes
        return evaluate(model, x, y, fed.n_classes, run_objective(config, fed)), None
    logits = predict_logits(model, x)  # one forward pass for the metrics and the summary
    metrics = logit_metrics(logits, y, fed.n_classes, run_objective(config, fed))
    if fed.task == "regression" or fed.n_classes < 2:
        return metrics, None
    summary = classification_summary(logits, y, _class_names(fed))
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
    """The pooled baseline's record (a regression baseline has `mse`, `mae` and `r2` instead of
    `accuracy`); under [privacy] marked as outside the guarantee: it is trained on the pooled
    records without DP, so its metrics are not private."""
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
    objective = run_objective(config, fed)
    train_epochs(
        model,
        x,
        y,
        TrainingPlan(**{**asdict(plan), "epochs": epochs}),
        torch_generator(config.seed, Purpose.BASELINE),
        objective,
    )
    xt, yt = as_tensors(fed.x_test, fed.y_test)
    return evaluate(model, xt, yt, fed.n_classes, objective)
