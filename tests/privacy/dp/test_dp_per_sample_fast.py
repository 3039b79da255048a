"""The fast DP-SGD paths: the fused linear chain, sampling and noise drawn for several steps at
once, and the foreach update. Each must give what the generic path gives."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from veil.federation import TrainingPlan
from veil.federation.training import sgd_step
from veil.models import MLP, LogisticRegression, SmallCNN, get_parameters
from veil.privacy.dp.dpsgd import (
    DPSGDTrainer,
    NoiseBlocks,
    _sgd_update,
    poisson_batch,
    poisson_batches,
)
from veil.privacy.dp.per_sample import PerSampleClipper
from veil.privacy.dp.randomness import SeededRandom


def data(n: int, d: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * 3, torch.randint(0, k, (n,), generator=g)


class Chain(nn.Module):
    """A hand-written forward: flatten, functional and method activations."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 7)
        self.b = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(torch.flatten(x, 1)))
        return self.b(h.tanh()).sigmoid()


def fused_models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    frozen = MLP(6, [5], 3)
    frozen.layers[0].weight.requires_grad_(False)  # frozen weight, trainable bias
    frozen_bottom = MLP(6, [5, 4], 3)
    frozen_bottom.layers[0].requires_grad_(False)  # no gradient needed below layer 2
    no_bias = nn.Sequential(nn.Linear(6, 5, bias=False), nn.ReLU(), nn.Linear(5, 3))
    return {
        "logistic": LogisticRegression(6, 3),
        "mlp": MLP(6, [8, 4], 3),
        "activations": nn.Sequential(
            nn.Flatten(),
            nn.Linear(6, 5),
            nn.Tanh(),
            nn.Linear(5, 5),
            nn.GELU(),
            nn.Dropout(0.0),
            nn.Linear(5, 5),
            nn.LeakyReLU(0.1),
            nn.Linear(5, 4),
            nn.SiLU(),
            nn.Identity(),
            nn.Linear(4, 3),
            nn.Sigmoid(),
        ),
        "functional": Chain(),
        "frozen-weight": frozen,
        "frozen-bottom": frozen_bottom,
        "no-bias": no_bias,
    }


@pytest.mark.parametrize("name", list(fused_models()))
def test_fused_path_matches_layer_rules_and_torch_func(name: str) -> None:
    model = fused_models()[name]
    x, y = data(12, 6, 3)
    clipper = PerSampleClipper(model)
    assert clipper.method == "fused-linear"
    fused = clipper.clipped_sum(x, y, 0.5)
    rules = clipper._with_rules(x, y, 0.5)
    assert rules is not None
    slow = clipper._with_vmap(x, y, 0.5)
    assert set(fused.grads) == set(clipper.params)
    for other in (rules, slow):
        for key in fused.grads:
            torch.testing.assert_close(fused.grads[key], other.grads[key], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(fused.norms, other.norms, atol=1e-5, rtol=1e-4)
    # add_clipped_sum adds scale · the same sum into existing tensors.
    out = [torch.ones_like(p) for p in clipper.params.values()]
    norms = clipper.add_clipped_sum(x, y, 0.5, out, scale=0.25)
    torch.testing.assert_close(norms, fused.norms)
    for key, total in zip(clipper.params, out, strict=True):
        torch.testing.assert_close(total, 1 + 0.25 * fused.grads[key], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["logistic", "mlp", "no-bias"])
def test_fused_path_clips_every_example(name: str) -> None:
    model = fused_models()[name]
    x, y = data(16, 6, 3, seed=1)
    x = x * 50  # large inputs: most examples have gradients far above C
    clipper = PerSampleClipper(model)
    batch = clipper.clipped_sum(x, y, 0.3)
    assert int((batch.norms > 0.3).sum()) >= 8
    for i in range(x.shape[0]):
        one = clipper.clipped_sum(x[i : i + 1], y[i : i + 1], 0.3)
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in one.grads.values()))
        assert float(norm) <= 0.3 + 1e-6
        if batch.norms[i] > 0.3:
            assert float(norm) == pytest.approx(0.3, rel=1e-4)
        else:
            assert float(norm) == pytest.approx(float(batch.norms[i]), rel=1e-4, abs=1e-7)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(x + torch.relu(self.a(x)))


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(torch.relu(self.a(x)))))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight  # one tensor, two layers
        self.c = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent: fx cannot trace it
            return self.a(x)
        return self.a(-x)


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) * 2  # not an activation the chain knows


