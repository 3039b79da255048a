"""Fixed-point encoding of floats as integers mod 2^k, the input space of secure aggregation.

Masking (Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", §4) works in the group Z_{2^k}: each client turns its float vector into integers
mod 2^k, adds masks that cancel in the sum, and the server decodes the sum. This module does the
float ↔ integer part:

* `FixedPoint.encode` clips every value to a declared ``[-bound, bound]`` (and counts the entries
  it clipped: clipping is reported, never silent), divides by ``step`` and rounds stochastically
  (down or up with the probability that makes the rounding unbiased: E[q] = x / step, exactly,
  at every magnitude and every modulus), then writes the integer in two's complement mod 2^k.
* `FixedPoint.decode` lifts a sum mod 2^k to the centred range [-2^(k-1), 2^(k-1)) and multiplies
  by ``step``. The lift is exact as long as the true integer sum lies in that range, which
  `FixedPoint.check_capacity` guarantees: ``n · (ceil(bound / step) + 1) < 2^(k-1)``. (After
  clipping and stochastic rounding every encoded value lies in ``[-ceil(bound/step),
  ceil(bound/step)]``; the ``+ 1`` is a margin of one step per client.)

So the decoded sum of n clients differs from the sum of their clipped inputs by less than
``n · step`` (each rounding moves a value by less than one step), and by about
``step · sqrt(n) / 2`` typically (the rounding errors are independent and have mean zero).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

from veil.errors import UserError
from veil.privacy.dp.randomness import RandomSource

__all__ = ["CapacityError", "Encoded", "FixedPoint", "UIntArray"]

#: An array of unsigned integers (``uint8`` to ``uint64``): residues mod 2^k.
UIntArray: TypeAlias = npt.NDArray[np.unsignedinteger[Any]]

_MIN_BITS = 8
_MAX_BITS = 64
#: Entries encoded per pass: 256 KiB of float64, so that all the temporaries of one pass (about
#: 1 MiB) stay in a core's L2 cache.
_CHUNK = 1 << 15
#: ``2**32``: `RandomSource.uniform32` draws are integers U in [0, 2^32) times ``2**-32``.
_TWO_POW_32 = 1 << 32
#: The rounding is decided exactly without more random bits unless ``f + u`` lies in
#: ``[1 - 2^-32, 1]``; `_exact_carry` settles those entries (probability at most 2^-31 each).
_NEAR_ONE = 1.0 - 2.0**-32


class CapacityError(UserError):
    """The sum of the clients' encoded values could exceed the signed range of Z_{2^k}."""


@dataclass(frozen=True)
class Encoded:
    """The result of `FixedPoint.encode`: residues mod 2^k and how many entries were clipped."""

    values: UIntArray
    clipped: int


