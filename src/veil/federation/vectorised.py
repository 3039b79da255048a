"""Vectorised simulation: a round's simulated clients trained together, in one batched computation.

A simulation of many small clients spends its time in per-client overhead (one tiny forward and
backward pass at a time), not in arithmetic. For models that are a chain of `nn.Linear` layers
with ReLUs between them (logistic regression, MLPs without dropout) trained by plain SGD on the
cross-entropy, `VectorisedTrainer` stacks every client's parameters into one tensor per layer and
runs each local step for all of them at once (`torch.bmm`), with the forward and backward passes
written out. It does exactly what `ClientRunner.fit` does client by client:

- the same per-client shuffling: each client's `torch.randperm` from its own generator, seeded as
  `ClientRunner` seeds it (the seeds of all clients derived at once by `derive_seeds`, and for
  small clients the permutations drawn at once too, by `randperms`);
- the same batches and SGD steps (momentum, weight decay and FedProx's proximal term included);
  clients of different sizes take different numbers of steps of different sizes: each step's
  rows are padded and masked, and a client with no rows left in a step is not updated by it;
- the same update (local minus global parameters, in float32), weight and `train_loss`; the
  updates also come as one `StackedUpdates` per chunk, which plain aggregation checks and sums
  in one pass (`fit_stacked`).

The results equal the per-client loop's to float32 rounding (tests: 1e-6). Anything else (another
model, a DP-SGD or attacking trainer, another loss, a frozen base, a client stage, secure or
robust aggregation) is not `vectorisable`, and the in-process transport then trains client by
client as before.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from veil.data import ClientData
from veil.federation.client import ClientRunner
from veil.federation.messages import FitInstruction, FitResult, TrainingPlan
from veil.federation.objective import CROSS_ENTROPY
from veil.federation.pipeline import StackedUpdates, WeightedSum
from veil.federation.training import SGDTrainer
from veil.models.tabular import MLP, LogisticRegression
from veil.seeding import Purpose
from veil.tensors import NamedArrays

#: Most clients trained in one batched computation (bounds the memory of a step's batch).
CHUNK_CLIENTS = 4096

_MASK32 = 0xFFFFFFFF
# numpy.random.SeedSequence's hash constants (numpy/random/bit_generator.pyx).
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R = 0xCA01F9DD, 0x4973F715
_POOL = 4


def derive_seeds(roots: Sequence[int], purpose: Purpose, *keys: int) -> list[int]:
    """`[veil.seeding.derive_seed(r, purpose, *keys) for r in roots]`, computed for all roots at
    once: numpy's `SeedSequence` hashing written out on arrays (one `SeedSequence` per root costs
    about 8 µs, the whole cost of a vectorised client's step). Roots must be in [0, 2**64)."""
    words = np.asarray([int(r) for r in roots], dtype=np.uint64)
    tail = [w for key in (int(purpose), *keys) for w in _uint32_words(int(key))]
    low, high = words & np.uint64(_MASK32), words >> np.uint64(32)
    out = np.zeros(len(words), dtype=np.uint64)
    for wide in (False, True):
        rows = (high > 0) == wide
        count = int(rows.sum())
        if not count:
            continue
        columns = [low[rows], *([high[rows]] if wide else [])]
        columns += [np.full(count, w, dtype=np.uint64) for w in tail]
        pool = _mixed_pool(columns)
        state, hash_const = [], _INIT_B
        for i in range(2):
            value = pool[i] ^ np.uint64(hash_const)
            hash_const = (hash_const * _MULT_B) & _MASK32
            value = (value * np.uint64(hash_const)) & np.uint64(_MASK32)
            state.append(value ^ (value >> np.uint64(16)))
        out[rows] = ((state[0] << np.uint64(31)) | state[1]) & np.uint64(2**63 - 1)
    return [int(s) for s in out]


