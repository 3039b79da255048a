"""A federated gradient-boosting run (`[model] name = "gradient_boosting"`) from the config.

The composition root of the trees (`veil.trees`, which takes plain parameters): the bin edges
from the run's declared feature bounds, the members with their rows, the boosting plan from
`[model.trees]`, the sum of the histograms (SecAgg's protocol objects, or in the clear), the DP
noise and its accountant, the metrics of each round, and the pooled-data XGBoost baseline with
the same depth, rounds, bins, λ and η. `veil.runtime.run_tree_federation` drives it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from veil.assembly.model import run_objective
from veil.assembly.secure_aggregation.secagg import settings_from_config
from veil.config import RunConfig
from veil.data import FederatedData
from veil.errors import ConfigError, DataError
from veil.federation.objective import Objective as RunObjective
from veil.federation.training import classification_summary, logit_metrics
from veil.privacy.dp.accountant import Accountant
from veil.result import Classification
from veil.seeding import Purpose, derive_seed
from veil.trees.binning import BinEdges, equal_width_edges
from veil.trees.booster import Ensemble, base_score
from veil.trees.federated import (
    BoostingPlan,
    FederatedBooster,
    HistogramNoise,
    Summer,
    TreeMember,
    histogram_sensitivity,
)
from veil.trees.objectives import Objective, ObjectiveName
from veil.trees.secure_sum import ClearSum, SecureSum, Upload
from veil.trees.split import SplitRule

__all__ = [
    "TreeFederation",
    "tree_edges",
    "tree_federation",
    "tree_final",
    "tree_metrics",
    "tree_objective",
    "xgboost_baseline",
]

#: The default gradient clip of the squared loss, on the target's mapped scale (a target in its
#: declared bounds maps into [-3, 3]).
SQUARED_GRADIENT_CLIP = 6.0


@dataclass
class TreeFederation:
    """A trees run's parts."""

    fed: FederatedData
    plan: BoostingPlan
    edges: BinEdges
    members: list[TreeMember]
    booster: FederatedBooster
    summer: Summer
    #: The map of a regression target onto the trees' scale (identity for classification).
    target: RunObjective
    accountant: Accountant | None
    #: SecAgg's record for result.json (None in the clear).
    secure_aggregation: dict[str, Any] | None


def tree_objective(config: RunConfig, fed: FederatedData) -> Objective:
    """The boosting loss of `fed`'s task: logistic (2 classes), softmax, or squared."""
    trees = config.model.tree_settings()
    name: ObjectiveName
    if fed.task == "regression":
        name, groups, clip = "reg:squarederror", 1, SQUARED_GRADIENT_CLIP
    elif fed.n_classes == 2:
        name, groups, clip = "binary:logistic", 1, 1.0
    else:
        name, groups, clip = "multi:softprob", fed.n_classes, 1.0
    if trees.gradient_clip is not None:
        clip = trees.gradient_clip
    return Objective(name, groups, clip)


def tree_edges(config: RunConfig, fed: FederatedData) -> BinEdges:
    """Equal-width bins over each feature's declared bounds, in the units the members' features
    have (`scaling = "bounds"` maps the bounds as it maps the features). DataError without
    declared bounds: bins computed from the records would not be public."""
    bounds = fed.bounds
    if bounds is None:
        raise DataError(
            f"gradient_boosting bins each feature over its declared public range, and data set "
            f"{fed.dataset_name!r} declares none: set [data] feature_bounds = {{lower = [...], "
            "upper = [...]}} (one value per feature, or one for all)"
        )
    lower, upper = bounds.lower, bounds.upper
    if fed.scaling == "bounds":
        scale = (bounds.upper - bounds.lower) / 6.0
        lower, upper = (lower - bounds.centres) / scale, (upper - bounds.centres) / scale
    return equal_width_edges(lower, upper, config.model.tree_settings().max_bins)


def tree_federation(
    config: RunConfig,
    fed: FederatedData,
    run_id: str,
    *,
    on_upload: Upload | None = None,
) -> TreeFederation:
    """Every part of a trees run. `on_upload` sees what the coordinator receives from each
    member at each level. The members' noise and rounding, and the coordinator's noise, draw
    from a CSPRNG (`SecureRandom`)."""
    trees = config.model.tree_settings()
    objective = tree_objective(config, fed)
    edges = tree_edges(config, fed)
    target = run_objective(config, fed)
    names = [c.name for c in fed.clients]
    members = [
        TreeMember(
            c.name,
            c.x_train,
            _mapped_target(c.y_train, target, fed.task),
            edges,
            objective,
        )
        for c in fed.clients
    ]
    secure = config.secure_aggregation == "secagg"
    settings = settings_from_config(config.secagg, round_size=len(names)) if secure else None
    noise = None
    if trees.noise_multiplier is not None:
        sensitivity = histogram_sensitivity(
            edges.n_features, objective.n_groups, objective.gradient_bound, objective.hessian_bound
        )
        shares = settings.round_threshold if settings is not None else None
        noise = HistogramNoise(trees.noise_multiplier, sensitivity, shares)
    plan = BoostingPlan(
        rounds=trees.resolved_trees(config.federation.rounds),
        max_depth=trees.max_depth,
        rule=SplitRule(trees.reg_lambda, trees.gamma, trees.min_child_weight, trees.learning_rate),
        objective=objective,
        noise=noise,
    )
    summer: Summer = ClearSum(on_upload)
    record = None
    if settings is not None:
        # Every entry is a sum of at most `rows` clipped values (and a noise share).
        bound = max(objective.gradient_bound, objective.hessian_bound) * max(
            m.rows for m in members
        )
        if noise is not None:
            bound += 10.0 * noise.member_stddev
        settings = replace(settings, clip_range=bound, max_weight=1.0)
        summer = SecureSum(
            run_id,
            names,
            plan.shape(edges).size,
            settings,
            on_upload=on_upload,
        )
        record = _secagg_record(settings)
    booster = FederatedBooster(members, plan, edges, summer)
    accountant = Accountant("pld", neighbouring="add_or_remove") if noise is not None else None
    return TreeFederation(fed, plan, edges, members, booster, summer, target, accountant, record)


