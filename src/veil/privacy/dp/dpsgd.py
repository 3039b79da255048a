"""Record-level DP-SGD on a client (Abadi et al. 2016, "Deep Learning with Differential Privacy").

Each step: Poisson sampling (every example joins the batch independently with probability q, so
batch sizes follow Binomial(n, q)); each example's gradient clipped to norm C; Gaussian noise
N(0, σ²C²) added to the clipped sum on every step, empty batches included; the sum divided by the
expected batch size q·n, never by the realised one (which would leak the batch size). The training
loss is not reported: it is a function of the records and not covered by the guarantee.

The accountant composes exactly the schedule that `poisson_schedule` gives, so training and
accounting cannot disagree.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from veil.federation.messages import TrainingPlan
from veil.federation.training import TrainStats, sgd_step
from veil.privacy.dp.per_sample import PerSampleClipper
from veil.privacy.dp.randomness import RandomSource


def poisson_schedule(n_examples: int, expected_batch_size: int, epochs: int) -> tuple[float, int]:
    """(sampling rate q, steps) for `epochs` passes of Poisson-sampled batches.

    q = min(1, b/n) and steps = epochs · ⌈n/b⌉, so that one "epoch" visits n examples in
    expectation. No data (n = 0) gives (1.0, 0): nothing to protect, nothing to train.
    """
    if n_examples <= 0:
        return 1.0, 0
    q = min(1.0, expected_batch_size / n_examples)
    return q, epochs * math.ceil(n_examples / expected_batch_size)


def poisson_batch(source: RandomSource, n_examples: int, sampling_rate: float) -> np.ndarray:
    """Indices of one Poisson-sampled batch: each example independently with probability q.

    Drawn as the gaps between successive members, which are i.i.d. Geometric(q) in a Bernoulli
    process, so a batch costs about q·n random draws instead of n.
    """
    if sampling_rate >= 1:
        return np.arange(n_examples)
    if n_examples <= 0:
        return np.zeros(0, dtype=np.int64)
    expected = sampling_rate * n_examples
    log_miss = math.log1p(-sampling_rate)
    position = -1
    chunks = []
    while True:
        k = int(expected + 4 * math.sqrt(expected) + 16)
        u = 1.0 - source.uniform(k)  # in (0, 1]
        gaps = np.floor(np.log(u) / log_miss).astype(np.int64) + 1
        positions = position + np.cumsum(gaps)
        inside = positions[positions < n_examples]
        chunks.append(inside)
        if inside.size < k:
            return np.concatenate(chunks)
        position = int(positions[-1])


class DPSGDTrainer:
    """A `LocalTrainer` that runs DP-SGD with a fixed noise multiplier and clipping norm."""

    name = "dp-sgd"

    def __init__(self, *, noise_multiplier: float, clip_norm: float, source: RandomSource) -> None:
        if not noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
        if not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
        self.noise_multiplier = noise_multiplier
        self.clip_norm = clip_norm
        self.source = source
        self._clippers: dict[int, PerSampleClipper] = {}

    def train(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        plan: TrainingPlan,
        generator: torch.Generator,
    ) -> TrainStats:
        """Train in place; `generator` is unused: sampling and noise come from `source`."""
        n = int(x.shape[0])
        q, steps = poisson_schedule(n, plan.batch_size, plan.epochs)
        if steps == 0:
            return TrainStats(loss=None, steps=0)
        clipper = self._clipper(model)
        params = list(clipper.params.values())
        names = list(clipper.params)
        sizes = [p.numel() for p in params]
        total = sum(sizes)
        velocity = [torch.zeros_like(p) for p in params] if plan.momentum > 0 else []
        anchor = [p.detach().clone() for p in params] if plan.proximal_mu > 0 else []
        expected_batch = q * n
        std = self.noise_multiplier * self.clip_norm
        model.train()
        for _ in range(steps):
            chosen = poisson_batch(self.source, n, q)
            if chosen.size:
                idx = torch.from_numpy(chosen)
                sums = clipper.clipped_sum(x[idx], y[idx], self.clip_norm).grads
            else:
                sums = {}
            noise = torch.from_numpy(self.source.standard_normal(total).astype(np.float32))
            # grad = (Σ clipped + N(0, σ²C²)) / (q·n), the noise drawn as one block.
            noise.mul_(std / expected_batch)
            for i, chunk in enumerate(torch.split(noise, sizes)):
                p = params[i]
                g = chunk.view(p.shape)
                summed = sums.get(names[i])
                if summed is not None:
                    g.add_(summed, alpha=1.0 / expected_batch)
                if anchor:
                    g.add_(p.detach() - anchor[i], alpha=plan.proximal_mu)
                p.grad = g
            sgd_step(params, velocity, plan)
        return TrainStats(loss=None, steps=steps)

    def _clipper(self, model: nn.Module) -> PerSampleClipper:
        key = id(model)
        clipper = self._clippers.get(key)
        if clipper is None or clipper.model is not model:
            clipper = self._clippers[key] = PerSampleClipper(model)
        return clipper
