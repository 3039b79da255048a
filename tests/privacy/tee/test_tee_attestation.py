"""Attestation: evidence bound to a TLS key, a nonce and a round, checked against a policy."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from veil.assembly.secure_aggregation.tee import measure
from veil.config import RunConfig
from veil.crypto.identity import IdentityKey
from veil.privacy.tee.attestation import (
    AttestationRefused,
    Evidence,
    Policy,
    attest,
    report_data,
    verify,
)
from veil.privacy.tee.measurement import code_digest
from veil.privacy.tee.software_dev import SoftwareDevAttester

MEASUREMENT = "ab" * 32
TLS = b"server-tls-spki"
DEV = Policy(frozenset({MEASUREMENT}), 0, allow_insecure_dev=True)


def evidence_for(nonce: bytes, *, round_: int = 1, tls: bytes = TLS, svn: int = 0) -> Evidence:
    return attest(SoftwareDevAttester(MEASUREMENT, security_version=svn), tls, nonce, round_)


def test_valid_dev_evidence_gives_its_claims() -> None:
    nonce = os.urandom(32)
    claims = verify(evidence_for(nonce, round_=4), DEV, nonce)
    assert claims.measurement == MEASUREMENT
    assert claims.tls_public_key == TLS and claims.round == 4
    assert not claims.hardware_root_of_trust
    assert claims.describe() == "software_dev (no hardware root of trust)"


def test_dev_evidence_is_refused_without_allow_insecure_dev() -> None:
    nonce = os.urandom(32)
    strict = Policy(frozenset({MEASUREMENT}), 0, allow_insecure_dev=False)
    with pytest.raises(AttestationRefused, match="no hardware root of trust"):
        verify(evidence_for(nonce), strict, nonce)


def test_evidence_for_another_nonce_is_a_replay() -> None:
    old = os.urandom(32)
    with pytest.raises(AttestationRefused, match="another nonce"):
        verify(evidence_for(old), DEV, os.urandom(32))


def test_measurement_not_in_the_allow_list_is_refused() -> None:
    nonce = os.urandom(32)
    other = Policy(frozenset({"cd" * 32}), 0, allow_insecure_dev=True)
    with pytest.raises(AttestationRefused, match="not in the policy's allowed measurements"):
        verify(evidence_for(nonce), other, nonce)


def test_old_security_version_is_refused() -> None:
    nonce = os.urandom(32)
    policy = Policy(frozenset({MEASUREMENT}), 3, allow_insecure_dev=True)
    with pytest.raises(AttestationRefused, match="below the policy's minimum 3"):
        verify(evidence_for(nonce, svn=2), policy, nonce)
    assert verify(evidence_for(nonce, svn=3), policy, nonce).security_version == 3


@pytest.mark.parametrize("field", ["measurement", "report_data", "security_version"])
def test_tampered_report_is_refused(field: str) -> None:
    nonce = os.urandom(32)
    evidence = evidence_for(nonce)
    report = json.loads(evidence.report)
    report[field] = {
        "measurement": "cd" * 32,
        "report_data": base64.b64encode(report_data(TLS, nonce, 2)).decode(),
        "security_version": 9,
    }[field]
    forged = Evidence(evidence.backend, json.dumps(report).encode(), TLS, evidence.round)
    with pytest.raises(AttestationRefused, match="signature does not verify"):
        verify(forged, Policy(frozenset({MEASUREMENT, "cd" * 32}), 0, True), nonce)


def test_evidence_moved_to_another_tls_key_or_round_is_refused() -> None:
    nonce = os.urandom(32)
    evidence = evidence_for(nonce)
    for moved in (
        Evidence(evidence.backend, evidence.report, b"other-key", evidence.round),
        Evidence(evidence.backend, evidence.report, TLS, evidence.round + 1),
    ):
        with pytest.raises(AttestationRefused, match="not bound to this challenge"):
            verify(moved, DEV, nonce)


def test_report_signed_by_a_new_key_for_a_forged_measurement_passes_only_dev_policy() -> None:
    # The residual risk of software_dev, stated as a test: anyone can mint valid evidence.
    nonce = os.urandom(32)
    forged = attest(SoftwareDevAttester(MEASUREMENT, key=IdentityKey.generate()), TLS, nonce, 1)
    assert verify(forged, DEV, nonce).measurement == MEASUREMENT


def test_malformed_evidence_and_unknown_backend_are_refused() -> None:
    nonce = os.urandom(32)
    with pytest.raises(AttestationRefused, match="not JSON"):
        Evidence.from_bytes(b"\xff")
    unknown = Evidence("sgx-magic", b"{}", TLS, 1)
    with pytest.raises(AttestationRefused, match="no verifier"):
        verify(unknown, DEV, nonce)
    with pytest.raises(AttestationRefused, match="32 bytes"):
        verify(evidence_for(nonce), DEV, b"short")
    evidence = evidence_for(nonce)
    assert Evidence.from_bytes(evidence.to_bytes()) == evidence


def config(**tee: object) -> RunConfig:
    return RunConfig.from_dict(
        {
            "secure_aggregation": "tee",
            "data": {"dataset": "breast_cancer"},
            "federation": {"clients": 3, "rounds": 1},
            "tee": {"allow_insecure_dev": True, **tee},
        }
    )


def test_measurement_covers_code_and_aggregation_config(tmp_path: Path) -> None:
    base = config()
    assert measure(base) == measure(config())
    changed = RunConfig.from_dict({**base.to_dict(), "robust": {"method": "median"}})
    assert measure(changed) != measure(base)
    package = tmp_path / "veil"
    package.mkdir()
    (package / "a.py").write_text("x = 1\n")
    before = code_digest(package)
    (package / "a.py").write_text("x = 2\n")
    code_digest.cache_clear()
    assert code_digest(package) != before