def _mapped_target(y: npt.NDArray[Any], target: RunObjective, task: str) -> npt.NDArray[np.float64]:
    """Class indices as they are; a regression target on the trees' scale."""
    values = np.asarray(y, dtype=np.float64)
    return (values - target.centre) / target.scale if task == "regression" else values


def _secagg_record(settings: Any) -> dict[str, Any]:
    return {
        "protocol": settings.protocol,
        "threshold": settings.round_threshold,
        "neighbours": settings.neighbours,
        "modulus_bits": settings.modulus_bits,
        "clip_range": settings.clip_range,
        "identities": "generated per run (simulation)",
        "rounds": "one SecAgg round per tree level (fresh keys and masks)",
    }


def _logits(ensemble: Ensemble, x: npt.NDArray[Any]) -> torch.Tensor:
    """The ensemble's margins as the logits (or the regression output) Veil's metrics read."""
    margin = ensemble.margin(x)
    if ensemble.objective == "binary:logistic":
        margin = np.concatenate([np.zeros_like(margin), margin], axis=1)
    return torch.from_numpy(margin.astype(np.float32))


def _labels(fed: FederatedData, y: npt.NDArray[Any]) -> torch.Tensor:
    if fed.task == "regression":
        return torch.from_numpy(np.asarray(y, dtype=np.float32))
    return torch.from_numpy(np.asarray(y, dtype=np.int64))


def tree_metrics(config: RunConfig, fed: FederatedData, ensemble: Ensemble) -> dict[str, float]:
    """The ensemble's metrics on the held-out test set (Veil's metric functions: loss,
    accuracy, AUC; or loss, mse, mae, r2)."""
    if fed.y_test.shape[0] == 0:
        return {}
    logits = _logits(ensemble, fed.x_test)
    return logit_metrics(
        logits, _labels(fed, fed.y_test), fed.n_classes, run_objective(config, fed)
    )


def tree_final(
    config: RunConfig, fed: FederatedData, ensemble: Ensemble
) -> tuple[dict[str, float], Classification | None]:
    """The final metrics, with macro and weighted F1 and the per-class section for
    classification (as `veil.assembly.data.final_evaluation`)."""
    metrics = tree_metrics(config, fed, ensemble)
    if not metrics or fed.task == "regression":
        return metrics, None
    names = [str(n) for n in fed.class_names]
    if len(names) != fed.n_classes:
        names = [str(k) for k in range(fed.n_classes)]
    logits = _logits(ensemble, fed.x_test)
    summary = classification_summary(logits, _labels(fed, fed.y_test), names)
    if summary is None:
        return metrics, None
    metrics |= {"macro_f1": summary["macro_f1"], "weighted_f1": summary["weighted_f1"]}
    return metrics, Classification.model_validate(summary)


def xgboost_baseline(config: RunConfig, fed: FederatedData, edges: BinEdges) -> dict[str, float]:
    """XGBoost (`tree_method = "hist"`) on the pooled training data with the run's depth,
    rounds, λ, γ, min_child_weight, η and `max_bin`: its metrics on the test set, and as
    ``same_bins_*`` those of XGBoost on the pooled data cut into the run's own bins (the exact
    centralised counterpart of the federated trees)."""
    try:
        import xgboost
    except ImportError:
        raise ConfigError(
            "the trees' centralised baseline runs XGBoost, which is not installed: pip install "
            "'veil[trees]', or set [federation] centralized_baseline = false"
        ) from None
    x, y = fed.pooled_train()
    objective = tree_objective(config, fed)
    target = run_objective(config, fed)
    label = _mapped_target(y, target, fed.task)
    trees = config.model.tree_settings()
    params: dict[str, Any] = {
        "objective": objective.name,
        "tree_method": "hist",
        "max_depth": trees.max_depth,
        "eta": trees.learning_rate,
        "lambda": trees.reg_lambda,
        "gamma": trees.gamma,
        "min_child_weight": trees.min_child_weight,
        "base_score": base_score(objective.name),
        "seed": derive_seed(config.seed, Purpose.BASELINE) % 2**31,
        "nthread": 1,
    }
    if objective.name == "multi:softprob":
        params["num_class"] = objective.n_groups
    rounds = trees.resolved_trees(config.federation.rounds)
    out: dict[str, float] = {}
    for prefix, train, test, bins in (
        ("", x, fed.x_test, trees.max_bins),
        ("same_bins_", edges.transform(x), edges.transform(fed.x_test), edges.n_bins + 1),
    ):
        booster = xgboost.train(
            {**params, "max_bin": bins},
            xgboost.DMatrix(np.asarray(train, np.float32), label=label),
            num_boost_round=rounds,
        )
        margin = booster.predict(xgboost.DMatrix(np.asarray(test, np.float32)), output_margin=True)
        margin = np.asarray(margin, dtype=np.float64).reshape(len(test), -1)
        if objective.name == "binary:logistic":
            margin = np.concatenate([np.zeros_like(margin), margin], axis=1)
        logits = torch.from_numpy(margin.astype(np.float32))
        metrics = logit_metrics(logits, _labels(fed, fed.y_test), fed.n_classes, target)
        out |= {f"{prefix}{k}": v for k, v in metrics.items()}
    return out
