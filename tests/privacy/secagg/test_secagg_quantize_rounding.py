"""Stochastic rounding in `FixedPoint.encode` is exact at every magnitude and every modulus.

The rounding of x = value / step must be floor(x) + B with P(B = 1) = x - floor(x) exactly. Adding
the uniform to x in float64 (``floor(x + u)``) is not: once the ulp of x exceeds the 2^-32 grid of
u (|x| >= 2^21) the sum drops low bits of u, and near 2^52 the rounding is nearly deterministic:
x = 2^50 + 0.25 rounds up with probability 0.375, 2^51 + 0.5 with 0.75, and an integral x in
[2^52, 2^53) moves up by one about half of the time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.privacy.dp.randomness import SeededRandom
from veil.privacy.secagg.quantize import FixedPoint

#: The allowed deviation of a sample mean, in standard errors.
_SIGMAS = 5.0


def _lifted(fp: FixedPoint, residues: npt.NDArray[np.unsignedinteger[Any]]) -> list[int]:
    """The centred lift of residues mod 2^k, as exact Python ints (decode rounds above 2^53)."""
    half = fp.modulus >> 1
    return [r - fp.modulus if r >= half else r for r in (int(v) for v in residues.reshape(-1))]


def _mean_carry_and_tolerance(
    fp: FixedPoint, value: float, bound: float, count: int, seed: int
) -> tuple[float, float, float]:
    """Encode `count` copies of `value`: the mean of q - floor(x), the fractional part f of
    x = value / step (exact, from x's float64 value), and 5 standard errors of the mean."""
    fp.check_capacity(1, bound)  # the encoded values cannot wrap
    scaled = Fraction(value / fp.step)  # the float64 quotient, as encode computes it
    floor = math.floor(scaled)
    fraction = float(scaled - floor)
    encoded = fp.encode(np.full(count, value), bound, SeededRandom(seed))
    assert encoded.clipped == 0
    lifted = np.array([q - floor for q in _lifted(fp, encoded.values)])
    assert set(np.unique(lifted).tolist()) <= {0, 1}  # floor(x) or floor(x) + 1, nothing else
    standard_error = math.sqrt(fraction * (1 - fraction) / count)
    return float(lifted.mean()), fraction, _SIGMAS * standard_error


# x / step near 2^52 + 0.25 cannot be a float64 (its ulp is 1 there): these are the largest
# magnitudes that hold the fractions 0.5, 0.25, 0.75 (negative), 0.625; 2^48 + 0.3 is
# 2^48 + 0.3125 and 2^40 + 0.3 is 2^40 + 0.300048828125 (ulps 2^-4 and 2^-12).
@pytest.mark.parametrize(
    "scaled",
    [
        2.0**51 + 0.5,
        2.0**50 + 0.25,
        -(2.0**50 + 0.25),
        2.0**49 + 0.625,
        2.0**48 + 0.3,
        2.0**40 + 0.3,
    ],
)
def test_rounding_is_unbiased_at_64_bits_near_2_to_the_52(scaled: float) -> None:
    step = 2.0**-20  # a power of two: value = scaled · step is exact, and value / step = scaled
    fp = FixedPoint(64, step)
    value = scaled * step
    mean, fraction, tolerance = _mean_carry_and_tolerance(fp, value, 2.0**40, 200_000, seed=11)
    assert 0 < fraction < 1
    assert abs(mean - fraction) <= tolerance, (scaled, mean, fraction, tolerance)


@pytest.mark.parametrize("scaled", [2.0**29 + 0.3, -(2.0**29 + 0.3), 2.0**25 + 0.7, 0.3])
def test_rounding_is_unbiased_at_32_bits_at_the_largest_magnitudes(scaled: float) -> None:
    # At 32 bits the capacity keeps |x| < 2^31, where floor(x + u) errs by at most 2^-23 of a
    # step: this guards the 32-bit path at its largest magnitudes; the exact test below is the
    # one that tells an inexact rounding apart.
    step = 2.0**-10
    fp = FixedPoint(32, step)
    value = scaled * step
    mean, fraction, tolerance = _mean_carry_and_tolerance(fp, value, 2.0**20, 200_000, seed=5)
    assert abs(mean - fraction) <= tolerance, (scaled, mean, fraction, tolerance)


class ScriptedRandom:
    """A test source whose every uniform32 draw is `uniform`; `randbelow` answers with `below`
    (or a seeded source) and records its arguments."""

    seeded = True

    def __init__(self, uniform: float, below: Callable[[int], int] | None = None) -> None:
        self._uniform = uniform
        self._below = below
        self._fallback = SeededRandom(3)
        self.randbelow_calls: list[int] = []

    def uniform32(self, size: int) -> npt.NDArray[np.float64]:
        return np.full(size, self._uniform)

    def randbelow(self, n: int) -> int:
        self.randbelow_calls.append(n)
        return self._below(n) if self._below is not None else self._fallback.randbelow(n)

    def uniform(self, size: int) -> npt.NDArray[np.float64]:
        raise AssertionError("encode draws 32-bit uniforms")

    def standard_normal(self, size: int) -> npt.NDArray[np.float64]:
        raise AssertionError("encode draws no Gaussians")


@pytest.mark.parametrize("bits", [32, 64])
def test_a_given_uniform_rounds_up_exactly_when_f_plus_u_reaches_1(bits: int) -> None:
    # x = 2^30 + 0.5 (+ 2^-22 for the second value): x + u in float64 has a 2^-22 ulp, so
    # floor(x + u) rounds 2^30 + 1 - 2^-32 up to 2^30 + 1. The exact rule rounds up iff
    # f + u >= 1, and f, u on the 2^-32 grid settle it without further bits.
    step = 2.0**-10
    fp = FixedPoint(bits, step)
    bound = 1.5 * 2.0**20  # |x| up to 1.5 · 2^30: within the 32-bit capacity of one client
    fp.check_capacity(1, bound)
    cases = [  # (x, u, rounds up)
        (2.0**30 + 0.5, 0.5 - 2.0**-32, False),
        (2.0**30 + 0.5, 0.5, True),
        (2.0**30 + 0.5 + 2.0**-22, 0.5 - 2.0**-22 - 2.0**-32, False),
        (2.0**30 + 0.5 + 2.0**-22, 0.5 - 2.0**-22, True),
        (-(2.0**30) - 0.5, 0.5 - 2.0**-32, False),
        (-(2.0**30) - 0.5, 0.5, True),
        (3.0, 1.0 - 2.0**-32, False),  # an integral x never moves
    ]
    for scaled, uniform, up in cases:
        random = ScriptedRandom(uniform)
        encoded = fp.encode(np.array([scaled * step]), bound, random)
        expected = math.floor(scaled) + int(up)
        assert _lifted(fp, encoded.values) == [expected], (scaled, uniform)
        assert random.randbelow_calls == []  # no more bits needed


def test_the_last_bit_band_is_settled_with_further_random_bits() -> None:
    # f = 1/2 + 2^-40 and u = 1/2 - 2^-32: f + u = 1 - 2^-32 + 2^-40 lies in the band where
    # the 32 drawn bits cannot tell; the next bits of u must reach 1 - 2^-8 for f + u >= 1, so
    # P(up | u) = 2^-8. Over 2^16 entries: 256 ups expected, standard deviation ~16.
    fp = FixedPoint(64, 1.0)
    count = 1 << 16
    random = ScriptedRandom(0.5 - 2.0**-32)
    encoded = fp.encode(np.full(count, 0.5 + 2.0**-40), 1.0, random)
    ups = sum(_lifted(fp, encoded.values))
    probability = 2.0**-8
    spread = _SIGMAS * math.sqrt(count * probability * (1 - probability))
    assert abs(ups - count * probability) <= spread, ups
    assert random.randbelow_calls == [256] * count

    # A scripted answer: up exactly when randbelow(2^m) < the numerator of P(up | u).
    # x = -2^-60 (f = 1 - 2^-60, rounded to 1.0 by x - floor(x)) and u = 0: P(up | u) =
    # 1 - 2^-28, so q = 0 unless the draw is the last of 2^28, then q = -1.
    for answer, expected in ((0, 0), ((1 << 28) - 2, 0), ((1 << 28) - 1, -1)):
        scripted = ScriptedRandom(0.0, below=lambda n, a=answer: a)
        encoded = fp.encode(np.array([-(2.0**-60)]), 1.0, scripted)
        assert _lifted(fp, encoded.values) == [expected]
        assert scripted.randbelow_calls == [1 << 28]


#: Magnitudes where floor(x + u) goes wrong in float64: integral x in [2^52, 2^53), halves below.
_SPECIAL = (2.0**52, 2.0**52 + 1, 2.0**53 - 1, -(2.0**52) - 3, 2.0**51 + 0.5, -(2.0**51) - 0.5)


@settings(max_examples=150, deadline=None)
@given(
    bits=st.sampled_from([16, 32, 40, 53, 54, 60, 64]),
    step=st.sampled_from([1.0, 2.0**-20, 0.375, 3.0, 1e-9]),
    data=st.data(),
)
def test_round_trip_is_within_one_step_and_integers_stay_put(
    bits: int, step: float, data: st.DataObject
) -> None:
    """Encode then decode (exactly, as ints) lands on floor(x) or ceil(x) of x = value / step (the
    float64 quotient encode rounds), so within one step of the value up to float64's
    representation of value / step; an integral x is encoded as itself."""
    limit = 2.0 ** (bits - 2)  # |x| <= 2^(k-2) is within the capacity of one client
    specials = [s for s in _SPECIAL if abs(s) <= limit] or [limit]
    scaled = data.draw(
        st.one_of(
            st.floats(-limit, limit, allow_nan=False),
            st.integers(-int(limit), int(limit)).map(float),
            st.sampled_from(specials),
        )
    )
    value = scaled * step
    bound = max(abs(value), step)
    if bound / step > limit:  # value / step rounded past the limit
        return
    fp = FixedPoint(bits, step)
    fp.check_capacity(1, bound)
    x = Fraction(value / step)
    exact = Fraction(value) / Fraction(step)  # |x - exact| <= |exact| · 2^-53
    encoded = fp.encode(np.full(8, value), bound, SeededRandom(data.draw(st.integers(0, 2**32))))
    assert encoded.clipped == 0
    for q in _lifted(fp, encoded.values):
        assert q in (math.floor(x), math.ceil(x)), (q, x)
        assert abs(q - exact) < 1 + abs(exact) * Fraction(1, 2**52)
    decoded = fp.decode(encoded.values)
    assert np.all(np.abs(decoded - value) <= step * (1 + 2.0**-50) + abs(value) * 2.0**-50)
