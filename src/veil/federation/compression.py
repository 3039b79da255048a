"""Compressed client updates: 8-bit fixed point or top-k sparsification, with error feedback.

A client compresses its update as the last client stage (after clipping and DP noise, which
compression never weakens: it is post-processing), and the server decompresses each upload
before the aggregator sums it, one upload at a time:

- **int8**: each tensor is encoded with SecAgg's own `FixedPoint` encoding at 8 bits (residues mod
  2⁸, stochastic rounding, so E[decoded] = value), with a step of max|x| / 127 sent alongside:
  4× smaller than float32. Under ``secure_aggregation = "secagg"`` there is no separate stage:
  the same encoding is SecAgg's, in a 16-bit ring whose masked vector travels as uint16
  (`veil.assembly.secure_aggregation.secagg.modulus_bits`), so compression and masking compose.
- **topk**: each tensor keeps its ``ceil(fraction · size)`` entries of largest magnitude, sent as
  uint32 indices and float32 values (Aji & Heafield 2017, "Sparse Communication for Distributed
  Gradient Descent"). Plain aggregation only: the kept coordinates differ per client, which
  secure aggregation's dense masks cannot hide.

**Error feedback** (Seide et al. 2014, "1-bit SGD"; Karimireddy et al. 2019, "Error Feedback
Fixes SignSGD"): a client adds what compression dropped from its last upload to its next update,
so that every part of an update reaches the server eventually. The residual stays on the client.

`veil.assembly.stages` builds a run's compressor and stage from `[compression]`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Protocol

import numpy as np

from veil.federation.messages import FitResult
from veil.federation.pipeline import Aggregator, MappedAggregator, RoundContext, UpdateRejected
from veil.privacy.dp.randomness import RandomSource, SecureRandom
from veil.privacy.secagg.quantize import FixedPoint
from veil.tensors import NamedArrays, Payload

__all__ = [
    "SECAGG_COMPRESSED_BITS",
    "CompressionStage",
    "Compressor",
    "DecompressingAggregator",
    "Int8Compressor",
    "TopKCompressor",
    "upload_reference",
]

#: The SecAgg ring under int8 compression: 2¹⁶, so the masked vector travels as uint16.
SECAGG_COMPRESSED_BITS = 16
#: Separates a parameter's name from the name of its side array in a compressed payload.
_SEP = "#"
_INT8 = FixedPoint(8, 1.0)
_INT8_LEVELS = 127


class Compressor(Protocol):
    """Turns float32 tensors into a smaller payload and back: ``decompress(compress(x))``
    approximates x (int8: unbiased; topk: exact on the kept entries, zero elsewhere)."""

    name: str

    def compress(self, arrays: NamedArrays, random: RandomSource) -> Payload: ...

    def decompress(self, payload: Payload, reference: NamedArrays) -> NamedArrays: ...

    def reference(self, reference: NamedArrays) -> Payload:
        """What a compressed upload of parameters shaped like `reference` looks like (names,
        shapes, dtypes), for a transport's checks."""
        ...


class Int8Compressor:
    """Per tensor: residues mod 2⁸ of x / step, rounded stochastically, step = max|x| / 127."""

    name = "int8"

    def compress(self, arrays: NamedArrays, random: RandomSource) -> Payload:
        payload: Payload = {}
        for name, values in arrays.items():
            peak = float(np.max(np.abs(values))) if values.size else 0.0
            if not math.isfinite(peak):
                raise UpdateRejected(
                    f"cannot compress parameter '{name}': it holds NaN or Inf (local training "
                    "diverged: lower the learning rate, or check this member's data)"
                )
            # The step travels as float32: encode with exactly that step, and clip at 127 steps
            # so that no value can round to 128 and wrap to -128 (a float32 step rounded down
            # clips the peak by at most one part in 10⁷). An all-zero or denormal tensor gets
            # step 1, and encodes as zeros.
            step = float(np.float32(peak / _INT8_LEVELS))
            step = step if step > 0 else 1.0
            fixed = FixedPoint(8, step)
            payload[name] = fixed.encode(values, _INT8_LEVELS * step, random).values
            payload[name + _SEP + "step"] = np.array([step], dtype=np.float32)
        return payload

    def decompress(self, payload: Payload, reference: NamedArrays) -> NamedArrays:
        _check_payload(payload, self.reference(reference))
        out: NamedArrays = {}
        for name in reference:
            step = float(payload[name + _SEP + "step"][0])
            if not (math.isfinite(step) and step > 0):
                raise UpdateRejected(f"parameter '{name}': the step must be positive, got {step}")
            out[name] = FixedPoint(8, step).decode(payload[name]).astype(np.float32)
        return out

    def reference(self, reference: NamedArrays) -> Payload:
        payload: Payload = {}
        for name, values in reference.items():
            payload[name] = np.broadcast_to(_INT8.dtype.type(0), values.shape)
            payload[name + _SEP + "step"] = np.broadcast_to(np.float32(0), (1,))
        return payload


