"""Stacking (FLoRA, Wang et al. 2024) in the update pipeline: a client stage and an aggregator.

Each round every client starts from B = 0 and the shared A, trains its factors, and uploads them
(not its merged delta, which it never changes: `DropMergedStage`). The server's
`StackingAggregator` adds, client by client, wᵢ·s·Bᵢ·Aᵢ to a running dense sum per layer (the
product of FLoRA's stacked factors, `lora_aggregation.stack_factors`, without keeping every
client's factors), and turns the round into an aggregate that FedAvg's step applies as:

    merged delta D ← D + s·Σᵢ wᵢ·Bᵢ·Aᵢ / Σᵢ wᵢ   (exact)
    B ← 0, A unchanged (the factors restart; every other parameter is averaged as usual)

So the global model after a round is exactly the base plus the weighted mean of the clients'
low-rank updates. The server needs each client's own factors: stacking runs only where it may
see them (`secure_aggregation = "plain"`, no DP, no robust rule; the config refuses the rest).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from veil.federation.compression import Compressor
from veil.federation.lora_aggregation import is_factor, is_merged, lora_pairs, low_rank_update
from veil.federation.messages import FitResult
from veil.federation.pipeline import (
    Accumulator,
    Aggregate,
    ProtocolChannel,
    RoundContext,
    check_update,
)
from veil.tensors import NamedArrays, zeros_like


class DropMergedStage:
    """The first client stage under stacking: leave the merged deltas (unchanged by training,
    so zero in the update) out of the upload; only the factors and the other trainable
    parameters travel up."""

    name = "lora-stack"

    def apply(self, result: FitResult, context: RoundContext) -> FitResult:
        update = {n: a for n, a in result.update.items() if not is_merged(n)}
        return replace(result, update=update)


class StackingAggregator:
    """The server's sum under stacking (see the module). `scale` is LoRA's alpha / rank; with a
    `compressor`, each upload is decompressed first."""

    def __init__(self, scale: float, compressor: Compressor | None = None) -> None:
        if not scale > 0:
            raise ValueError(f"the LoRA scale must be positive, got {scale}")
        self.scale = scale
        self.compressor = compressor
        self.name = "lora-stack" + (f"+{compressor.name}" if compressor else "")

    def start(
        self,
        reference: NamedArrays,
        context: RoundContext,
        channel: ProtocolChannel | None = None,
    ) -> Accumulator:
        return _StackingAccumulator(reference, list(context.clients), self)


class _StackingAccumulator:
    def __init__(
        self, reference: NamedArrays, participants: list[str], rule: StackingAggregator
    ) -> None:
        self.participants = participants
        self._rule = rule
        self._global = reference
        self._pairs = lora_pairs(reference)
        missing = [p.merged for p in self._pairs if p.merged not in reference]
        if not self._pairs or missing:
            raise ValueError(
                "stacking needs a LoRA model with merged deltas (prepare_lora(..., 'stack')); "
                f"missing {missing[:1] or ['any LoRA factor']}"
            )
        self._upload = {n: a for n, a in reference.items() if not is_merged(n)}
        self._total = zeros_like(reference)
        self._weight = 0.0
        self._count = 0
        self._sums: dict[str, float] = {}

    def add(self, result: FitResult) -> None:
        if self._rule.compressor is not None:
            update = self._rule.compressor.decompress(result.update, self._upload)
            result = replace(result, update=update)
        check_update(self._upload, result)
        w = np.float32(result.weight)
        update = result.update
        for name in self._upload:
            if not is_factor(name):
                self._total[name] += w * update[name]
        for pair in self._pairs:
            b = self._global[pair.b] + update[pair.b]
            a = self._global[pair.a] + update[pair.a]
            self._total[pair.merged] += w * low_rank_update(b, a, self._rule.scale)
        self._weight += result.weight
        self._count += 1
        for key, value in result.sums.items():
            self._sums[key] = self._sums.get(key, 0.0) + value

    def finish(self) -> Aggregate:
        # The factors restart: the mean step takes B back to zero and leaves A where it is.
        for pair in self._pairs:
            self._total[pair.b] = np.float32(-self._weight) * self._global[pair.b]
        return Aggregate(
            total=self._total,
            weight=self._weight,
            count=self._count,
            sums=self._sums,
            report={"lora_aggregation": "stack"},
        )
