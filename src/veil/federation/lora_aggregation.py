"""Aggregating LoRA adapters: the mean of the clients' low-rank updates, and how close each rule
gets to it. Pure functions on `NamedArrays` (NumPy), named as `peft` names the parameters.

A LoRA layer adds ΔW = s·B·A to a frozen weight (s = alpha / rank, A: rank × in, B: out × rank).
The update a federation wants is the weighted mean of the clients' updates, s·Σᵢ wᵢ·Bᵢ·Aᵢ / Σᵢ wᵢ.
Averaging the factors separately (FedAvg on B and on A, "average") gives s·mean(B)·mean(A),
which differs by the cross terms; the error grows with how far the clients' factors drift apart.

Two exact rules (docs/llm.md, "Aggregating LoRA"):

- FFA-LoRA (Sun et al. 2024): A is frozen at a shared init on every party, so mean(Bᵢ)·A =
  mean(Bᵢ·A) and averaging B is exact; only B travels.
- Stacking (FLoRA, Wang et al. 2024): the server stacks the factors, B = [w₁B₁ | … | w_kB_k] / Σw,
  A = [A₁; …; A_k], so that s·B·A = s·Σ wᵢBᵢAᵢ / Σw exactly (`stack_factors`); Veil then merges
  that product into a dense delta of the layer (`MERGED`) and the factors restart.

Names: a layer `L` with adapter `d` has `L.lora_A.d.weight` and `L.lora_B.d.weight`; stacking
adds `L.lora_merged`, the dense merged delta (out × in) that travels with the global model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from veil.tensors import Array, NamedArrays

#: The markers of LoRA factor names, as peft writes them.
LORA_A = ".lora_A."
LORA_B = ".lora_B."
#: The suffix of a layer's merged dense delta under stacking.
MERGED = ".lora_merged"


@dataclass(frozen=True)
class LoRAPair:
    """The names of one LoRA layer's factors, and of its merged delta under stacking."""

    layer: str
    a: str
    b: str

    @property
    def merged(self) -> str:
        return self.layer + MERGED


def is_factor(name: str) -> bool:
    """Whether `name` is a LoRA factor (an A or a B matrix)."""
    return LORA_A in name or LORA_B in name


def is_merged(name: str) -> bool:
    """Whether `name` is a layer's merged dense delta (stacking)."""
    return name.endswith(MERGED)


def lora_pairs(names: Iterable[str]) -> list[LoRAPair]:
    """Each LoRA layer's A and B names, in the order of the A names; `ValueError` when a factor
    lacks its partner (not a peft LoRA parameter set)."""
    names = list(names)
    present = set(names)
    pairs = []
    for name in names:
        if LORA_A not in name:
            continue
        layer, _, rest = name.partition(LORA_A)
        b = f"{layer}{LORA_B}{rest}"
        if b not in present:
            raise ValueError(f"LoRA factor '{name}' has no B factor '{b}'")
        pairs.append(LoRAPair(layer, name, b))
    paired = {p.b for p in pairs}
    lonely = [n for n in names if LORA_B in n and n not in paired]
    if lonely:
        raise ValueError(f"LoRA factor '{lonely[0]}' has no A factor")
    return pairs


def low_rank_update(b: np.ndarray, a: np.ndarray, scale: float) -> Array:
    """s·B·A as float32 (out × in), computed in float64."""
    product = scale * (b.astype(np.float64) @ a.astype(np.float64))
    return product.astype(np.float32)


def _normalised(weights: Sequence[float], count: int) -> list[float]:
    if len(weights) != count or count == 0:
        raise ValueError(f"need one weight per client ({count} clients), got {len(weights)}")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"the weights must sum to a positive number, got {total}")
    return [float(w) / total for w in weights]


def mean_of_products(
    factors: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], scale: float
) -> NamedArrays:
    """The exact aggregate: per layer, s·Σᵢ wᵢ·Bᵢ·Aᵢ / Σᵢ wᵢ, keyed by the layer's merged name.
    `factors` are the clients' LoRA parameters (at least A and B of every layer)."""
    shares = _normalised(weights, len(factors))
    out: NamedArrays = {}
    for pair in lora_pairs(factors[0]):
        total = np.zeros((factors[0][pair.b].shape[0], factors[0][pair.a].shape[1]))
        for share, client in zip(shares, factors, strict=True):
            total += share * low_rank_update(client[pair.b], client[pair.a], scale)
        out[pair.merged] = total.astype(np.float32)
    return out


def product_of_means(
    factors: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], scale: float
) -> NamedArrays:
    """What averaging the factors separately yields: per layer, s·mean(B)·mean(A)."""
    shares = _normalised(weights, len(factors))
    out: NamedArrays = {}
    for pair in lora_pairs(factors[0]):
        b = sum(s * c[pair.b].astype(np.float64) for s, c in zip(shares, factors, strict=True))
        a = sum(s * c[pair.a].astype(np.float64) for s, c in zip(shares, factors, strict=True))
        out[pair.merged] = low_rank_update(np.asarray(b), np.asarray(a), scale)
    return out


def stack_factors(
    factors: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> NamedArrays:
    """FLoRA's stacked factors: per layer B = [w₁B₁ | … | w_kB_k] / Σw (out × Σrᵢ) and
    A = [A₁; …; A_k] (Σrᵢ × in), under the layer's B and A names, so that s·B·A equals
    `mean_of_products`. Clients may have different ranks."""
    shares = _normalised(weights, len(factors))
    out: NamedArrays = {}
    for pair in lora_pairs(factors[0]):
        out[pair.b] = np.concatenate(
            [s * c[pair.b] for s, c in zip(shares, factors, strict=True)], axis=1
        ).astype(np.float32)
        out[pair.a] = np.concatenate([c[pair.a] for c in factors], axis=0).astype(np.float32)
    return out


def relative_error(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]) -> float:
    """‖got − want‖ / ‖want‖ over all arrays of `want` taken together (Frobenius)."""
    diff = sum(float(np.sum((got[n].astype(np.float64) - w) ** 2)) for n, w in want.items())
    norm = sum(float(np.sum(np.asarray(w, dtype=np.float64) ** 2)) for w in want.values())
    return float(np.sqrt(diff / norm)) if norm > 0 else float(np.sqrt(diff))
