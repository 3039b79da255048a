"""Clipping that no record can break: huge but finite values are clipped to exactly C on every
per-sample path, a record the model overflows on contributes zero (counted on the client, never
published), and client-level clipping does not overflow either.

The unit tests use SYNTHETIC data built here; the end-to-end runs use scikit-learn's breast
cancer data written to a CSV with one value of one row replaced.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_breast_cancer
from torch import nn

import veil
from veil.config import RunConfig
from veil.federation import FitResult, RoundContext, TrainingPlan
from veil.models import MLP, LogisticRegression, SmallCNN
from veil.privacy.dp import dpsgd
from veil.privacy.dp.client_level import UNCLIPPED, ClipUpdate
from veil.privacy.dp.per_sample import PerSampleClipper
from veil.privacy.dp.randomness import SeededRandom
from veil.tensors import l2_norm

PATHS = ["fused-linear", "layer-rules", "torch.func"]
CLIP = 0.5


def force(clipper: PerSampleClipper, path: str) -> PerSampleClipper:
    """Make `clipper` use `path`: the first that applies is used, so switch off those before."""
    if path != "fused-linear":
        clipper._chain = None
    if path == "torch.func":
        clipper._plan = None
    clipper.method = path
    return clipper


def synthetic(n: int, d: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """SYNTHETIC examples: standard-normal features, uniform labels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, k, (n,), generator=g)


def reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """One example's gradient by plain autograd in float64, where nothing here overflows."""
    m = copy.deepcopy(model).double()
    params = {n: p for n, p in m.named_parameters() if p.requires_grad}
    loss = F.cross_entropy(m(x.double().unsqueeze(0)), y.unsqueeze(0))
    return dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))


def norm(grads: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))


def extreme_case(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor, int]:
    """A model, a SYNTHETIC batch of 6 and the index of its one extreme example, whose label is
    the model's least likely class (so its gradient is far from zero)."""
    torch.manual_seed(0)
    model: nn.Module
    if name == "mlp-1e25":
        model, (x, y) = MLP(5, [8], 3), synthetic(6, 5, 3)
        x[2, 1] = 1e25
    elif name == "logistic-3e38":
        model, (x, y) = LogisticRegression(5, 3), synthetic(6, 5, 3)
        x[2, 3] = 3e38
    else:  # "cnn-1e25": the layer rules materialise its per-sample convolution gradients
        model, (x, y) = SmallCNN((1, 4, 4), 3, channels=(2, 3)), synthetic(6, 16, 3)
        x[2, 5] = 1e25
    model.train()
    with torch.no_grad():
        y[2] = int(model(x[2:3]).argmin())
    return model, x, y, 2


CASES = [
    ("mlp-1e25", "fused-linear"),
    ("mlp-1e25", "layer-rules"),
    ("mlp-1e25", "torch.func"),
    ("logistic-3e38", "fused-linear"),
    ("logistic-3e38", "layer-rules"),
    ("logistic-3e38", "torch.func"),
    ("cnn-1e25", "layer-rules"),
    ("cnn-1e25", "torch.func"),
]


