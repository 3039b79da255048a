"""CKKS inside a federation run: the same accuracy as plain aggregation on the medical example,
reported in result.json."""

from __future__ import annotations

import veil
from support import EXAMPLES
from veil.config import load_config


def test_medical_example_with_ckks_matches_plain_aggregation() -> None:
    encrypted = veil.run(EXAMPLES / "medical_diagnosis_ckks.toml")
    plain_cfg = load_config(EXAMPLES / "medical_diagnosis_ckks.toml").model_copy(
        update={"secure_aggregation": "plain", "ckks": None}
    )
    plain = veil.run(plain_cfg)
    assert abs(encrypted.final["accuracy"] - plain.final["accuracy"]) <= 0.01
    assert encrypted.privacy.aggregation == "ckks"
    he = encrypted.privacy.homomorphic_encryption  # type: ignore[attr-defined]
    assert he["coeff_modulus_bits"] == [60, 40] and "collud" in he["threat"]
    for r in encrypted.rounds:
        assert r.applied and r.clients == 5
        assert r.aggregation["count_slot_error"] <= r.aggregation["tolerance"]
        assert r.aggregation["ciphertexts_per_client"] == 1
    # One ciphertext of N = 8192 with one 60-bit data prime: 128 KiB per client and round.
    assert encrypted.rounds[0].bytes_up < 5 * 140_000 + 200_000