def _uint32_words(n: int) -> list[int]:
    """An int's little-endian 32-bit words, as `SeedSequence` reads its entropy."""
    if n < 0:
        raise ValueError(f"seed words must be >= 0, got {n}")
    out = [n & _MASK32]
    while n > _MASK32:
        n >>= 32
        out.append(n & _MASK32)
    return out


def _mixed_pool(entropy: list[np.ndarray]) -> list[np.ndarray]:
    """`SeedSequence.mix_entropy` on columns of uint32 words (held in uint64, no overflow)."""
    hash_const = _INIT_A
    mask = np.uint64(_MASK32)

    def hashmix(value: np.ndarray) -> np.ndarray:
        nonlocal hash_const
        value = value ^ np.uint64(hash_const)
        hash_const = (hash_const * _MULT_A) & _MASK32
        value = (value * np.uint64(hash_const)) & mask
        return value ^ (value >> np.uint64(16))

    def mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        result: np.ndarray = np.bitwise_and(x * np.uint64(_MIX_L) - y * np.uint64(_MIX_R), mask)
        shifted: np.ndarray = result ^ (result >> np.uint64(16))
        return shifted

    zero = np.zeros_like(entropy[0])
    pool = [hashmix(entropy[i] if i < len(entropy) else zero) for i in range(_POOL)]
    for src in range(_POOL):
        for dst in range(_POOL):
            if src != dst:
                pool[dst] = mix(pool[dst], hashmix(pool[src]))
    for src in range(_POOL, len(entropy)):
        for dst in range(_POOL):
            pool[dst] = mix(pool[dst], hashmix(entropy[src]))
    return pool


# mt19937, as torch's CPU generator runs it (seeded with the seed's low 32 bits).
_MT_M, _MT_INIT = 397, np.uint32(1812433253)
#: Outputs of one twist that read only the seeded state (624 - 397).
_MT_ONE_TWIST = 227
#: Fewest client-epochs whose permutations `randperms` draws: its cost is mostly ~450 sequential
#: array steps whatever the number of clients, and torch draws one client-epoch in about the
#: time of one step.
BATCH_DRAWS_FROM = 512
_MT_MATRIX, _MT_UPPER, _MT_LOWER = (
    np.uint32(0x9908B0DF),
    np.uint32(0x80000000),
    np.uint32(0x7FFFFFFF),
)


def randperms(seeds: Sequence[int], sizes: np.ndarray, epochs: int) -> list[np.ndarray] | None:
    """Per epoch, (clients, max size) int64: row c is the `epochs` successive draws of
    `torch.randperm(sizes[c], generator=g)` after `g.manual_seed(seeds[c])`, padded with 0;
    computed for all clients at once. torch's CPU `randperm` of n is a Fisher-Yates shuffle
    taking n - 1 mt19937 outputs, output % (n - i) at step i; this writes that out on arrays
    for the first `_MT_ONE_TWIST` outputs. None when a client needs more, or when this torch
    draws otherwise (checked once per process): then `torch_randperms` draws them."""
    sizes = np.asarray(sizes, dtype=np.int64)
    steps = np.maximum(sizes - 1, 0)
    total = epochs * int(steps.max(initial=0))
    if total > _MT_ONE_TWIST or not _matches_torch():
        return None
    outputs = _mt_outputs(np.asarray([s & _MASK32 for s in seeds], dtype=np.uint32), total)
    width, count = int(sizes.max(initial=0)), len(sizes)
    step = np.arange(max(width - 1, 0), dtype=np.int64)[:, None]
    clients = np.arange(count, dtype=np.int64)
    # Clients with fewer steps draw nothing more: modulus 1, a swap with itself.
    modulus = np.maximum(sizes[None, :] - step, 1).astype(np.uint32)
    orders = []
    for epoch in range(epochs):
        drawn = outputs[np.minimum(epoch * steps[None, :] + step, max(total - 1, 0)), clients]
        # Flat (position, client) indices of each step's swap partner.
        partner = (step + drawn % modulus) * count + clients
        flat = np.repeat(np.arange(width, dtype=np.int64), count)
        for i in range(width - 1):
            here = slice(i * count, (i + 1) * count)
            moved = flat.take(partner[i])
            flat[partner[i]] = flat[here]
            flat[here] = moved
        order = np.ascontiguousarray(flat.reshape(width, count).T)
        order[np.arange(width)[None, :] >= sizes[:, None]] = 0
        orders.append(order)
    return orders