@pytest.mark.parametrize(("case", "path"), CASES)
def test_a_huge_finite_gradient_is_clipped_to_exactly_c(case: str, path: str) -> None:
    model, x, y, i = extreme_case(case)
    clipper = force(PerSampleClipper(model), path)
    want = reference(model, x[i], y[i])
    assert math.isfinite(norm(want)) and norm(want) > 1e20  # huge: its square overflows float32
    # Alone: the clipped gradient has norm C and the direction of the true gradient.
    alone = clipper.clipped_sum(x[i : i + 1], y[i : i + 1], CLIP)
    assert norm(alone.grads) == pytest.approx(CLIP, rel=1e-5)
    for key, g in alone.grads.items():
        assert torch.isfinite(g).all()
        torch.testing.assert_close(
            g.double(), want[key] * (CLIP / norm(want)), rtol=1e-5, atol=CLIP * 1e-6
        )
    # The diagnostic norm: float32, so inf where the true norm is above float32's range.
    want_norm = norm(want) if norm(want) <= torch.finfo(torch.float32).max else math.inf
    assert float(alone.norms[0]) == pytest.approx(want_norm, rel=1e-5)
    # In a batch: the ordinary examples' sum plus the extreme example's clipped gradient.
    others = torch.arange(len(x)) != i
    ordinary = clipper.clipped_sum(x[others], y[others], CLIP)
    batch = clipper.clipped_sum(x, y, CLIP)
    for key, g in batch.grads.items():
        torch.testing.assert_close(g, ordinary.grads[key] + alone.grads[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batch.norms[others], ordinary.norms)
    assert float(batch.norms[i]) == pytest.approx(want_norm, rel=1e-5)
    assert clipper.nonfinite == 0  # clipped, not dropped


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_an_example_the_model_overflows_on_contributes_zero_and_is_counted(
    path: str, bad: float
) -> None:
    torch.manual_seed(0)
    model = MLP(5, [8], 3)
    x, y = synthetic(6, 5, 3, seed=1)
    clipper = force(PerSampleClipper(model), path)
    ordinary = clipper.clipped_sum(x[1:], y[1:], CLIP)
    x[0, 2] = bad
    batch = clipper.clipped_sum(x, y, CLIP)
    for key, g in batch.grads.items():
        torch.testing.assert_close(g, ordinary.grads[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batch.norms[1:], ordinary.norms)
    assert math.isnan(float(batch.norms[0]))
    assert clipper.nonfinite == 1
    # add_clipped_sum, the trainer's call, adds the same finite sum.
    out = [torch.zeros_like(p) for p in clipper.params.values()]
    clipper.add_clipped_sum(x, y, CLIP, out, scale=0.5)
    assert clipper.nonfinite == 2
    for key, total in zip(clipper.params, out, strict=True):
        torch.testing.assert_close(total, 0.5 * ordinary.grads[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", PATHS)
def test_dp_sgd_on_an_extreme_record_stays_finite_and_counts_only_locally(path: str) -> None:
    torch.manual_seed(0)
    model = MLP(5, [8], 3)
    x, y = synthetic(40, 5, 3, seed=2)
    x[3, 0] = 3e38  # overflows this model's float32 forward once its weights grow
    x[7, 1] = math.inf  # cannot come from the CSV loader; the clipper must cope all the same
    trainer = dpsgd.DPSGDTrainer(
        noise_multiplier=1.0, clip_norm=CLIP, source=SeededRandom(0), production=False
    )
    force(trainer._clipper(model), path)
    plan = TrainingPlan(epochs=3, batch_size=10, learning_rate=5.0)
    stats = trainer.train(model, x, y, plan, torch.Generator())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert trainer.nonfinite_examples >= 1  # the inf record, each time it was sampled
    assert stats.loss is None  # nothing about it in what the client reports


# -- end to end: one record of a CSV under record-level DP --------------------------------


def csv_with_one_extreme_value(path: Path, value: float) -> None:
    frame = load_breast_cancer(as_frame=True).frame
    frame.iloc[7, 3] = value  # one record, one feature ("mean area")
    frame.to_csv(path, index=False)


def spy_on_clippers(
    monkeypatch: pytest.MonkeyPatch, path: str
) -> tuple[list[PerSampleClipper], list[float]]:
    """Force `path` on every DP-SGD client; record each clipper and the largest |x| of each
    clipped batch (to show the extreme record was sampled)."""
    clippers: list[PerSampleClipper] = []
    peaks: list[float] = []
    original_clipper = dpsgd.DPSGDTrainer._clipper
    original_add = PerSampleClipper.add_clipped_sum

    def clipper(self: dpsgd.DPSGDTrainer, model: nn.Module) -> PerSampleClipper:
        c = force(original_clipper(self, model), path)
        if c not in clippers:
            clippers.append(c)
        return c

    def add(self: PerSampleClipper, x: torch.Tensor, *args: object, **kw: object) -> torch.Tensor:
        peaks.append(float(x.abs().max()))
        return original_add(self, x, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(dpsgd.DPSGDTrainer, "_clipper", clipper)
    monkeypatch.setattr(PerSampleClipper, "add_clipped_sum", add)
    return clippers, peaks


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("value", [1e25, 3e38])
def test_one_extreme_csv_record_under_record_level_dp_leaves_no_trace_per_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: float, path: str
) -> None:
    csv = tmp_path / "biopsies.csv"
    csv_with_one_extreme_value(csv, value)
    clippers, peaks = spy_on_clippers(monkeypatch, path)
    config = RunConfig.from_dict(
        {
            "name": "extreme-record",
            "seed": 3,
            "data": {
                "dataset": "csv",
                "path": str(csv),
                "target": "target",
                "scaling": "none",
                "validation_fraction": 0.0,
            },
            "model": {"name": "mlp", "hidden": [64]},
            "federation": {
                "clients": 3,
                "rounds": 3,
                "batch_size": 32,
                # Large: the weights grow until 3e38 overflows the float32 forward pass.
                "learning_rate": 5.0,
                "fraction_evaluate": 0.0,
            },
            "privacy": {
                "unit": "record",
                "epsilon": 1.0,
                "delta": 1e-5,
                "production": False,
                "noise_seed": 1,
            },
        }
    )
    out = tmp_path / "run"
    result = veil.run(config, out_dir=out)
    assert clippers and all(c.method == path for c in clippers)
    assert max(peaks) == pytest.approx(value, rel=1e-6)  # the record was sampled and clipped
    for r in result.rounds:  # every organisation's update was finite and accepted
        assert (r.clients, r.selected, r.dropped) == (3, 3, 0)
        assert r.failures == [] and r.failure_counts == {}
    written = json.loads((out / "result.json").read_text())
    for r in written["rounds"]:
        assert r["failures"] == [] and r["failure_counts"] == {}
        assert "nonfinite" not in json.dumps(r)
    assert result.privacy.epsilon is not None and result.privacy.epsilon <= 1.0 + 1e-9


# -- client level -------------------------------------------------------------------------


def update_of(value: float) -> dict[str, np.ndarray]:
    """A SYNTHETIC update with entries of magnitude `value` and a few ordinary ones."""
    rng = np.random.default_rng(0)
    w = (rng.choice([-1.0, 1.0], (3, 4)) * value).astype(np.float32)
    b = np.array([value, -0.5 * value, 1.0], dtype=np.float32)
    return {"w": w, "b": b}


def exact_norm(update: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float((a.astype(np.float64) ** 2).sum()) for a in update.values()))


@pytest.mark.parametrize("value", [3e19, 3e38])
def test_client_level_clipping_of_a_huge_update_keeps_c_and_the_direction(value: float) -> None:
    clip = 1.0
    update = update_of(value)
    result = FitResult("c", 1, update, weight=50.0, num_examples=50)
    plan = TrainingPlan(epochs=1, batch_size=8, learning_rate=0.1, update_clip_norm=clip)
    out = ClipUpdate().apply(result, RoundContext("r", 1, plan))
    assert exact_norm(out.update) == pytest.approx(clip, rel=1e-5)
    scale = clip / exact_norm(update)
    for key, arr in out.update.items():
        assert arr.dtype == np.float32 and np.isfinite(arr).all()
        np.testing.assert_allclose(arr, update[key].astype(np.float64) * scale, rtol=1e-5)
    assert out.sums[UNCLIPPED] == -0.5


def test_a_clip_factor_below_float32s_normal_range_is_applied_in_float64() -> None:
    """10^6 entries of 3e38: C/‖Δ‖ ≈ 3e-42 is a float32 subnormal with a few bits of precision,
    so scaling in float32 would miss the direction by ~1e-4; scaled in float64 and rounded
    once, every entry is within float32's own rounding."""
    big = np.full(1_000_000, 3e38, dtype=np.float32)
    big[::2] *= -1
    update = {"w": big}
    plan = TrainingPlan(epochs=1, batch_size=8, learning_rate=0.1, update_clip_norm=1.0)
    result = FitResult("c", 1, update, weight=50.0, num_examples=50)
    out = ClipUpdate().apply(result, RoundContext("r", 1, plan))
    want = big.astype(np.float64) * (1.0 / exact_norm(update))
    np.testing.assert_allclose(out.update["w"], want, rtol=1e-6)


@pytest.mark.parametrize("value", [1e-30, 0.3, 3e19, 3e38])
def test_l2_norm_does_not_overflow(value: float) -> None:
    update = update_of(value)
    assert l2_norm(update) == pytest.approx(exact_norm(update), rel=1e-6)
    assert l2_norm({}) == 0.0
    for entry, want in ((math.inf, math.inf), (-math.inf, math.inf)):
        assert l2_norm({**update, "c": np.array([1.0, entry], np.float32)}) == want
    assert math.isnan(l2_norm({**update, "c": np.array([1.0, math.nan], np.float32)}))