class HalfLinear(nn.Linear):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input) * 0.5


def custom_linear() -> nn.Module:
    return nn.Sequential(HalfLinear(6, 4), nn.ReLU(), nn.Linear(4, 3))


def hooked() -> nn.Module:
    model = MLP(6, [5], 3)
    model.layers[1].register_forward_hook(lambda m, i, o: o * 0.5)
    return model


@pytest.mark.parametrize(
    ("factory", "method"),
    [
        (Residual, "layer-rules"),
        (Shared, "layer-rules"),
        (Tied, "torch.func"),  # the layer rules would clip its two parts apart
        (Branchy, "layer-rules"),
        (Scaled, "layer-rules"),
        (hooked, "layer-rules"),
        (custom_linear, "layer-rules"),
        (lambda: MLP(6, [5], 3, dropout=0.3), "layer-rules"),
        (lambda: nn.Linear(6, 3), "layer-rules"),  # the root's own forward: F.linear
        (lambda: SmallCNN((1, 4, 4), 3, channels=(2, 3)), "layer-rules"),
        (lambda: nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3)), "torch.func"),
    ],
    ids=[
        "residual",
        "shared",
        "tied",
        "untraceable",
        "scaled",
        "hook",
        "custom-linear",
        "dropout",
        "bare-linear",
        "cnn",
        "layernorm",
    ],
)
def test_models_that_are_not_plain_chains_take_the_generic_path(
    factory: type[nn.Module], method: str
) -> None:
    torch.manual_seed(0)
    model = factory()
    clipper = PerSampleClipper(model)
    assert clipper.method == method
    d = 16 if isinstance(model, SmallCNN) else 6
    x, y = data(8, d, 3)
    batch = clipper.clipped_sum(x, y, 1.0)
    assert set(batch.grads) == set(clipper.params)


def test_custom_loss_is_never_fused() -> None:
    model = MLP(6, [5], 3)
    clipper = PerSampleClipper(model, loss=lambda out, y: F.cross_entropy(out, y, reduction="none"))
    assert clipper.method == "layer-rules"


def test_fused_path_defers_to_the_real_loss_where_a_batch_does_not_fit() -> None:
    model = MLP(6, [5], 3)
    clipper = PerSampleClipper(model)
    x, y = data(10, 6, 3)
    # ignore_index: cross-entropy gives those examples no gradient; the fused path steps aside.
    y_ignored = y.clone()
    y_ignored[:3] = -100
    got = clipper.clipped_sum(x, y_ignored, 1.0)
    want = clipper._with_vmap(x, y_ignored, 1.0)
    for key in got.grads:
        torch.testing.assert_close(got.grads[key], want.grads[key], atol=1e-5, rtol=1e-4)
    assert float(got.norms[:3].abs().max()) == 0.0
    # Eval mode (branches were traced in training mode) and rows that are not flat.
    model.eval()
    got = clipper.clipped_sum(x, y, 1.0)
    want = clipper._with_vmap(x, y, 1.0)
    for key in got.grads:
        torch.testing.assert_close(got.grads[key], want.grads[key], atol=1e-5, rtol=1e-4)
    model.train()
    seq = PerSampleClipper(nn.Sequential(nn.Linear(6, 3)))
    assert seq.method == "fused-linear"
    x3 = x.reshape(10, 1, 6).expand(10, 2, 6)
    y3 = torch.randint(0, 3, (10, 2))
    loss = seq.loss

    def flat_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return loss(out.reshape(-1, 3), target.reshape(-1)).reshape(out.shape[0], -1).sum(1)

    seq.loss = flat_loss
    got = seq.clipped_sum(x3, y3, 1.0)  # 2-D labels: not the fused path's loss
    want = seq._with_vmap(x3, y3, 1.0)
    for key in got.grads:
        torch.testing.assert_close(got.grads[key], want.grads[key], atol=1e-5, rtol=1e-4)


