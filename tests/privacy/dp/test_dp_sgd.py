"""DP-SGD: Poisson sampling, per-sample clipping, noise on every step, the right scale."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
import torch
from scipy import stats
from torch import nn

from veil.federation import TrainingPlan
from veil.models import MLP, LogisticRegression, SmallCNN, get_parameters
from veil.privacy.dp.dpsgd import DPSGDTrainer, poisson_batch, poisson_schedule
from veil.privacy.dp.per_sample import PerSampleClipper
from veil.privacy.dp.randomness import SecureRandom, SeededRandom


class NeverSample(SecureRandom):
    """The production noise source (`SecureRandom`), but no example is ever sampled: every
    batch is empty, so a step moves the model by its noise alone."""

    def uniform(self, size: int) -> npt.NDArray[np.float64]:
        return np.full(size, 1 - 1e-15)  # the largest draws: every gap overshoots n


def data(n: int, d: int, k: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * 3, torch.randint(0, k, (n,), generator=g)


def test_poisson_batch_sizes_follow_the_binomial() -> None:
    # Chi-square goodness of fit of 4000 batch sizes against Binomial(n=200, q=0.05),
    # bins with expected count >= 5; reject at the 0.1% level only.
    n, q, draws = 200, 0.05, 4000
    source = SeededRandom(1)
    sizes = np.array([poisson_batch(source, n, q).size for _ in range(draws)])
    support = np.arange(n + 1)
    expected = stats.binom.pmf(support, n, q) * draws
    keep = expected >= 5
    observed = np.bincount(sizes, minlength=n + 1)
    obs = np.append(observed[keep], observed[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    exp *= obs.sum() / exp.sum()
    assert stats.chisquare(obs, exp).pvalue > 1e-3


def test_poisson_schedule() -> None:
    assert poisson_schedule(100, 10, 2) == (0.1, 20)
    assert poisson_schedule(5, 10, 1) == (1.0, 1)
    assert poisson_schedule(0, 10, 3) == (1.0, 0)


@pytest.mark.parametrize(
    "model",
    [LogisticRegression(6, 2), MLP(6, [8, 4], 3), SmallCNN((1, 4, 4), 3, channels=(2, 3))],
    ids=["logistic", "mlp", "cnn"],
)
def test_layer_rules_match_torch_func_and_clip_each_example(model: nn.Module) -> None:
    d = 16 if isinstance(model, SmallCNN) else 6
    x, y = data(12, d, k=2 if isinstance(model, LogisticRegression) else 3)
    clipper = PerSampleClipper(model)
    # Linear-only models take the fused path (tests/privacy/test_dp_per_sample_fast.py); the
    # layer rules stay their fallback and are compared here.
    assert clipper.method == ("layer-rules" if isinstance(model, SmallCNN) else "fused-linear")
    fast = clipper._with_rules(x, y, 0.5)
    assert fast is not None
    slow = clipper._with_vmap(x, y, 0.5)
    assert set(fast.grads) == set(get_parameters(model))
    for name in fast.grads:
        torch.testing.assert_close(fast.grads[name], slow.grads[name], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fast.norms, slow.norms, atol=1e-5, rtol=1e-4)
    for i in range(x.shape[0]):  # each example alone: its clipped gradient has norm <= C
        one = clipper.clipped_sum(x[i : i + 1], y[i : i + 1], 0.5)
        norm = torch.sqrt(sum((g**2).sum() for g in one.grads.values()))
        assert float(norm) <= 0.5 + 1e-6


def test_unsupported_layers_fall_back_to_torch_func() -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 2))
    clipper = PerSampleClipper(model)
    assert clipper.method == "torch.func"
    x, y = data(6, 4)
    batch = clipper.clipped_sum(x, y, 1.0)
    assert set(batch.grads) == {n for n, _ in model.named_parameters()}


def test_empty_batches_still_receive_noise() -> None:
    model = LogisticRegression(4, 2)
    before = get_parameters(model)
    trainer = DPSGDTrainer(noise_multiplier=1.0, clip_norm=1.0, source=NeverSample())
    x, y = data(50, 4)
    stats_ = trainer.train(
        model, x, y, TrainingPlan(epochs=1, batch_size=10, learning_rate=0.1), torch.Generator()
    )
    assert stats_.steps == 5 and stats_.loss is None
    after = get_parameters(model)
    assert all(not np.array_equal(before[k], after[k]) for k in before)


def test_noise_standard_deviation_is_sigma_times_clip() -> None:
    # With no example sampled, each step moves a parameter by -lr·N(0, (σC)²)/(q·n). Each of
    # the 40 calls sums 100 steps, so the sample is 40 calls x 802 parameters = 32 080 sums:
    # the relative standard error of their std is 1/sqrt(2·32080) = 0.4 %, and 5 % is twelve
    # of them. (With 10 parameters it was 3.5 %: the old 5 % bound passed by the seed's luck.)
    sigma, clip, n, b, lr = 1.3, 0.7, 100, 10, 1.0
    model = LogisticRegression(400, 2)
    trainer = DPSGDTrainer(noise_multiplier=sigma, clip_norm=clip, source=NeverSample())
    x, y = data(n, 400)
    deltas = []
    for _ in range(40):
        before = np.concatenate([a.ravel() for a in get_parameters(model).values()])
        plan = TrainingPlan(epochs=10, batch_size=b, learning_rate=lr)
        trainer.train(model, x, y, plan, torch.Generator())
        after = np.concatenate([a.ravel() for a in get_parameters(model).values()])
        deltas.append(after - before)
    # Each call made 100 steps: the sum of 100 N(0, s²) has std 10·s.
    per_step_std = np.std(np.concatenate(deltas)) / np.sqrt(100)
    expected = sigma * clip / (b / n * n) * lr
    assert per_step_std == pytest.approx(expected, rel=0.05)


def test_dpsgd_learns_with_moderate_noise() -> None:
    x, y = data(400, 5)
    y = (x[:, 0] + x[:, 1] > 0).long()
    model = LogisticRegression(5, 2)
    trainer = DPSGDTrainer(
        noise_multiplier=0.8, clip_norm=1.0, source=SeededRandom(2), production=False
    )
    trainer.train(
        model, x, y, TrainingPlan(epochs=5, batch_size=50, learning_rate=0.5), torch.Generator()
    )
    accuracy = float((model(x).argmax(1) == y).float().mean())
    assert accuracy > 0.85