def _mt_outputs(seeds: np.ndarray, count: int) -> np.ndarray:
    """(count, clients): each uint32 seed's first `count` (<= `_MT_ONE_TWIST`) mt19937
    outputs."""
    last = _MT_M + count  # state words the first `count` outputs read
    state = np.empty((last, len(seeds)), dtype=np.uint32)
    state[0] = seeds
    scratch = np.empty(len(seeds), dtype=np.uint32)
    words = list(state)  # row views made once: the loop is ufunc-call bound
    for j in range(1, last):
        previous, word = words[j - 1], words[j]
        np.right_shift(previous, 30, out=scratch)
        np.bitwise_xor(scratch, previous, out=scratch)
        np.multiply(scratch, _MT_INIT, out=word)
        np.add(word, j, out=word)
    y = (state[:count] & _MT_UPPER) | (state[1 : count + 1] & _MT_LOWER)
    y = state[_MT_M : _MT_M + count] ^ (y >> 1) ^ ((y & 1) * _MT_MATRIX)
    y ^= y >> 11
    y ^= (y << 7) & np.uint32(0x9D2C5680)
    y ^= (y << 15) & np.uint32(0xEFC60000)
    y ^= y >> 18
    return y


def torch_randperms(seeds: Sequence[int], sizes: Sequence[int], epochs: int) -> list[torch.Tensor]:
    """Per epoch, (clients, max size): each client's `epochs` successive `torch.randperm`
    draws from a generator seeded with its seed (what `train_epochs` draws), padded with 0."""
    per_epoch: list[list[torch.Tensor]] = [[] for _ in range(epochs)]
    generator = torch.Generator()
    for seed, size in zip(seeds, sizes, strict=True):
        generator.manual_seed(seed)
        for epoch in range(epochs):
            per_epoch[epoch].append(torch.randperm(size, generator=generator))
    if len(set(sizes)) == 1:
        return [torch.stack(perms) for perms in per_epoch]  # much faster than padding
    return [pad_sequence(perms, batch_first=True) for perms in per_epoch]


_TORCH_MATCH: list[bool] = []


def _matches_torch() -> bool:
    """Whether `randperms` draws what this torch's `randperm` does (checked once)."""
    if not _TORCH_MATCH:
        _TORCH_MATCH.append(True)  # lets `randperms` run for the check
        seeds, sizes, epochs = [0, 7, 2**40 + 3, 2**63 - 5], [1, 2, 33, 50], 3
        ours = randperms(seeds, np.asarray(sizes), epochs)
        theirs = torch_randperms(seeds, sizes, epochs)
        _TORCH_MATCH[0] = ours is not None and all(
            torch.equal(torch.from_numpy(a), b) for a, b in zip(ours, theirs, strict=True)
        )
    return _TORCH_MATCH[0]


def linear_chain(model: nn.Module) -> list[tuple[str, nn.Linear]] | None:
    """The (name, layer) pairs of a model that is `Linear` layers with a ReLU between each two
    (`LogisticRegression`, an `MLP` without dropout), every parameter trainable; None for any
    other model (a subclass, dropout, another layer or activation)."""
    if type(model) is LogisticRegression:
        chain: list[tuple[str, nn.Module]] = [("linear", model.linear)]
    elif type(model) is MLP:
        chain = [(f"layers.{name}", layer) for name, layer in model.layers.named_children()]
    else:
        return None
    linears = [(name, layer) for name, layer in chain if type(layer) is nn.Linear]
    shape_ok = len(chain) == 2 * len(linears) - 1 and all(
        type(layer) is (nn.Linear if i % 2 == 0 else nn.ReLU) for i, (_, layer) in enumerate(chain)
    )
    if not shape_ok or any(layer.bias is None for _, layer in linears):
        return None
    if not all(p.requires_grad for p in model.parameters()):
        return None
    return [(name, layer) for name, layer in linears if isinstance(layer, nn.Linear)]