def test_hooks_of_another_clipper_do_not_block_fusing() -> None:
    model = MLP(6, [5], 3)
    first = PerSampleClipper(model)
    x, y = data(8, 6, 3)
    assert first._with_rules(x, y, 1.0) is not None  # registers its recording hooks
    assert PerSampleClipper(model).method == "fused-linear"


def trained(model: nn.Module, fused: bool, plan: TrainingPlan, seed: int) -> dict[str, np.ndarray]:
    trainer = DPSGDTrainer(
        noise_multiplier=0.7, clip_norm=0.5, source=SeededRandom(seed), production=False
    )
    clipper = trainer._clipper(model)
    assert clipper.method == "fused-linear"
    if not fused:
        clipper._chain = None  # force the layer rules
    x, y = data(300, 6, 3, seed=seed)
    trainer.train(model, x, y, plan, torch.Generator())
    return get_parameters(model)


@pytest.mark.parametrize(
    "plan",
    [
        TrainingPlan(epochs=2, batch_size=20, learning_rate=0.1),
        TrainingPlan(
            epochs=2,
            batch_size=20,
            learning_rate=0.1,
            momentum=0.9,
            weight_decay=0.01,
            proximal_mu=0.1,
        ),
    ],
    ids=["sgd", "momentum-decay-prox"],
)
def test_training_with_the_fused_path_matches_the_layer_rules(plan: TrainingPlan) -> None:
    torch.manual_seed(0)
    initial = MLP(6, [8], 3)
    a = MLP(6, [8], 3)
    b = MLP(6, [8], 3)
    a.load_state_dict(initial.state_dict())
    b.load_state_dict(initial.state_dict())
    fast = trained(a, True, plan, seed=4)
    slow = trained(b, False, plan, seed=4)
    before = get_parameters(initial)
    for key in fast:
        assert not np.allclose(fast[key], before[key])
        np.testing.assert_allclose(fast[key], slow[key], atol=1e-5, rtol=1e-4)


def test_foreach_update_matches_sgd_step() -> None:
    plan = TrainingPlan(
        epochs=1, batch_size=1, learning_rate=0.3, momentum=0.8, weight_decay=0.05, proximal_mu=0.2
    )
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (4,), ()]
    start = [torch.randn(s, generator=g) for s in shapes]
    anchor = [t + 0.1 for t in start]
    ours = [t.clone() for t in start]
    ref = [t.clone() for t in start]
    vel_ours = [torch.zeros_like(t) for t in start]
    vel_ref = [torch.zeros_like(t) for t in start]
    for _ in range(3):
        grads = [torch.randn(s, generator=g) for s in shapes]
        ref_grads = [
            gr + plan.proximal_mu * (p - a) for gr, p, a in zip(grads, ref, anchor, strict=True)
        ]
        for p, gr in zip(ref, ref_grads, strict=True):
            p.grad = gr
        sgd_step(ref, vel_ref, plan)
        _sgd_update(ours, [gr.clone() for gr in grads], vel_ours, anchor, plan)
    for mine, theirs in zip(ours, ref, strict=True):
        torch.testing.assert_close(mine, theirs)


