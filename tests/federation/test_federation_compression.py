"""Tests for `veil.federation.compression`: 8-bit and top-k compression, error feedback, the
server's decompression, and compressed runs with plain and secure aggregation.

Data: scikit-learn's breast cancer data (real) for the runs; generated arrays elsewhere.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from veil.config import RunConfig
from veil.errors import ConfigError
from veil.federation.compression import (
    CompressionStage,
    DecompressingAggregator,
    Int8Compressor,
    TopKCompressor,
)
from veil.federation.messages import FitResult
from veil.federation.pipeline import RoundContext, UpdateRejected, WeightedSum
from veil.privacy.dp.randomness import SeededRandom
from veil.run import run

finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)
tensors = arrays(np.float32, st.integers(1, 300), elements=finite)


def _fit(update: dict[str, np.ndarray], client: str = "a", weight: float = 1.0) -> FitResult:
    return FitResult(client=client, round=1, update=update, weight=weight, num_examples=1)


@settings(max_examples=60, deadline=None)
@given(tensors)
@example(np.array([1e-45], np.float32))  # a denormal peak: its step underflows in float32
def test_int8_round_trip_is_within_one_step(x: np.ndarray) -> None:
    codec = Int8Compressor()
    payload = codec.compress({"w": x}, SeededRandom(0))
    assert payload["w"].dtype == np.uint8
    back = codec.decompress(payload, {"w": x})["w"]
    step = float(payload["w#step"][0])
    peak = float(np.max(np.abs(x)))
    # The step travels as float32; a tensor whose step would underflow there (all zero, or
    # denormal: x = 1e-45 was found) gets step 1 and encodes as zeros.
    expected = float(np.float32(peak / 127))
    assert step == pytest.approx(expected if expected > 0 else 1.0, rel=1e-6)
    assert back.dtype == np.float32 and back.shape == x.shape
    # Stochastic rounding moves a value by less than one step (float32 slack on top).
    assert np.all(np.abs(back - x) <= step * (1 + 1e-5) + 1e-30)


def test_int8_is_unbiased() -> None:
    # E[decoded] = x. Mean of 2000 draws: the rounding error of one draw has s.d. <= step/2, so
    # the mean's s.d. is <= step/(2·sqrt(2000)) ≈ 0.011 step; allow 6 s.d. (0.07 step).
    x = np.linspace(-1, 1, 41, dtype=np.float32)
    codec, random = Int8Compressor(), SeededRandom(1)
    total = np.zeros_like(x, dtype=np.float64)
    draws = 2000
    for _ in range(draws):
        total += codec.decompress(codec.compress({"w": x}, random), {"w": x})["w"]
    step = 1 / 127
    assert np.max(np.abs(total / draws - x)) < 0.07 * step


@settings(max_examples=60, deadline=None)
@given(tensors, st.floats(0.001, 1.0))
def test_topk_keeps_exactly_the_largest_entries(x: np.ndarray, fraction: float) -> None:
    codec = TopKCompressor(fraction)
    payload = codec.compress({"w": x}, SeededRandom(0))
    k = codec.kept(x.size)
    assert k == min(x.size, max(1, math.ceil(fraction * x.size)))
    assert payload["w#index"].shape == (k,) and payload["w#index"].dtype == np.uint32
    back = codec.decompress(payload, {"w": x})["w"]
    kept = back != 0
    assert np.array_equal(back[kept], x[kept])  # exact where kept
    # No dropped entry is larger in magnitude than a kept one.
    index = payload["w#index"].astype(np.int64)
    dropped = np.delete(np.abs(x), index)
    if dropped.size:
        assert dropped.max() <= np.abs(x[index]).min()


@pytest.mark.parametrize("codec", [Int8Compressor(), TopKCompressor(0.05)], ids=["int8", "topk"])
def test_error_feedback_loses_nothing(codec: Any) -> None:
    # What the server received over all rounds plus what the client still owes equals the sum
    # of the updates: error feedback telescopes.
    rng = np.random.default_rng(0)
    stage = CompressionStage(codec, error_feedback=True, random=SeededRandom(2))
    reference = {"w": np.zeros((20, 10), np.float32), "b": np.zeros(10, np.float32)}
    context = RoundContext("run", 1)
    received = {n: np.zeros_like(a, dtype=np.float64) for n, a in reference.items()}
    total = {n: np.zeros_like(a, dtype=np.float64) for n, a in reference.items()}
    for _ in range(15):
        update = {n: rng.normal(size=a.shape).astype(np.float32) for n, a in reference.items()}
        for n in update:
            total[n] += update[n]
        sent = stage.apply(_fit(update), context)
        for n, arr in codec.decompress(sent.update, reference).items():
            received[n] += arr
    residual = stage._residuals["a"]
    for n in reference:
        np.testing.assert_allclose(received[n] + residual[n], total[n], atol=1e-4)
    assert stage.residual_norm("a") > 0


def test_without_error_feedback_topk_drops_mass_for_good() -> None:
    stage = CompressionStage(TopKCompressor(0.1), error_feedback=False, random=SeededRandom(0))
    update = {"w": np.arange(1, 101, dtype=np.float32)}
    sent = stage.apply(_fit(update), RoundContext("run", 1))
    assert sent.update["w#value"].size == 10
    assert stage.residual_norm("a") == 0.0


def test_server_decompresses_one_upload_at_a_time_into_the_weighted_sum() -> None:
    reference = {"w": np.zeros(50, np.float32)}
    codec = TopKCompressor(0.2)
    aggregator = DecompressingAggregator(WeightedSum(), codec)
    acc = aggregator.start(reference, RoundContext("run", 1, clients=("a", "b")))
    rng = np.random.default_rng(1)
    dense = []
    for client, weight in (("a", 2.0), ("b", 3.0)):
        x = rng.normal(size=50).astype(np.float32)
        payload = codec.compress({"w": x}, SeededRandom(0))
        dense.append(weight * codec.decompress(payload, reference)["w"])
        acc.add(_fit(payload, client, weight))
    aggregate = acc.finish()
    np.testing.assert_allclose(aggregate.total["w"], dense[0] + dense[1], rtol=1e-6)
    assert aggregate.weight == 5.0
    assert aggregate.report["compression"] == "topk"


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"w#index": np.array([0, 99], np.uint32), "w#value": np.ones(2, np.float32)}, "outside"),
        ({"w#index": np.array([3, 3], np.uint32), "w#value": np.ones(2, np.float32)}, "repeated"),
        ({"w#index": np.array([0, 1], np.uint32)}, "missing"),
        ({"w": np.ones(10, np.float32)}, "unexpected"),
        (
            {"w#index": np.array([0, 1], np.uint32), "w#value": np.array([1, np.nan], np.float32)},
            "NaN",
        ),
        ({"w#index": np.array([0, 1], np.int64), "w#value": np.ones(2, np.float32)}, "expected"),
    ],
)
def test_malformed_compressed_uploads_are_rejected(
    payload: dict[str, np.ndarray], message: str
) -> None:
    reference = {"w": np.zeros(10, np.float32)}
    aggregator = DecompressingAggregator(WeightedSum(), TopKCompressor(0.2))
    acc = aggregator.start(reference, RoundContext("run", 1, clients=("a",)))
    with pytest.raises(UpdateRejected, match=message):
        acc.add(_fit(payload))


def test_int8_rejects_a_bad_step() -> None:
    reference = {"w": np.zeros(4, np.float32)}
    payload = {"w": np.zeros(4, np.uint8), "w#step": np.array([-1.0], np.float32)}
    with pytest.raises(UpdateRejected, match="step"):
        Int8Compressor().decompress(payload, reference)


def _config(**overrides: Any) -> RunConfig:
    raw: dict[str, Any] = {
        "name": "compression",
        "seed": 3,
        "data": {"dataset": "breast_cancer", "scaling": "local"},
        "model": {"name": "logistic"},
        "federation": {
            "clients": 4,
            "rounds": 6,
            "learning_rate": 0.1,
            "batch_size": 16,
            "fraction_evaluate": 0.0,
        },
    }
    raw.update(overrides)
    return RunConfig.from_dict(raw)


def test_compressed_runs_learn_as_well_with_a_fraction_of_the_bytes() -> None:
    plain = run(_config())
    int8 = run(_config(compression={"kind": "int8"}))
    topk = run(_config(compression={"kind": "topk", "fraction": 0.25}))
    # Logistic regression on 30 features and 2 classes: 2·30 + 2 = 62 float32 parameters.
    assert plain.communication.update_bytes_per_client == 62 * 4
    assert int8.communication.update_bytes_per_client == 62 + 2 * 4  # uint8 + one step/tensor
    assert topk.communication.update_bytes_per_client == (15 + 1) * 8
    assert int8.communication.bytes_up < plain.communication.bytes_up / 3
    for compressed in (int8, topk):
        assert compressed.final["accuracy"] > plain.final["accuracy"] - 0.03
    assert "client:compress-int8+ef" in int8.pipeline


def test_int8_with_secagg_masks_a_16_bit_ring() -> None:
    secure = {"secure_aggregation": "secagg", "secagg": {"clip_range": 2.0, "max_weight": 500}}
    plain = run(_config(**secure))
    narrow = run(_config(**secure, compression={"kind": "int8"}))
    # uint32: the parameters, the weight slot and the two summed counters (clipped, capped)
    assert plain.communication.update_bytes_per_client == (62 + 3) * 4
    assert narrow.communication.update_bytes_per_client == (62 + 3) * 2  # uint16
    assert narrow.privacy.secure_aggregation["modulus_bits"] == 16  # type: ignore[attr-defined]
    assert narrow.final["accuracy"] > plain.final["accuracy"] - 0.03


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"secure_aggregation": "secagg", "compression": {"kind": "topk"}},
            "use kind = 'int8' with secagg",
        ),
        ({"secure_aggregation": "ckks", "compression": {"kind": "int8"}}, "not available"),
        ({"compression": {"kind": "int8", "fraction": 0.5}}, "fraction applies"),
        ({"compression": {"kind": "zip"}}, "compression.kind"),
    ],
)
def test_compression_config_refusals(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(**overrides)


def test_a_stage_travels_to_another_process_without_its_csprng_state() -> None:
    # Ray ships client stages with pickle: the cipher state of a SecureRandom must not travel
    # (it cannot be pickled, and a copy would repeat the rounding randomness); the copy makes
    # its own.
    import pickle

    stage = CompressionStage(Int8Compressor(), error_feedback=False)
    update = {"w": np.linspace(-1, 1, 9, dtype=np.float32)}
    stage.apply(_fit(update), RoundContext("run", 1))  # creates the CSPRNG
    copy = pickle.loads(pickle.dumps(stage))  # noqa: S301 - our own bytes, as Ray ships them
    sent = copy.apply(_fit(update), RoundContext("run", 2))
    assert sent.update["w"].dtype == np.uint8


@pytest.mark.parametrize(
    "compression",
    [{"kind": "int8", "error_feedback": False}, {"kind": "topk", "error_feedback": True}],
)
def test_client_level_dp_refuses_compression_that_can_lengthen_an_update(
    compression: dict[str, Any],
) -> None:
    privacy = {"unit": "client", "epsilon": 5.0, "delta": 1e-3}
    with pytest.raises(ConfigError, match="longer than clip_norm"):
        _config(
            privacy=privacy,
            compression=compression,
            data={"dataset": "breast_cancer", "scaling": "bounds", "validation_fraction": 0.0},
        )
    # Allowed: top-k without error feedback (never longer), and int8 inside SecAgg's encoding.
    _config(
        privacy=privacy,
        compression={"kind": "topk", "error_feedback": False},
        data={"dataset": "breast_cancer", "scaling": "bounds", "validation_fraction": 0.0},
    )
    _config(
        privacy=privacy,
        secure_aggregation="secagg",
        compression={"kind": "int8"},
        data={"dataset": "breast_cancer", "scaling": "bounds", "validation_fraction": 0.0},
    )


def test_int8_never_wraps_the_largest_entry() -> None:
    # A step rounded to float32 could put the peak a hair above 127 steps; stochastic rounding
    # must still never give 128 (which would decode as -128, flipping the sign).
    rng = np.random.default_rng(4)
    codec = Int8Compressor()
    for _ in range(200):
        x = (rng.normal(size=64) * 10 ** rng.uniform(-30, 30)).astype(np.float32)
        back = codec.decompress(codec.compress({"w": x}, SeededRandom(5)), {"w": x})["w"]
        big = np.argmax(np.abs(x))
        assert np.sign(back[big]) == np.sign(x[big])
    tiny = {"w": np.full(4, 1e-45, np.float32)}  # a denormal peak: step 1, zeros
    assert not codec.decompress(codec.compress(tiny, SeededRandom(0)), tiny)["w"].any()