def vectorisable(model: nn.Module, runners: Iterable[ClientRunner]) -> str | None:
    """Why `runners` cannot train together on `model` (None: they can): the model must be a
    `linear_chain`, every runner's trainer plain SGD on the cross-entropy, and its updates go
    unchanged to plain aggregation (`WeightedSum`: no client stage, protocol or robust rule).

    Batched and per-client training agree to float32 rounding, not bit for bit, and a step
    that is not continuous in the update (int8 or top-k compression, SecAgg's fixed-point
    encoding, Krum's choice) can turn a 1e-8 difference into a whole quantum or another pick.
    """
    if linear_chain(model) is None:
        return f"{type(model).__name__} is not a chain of Linear layers and ReLUs"
    for runner in runners:
        trainer = runner.trainer
        if type(trainer) is not SGDTrainer or trainer.objective != CROSS_ENTROPY:
            return f"client '{runner.name}' trains with {trainer.name}, not plain SGD"
        pipeline = runner.pipeline
        if pipeline.client_stages or runner.protocol is not None:
            return f"client '{runner.name}' transforms its update before sending it"
        if type(pipeline.aggregator) is not WeightedSum:
            return f"updates are summed by '{pipeline.aggregator.name}', not plainly"
    return None


@dataclass
class _Chunk:
    """Clients trained together: their data rows, sizes and stacked parameters."""

    names: list[str]
    offsets: torch.Tensor  # (C,) first row of each client in the flat data
    sizes: torch.Tensor  # (C,) examples per client
    weights: list[torch.Tensor]  # per layer (C, out, in)
    biases: list[torch.Tensor]  # per layer (C, out)


