"""Named float32 arrays: the form in which model parameters and updates travel.

A `NamedArrays` maps a parameter name (as `torch.nn.Module.named_parameters` gives it) to a NumPy
array. NumPy rather than torch so that every transport, privacy stage and store can handle them
without importing torch, and so that the bytes on the wire are the raw little-endian buffer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float32]
NamedArrays = dict[str, Array]
#: What an update may be on its way to the server: float32 parameters, or (under SecAgg) one
#: encoded and masked integer vector.
Payload = dict[str, np.ndarray]


def total_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """The payload size of `arrays` in bytes (what a transport would send, headers excluded)."""
    return sum(int(a.nbytes) for a in arrays.values())


def zeros_like(arrays: Mapping[str, np.ndarray]) -> NamedArrays:
    """Float32 zeros with the names and shapes of `arrays`."""
    return {name: np.zeros(a.shape, dtype=np.float32) for name, a in arrays.items()}


def check_compatible(reference: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray]) -> None:
    """Raise `ValueError` unless `other` has exactly the names, shapes and dtype of `reference`."""
    missing = sorted(set(reference) - set(other))
    extra = sorted(set(other) - set(reference))
    if missing or extra:
        raise ValueError(f"parameter names differ: missing {missing}, unexpected {extra}")
    for name, ref in reference.items():
        arr = other[name]
        if arr.shape != ref.shape:
            raise ValueError(f"parameter '{name}' has shape {arr.shape}, expected {ref.shape}")
        if arr.dtype != ref.dtype:
            raise ValueError(f"parameter '{name}' has dtype {arr.dtype}, expected {ref.dtype}")


def add_scaled_(target: NamedArrays, other: Mapping[str, np.ndarray], scale: float) -> None:
    """In place: target += scale * other (names must match)."""
    for name, arr in target.items():
        if scale == 1.0:
            arr += other[name]
        else:
            arr += np.float32(scale) * other[name]


def l2_norm(arrays: Mapping[str, np.ndarray]) -> float:
    """The Euclidean norm of all arrays taken together as one flat vector, as a Python float.

    Never overflows for finite entries: each array's sum of squares is taken in its own dtype
    (fast), and where that is not finite (float32 entries of 2e19 already square to inf) it is
    redone as m·‖a/m‖ in float64, m = max |aᵢ|; the per-array norms are combined by
    `math.hypot`, which scales too. An entry that is NaN or infinite gives NaN or inf.
    """
    norms = []
    for a in arrays.values():
        flat = a.ravel()
        with np.errstate(over="ignore", invalid="ignore"):
            squares = float(np.dot(flat, flat))
        if math.isfinite(squares):
            norms.append(math.sqrt(squares))
            continue
        peak = float(np.max(np.abs(flat)))
        if not math.isfinite(peak):
            return peak  # NaN if the array holds a NaN, else inf
        scaled = flat.astype(np.float64) / peak
        norms.append(peak * math.sqrt(float(np.dot(scaled, scaled))))
    return math.hypot(*norms)