@dataclass(frozen=True)
class FixedPoint:
    """Fixed-point numbers ``q · step`` stored as residues mod ``2**modulus_bits``.

    Contract: ``8 <= modulus_bits <= 64``; ``step`` is a positive finite float. Residues are held
    in `dtype`, the narrowest of ``uint8``, ``uint16``, ``uint32`` and ``uint64`` that holds
    them, so that a narrow modulus also makes a small upload (8-bit compression is this encoding
    at 8 bits); every array this class returns holds values below `modulus`.
    """

    modulus_bits: int
    step: float

    def __post_init__(self) -> None:
        bits = self.modulus_bits
        if isinstance(bits, bool) or not isinstance(bits, int):
            raise TypeError(f"modulus_bits must be an int, got {type(bits).__name__}")
        if not _MIN_BITS <= bits <= _MAX_BITS:
            raise ValueError(
                f"modulus_bits must be between {_MIN_BITS} and {_MAX_BITS}, got {bits}"
            )
        step = self.step
        if isinstance(step, bool) or not isinstance(step, int | float):
            raise TypeError(f"step must be a float, got {type(step).__name__}")
        if not (math.isfinite(step) and step > 0):
            raise ValueError(f"step must be positive and finite, got {step}")
        object.__setattr__(self, "step", float(step))

    @property
    def dtype(self) -> np.dtype[np.unsignedinteger[Any]]:
        """The narrowest unsigned integer type of 8, 16, 32 or 64 bits that holds `modulus_bits`."""
        width = next(w for w in (8, 16, 32, 64) if self.modulus_bits <= w)
        return np.dtype(f"uint{width}")

    @property
    def modulus(self) -> int:
        """``2**modulus_bits``."""
        return 1 << self.modulus_bits

    @classmethod
    def fit(cls, n_clients: int, bound: float, modulus_bits: int = 32) -> FixedPoint:
        """The finest step for which the sum of `n_clients` values in ``[-bound, bound]`` cannot
        wrap: the smallest ``step`` with ``n_clients · (ceil(bound / step) + 1) < 2^(k-1)``.

        Raises CapacityError when even the coarsest useful step (``step = bound``) cannot hold
        the sum, and ValueError for a non-positive `n_clients` or `bound`.
        """
        _check_clients_and_bound(n_clients, bound)
        cls(modulus_bits, 1.0)  # validates modulus_bits
        # The largest integer magnitude c with n · (c + 1) <= 2^(k-1) - 1.
        largest = ((1 << (modulus_bits - 1)) - 1) // n_clients - 1
        if largest < 1:
            raise CapacityError(
                _capacity_message(n_clients, bound, float(bound), modulus_bits, "fit")
            )
        step = float(bound) / largest
        fitted = cls(modulus_bits, step)
        # bound / step is rounded to float: nudge the step up until the exact check passes.
        while not fitted._fits(n_clients, bound):
            step = math.nextafter(step, math.inf)
            fitted = cls(modulus_bits, step)
        return fitted

    def check_capacity(self, n_clients: int, bound: float) -> None:
        """Return if the sum of `n_clients` encoded values in ``[-bound, bound]`` can never wrap
        mod 2^k; raise CapacityError (saying what to change) otherwise."""
        _check_clients_and_bound(n_clients, bound)
        if not self._fits(n_clients, bound):
            raise CapacityError(
                _capacity_message(n_clients, bound, self.step, self.modulus_bits, "check")
            )

    def _fits(self, n_clients: int, bound: float) -> bool:
        scaled = float(bound) / self.step
        if not math.isfinite(scaled):
            return False
        return n_clients * (math.ceil(scaled) + 1) < 1 << (self.modulus_bits - 1)

    def encode(
        self,
        values: npt.ArrayLike,
        bound: float | npt.NDArray[np.floating[Any]],
        random: RandomSource,
        *,
        scale: float = 1.0,
        out: UIntArray | None = None,
    ) -> Encoded:
        """Clip to ``[-bound, bound]``, scale by ``1 / step``, round stochastically with uniforms
        from `random`, and reduce mod 2^k (two's complement).

        `bound` is a positive scalar, or an array of positive bounds of the same shape as
        `values` (one per coordinate). `values` may be any real array (float32 or float64 are
        the usual); the result has its shape and `dtype`. `Encoded.clipped` counts the entries
        whose value lay outside the bound. NaN or ±Inf raises ValueError naming the first such
        entry. The caller is responsible for `check_capacity` with the number of clients.

        The rounding is exact at every magnitude and modulus: with ``x`` the float64 value of
        ``clip(value) / step``, ``q = floor(x) + B`` where B is a Bernoulli variable whose
        probability is exactly the fractional part ``f = x - floor(x)``, so E[q] = x exactly
        (unbiased up to float64's representation of ``x``; an ``x`` of magnitude 2^52 or more
        is an integer, and is encoded as it is). B is decided by comparing ``f`` with a uniform
        ``u`` from ``random.uniform32`` (B = 1 when ``f + u >= 1``), and floor(x) + B is added
        in int64 arithmetic: the uniform never meets a large float, whose ulp would swallow its
        low bits (``floor(x + u)`` in float64 is biased by up to half an ulp of ``x`` once
        ``|x| >= 2^21``, and near 2^52 rounds almost deterministically). Where ``f + u`` falls
        within 2^-32 below 1, which 32 random bits cannot settle (probability at most 2^-31 per
        entry), the comparison is completed exactly with further random bits
        (`RandomSource.randbelow`), so the probability is ``f`` itself, not ``f`` rounded to
        32 bits. Outside that band, ``q`` is ``floor(x + u)`` of the exact (real) sum.

        In production `random` must be a `SecureRandom`: the rounding randomness is part of the
        privacy argument when DP noise is added on the integers.

        `scale` multiplies the values first (the bound applies to the scaled values): a client
        folds its aggregation weight in without a scaled copy of its update. With `out` (a flat
        array of `dtype` and the values' size, e.g. a slice of a larger vector) the residues
        are written there and `Encoded.values` is `out`.
        """
        array = np.asarray(values)
        if array.dtype.kind not in "biuf":
            raise TypeError(f"cannot encode an array of dtype {array.dtype}")
        shape = array.shape
        flat = array.reshape(-1)
        size = flat.size
        bounds = _bounds(bound, shape)
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be positive and finite, got {scale}")
        out = self._output(out, size)
        clipped = 0
        scratch = _Scratch.allocate(min(size, _CHUNK))
        for start in range(0, size, _CHUNK):
            stop = min(start + _CHUNK, size)
            x = scratch.scaled[: stop - start]
            np.copyto(x, flat[start:stop], casting="unsafe")  # real → float64
            if scale != 1.0:
                np.multiply(x, scale, out=x)
            b = bounds if isinstance(bounds, float) else bounds[start:stop]
            clipped += _clip_chunk(x, b, flat, start)
            np.divide(x, self.step, out=x)
            _round_chunk(x, scratch, random, out[start:stop])
        self.reduce(out)
        return Encoded(values=out.reshape(shape), clipped=clipped)

    def _output(self, out: UIntArray | None, size: int) -> UIntArray:
        """`out` if it is a flat array of `dtype` and `size` entries (ValueError if not), or a
        new one when None."""
        if out is None:
            return np.empty(size, dtype=self.dtype)
        if out.shape != (size,) or out.dtype != self.dtype:
            raise ValueError(
                f"out must be a flat {self.dtype} array of {size} entries, got {out.shape} "
                f"{out.dtype}"
            )
        return out

    def decode(self, total: UIntArray) -> npt.NDArray[np.float64]:
        """The floats that residues mod 2^k stand for: the centred lift (residues at or above
        ``2^(k-1)`` are negative) times ``step``.

        Exact up to the quantization step whenever the true integer sum lies in
        ``[-2^(k-1), 2^(k-1))``, which `check_capacity` guarantees. (For ``k > 53`` the final
        conversion to float64 rounds to 53 significant bits.) Accepts any shape; `total` must
        have `dtype`.
        """
        total = np.asarray(total)
        self._check_dtype(total, "total")
        width = 8 * total.dtype.itemsize
        signed_type = np.dtype(f"int{width}").type
        shift = width - self.modulus_bits
        if shift:
            shifted = np.left_shift(total, total.dtype.type(shift))
            signed = shifted.view(signed_type)
            np.right_shift(signed, signed_type(shift), out=signed)  # arithmetic: sign-extends
        else:
            signed = total.view(signed_type)
        result: npt.NDArray[np.float64] = signed.astype(np.float64)
        np.multiply(result, self.step, out=result)
        return result

    def add_mod(self, acc: UIntArray, x: UIntArray) -> UIntArray:
        """``acc += x (mod 2^k)`` in place; returns `acc`. Both must have `dtype`."""
        self._check_dtype(acc, "acc")
        self._check_dtype(x, "x")
        np.add(acc, x, out=acc)
        return self.reduce(acc)

    def sub_mod(self, acc: UIntArray, x: UIntArray) -> UIntArray:
        """``acc -= x (mod 2^k)`` in place; returns `acc`. Both must have `dtype`."""
        self._check_dtype(acc, "acc")
        self._check_dtype(x, "x")
        np.subtract(acc, x, out=acc)
        return self.reduce(acc)

    def reduce(self, acc: UIntArray) -> UIntArray:
        """Reduce `acc` mod 2^k in place; returns it.

        Sums may be left unreduced in between: unsigned arithmetic wraps mod 2^width, and 2^k
        divides it, so one reduction at the end gives the same residues.
        """
        if self.modulus_bits != 8 * self.dtype.itemsize:
            np.bitwise_and(acc, acc.dtype.type(self.modulus - 1), out=acc)
        return acc

    def _check_dtype(self, array: npt.NDArray[Any], name: str) -> None:
        if array.dtype != self.dtype:
            raise TypeError(
                f"{name} has dtype {array.dtype}, expected {self.dtype} for "
                f"{self.modulus_bits}-bit residues"
            )