class VectorisedTrainer:
    """Trains any subset of its clients for one round in one batched computation, with the
    results of `ClientRunner.fit` client by client (see the module's docstring)."""

    def __init__(
        self,
        model: nn.Module,
        runners: Mapping[str, ClientRunner],
        data: Mapping[str, ClientData],
    ) -> None:
        """`data[name]` is the data `runners[name]` was built with. ValueError unless
        `vectorisable(model, runners)`."""
        reason = vectorisable(model, runners.values())
        if reason is not None:
            raise ValueError(f"cannot vectorise this simulation: {reason}")
        self.runners = dict(runners)
        self.layers = [name for name, _ in linear_chain(model) or []]
        xs = [np.asarray(data[name].x_train, np.float32) for name in self.runners]
        xs = [x.reshape(len(x), int(np.prod(x.shape[1:]))) for x in xs]  # as the model flattens
        sizes = [len(x) for x in xs]
        self._x = torch.from_numpy(np.concatenate(xs))
        self._y = torch.from_numpy(
            np.concatenate([np.asarray(data[n].y_train, np.int64) for n in self.runners])
        )
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self._start = {name: int(s) for name, s in zip(self.runners, starts, strict=True)}
        self._size = {name: n for name, n in zip(self.runners, sizes, strict=True)}

    def eligible(self, name: str, instruction: FitInstruction) -> bool:
        """Whether `name`'s round can be trained in the batch: it has training data, does not
        keep its last update (a deployment member's behaviour) and no frozen base is named."""
        runner = self.runners.get(name)
        return (
            runner is not None
            and self._size[name] > 0
            and not runner.remember_last
            and instruction.plan.base_model is None
        )

    def fit(self, names: Sequence[str], instruction: FitInstruction) -> dict[str, FitResult]:
        """Each named client's `FitResult` (what `ClientRunner.fit` returns), all trained
        together; names must be `eligible`."""
        return {
            result.client: result
            for stack in self.fit_stacked(names, instruction)
            for result in stack.results
        }

    def fit_stacked(
        self, names: Sequence[str], instruction: FitInstruction
    ) -> list[StackedUpdates]:
        """`fit`'s results as stacks (one per chunk of at most `CHUNK_CLIENTS` clients): each
        result's update arrays are views of its row, so a plain aggregator can check and sum
        a stack at once (`StackedUpdates`)."""
        order = sorted(names, key=lambda n: self._size[n])  # similar sizes pad little
        return [
            self._fit_chunk(order[at : at + CHUNK_CLIENTS], instruction)
            for at in range(0, len(order), CHUNK_CLIENTS)
        ]

    def _fit_chunk(self, names: list[str], instruction: FitInstruction) -> StackedUpdates:
        chunk = self._stack(names, instruction.parameters)
        orders = self._orders(chunk, instruction)
        losses = _train_chunk(chunk, self._x, self._y, orders, instruction.plan)
        return self._results(chunk, instruction, losses)

    def _stack(self, names: list[str], parameters: NamedArrays) -> _Chunk:
        count = len(names)
        weights = [
            torch.from_numpy(parameters[f"{layer}.weight"]).expand(count, -1, -1).clone()
            for layer in self.layers
        ]
        biases = [
            torch.from_numpy(parameters[f"{layer}.bias"]).expand(count, -1).clone()
            for layer in self.layers
        ]
        return _Chunk(
            names=names,
            offsets=torch.tensor([self._start[n] for n in names], dtype=torch.int64),
            sizes=torch.tensor([self._size[n] for n in names], dtype=torch.int64),
            weights=weights,
            biases=biases,
        )

    def _orders(self, chunk: _Chunk, instruction: FitInstruction) -> list[torch.Tensor]:
        """Per epoch, each client's visiting order (C, max size), padded with row 0: the
        permutations `train_epochs` draws from the client's own generator."""
        epochs = instruction.plan.epochs
        seeds = derive_seeds(
            [self.runners[n].seed for n in chunk.names], Purpose.LOCAL_TRAINING, instruction.round
        )
        drawn = None
        if len(seeds) * epochs >= BATCH_DRAWS_FROM:
            drawn = randperms(seeds, chunk.sizes.numpy(), epochs)
        if drawn is not None:
            return [torch.from_numpy(order) for order in drawn]
        return torch_randperms(seeds, [self._size[name] for name in chunk.names], epochs)

    def _results(
        self, chunk: _Chunk, instruction: FitInstruction, losses: list[float]
    ) -> StackedUpdates:
        updates: dict[str, np.ndarray] = {}
        for layer, weight, bias in zip(self.layers, chunk.weights, chunk.biases, strict=True):
            for suffix, stacked in (("weight", weight), ("bias", bias)):
                name = f"{layer}.{suffix}"
                updates[name] = stacked.numpy() - instruction.parameters[name]
        sizes = [self._size[name] for name in chunk.names]
        keys = list(updates)
        rows = zip(*(list(stacked) for stacked in updates.values()), strict=True)  # row views
        results = tuple(
            FitResult(
                client=name,
                round=instruction.round,
                update=dict(zip(keys, row, strict=True)),
                weight=float(size),
                num_examples=size,
                metrics={"train_loss": loss},
            )
            for name, size, loss, row in zip(chunk.names, sizes, losses, rows, strict=True)
        )
        return StackedUpdates(results, updates, np.asarray(sizes, dtype=np.float64))


