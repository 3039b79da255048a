"""The ensemble of trees, its margins and predictions, and its export as an XGBoost model.

`Ensemble` lays its trees out as XGBoost does: round r holds one tree per group (class) for
``multi:softprob``, one tree otherwise, and tree i belongs to group ``i % groups``. The margin
of a row is the sum of its trees' leaf values per group (the base margin is 0: base_score 0.5
for the logistic loss, 0 for the others). `to_xgboost_json` writes the trees into an XGBoost
JSON model (the learner of XGBoost's own format, taken from a template model that XGBoost
writes for the same objective and width, so the format follows the installed version), and
`to_booster` loads it as an `xgboost.Booster` for prediction and export.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from veil.trees.objectives import ObjectiveName
from veil.trees.tree import Tree

if TYPE_CHECKING:
    import xgboost

__all__ = ["Ensemble", "base_score"]


def base_score(objective: ObjectiveName) -> float:
    """XGBoost's base_score for a base margin of 0."""
    return 0.5 if objective == "binary:logistic" else 0.0


@dataclass
class Ensemble:
    """Boosted trees: `trees[i]` adds to the margin of group ``i % groups``."""

    objective: ObjectiveName
    n_features: int
    groups: int = 1
    trees: list[Tree] = field(default_factory=list)

    @property
    def rounds(self) -> int:
        return len(self.trees) // self.groups

    def margin(self, x: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """The margins ``(n, groups)`` of the rows of `x`."""
        values = np.asarray(x, dtype=np.float32)
        out = np.zeros((values.shape[0], self.groups), dtype=np.float32)
        for i, tree in enumerate(self.trees):
            out[:, i % self.groups] += tree.predict(values)
        return out.astype(np.float64)

    def predict(self, x: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Probabilities ``(n, classes)`` for classification (two columns for the logistic
        loss), the mapped regression target ``(n,)`` for squared loss."""
        m = self.margin(x)
        if self.objective == "binary:logistic":
            p = 1.0 / (1.0 + np.exp(-m[:, 0]))
            return np.stack([1.0 - p, p], axis=1)
        if self.objective == "multi:softprob":
            e = np.exp(m - m.max(axis=1, keepdims=True))
            probs: npt.NDArray[np.float64] = e / e.sum(axis=1, keepdims=True)
            return probs
        return m[:, 0]

    def to_xgboost_json(self) -> dict[str, Any]:
        """The ensemble as an XGBoost JSON model (what `Booster.save_raw("json")` writes)."""
        model = _template(self.objective, self.groups, self.n_features)
        booster = model["learner"]["gradient_booster"]["model"]
        booster["trees"] = [t.to_xgboost(i, self.n_features) for i, t in enumerate(self.trees)]
        booster["tree_info"] = [i % self.groups for i in range(len(self.trees))]
        booster["gbtree_model_param"]["num_trees"] = str(len(self.trees))
        if "iteration_indptr" in booster:
            booster["iteration_indptr"] = [r * self.groups for r in range(self.rounds + 1)]
        return model

    def to_booster(self) -> xgboost.Booster:
        """The ensemble loaded as an `xgboost.Booster`."""
        import xgboost

        booster = xgboost.Booster()
        booster.load_model(bytearray(json.dumps(self.to_xgboost_json()).encode()))
        return booster


def _template(objective: ObjectiveName, groups: int, n_features: int) -> dict[str, Any]:
    """An XGBoost JSON model of this objective and width, as the installed XGBoost writes it."""
    import xgboost

    x = np.tile(np.eye(max(groups, 2), n_features, dtype=np.float32), (2, 1))
    y = np.arange(x.shape[0], dtype=np.float32) % max(groups, 2)
    params: dict[str, Any] = {
        "objective": objective,
        "base_score": base_score(objective),
        "max_depth": 1,
        "nthread": 1,
    }
    if objective == "multi:softprob":
        params["num_class"] = groups
    trained = xgboost.train(params, xgboost.DMatrix(x, label=y), num_boost_round=1)
    template: dict[str, Any] = json.loads(trained.save_raw("json"))
    return template