@dataclass(frozen=True)
class _Scratch:
    """`FixedPoint.encode`'s buffers for one chunk, reused for every chunk (no allocation in
    the loop but the uniforms)."""

    scaled: npt.NDArray[np.float64]
    frac: npt.NDArray[np.float64]
    integers: npt.NDArray[np.int64]
    carry: npt.NDArray[np.bool_]

    @classmethod
    def allocate(cls, size: int) -> _Scratch:
        return cls(
            np.empty(size, dtype=np.float64),
            np.empty(size, dtype=np.float64),
            np.empty(size, dtype=np.int64),
            np.empty(size, dtype=np.bool_),
        )


def _clip_chunk(x: npt.NDArray[np.float64], b: Any, flat: npt.NDArray[Any], start: int) -> int:
    """Clip the chunk `x` (the scaled entries of `flat` from `start` on) to ``[-b, b]`` in place
    (`b` a float, or the chunk's bounds) and return how many entries lay outside; ValueError
    naming the first entry that is NaN or ±Inf."""
    low, high = float(x.min()), float(x.max())  # NaN propagates into both
    if not (math.isfinite(low) and math.isfinite(high)):
        bad = start + int(np.flatnonzero(~np.isfinite(x))[0])
        raise ValueError(
            f"cannot encode a non-finite value: entry {bad} (flat index) is "
            f"{flat[bad]}; the update holds NaN or Inf (diverged training?)"
        )
    if isinstance(b, float) and low >= -b and high <= b:
        return 0
    clipped = int(np.count_nonzero(x > b)) + int(np.count_nonzero(x < -b))
    np.clip(x, -b, b, out=x)
    return clipped


