"""The records of a gradient-boosting run: its rounds, its privacy record and its result.json.

One round of the run is one boosting round (one tree per class); its row carries the test
metrics after it, the ε spent so far under DP, the bytes the level sums moved and the last
level's SecAgg report. The privacy record states the histogram DP as a record-level guarantee
per organisation (every member's records are in every release), with each organisation's
composed DpEvents, so `veil privacy verify` recomputes it.
"""

from __future__ import annotations

import json
import time
from typing import Any

from veil.assembly.data import data_record
from veil.assembly.trees import TreeFederation, tree_final, tree_metrics, xgboost_baseline
from veil.config import RunConfig
from veil.result import (
    Baseline,
    Communication,
    Mechanism,
    PrivacyRecord,
    Result,
    RoundResult,
    Timing,
)
from veil.trees.federated import TreeRound

__all__ = [
    "TREE_MODEL_FILE",
    "tree_model_json",
    "tree_privacy_record",
    "tree_result",
    "tree_round_result",
]

#: The trained ensemble in a run folder, as an XGBoost JSON model (`xgboost.Booster.load_model`).
TREE_MODEL_FILE = "model.xgboost.json"


def tree_model_json(tf: TreeFederation) -> str | None:
    """The ensemble as XGBoost JSON text, or None when XGBoost (which writes the model's
    learner template) is not installed."""
    try:
        return json.dumps(tf.booster.ensemble.to_xgboost_json())
    except ImportError:
        return None


def tree_round_result(config: RunConfig, tf: TreeFederation, record: TreeRound) -> RoundResult:
    """The round's row (composing its releases into the accountant under DP)."""
    epsilon = None
    noise = tf.plan.noise
    if tf.accountant is not None and noise is not None:
        tf.accountant.compose_gaussian(noise.noise_multiplier, record.levels)
        epsilon = tf.accountant.epsilon(config.model.tree_settings().delta)
    nodes = sum(t.n_nodes for t in record.trees)
    members = len(tf.members)
    return RoundResult(
        round=record.round,
        selected=members,
        clients=members,
        dropped=0,
        metrics=tree_metrics(config, tf.fed, tf.booster.ensemble),
        epsilon=epsilon,
        bytes_up=record.bytes_up,
        bytes_down=record.bytes_down,
        duration_s=record.duration_s,
        aggregation={**record.aggregation, "levels": record.levels, "tree_nodes": nodes},
    )


def tree_privacy_record(config: RunConfig, tf: TreeFederation) -> PrivacyRecord:
    """result.json's `privacy`: the histogram DP (if on) and the SecAgg entry."""
    fields: dict[str, Any] = {"aggregation": config.secure_aggregation}
    noise, accountant = tf.plan.noise, tf.accountant
    if noise is not None and accountant is not None:
        delta = config.model.tree_settings().delta
        epsilon = accountant.epsilon(delta)
        mechanism = Mechanism(
            noise_multiplier=noise.noise_multiplier,
            clip_norm=noise.sensitivity,
            sampling_rate=1.0,
            steps=accountant.steps,
        )
        fields |= {
            "unit": "record",
            "epsilon": epsilon,
            "delta": delta,
            "accountant": accountant.describe(),
            "neighbouring": "add_or_remove",
            "mechanism": mechanism,
            "histogram_dp": {
                "releases": accountant.steps,
                "sensitivity": noise.sensitivity,
                "stddev": noise.stddev,
                "added_by": "members (shares)" if noise.shares is not None else "coordinator",
                "shares": noise.shares,
            },
            "per_organisation": [
                {
                    "name": m.name,
                    "epsilon": epsilon,
                    "examples": m.rows,
                    "mechanism": mechanism.model_dump(),
                    "accounting": accountant.state(),
                }
                for m in tf.members
            ],
        }
    if tf.secure_aggregation is not None:
        fields["secure_aggregation"] = tf.secure_aggregation
    return PrivacyRecord.model_validate(fields)


def tree_result(
    config: RunConfig,
    tf: TreeFederation,
    run_id: str,
    rounds: list[RoundResult],
    *,
    interrupted: bool,
    started: float,
) -> Result:
    """The run's `Result`: final metrics, the XGBoost baseline, the rounds, the records."""
    fed = tf.fed
    final, classification = tree_final(config, fed, tf.booster.ensemble)
    baseline = None
    if config.federation.centralized_baseline and not interrupted:
        metrics = xgboost_baseline(config, fed, tf.edges)
        # Under DP the baseline is trained on the pooled records without noise: not private.
        outside = {"outside_guarantee": True} if tf.plan.noise is not None else {}
        baseline = Baseline(**metrics, **outside)
    nodes = sum(t.n_nodes for t in tf.booster.ensemble.trees)
    upload = tf.plan.shape(tf.edges).size * 4
    per_client = [r.bytes_up / r.clients for r in rounds if r.clients]
    return Result(
        run_id=run_id,
        name=config.name,
        mode=config.mode,
        status="interrupted" if interrupted else "finished",
        rounds_planned=tf.plan.rounds,
        final=final,
        centralized_baseline=baseline,
        rounds=rounds,
        privacy=tree_privacy_record(config, tf),
        communication=Communication(
            bytes_up=sum(r.bytes_up for r in rounds),
            bytes_down=sum(r.bytes_down for r in rounds),
            update_bytes_per_client=upload,
            bytes_up_per_client_round=sum(per_client) / len(per_client) if per_client else 0.0,
            model_parameters=nodes,
        ),
        timing=Timing(total_s=time.perf_counter() - started),
        pipeline=_pipeline(config, tf),
        strategy="histogram boosting",
        clients=len(tf.members),
        dataset={"name": fed.dataset_name, "synthetic": fed.synthetic},
        data=data_record(config, fed),
        classification=classification,
        trees=_trees_record(tf),
    )


def _pipeline(config: RunConfig, tf: TreeFederation) -> list[str]:
    steps = ["gradients (clipped)", "histograms"]
    if tf.plan.noise is not None:
        steps.append("gaussian noise (histograms)")
    steps.append("secagg (masked sum)" if config.secure_aggregation == "secagg" else "plain sum")
    return steps


def _trees_record(tf: TreeFederation) -> dict[str, Any]:
    """result.json's `trees`: the plan and the bins, so the run can be read without its config."""
    plan = tf.plan
    return {
        "objective": plan.objective.name,
        "rounds": plan.rounds,
        "trees": len(tf.booster.ensemble.trees),
        "max_depth": plan.max_depth,
        "bins": tf.edges.n_bins,
        "binning": "equal width over the declared feature bounds",
        "lambda": plan.rule.reg_lambda,
        "gamma": plan.rule.gamma,
        "min_child_weight": plan.rule.min_child_weight,
        "learning_rate": plan.rule.learning_rate,
        "gradient_bound": plan.objective.gradient_bound,
        "hessian_bound": plan.objective.hessian_bound,
        "baseline": "XGBoost tree_method = 'hist' on the pooled training data, same depth, "
        "rounds, max_bin, lambda, gamma, min_child_weight and eta; same_bins_*: on the pooled "
        "data cut into this run's bins",
    }
