"""Fixed-point encoding mod 2^k: round trips, clipping counts, capacity, unbiased rounding."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from veil.errors import UserError
from veil.privacy.dp.randomness import SeededRandom
from veil.privacy.secagg.quantize import CapacityError, FixedPoint

BITS = st.sampled_from([8, 12, 16, 20, 32, 40, 64])


def _sum_decoded(fp: FixedPoint, vectors: list[np.ndarray], bound: float, seed: int):
    random = SeededRandom(seed)
    acc = np.zeros(vectors[0].shape, dtype=fp.dtype)
    clipped = 0
    for vector in vectors:
        encoded = fp.encode(vector, bound, random)
        assert encoded.values.dtype == fp.dtype
        assert int(encoded.values.max(initial=0)) < fp.modulus
        fp.add_mod(acc, encoded.values)
        clipped += encoded.clipped
    return fp.decode(acc), clipped


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 6),
    bits=BITS,
    bound=st.floats(0.01, 1000.0),
    data=st.data(),
)
def test_round_trip_of_a_sum_is_within_n_steps(
    n: int, bits: int, bound: float, data: st.DataObject
) -> None:
    fp = FixedPoint.fit(n, bound, bits)
    fp.check_capacity(n, bound)
    # Values inside, exactly at and beyond the bounds.
    elements = st.one_of(
        st.floats(-3 * bound, 3 * bound, allow_nan=False),
        st.sampled_from([bound, -bound, 0.0]),
    )
    vectors = [data.draw(hnp.arrays(np.float64, 7, elements=elements)) for _ in range(n)]
    decoded, clipped = _sum_decoded(fp, vectors, bound, data.draw(st.integers(0, 2**32)))
    clipped_sum = np.sum([np.clip(v, -bound, bound) for v in vectors], axis=0)
    tolerance = n * fp.step + 1e-12 * n * bound  # rounding < 1 step each; float64 slack
    assert np.all(np.abs(decoded - clipped_sum) <= tolerance)
    assert clipped == sum(int(np.count_nonzero(np.abs(v) > bound)) for v in vectors)


def test_values_at_the_bounds_decode_to_the_bounds() -> None:
    for bits in (16, 32, 64):
        fp = FixedPoint.fit(4, 2.5, bits)
        encoded = fp.encode(np.array([2.5, -2.5, 0.0]), 2.5, SeededRandom(1))
        assert encoded.clipped == 0
        assert np.allclose(fp.decode(encoded.values), [2.5, -2.5, 0.0], atol=fp.step, rtol=0)


def test_clipping_is_counted_exactly() -> None:
    fp = FixedPoint.fit(3, 1.0)
    values = np.array([-5.0, -1.0, -0.999, 0.0, 1.0, 1.0000001, 7.0], dtype=np.float32)
    encoded = fp.encode(values, 1.0, SeededRandom(0))
    assert encoded.clipped == 3
    decoded = fp.decode(encoded.values)
    assert decoded[0] == pytest.approx(-1.0, abs=fp.step)
    assert decoded[-1] == pytest.approx(1.0, abs=fp.step)


def test_per_coordinate_bounds() -> None:
    fp = FixedPoint.fit(2, 10.0)
    bounds = np.array([1.0, 10.0, 0.5])
    encoded = fp.encode(np.array([3.0, 3.0, -3.0]), bounds, SeededRandom(0))
    assert encoded.clipped == 2
    assert np.allclose(fp.decode(encoded.values), [1.0, 3.0, -0.5], atol=fp.step, rtol=0)
    with pytest.raises(ValueError, match="shape"):
        fp.encode(np.zeros(2), bounds, SeededRandom(0))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_values_are_refused(bad: float) -> None:
    fp = FixedPoint.fit(2, 1.0)
    with pytest.raises(ValueError, match="entry 2"):
        fp.encode(np.array([0.0, 1.0, bad, 0.0]), 1.0, SeededRandom(0))


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 10_000), bits=BITS, bound=st.floats(1e-3, 1e6))
def test_fit_gives_the_finest_step_that_cannot_wrap(n: int, bits: int, bound: float) -> None:
    half = 1 << (bits - 1)
    try:
        fp = FixedPoint.fit(n, bound, bits)
    except CapacityError:
        assert n * 2 >= half - 1  # not even one level per side fits
        return
    fp.check_capacity(n, bound)
    levels = math.ceil(bound / fp.step)
    assert n * (levels + 1) < half
    if bits <= 48:
        assert n * (levels + 2) >= half  # one level finer would wrap
    else:  # bound / step is a float: levels are exact to 53 bits only
        assert n * (levels + 1) >= half * (1 - 1e-12)


def test_capacity_check_raises_when_the_sum_could_wrap() -> None:
    fp = FixedPoint(16, 1.0)  # signed range: 2^15 = 32768
    fp.check_capacity(8, 4094.0)  # 8 · 4095 = 32760 < 32768
    with pytest.raises(CapacityError) as caught:
        fp.check_capacity(8, 4095.0)  # 8 · 4096 = 32768: could wrap
    message = str(caught.value)
    for fragment in ("8 clients", "4095", "step 1", "16-bit", "modulus_bits", "fewer clients"):
        assert fragment in message
    assert isinstance(caught.value, UserError)
    with pytest.raises(CapacityError):
        FixedPoint.fit(1 << 14, 1.0, 16)


def test_stochastic_rounding_is_unbiased() -> None:
    # 200 000 draws of x = 0.3 steps: the mean of the rounded values has standard deviation
    # sqrt(0.3 · 0.7 / 200 000) ≈ 0.001 steps; 0.006 is six standard deviations.
    fp = FixedPoint(32, 0.01)
    count = 200_000
    for fraction in (0.3, -0.3, 0.5, 0.01):
        values = np.full(count, fraction * fp.step)
        decoded = fp.decode(fp.encode(values, 1.0, SeededRandom(7)).values)
        assert set(np.round(decoded / fp.step).astype(int)) <= {
            math.floor(fraction),
            math.floor(fraction) + 1,
        }
        assert abs(decoded.mean() / fp.step - fraction) < 0.006


def test_decode_is_the_centred_lift_for_any_modulus() -> None:
    for bits in (8, 20, 32, 33, 64):
        fp = FixedPoint(bits, 1.0)
        ints = np.array([0, 1, -1, (1 << (bits - 1)) - 1, -(1 << (bits - 1))], dtype=np.int64)
        residues = np.array([int(v) % fp.modulus for v in ints], dtype=fp.dtype)
        assert np.array_equal(fp.decode(residues), ints.astype(np.float64))


def test_add_and_sub_mod_wrap_at_the_modulus() -> None:
    fp = FixedPoint(20, 1.0)
    acc = np.array([fp.modulus - 1, 5], dtype=fp.dtype)
    fp.add_mod(acc, np.array([2, 1], dtype=fp.dtype))
    assert acc.tolist() == [1, 6]
    fp.sub_mod(acc, np.array([2, 7], dtype=fp.dtype))
    assert acc.tolist() == [fp.modulus - 1, fp.modulus - 1]
    with pytest.raises(TypeError, match="dtype"):
        fp.add_mod(acc, np.array([1, 1], dtype=np.uint64))


def test_validation() -> None:
    assert FixedPoint(8, 1.0).dtype == np.uint8
    assert FixedPoint(9, 1.0).dtype == np.uint16
    assert FixedPoint(16, 1.0).dtype == np.uint16
    assert FixedPoint(17, 1.0).dtype == np.uint32
    assert FixedPoint(32, 1.0).dtype == np.uint32
    assert FixedPoint(33, 1.0).dtype == np.uint64
    assert FixedPoint(64, 1.0).modulus == 2**64
    for bits in (7, 65):
        with pytest.raises(ValueError, match="modulus_bits"):
            FixedPoint(bits, 1.0)
    for step in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="step"):
            FixedPoint(32, step)
    with pytest.raises(ValueError, match="bound"):
        FixedPoint.fit(3, 0.0)
    with pytest.raises(ValueError, match="n_clients"):
        FixedPoint(32, 1.0).check_capacity(0, 1.0)