class TopKCompressor:
    """Per tensor: the ``ceil(fraction · size)`` entries of largest magnitude (indices into the
    flattened tensor, and their float32 values)."""

    name = "topk"

    def __init__(self, fraction: float) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction

    def kept(self, size: int) -> int:
        """How many of `size` entries travel."""
        return min(size, max(1, math.ceil(self.fraction * size)))

    def compress(self, arrays: NamedArrays, random: RandomSource) -> Payload:
        payload: Payload = {}
        for name, values in arrays.items():
            flat = values.reshape(-1)
            k = self.kept(flat.size)
            index = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :]
            index.sort()
            payload[name + _SEP + "index"] = index.astype(np.uint32)
            payload[name + _SEP + "value"] = flat[index].astype(np.float32)
        return payload

    def decompress(self, payload: Payload, reference: NamedArrays) -> NamedArrays:
        _check_payload(payload, self.reference(reference))
        out: NamedArrays = {}
        for name, like in reference.items():
            index = payload[name + _SEP + "index"]
            if index.size and int(index.max()) >= like.size:
                raise UpdateRejected(f"parameter '{name}': an index lies outside the tensor")
            if np.unique(index).size != index.size:
                raise UpdateRejected(f"parameter '{name}': an index is repeated")
            dense = np.zeros(like.size, dtype=np.float32)
            dense[index] = payload[name + _SEP + "value"]
            out[name] = dense.reshape(like.shape)
        return out

    def reference(self, reference: NamedArrays) -> Payload:
        payload: Payload = {}
        for name, values in reference.items():
            k = self.kept(int(values.size))
            payload[name + _SEP + "index"] = np.broadcast_to(np.uint32(0), (k,))
            payload[name + _SEP + "value"] = np.broadcast_to(np.float32(0), (k,))
        return payload


def _check_payload(payload: Payload, expected: Payload) -> None:
    if payload.keys() != expected.keys():
        missing = sorted(expected.keys() - payload.keys())
        extra = sorted(payload.keys() - expected.keys())
        raise UpdateRejected(f"compressed update: missing {missing}, unexpected {extra}")
    for name, like in expected.items():
        got = payload[name]
        if got.shape != like.shape or got.dtype != like.dtype:
            raise UpdateRejected(
                f"compressed update: '{name}' is {got.dtype} {got.shape}, expected "
                f"{like.dtype} {like.shape}"
            )
        if got.dtype.kind == "f" and not np.isfinite(got).all():
            raise UpdateRejected(f"compressed update: '{name}' contains NaN or Inf")


class CompressionStage:
    """The last client stage: compress the update, keeping each client's error-feedback residual
    (what the server did not receive) to add to its next update."""

    def __init__(
        self,
        compressor: Compressor,
        *,
        error_feedback: bool = True,
        random: RandomSource | None = None,
    ) -> None:
        self.compressor = compressor
        self.error_feedback = error_feedback
        self.name = f"compress-{compressor.name}" + ("+ef" if error_feedback else "")
        self._random = random
        self._residuals: dict[str, NamedArrays] = {}

    def __getstate__(self) -> dict[str, object]:
        # A CSPRNG's cipher state cannot (and must not) be copied to another process (Ray ships
        # client stages): the copy draws from a fresh `SecureRandom` of its own.
        state = dict(self.__dict__)
        if isinstance(state["_random"], SecureRandom):
            state["_random"] = None
        return state

    def apply(self, result: FitResult, context: RoundContext) -> FitResult:
        update = dict(result.update)
        residual = self._residuals.get(result.client)
        if self.error_feedback and residual is not None and residual.keys() == update.keys():
            update = {n: update[n] + residual[n] for n in update}
        if self._random is None:
            self._random = SecureRandom()
        payload = self.compressor.compress(update, self._random)
        if self.error_feedback:
            sent = self.compressor.decompress(payload, update)
            self._residuals[result.client] = {n: update[n] - sent[n] for n in update}
        return replace(result, update=payload)

    def residual_norm(self, client: str) -> float:
        """The L2 norm of what `client` still owes the server (0 before its first upload)."""
        residual = self._residuals.get(client, {})
        return math.sqrt(
            sum(float(np.sum(np.square(r, dtype=np.float64))) for r in residual.values())
        )


class DecompressingAggregator(MappedAggregator):
    """Wraps an aggregator: each compressed upload is decompressed, then added as usual, so the
    server still holds one running sum and never every client's update."""

    def __init__(self, inner: Aggregator, compressor: Compressor) -> None:
        self.compressor = compressor
        super().__init__(
            inner,
            f"{inner.name}+{compressor.name}",
            lambda reference: _Decompress(compressor, reference),
        )


class _Decompress:
    def __init__(self, compressor: Compressor, reference: NamedArrays) -> None:
        self._compressor = compressor
        self._reference = reference

    def apply(self, result: FitResult) -> FitResult:
        return replace(result, update=self._compressor.decompress(result.update, self._reference))

    def report(self) -> dict[str, Any]:
        return {"compression": self._compressor.name}


def upload_reference(compressor: Compressor | None, reference: Mapping[str, np.ndarray]) -> Payload:
    """What a client's upload must look like: `reference` itself, or its compressed shape."""
    return dict(reference) if compressor is None else compressor.reference(dict(reference))