def _round_chunk(
    x: npt.NDArray[np.float64], scratch: _Scratch, random: RandomSource, out: UIntArray
) -> None:
    """Round the chunk `x` (values in steps) stochastically, as `FixedPoint.encode` describes,
    and write the integers into `out` in two's complement (not yet reduced mod 2^k)."""
    n = x.size
    frac, integers, carry = scratch.frac[:n], scratch.integers[:n], scratch.carry[:n]
    # Stochastic rounding q = floor(x) + [f + u >= 1], f = x - floor(x), u ~ U[0, 1):
    # it rounds up with probability f. The integer part and the carry are added as
    # integers; only f, in [0, 1], meets the uniform.
    np.floor(x, out=frac)
    np.copyto(integers, frac, casting="unsafe")  # exact: integral, |floor(x)| < 2^63
    # f is exact (x - floor(x) is a float) except for -1/2 < x < 0, where 1 + x may
    # round; the rounding cannot move f across the thresholds below (they are floats),
    # so it only matters in the [1 - 2^-32, 1] band that `_exact_carry` redoes from x.
    np.subtract(x, frac, out=frac)
    uniform = random.uniform32(n)
    np.add(frac, uniform, out=frac)  # s = f + u in [0, 2), rounded
    # s > 1 implies f + u >= 1 (round up); s < 1 - 2^-32 implies f + u + 2^-32 < 1, so
    # no bits of u beyond the 32 drawn could reach 1 (round down). In between (at most
    # two values of u per entry), decide exactly from x and u.
    np.greater_equal(frac, _NEAR_ONE, out=carry)
    near = np.count_nonzero(carry)
    np.greater(frac, 1.0, out=carry)
    if near != np.count_nonzero(carry):
        band = np.flatnonzero((frac >= _NEAR_ONE) & (frac <= 1.0))
        for i in band.tolist():
            carry[i] = _exact_carry(float(x[i]), float(uniform[i]), random)
    np.add(integers, carry, out=integers)  # |q| <= 2^53 wherever the carry can be 1
    # int64 → uint8..uint64 keeps the low bits: two's complement mod 2^width.
    np.copyto(out, integers, casting="unsafe")


def _exact_carry(x: float, u: float, random: RandomSource) -> bool:
    """Whether ``f + u + v · 2^-32 >= 1``, f = x - floor(x) exactly, for a uniform v in [0, 1)
    drawn now: the carry of the stochastic rounding of `x` given the 32-bit draw `u`,
    completed with as many further random bits as the fraction has. Its probability over v and
    u is exactly f.
    """
    value = Fraction(x)
    fraction = value - math.floor(value)
    drawn = int(u * _TWO_POW_32)  # exact: u is on the grid k · 2^-32
    # P(v >= 2^32 · (1 - f) - drawn) over v ~ U[0, 1): a dyadic rational, clipped to [0, 1].
    probability = fraction * _TWO_POW_32 + drawn - (_TWO_POW_32 - 1)
    if probability <= 0:
        return False
    if probability >= 1:
        return True
    return random.randbelow(probability.denominator) < probability.numerator


def _check_clients_and_bound(n_clients: int, bound: float) -> None:
    if isinstance(n_clients, bool) or not isinstance(n_clients, int) or n_clients < 1:
        raise ValueError(f"n_clients must be a positive int, got {n_clients!r}")
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"bound must be positive and finite, got {bound}")


def _bounds(bound: float | npt.NDArray[np.floating[Any]], shape: tuple[int, ...]) -> Any:
    """A positive finite float, or a flat float64 array matching `shape`; ValueError otherwise."""
    if isinstance(bound, int | float) and not isinstance(bound, bool):
        scalar = float(bound)
        if not (math.isfinite(scalar) and scalar > 0):
            raise ValueError(f"bound must be positive and finite, got {bound}")
        return scalar
    array = np.asarray(bound, dtype=np.float64)
    if array.shape != shape:
        raise ValueError(f"bound has shape {array.shape}, values have shape {shape}")
    if not (np.isfinite(array).all() and (array > 0).all()):
        raise ValueError("every bound must be positive and finite")
    return array.reshape(-1)


def _capacity_message(n: int, bound: float, step: float, bits: int, how: str) -> str:
    limit = 1 << (bits - 1)
    need = "the coarsest step (= bound)" if how == "fit" else f"step {step:.6g}"
    return (
        f"secure aggregation capacity exceeded: {n} clients × values in [-{bound:.6g}, "
        f"{bound:.6g}] with {need} can sum to more than 2^{bits - 1} = {limit} in "
        f"{bits}-bit arithmetic, so the sum would wrap around; raise modulus_bits (at most 64), "
        "lower the clipping bound, use a coarser step, or aggregate fewer clients per round"
    )
