"""A run's curves as SVG: model quality, error and loss per round, and ε against the budget.

One path draws them for both readers: the report (`veil.report.html`) and the live dashboard
(`veil.report.dashboard`). The input is a run's rounds as plain dicts (``round``, ``metrics``,
``epsilon``), as result.json and the run store hold them, so the metric names a run happens to
have decide the charts: ``accuracy`` / ``auc`` for a classifier, ``r2`` for a regression in the
same place, ``mse`` / ``mae`` as errors, anything with ``loss`` in its name as a loss.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from veil.report.svg import Line, Point, finite, line_chart

#: How a metric is named on a page (anything else is shown under its own key).
LABELS: dict[str, str] = {
    "accuracy": "accuracy",
    "auc": "AUC",
    "r2": "R²",
    "mse": "MSE",
    "mae": "MAE",
    "rmse": "RMSE",
    "macro_f1": "macro F1",
    "weighted_f1": "weighted F1",
    "loss": "loss",
    "train_loss": "training loss",
}

#: The metric that sums up a run in one figure: the first of these that it has.
HEADLINE_ORDER = ("accuracy", "r2", "auc", "macro_f1", "mse", "mae", "loss")

_QUALITY = ("accuracy", "auc", "r2", "f1")
_ERROR = ("mse", "mae", "rmse")


@dataclass(frozen=True)
class MetricGroup:
    """Metrics drawn on one chart."""

    title: str
    y_label: str
    keys: tuple[str, ...]


def metric_label(key: str) -> str:
    """The name a page shows for metric `key` (``r2`` is "R²", ``federated_r2`` "federated R²":
    measured by the organisations on their own validation rows; unknown keys as they are)."""
    if key.startswith("federated_") and key not in LABELS:
        return "federated " + metric_label(key.removeprefix("federated_"))
    return LABELS.get(key, key)


def _kind(key: str) -> str | None:
    """ "loss", "quality", an error's name ("mse", "mae", "rmse"), or None."""
    base = key.lower()
    if "loss" in base:
        return "loss"
    if any(base == q or base.endswith("_" + q) or "acc" in base for q in _QUALITY):
        return "quality"
    return next((e for e in _ERROR if base == e or base.endswith("_" + e)), None)


def _quality_title(keys: Sequence[str]) -> tuple[str, str]:
    if keys and all(k.endswith("r2") for k in keys):
        return "R² per round", "R²"
    if not any(k.endswith("r2") for k in keys):
        return "Accuracy per round", "accuracy / AUC"
    return "Model quality per round", "score"


def metric_groups(keys: Iterable[str]) -> list[MetricGroup]:
    """The charts for a run whose rounds report metrics `keys`: quality (accuracy, AUC, F1 or
    R²) and loss always (drawn as "no data" when empty), and one per kind of error (MSE, MAE:
    their scales differ) that the run reports. Keys that fit none of these are left to the
    rounds table."""
    ordered = sorted(set(keys))
    quality = tuple(k for k in ordered if _kind(k) == "quality")
    loss = tuple(k for k in ordered if _kind(k) == "loss")
    title, y_label = _quality_title(quality)
    groups = [MetricGroup(title, y_label, quality)]
    for error in _ERROR:
        found = tuple(k for k in ordered if _kind(k) == error)
        if found:
            label = metric_label(error)
            groups.append(MetricGroup(f"{label} per round", label, found))
    groups.append(MetricGroup("Loss per round", "loss", loss))
    return groups


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def round_numbers(rounds: Sequence[Mapping[str, Any]]) -> list[float]:
    """Each round's number (its position, counted from 1, where it has none)."""
    return [float(finite(r.get("round")) or i + 1) for i, r in enumerate(rounds)]


def metric_series(rounds: Sequence[Mapping[str, Any]], key: str) -> list[Point]:
    """``(round, value)`` of metric `key` in each round; None where it is missing or not finite."""
    xs = round_numbers(rounds)
    return [(x, finite(_dict(r.get("metrics")).get(key))) for x, r in zip(xs, rounds, strict=True)]


def epsilon_series(rounds: Sequence[Mapping[str, Any]]) -> list[Point]:
    """``(round, cumulative ε)`` of each round; None where the round has no ε."""
    xs = round_numbers(rounds)
    return [(x, finite(r.get("epsilon"))) for x, r in zip(xs, rounds, strict=True)]


def metric_charts(rounds: Sequence[Mapping[str, Any]]) -> list[str]:
    """The SVG charts of the rounds' metrics, one per `metric_groups` group."""
    keys = {k for r in rounds for k in _dict(r.get("metrics"))}
    return [
        line_chart(
            {metric_label(k): metric_series(rounds, k) for k in group.keys},
            title=group.title,
            y_label=group.y_label,
        )
        for group in metric_groups(keys)
    ]


def epsilon_chart(rounds: Sequence[Mapping[str, Any]], budget: object = None) -> str | None:
    """The SVG chart of cumulative ε per round against the dashed `budget` line; None when the
    run spends no ε and has no budget (no differential privacy)."""
    spent = epsilon_series(rounds)
    target = finite(budget)
    if all(e is None for _, e in spent) and target is None:
        return None
    return line_chart(
        {"ε spent (cumulative)": spent},
        title="ε spent per round against the budget",
        y_label="ε",
        reference=Line(target, f"budget ε = {target:.3f}") if target is not None else None,
        y_zero=True,
    )


def headline(metrics: Mapping[str, Any]) -> tuple[str, float | None] | None:
    """The metric that sums up `metrics` (the first of `HEADLINE_ORDER` present) as
    ``(key, value)``, the value None when it is not a finite number; None when none is present."""
    for key in HEADLINE_ORDER:
        if key in metrics:
            return key, finite(metrics[key])
    return None
