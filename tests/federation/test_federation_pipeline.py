"""Tests for `veil.federation.pipeline`: the plain weighted sum and stage ordering."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from veil.federation import (
    Aggregate,
    FitResult,
    RoundContext,
    UpdatePipeline,
    UpdateRejected,
    WeightedSum,
)

CTX = RoundContext("run", 3)
SHAPES = {"w": (3, 2), "b": (2,)}
EPS32 = float(np.finfo(np.float32).eps)


def reference() -> dict[str, np.ndarray]:
    return {name: np.zeros(shape, np.float32) for name, shape in SHAPES.items()}


def result(update: dict[str, np.ndarray], weight: float = 1.0, client: str = "c") -> FitResult:
    return FitResult(client=client, round=3, update=update, weight=weight, num_examples=1)


def good_update(value: float = 1.0) -> dict[str, np.ndarray]:
    return {name: np.full(shape, value, np.float32) for name, shape in SHAPES.items()}


update_arrays = st.fixed_dictionaries(
    {
        name: hnp.arrays(
            np.float32, shape, elements=st.floats(-1e3, 1e3, width=32, allow_subnormal=False)
        )
        for name, shape in SHAPES.items()
    }
)
weights = st.floats(min_value=0.01, max_value=1e4, allow_nan=False, allow_infinity=False)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(update_arrays, weights), min_size=1, max_size=8))
def test_weighted_sum_matches_numpy(items: list[tuple[dict[str, np.ndarray], float]]) -> None:
    acc = WeightedSum().start(reference(), CTX)
    for update, weight in items:
        acc.add(result(update, weight))
    agg = acc.finish()

    assert agg.count == len(items)
    assert math.isclose(agg.weight, math.fsum(w for _, w in items), rel_tol=1e-12)
    n = len(items)
    for name in SHAPES:
        terms = np.stack([w * u[name].astype(np.float64) for u, w in items])
        exact = terms.sum(axis=0)
        # Float32 accumulation: rounding the weight, the product and each of n additions costs
        # at most (n + 2)·eps relative to Σ|wᵢΔᵢ| per element (plus slack for the bound).
        bound = 2 * (n + 2) * EPS32 * np.abs(terms).sum(axis=0) + 1e-30
        assert agg.total[name].dtype == np.float32
        assert np.all(np.abs(agg.total[name].astype(np.float64) - exact) <= bound), name


def test_weighted_sum_simple_values() -> None:
    acc = WeightedSum().start(reference(), CTX)
    acc.add(result(good_update(1.0), 2.0))
    acc.add(result(good_update(-4.0), 3.0))
    agg = acc.finish()
    assert agg.weight == 5.0
    assert agg.count == 2
    np.testing.assert_array_equal(agg.total["w"], np.full((3, 2), 2.0 - 12.0, np.float32))
    np.testing.assert_allclose(agg.mean()["b"], np.full((2,), -2.0), rtol=1e-6)


def test_weighted_sum_does_not_mutate_reference_or_updates() -> None:
    ref = reference()
    upd = good_update(2.0)
    acc = WeightedSum().start(ref, CTX)
    acc.add(result(upd, 3.0))
    acc.finish()
    np.testing.assert_array_equal(ref["w"], np.zeros((3, 2), np.float32))
    np.testing.assert_array_equal(upd["w"], np.full((3, 2), 2.0, np.float32))


def test_empty_accumulator_finishes_to_zero_weight() -> None:
    agg = WeightedSum().start(reference(), CTX).finish()
    assert agg.count == 0
    assert agg.weight == 0
    np.testing.assert_array_equal(agg.total["w"], np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match="empty"):
        agg.mean()


def test_aggregate_mean() -> None:
    total = {"w": np.array([3.0, -6.0, 0.0], np.float32)}
    mean = Aggregate(total=total, weight=1.5, count=2).mean()
    np.testing.assert_allclose(mean["w"], [2.0, -4.0, 0.0], rtol=1e-6)
    assert mean["w"].dtype == np.float32


@pytest.mark.parametrize("weight", [0.0, -1.0])
def test_aggregate_mean_of_nonpositive_weight_is_refused(weight: float) -> None:
    with pytest.raises(ValueError):
        Aggregate(total={"w": np.ones(2, np.float32)}, weight=weight, count=1).mean()


def _with(name: str, value: np.ndarray) -> dict[str, np.ndarray]:
    update = good_update()
    update[name] = value
    return update


def _without(name: str) -> dict[str, np.ndarray]:
    update = good_update()
    del update[name]
    return update


BAD_UPDATES = {
    "nan": (_with("w", np.array([[1, 2], [np.nan, 0], [0, 0]], np.float32)), 1.0, "NaN"),
    "inf": (_with("b", np.array([np.inf, 0], np.float32)), 1.0, "Inf"),
    "neg_inf": (_with("b", np.array([0, -np.inf], np.float32)), 1.0, "Inf"),
    "wrong_shape": (_with("w", np.zeros((2, 3), np.float32)), 1.0, "shape"),
    "missing_name": (_without("b"), 1.0, "missing"),
    "extra_name": ({**good_update(), "z": np.zeros(1, np.float32)}, 1.0, "unexpected"),
    "float64": (_with("b", np.zeros(2, np.float64)), 1.0, "dtype"),
    "zero_weight": (good_update(), 0.0, "weight"),
    "negative_weight": (good_update(), -2.0, "weight"),
    "nan_weight": (good_update(), math.nan, "weight"),
    "inf_weight": (good_update(), math.inf, "weight"),
}


@pytest.mark.parametrize("case", sorted(BAD_UPDATES))
def test_bad_update_is_rejected_and_not_counted(case: str) -> None:
    update, weight, message = BAD_UPDATES[case]
    acc = WeightedSum().start(reference(), CTX)
    acc.add(result(good_update(1.0), 2.0))
    with pytest.raises(UpdateRejected, match=message):
        acc.add(result(update, weight))
    agg = acc.finish()
    # The rejected update left no trace: only the first one is in the sum.
    assert agg.count == 1
    assert agg.weight == 2.0
    np.testing.assert_array_equal(agg.total["w"], np.full((3, 2), 2.0, np.float32))
    np.testing.assert_array_equal(agg.total["b"], np.full((2,), 2.0, np.float32))


def test_update_rejected_is_a_value_error() -> None:
    assert issubclass(UpdateRejected, ValueError)


@dataclass
class RecordingClientStage:
    name: str
    log: list[str]

    def apply(self, res: FitResult, context: RoundContext) -> FitResult:
        self.log.append(f"{self.name}@{context.round}")
        return replace(res, metrics={**res.metrics, "trail": res.metrics["trail"] * 10 + 1})


@dataclass
class RecordingServerStage:
    name: str
    log: list[str]
    seen_weights: list[float] = field(default_factory=list)

    def apply(self, aggregate: Aggregate, context: RoundContext) -> Aggregate:
        self.log.append(f"{self.name}@{context.round}")
        self.seen_weights.append(aggregate.weight)
        return replace(aggregate, weight=aggregate.weight * 2)


def test_client_stages_run_in_order_and_chain() -> None:
    log: list[str] = []
    stages = [RecordingClientStage(n, log) for n in ("clip", "noise", "quantize")]
    pipeline = UpdatePipeline(client_stages=stages)
    res = result(good_update())
    res.metrics["trail"] = 0.0
    out = pipeline.on_client(res, CTX)
    assert log == ["clip@3", "noise@3", "quantize@3"]
    # Each stage received the previous one's output: 0 → 1 → 11 → 111.
    assert out.metrics["trail"] == 111.0
    assert pipeline.on_server(Aggregate(reference(), 1.0, 1), CTX).weight == 1.0


def test_server_stages_run_in_order_and_chain() -> None:
    log: list[str] = []
    first, second = RecordingServerStage("unmask", log), RecordingServerStage("noise", log)
    pipeline = UpdatePipeline(server_stages=[first, second])
    out = pipeline.on_server(Aggregate(reference(), 1.5, 2), CTX)
    assert log == ["unmask@3", "noise@3"]
    assert first.seen_weights == [1.5]
    assert second.seen_weights == [3.0]
    assert out.weight == 6.0
    res = result(good_update())
    assert pipeline.on_client(res, CTX) is res


def test_describe_lists_stages_in_order() -> None:
    log: list[str] = []
    pipeline = UpdatePipeline(
        client_stages=[RecordingClientStage("clip", log), RecordingClientStage("mask", log)],
        server_stages=[RecordingServerStage("unmask", log)],
    )
    assert pipeline.describe() == ["client:clip", "client:mask", "aggregate:plain", "server:unmask"]
    assert UpdatePipeline().describe() == ["aggregate:plain"]
    assert log == []