def test_poisson_batches_of_one_step_equal_poisson_batch() -> None:
    for q in (0.05, 0.5):
        got = poisson_batches(SeededRandom(3), 200, q, 1)
        assert len(got) == 1
        np.testing.assert_array_equal(got[0], poisson_batch(SeededRandom(3), 200, q))
    assert [b.size for b in poisson_batches(SeededRandom(0), 5, 1.0, 3)] == [5, 5, 5]
    assert [b.size for b in poisson_batches(SeededRandom(0), 0, 0.5, 2)] == [0, 0]


def test_poisson_batches_are_independent_binomial_batches() -> None:
    # 4000 batches drawn 40 steps at a time: sizes fit Binomial(n, q) (chi-square, as for
    # poisson_batch), every example is sampled at rate q, and consecutive batches of a block
    # are uncorrelated.
    n, q, steps, blocks = 200, 0.05, 40, 100
    source = SeededRandom(7)
    batches = [b for _ in range(blocks) for b in poisson_batches(source, n, q, steps)]
    assert len(batches) == steps * blocks
    assert all(b.size == 0 or (b.min() >= 0 and b.max() < n) for b in batches)
    assert all(np.unique(b).size == b.size for b in batches)
    sizes = np.array([b.size for b in batches])
    support = np.arange(n + 1)
    expected = stats.binom.pmf(support, n, q) * sizes.size
    keep = expected >= 5
    observed = np.bincount(sizes, minlength=n + 1)
    obs = np.append(observed[keep], observed[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    exp *= obs.sum() / exp.sum()
    assert stats.chisquare(obs, exp).pvalue > 1e-3
    counts = np.bincount(np.concatenate(batches), minlength=n)
    draws = steps * blocks  # each example's count is Binomial(4000, q)
    z = (counts - draws * q) / math.sqrt(draws * q * (1 - q))
    assert stats.kstest(z, "norm").pvalue > 1e-3
    by_step = sizes.reshape(blocks, steps)
    r = np.corrcoef(by_step[:, :-1].ravel(), by_step[:, 1:].ravel())[0, 1]
    assert abs(r) < 4 / math.sqrt(by_step[:, 1:].size)


def test_noise_blocks_give_fresh_scaled_draws_for_every_step() -> None:
    params = [torch.zeros(30, 20), torch.zeros(20), torch.zeros(())]
    steps = 100
    noise = NoiseBlocks(SeededRandom(0), params, steps, scale=0.5)
    assert 1 < noise.per_block < steps  # several blocks
    draws = []
    for _ in range(steps):
        step = noise.next()
        assert [t.shape for t in step] == [p.shape for p in params]
        assert all(t.dtype == torch.float32 for t in step)
        draws.append(torch.cat([t.reshape(-1) for t in step]))
    with pytest.raises(RuntimeError):
        noise.next()  # never more than the schedule's steps
    flat = torch.stack(draws).double()
    # Nothing reused between steps, within or across blocks: successive steps are uncorrelated.
    r = np.corrcoef(flat[:-1].ravel().numpy(), flat[1:].ravel().numpy())[0, 1]
    assert abs(r) < 4 / math.sqrt(flat[1:].numel())
    assert float(flat.std()) == pytest.approx(0.5, rel=0.02)
    assert float(flat.mean()) == pytest.approx(0.0, abs=0.01)


def test_empty_batches_still_receive_noise_on_the_fused_path() -> None:
    class NeverSample(SeededRandom):
        def uniform(self, size: int) -> np.ndarray:
            return np.full(size, 1 - 1e-15)

    model = MLP(4, [6], 2)
    trainer = DPSGDTrainer(
        noise_multiplier=1.0, clip_norm=1.0, source=NeverSample(3), production=False
    )
    assert trainer._clipper(model).method == "fused-linear"
    before = get_parameters(model)
    x, y = data(50, 4, 2)
    plan = TrainingPlan(epochs=1, batch_size=10, learning_rate=0.1)
    assert trainer.train(model, x, y, plan, torch.Generator()).steps == 5
    after = get_parameters(model)
    assert all(not np.array_equal(before[k], after[k]) for k in before)