@torch.no_grad()
def _train_chunk(
    chunk: _Chunk, x: torch.Tensor, y: torch.Tensor, orders: list[torch.Tensor], plan: TrainingPlan
) -> list[float]:
    """`train_epochs` for every client of `chunk` at once, in place on its stacked parameters;
    returns each client's mean batch loss."""
    params = [*chunk.weights, *chunk.biases]
    anchor = [p.clone() for p in params] if plan.proximal_mu > 0 else []
    velocity = [torch.zeros_like(p) for p in params] if plan.momentum > 0 else []
    sizes = chunk.sizes
    total = torch.zeros(len(chunk.names), dtype=torch.float64)
    for order in orders:
        for start in range(0, order.shape[1], plan.batch_size):
            count = (sizes - start).clamp(0, plan.batch_size)
            rows = chunk.offsets[:, None] + order[:, start : start + plan.batch_size]
            width = rows.shape[1]
            # None where every client has a full batch of `width` rows: nothing to mask.
            valid = None if bool((count == width).all()) else torch.arange(width) < count[:, None]
            loss, grads = _gradients(chunk, x[rows], y[rows], count, valid)
            total += loss
            active = None if valid is None else count > 0
            _sgd_update(params, [*grads[0], *grads[1]], velocity, anchor, plan, active)
    steps = plan.epochs * torch.div(
        sizes + plan.batch_size - 1, plan.batch_size, rounding_mode="floor"
    )
    means: list[float] = (total / steps).tolist()
    return means


def _gradients(
    chunk: _Chunk,
    xb: torch.Tensor,
    yb: torch.Tensor,
    count: torch.Tensor,
    valid: torch.Tensor | None,
) -> tuple[torch.Tensor, tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Each client's mean cross-entropy over its `count` valid rows of the batch (xb, yb), and
    its gradients (weights, biases): autograd's, written out for the Linear/ReLU chain."""
    inputs, pre = [], []
    h = xb
    last = len(chunk.weights) - 1
    for layer, (weight, bias) in enumerate(zip(chunk.weights, chunk.biases, strict=True)):
        inputs.append(h)
        out = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
        if layer < last:
            pre.append(out)
            h = out.clamp_min(0)
        else:
            h = out
    logp = torch.log_softmax(h, dim=2)
    labels = yb.unsqueeze(2)
    nll = -logp.gather(2, labels).squeeze(2)
    denominator = count.clamp_min(1).to(torch.float32)
    grad = logp.exp()
    grad.scatter_add_(2, labels, torch.full_like(nll, -1.0).unsqueeze(2))
    grad /= denominator[:, None, None]
    if valid is not None:
        nll = nll * valid
        grad *= valid.unsqueeze(2)
    loss = nll.sum(1) / denominator
    weight_grads: list[torch.Tensor] = [torch.empty(0)] * len(chunk.weights)
    bias_grads: list[torch.Tensor] = [torch.empty(0)] * len(chunk.weights)
    for layer in range(last, -1, -1):
        weight_grads[layer] = torch.bmm(grad.transpose(1, 2), inputs[layer])
        bias_grads[layer] = grad.sum(1)
        if layer > 0:
            grad = torch.bmm(grad, chunk.weights[layer]) * (pre[layer - 1] > 0)
    return loss, (weight_grads, bias_grads)


def _sgd_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    velocity: list[torch.Tensor],
    anchor: list[torch.Tensor],
    plan: TrainingPlan,
    active: torch.Tensor | None,
) -> None:
    """`sgd_step` (and FedProx's proximal gradient) on stacked parameters, in place; clients
    not `active` (None: all are) keep their parameters and velocity."""
    for i, (p, grad) in enumerate(zip(params, grads, strict=True)):
        mask = None if active is None else active.view(-1, *([1] * (p.dim() - 1)))
        if anchor:
            grad = grad + plan.proximal_mu * (p - anchor[i])
        if plan.weight_decay:
            grad = grad.add(p, alpha=plan.weight_decay)
        if velocity:
            moved = velocity[i].mul(plan.momentum).add_(grad)
            velocity[i] = moved if mask is None else torch.where(mask, moved, velocity[i])
            grad = velocity[i]
        if mask is not None:
            grad = grad * mask
        p.add_(grad, alpha=-plan.learning_rate)
