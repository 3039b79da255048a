"""What the coordinator receives while it grows trees under SecAgg: masked histograms only."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from veil.privacy.dp.randomness import SeededRandom
from veil.privacy.secagg.layout import MASKED
from veil.privacy.secagg.quantize import FixedPoint
from veil.privacy.secagg.settings import SecAggSettings
from veil.trees.binning import equal_width_edges
from veil.trees.federated import BoostingPlan, FederatedBooster, TreeMember
from veil.trees.histograms import HistogramShape
from veil.trees.objectives import Objective
from veil.trees.secure_sum import ClearSum, SecureSum, SumResult
from veil.trees.split import SplitRule


class RecordingMember(TreeMember):
    """A member that also keeps the true histograms it computed (what must never leave it)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[npt.NDArray[np.float64]] = []

    def histograms(self, shape: HistogramShape, noise_stddev: float = 0.0) -> npt.NDArray[Any]:
        vector = super().histograms(shape, noise_stddev)
        self.sent.append(vector.copy())
        return vector


def _members() -> list[RecordingMember]:
    rng = np.random.default_rng(11)
    x = rng.uniform(0, 10, size=(240, 4)).astype(np.float32)
    y = (x[:, 0] + rng.normal(0, 2, 240) > 5).astype(np.float64)
    edges = equal_width_edges([0.0] * 4, [10.0] * 4, 8)
    return [
        RecordingMember(f"bank-{i}", x[i::4], y[i::4], edges, Objective("binary:logistic"))
        for i in range(4)
    ]


def _plan() -> BoostingPlan:
    return BoostingPlan(2, 3, SplitRule(learning_rate=0.3), Objective("binary:logistic"))


def test_the_coordinator_receives_only_masked_vectors_that_sum_to_the_histograms() -> None:
    members = _members()
    edges = equal_width_edges([0.0] * 4, [10.0] * 4, 8)
    plan = _plan()
    length = plan.shape(edges).size
    received: dict[tuple[int, str], Mapping[str, npt.NDArray[Any]]] = {}

    def receive(member: str, round_: int, upload: Mapping[str, npt.NDArray[Any]]) -> None:
        received[(round_, member)] = {k: v.copy() for k, v in upload.items()}

    settings = SecAggSettings(clip_range=0.25 * 60, max_weight=1.0, round_size=4)
    summer = SecureSum(
        "run",
        [m.name for m in members],
        length,
        settings,
        on_upload=receive,
        random=lambda name: SeededRandom(len(name)),
        production=False,
    )
    sums: list[npt.NDArray[np.float64]] = []

    class Kept:
        """The level sums the coordinator computes (SecureSum's decoded result)."""

        def run(self, round_: int, vectors: Mapping[str, npt.NDArray[np.float64]]) -> SumResult:
            result = summer.run(round_, vectors)
            sums.append(result.total)
            return result

    FederatedBooster(members, plan, edges, Kept()).fit()
    rounds = sorted({r for r, _ in received})
    assert len(rounds) == 6  # 2 trees x 3 levels, one SecAgg round each
    fixed = FixedPoint(32, settings.fixed_point(summer.layout, 4).step)
    for index, round_ in enumerate(rounds):
        total = np.zeros(length)
        for member in members:
            upload = received[(round_, member.name)]
            assert set(upload) == {MASKED}
            assert upload[MASKED].dtype == np.uint32
            true = member.sent[index]
            total += true
            seen = fixed.decode(upload[MASKED])[:length]
            # Decoded, an upload is uniform over the whole ring (±60 here), unrelated to this
            # member's histogram (entries of a few units).
            assert np.mean(np.abs(seen - true) < 1.0) < 0.05
            assert abs(np.corrcoef(seen, true)[0, 1]) < 0.25
            assert np.abs(seen).mean() > 5 * np.abs(true).mean()
        # What the coordinator learns is the sum (after SecAgg's unmasking), up to rounding.
        np.testing.assert_allclose(sums[index], total, atol=4 * fixed.step)


def test_secure_and_clear_sums_grow_the_same_trees() -> None:
    edges = equal_width_edges([0.0] * 4, [10.0] * 4, 8)
    clear = FederatedBooster(_members(), _plan(), edges, ClearSum()).fit()
    settings = SecAggSettings(clip_range=15.0, max_weight=1.0, round_size=4)
    members = _members()
    summer = SecureSum(
        "run",
        [m.name for m in members],
        _plan().shape(edges).size,
        settings,
        random=lambda name: SeededRandom(3),
        production=False,
    )
    secure = FederatedBooster(members, _plan(), edges, summer).fit()
    for a, b in zip(clear.trees, secure.trees, strict=True):
        assert a.feature == b.feature and a.threshold == b.threshold and a.left == b.left
        np.testing.assert_allclose(a.weight, b.weight, atol=1e-5)


def test_in_the_clear_the_coordinator_sees_each_members_histograms() -> None:
    """The contrast: `secure_aggregation = "plain"` hands over the true histograms."""
    members = _members()
    edges = equal_width_edges([0.0] * 4, [10.0] * 4, 8)
    seen: list[npt.NDArray[Any]] = []
    FederatedBooster(
        members, _plan(), edges, ClearSum(lambda m, r, u: seen.append(next(iter(u.values()))))
    ).fit()
    np.testing.assert_array_equal(seen[0], members[0].sent[0])
