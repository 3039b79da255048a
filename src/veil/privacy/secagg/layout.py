"""Where each part of a client's contribution sits in the one integer vector that SecAgg sums.

A client contributes its weighted update w·Δ (every parameter, in the model's order), its weight w,
and the scalars the server may learn only as sums (`FitResult.sums`, e.g. adaptive clipping's
bit), each encoded with `FixedPoint`. The server learns Σ w·Δ, Σ w and Σ of each scalar: exactly
what a weighted FedAvg step needs, and nothing per client.

    [ w·Δ(param 1) | w·Δ(param 2) | ... | w | sum key 1 | sum key 2 | ... ]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from veil.tensors import NamedArrays, check_compatible

#: The name of the one tensor a masked upload carries.
MASKED = "secagg/masked"


@dataclass(frozen=True)
class UpdateLayout:
    """Names and shapes of the parameters, then the weight, then the summed scalars."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    sum_keys: tuple[str, ...] = ()

    @classmethod
    def of(cls, reference: NamedArrays, sum_keys: Iterable[str] = ()) -> UpdateLayout:
        """The layout of updates shaped like `reference`, in its order; sum keys sorted."""
        return cls(
            names=tuple(reference),
            shapes=tuple(tuple(int(d) for d in a.shape) for a in reference.values()),
            sum_keys=tuple(sorted(sum_keys)),
        )

    @property
    def parameter_count(self) -> int:
        return sum(int(np.prod(s, dtype=np.int64)) for s in self.shapes)

    @property
    def length(self) -> int:
        """Entries of the summed vector: parameters, the weight, the sum keys."""
        return self.parameter_count + 1 + len(self.sum_keys)

    def check_reference(self, reference: NamedArrays, what: str) -> None:
        """ValueError unless the round's model parameters are this layout's, in its order."""
        if tuple(reference) != self.names:
            raise ValueError(f"the model's parameters do not match the {what} layout")

    def flatten(self, update: NamedArrays) -> npt.NDArray[np.float64]:
        """The parameters of `update` as one float64 vector; ValueError if it does not fit."""
        check_compatible(self.reference_view(), update)
        out = np.empty(self.parameter_count, np.float64)
        offset = 0
        for name in self.names:
            flat = update[name].reshape(-1)
            out[offset : offset + flat.size] = flat
            offset += flat.size
        return out

    def sums_vector(self, sums: Mapping[str, float]) -> npt.NDArray[np.float64]:
        """The summed scalars in layout order; ValueError for a key the layout does not hold
        (a client must never send in the clear what was meant to be summed)."""
        unknown = sorted(set(sums) - set(self.sum_keys))
        if unknown:
            raise ValueError(
                f"summed scalars {unknown} have no place in the secure aggregation layout "
                f"(it holds {list(self.sum_keys)})"
            )
        return np.array([float(sums.get(k, 0.0)) for k in self.sum_keys], np.float64)

    def split(self, total: npt.NDArray[np.float64]) -> tuple[NamedArrays, float, dict[str, float]]:
        """The decoded sum as (Σ w·Δ per parameter in float32, Σ w, {key: Σ})."""
        if total.shape != (self.length,):
            raise ValueError(f"a sum of this layout has {self.length} entries, got {total.shape}")
        params: NamedArrays = {}
        offset = 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            size = int(np.prod(shape, dtype=np.int64))
            params[name] = total[offset : offset + size].astype(np.float32).reshape(shape)
            offset += size
        weight = float(total[offset])
        sums = {k: float(v) for k, v in zip(self.sum_keys, total[offset + 1 :], strict=True)}
        return params, weight, sums

    def reference_view(self) -> dict[str, np.ndarray]:
        """Zero-stride stand-ins with the right shapes and dtype (no memory per parameter)."""
        return {
            n: np.broadcast_to(np.float32(0), s)
            for n, s in zip(self.names, self.shapes, strict=True)
        }


def masked_reference(layout: UpdateLayout, dtype: np.dtype[Any]) -> dict[str, np.ndarray]:
    """What a masked upload must look like (for a transport's checks): one vector of
    `layout.length` residues of `dtype`, as a zero-stride stand-in."""
    return {MASKED: np.broadcast_to(dtype.type(0), (layout.length,))}
