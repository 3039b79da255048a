"""Record-level DP-SGD on a client (Abadi et al. 2016, "Deep Learning with Differential Privacy").

Each step: Poisson sampling (every example joins the batch independently with probability q, so
batch sizes follow Binomial(n, q)); each example's gradient clipped to norm C; Gaussian noise
N(0, σ²C²) added to the clipped sum on every step, empty batches included; the sum divided by the
expected batch size q·n, never by the realised one (which would leak the batch size). The training
loss is not reported: it is a function of the records and not covered by the guarantee.

A sampled example whose gradient is not finite (the model overflowed on an extreme record)
contributes zero, like an example that was not sampled (`veil.privacy.dp.per_sample`). How many
did is counted in `DPSGDTrainer.nonfinite_examples` and logged on the client; it is not part of
the update or of any metric, since whether one record was sampled is exactly what DP hides.

The accountant composes exactly the schedule that `poisson_schedule` gives, so training and
accounting cannot disagree.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from veil.federation.messages import TrainingPlan
from veil.federation.training import TrainStats
from veil.privacy.dp.per_sample import PerSampleClipper
from veil.privacy.dp.randomness import RandomSource, require_secure

logger = logging.getLogger(__name__)


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
    return _bernoulli_positions(source, n_examples, sampling_rate)


def poisson_batches(
    source: RandomSource, n_examples: int, sampling_rate: float, steps: int
) -> list[np.ndarray]:
    """The batches of `steps` consecutive steps, each Poisson-sampled as by `poisson_batch`.

    The steps·n (step, example) pairs are one Bernoulli process of steps·n slots, each in
    independently with probability q, slot s being example s mod n of step s div n: exactly the
    distribution of `steps` independent calls, for one call to the source instead of one per step.
    """
    if sampling_rate >= 1:
        return [np.arange(n_examples) for _ in range(steps)]
    if n_examples <= 0 or steps <= 0:
        return [np.zeros(0, dtype=np.int64) for _ in range(steps)]
    slots = _bernoulli_positions(source, steps * n_examples, sampling_rate)
    bounds = np.searchsorted(slots, np.arange(1, steps) * n_examples)
    return np.split(slots % n_examples, bounds)


def _bernoulli_positions(source: RandomSource, n: int, rate: float) -> np.ndarray:
    """The sorted positions in [0, n) kept by n independent Bernoulli(rate) trials, 0 < rate < 1."""
    expected = rate * n
    log_miss = math.log1p(-rate)
    position = -1
    chunks = []
    while True:
        k = int(expected + 4 * math.sqrt(expected) + 16)
        u = 1.0 - source.uniform(k)  # in (0, 1]
        gaps = np.floor(np.log(u) / log_miss).astype(np.int64) + 1
        positions = position + np.cumsum(gaps)
        inside = positions[positions < n]
        chunks.append(inside)
        if inside.size < k:
            return np.concatenate(chunks)
        position = int(positions[-1])


#: Steps whose batches are sampled and gathered together, at most, and the most bytes of examples
#: gathered at once (in expectation).
_BATCH_BLOCK_STEPS = 32
_BATCH_BLOCK_BYTES = 1 << 22


class DPSGDTrainer:
    """A `LocalTrainer` that runs DP-SGD with a fixed noise multiplier and clipping norm.

    `source` draws the Poisson sampling and the noise. In `production` (the default) a seeded
    source is refused with a `ConfigError` (`require_secure`); tests pass ``production=False``.
    `loss` is the per-example loss (reduction "none", shape ``(n,)``) whose gradients are
    clipped; default cross-entropy (a regression run passes its squared or Huber loss,
    `veil.federation.objective.Objective.per_example`).
    """

    name = "dp-sgd"

    def __init__(
        self,
        *,
        noise_multiplier: float,
        clip_norm: float,
        source: RandomSource,
        production: bool = True,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        require_secure(source, production=production, what="DP-SGD trainer")
        if not noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
        if not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
        self.noise_multiplier = noise_multiplier
        self.clip_norm = clip_norm
        self.source = source
        self.loss = loss
        self._clippers: dict[int, PerSampleClipper] = {}
        #: Sampled examples whose per-sample gradient was not finite and so contributed zero, over
        #: all of this trainer's training. Stays on the client: never sent, never in a metric.
        self.nonfinite_examples = 0

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
        # Updated in place outside autograd, like `sgd_step` under no_grad.
        params = [p.detach() for p in clipper.params.values()]
        velocity = [torch.zeros_like(p) for p in params] if plan.momentum > 0 else []
        anchor = [p.clone() for p in params] if plan.proximal_mu > 0 else []
        expected_batch = q * n
        # grad = (Σ clipped + N(0, σ²C²)) / (q·n): the noise term drawn ahead, already scaled.
        noise = NoiseBlocks(
            self.source, params, steps, self.noise_multiplier * self.clip_norm / expected_batch
        )
        device = params[0].device if params else torch.device("cpu")
        # Batches are sampled, and their examples gathered, several steps at a time.
        step_bytes = (expected_batch + 1) * math.prod(x.shape[1:]) * x.element_size()
        per_block = max(1, min(_BATCH_BLOCK_STEPS, int(_BATCH_BLOCK_BYTES / step_bytes)))
        model.train()
        nonfinite_before = clipper.nonfinite
        for first in range(0, steps, per_block):
            batches = poisson_batches(self.source, n, q, min(per_block, steps - first))
            sizes = [int(b.size) for b in batches]
            idx = torch.from_numpy(np.concatenate(batches))
            # Gathered in host memory, moved to the model's device in one copy per block.
            xs = torch.split(x[idx].to(device), sizes)
            ys = torch.split(y[idx].to(device), sizes)
            for size, xb, yb in zip(sizes, xs, ys, strict=True):
                grads = noise.next()
                if size:
                    clipper.add_clipped_sum(xb, yb, self.clip_norm, grads, 1.0 / expected_batch)
                _sgd_update(params, grads, velocity, anchor, plan)
        nonfinite = clipper.nonfinite - nonfinite_before
        if nonfinite:
            self.nonfinite_examples += nonfinite
            logger.warning(
                "DP-SGD: %d sampled example(s) had a non-finite gradient (the model overflowed on "
                "them) and contributed zero to their step; check the data for extreme values. "
                "This count stays on this machine.",
                nonfinite,
            )
        return TrainStats(loss=None, steps=steps)

    def _clipper(self, model: nn.Module) -> PerSampleClipper:
        key = id(model)
        clipper = self._clippers.get(key)
        if clipper is None or clipper.model is not model:
            clipper = self._clippers[key] = PerSampleClipper(model, self.loss)
        return clipper


class NoiseBlocks:
    """Gaussian noise for every step, drawn from the source several steps at a time.

    `next()` returns, per parameter, a fresh tensor of i.i.d. N(0, 1)·`scale` draws (one step's
    noise; the caller may write into it) on the parameters' device and in their dtype. Drawing
    a block of steps at once amortises the source's per-call cost; the draws are i.i.d., so their
    grouping changes nothing about their distribution. A block holds at most `_BLOCK_FLOATS`
    numbers, and never more steps than remain.

    The draws come from `source` (the host's CSPRNG) and are copied to the device one block at
    a time: a GPU's own generator (Philox) is not cryptographically secure, and copying changes
    no value, so the noise is exactly as unpredictable as the host source (`veil.devices`).
    """

    _BLOCK_FLOATS = 1 << 15
    _BLOCK_STEPS = 32

    def __init__(
        self, source: RandomSource, params: list[torch.Tensor], steps: int, scale: float
    ) -> None:
        self.source = source
        self.shapes = [p.shape for p in params]
        self.sizes = [p.numel() for p in params]
        self.total = sum(self.sizes)
        self.dtype = params[0].dtype if params else torch.float32
        self.device = params[0].device if params else torch.device("cpu")
        self.scale = scale
        self.remaining = steps
        self.per_block = max(1, min(self._BLOCK_STEPS, self._BLOCK_FLOATS // max(self.total, 1)))
        self._steps: list[tuple[torch.Tensor, ...]] = []  # per parameter: a view per step
        self._next = self._drawn = 0

    def next(self) -> list[torch.Tensor]:
        if self._next == self._drawn:
            self._refill()
        i = self._next
        self._next += 1
        return [views[i] for views in self._steps]

    def _refill(self) -> None:
        k = min(self.per_block, self.remaining)
        if k <= 0:
            raise RuntimeError("all the noise of this schedule was drawn")
        self.remaining -= k
        draws = self.source.standard_normal(k * self.total)
        host = torch.from_numpy(draws).to(self.dtype).mul_(self.scale)
        block = host.to(self.device).view(k, self.total)
        self._steps = [
            chunk.view(k, *shape).unbind(0)
            for chunk, shape in zip(torch.split(block, self.sizes, dim=1), self.shapes, strict=True)
        ]
        self._next, self._drawn = 0, k


def _sgd_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    velocity: list[torch.Tensor],
    anchor: list[torch.Tensor],
    plan: TrainingPlan,
) -> None:
    """The update of `sgd_step` (FedProx term, weight decay, momentum) with `foreach` kernels:
    one call per rule for all parameters instead of one per parameter. `grads` is scratch."""
    if anchor:
        torch._foreach_add_(grads, torch._foreach_sub(params, anchor), alpha=plan.proximal_mu)
    if plan.weight_decay:
        torch._foreach_add_(grads, params, alpha=plan.weight_decay)
    if velocity:
        torch._foreach_mul_(velocity, plan.momentum)
        torch._foreach_add_(velocity, grads)
        grads = velocity
    torch._foreach_add_(params, grads, alpha=-plan.learning_rate)
