"""SEV-SNP reports (EXPERIMENTAL parser): well-formed and tampered reports under a test chain."""

from __future__ import annotations

import base64
import json
import os
import struct

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from tee_chains import chain, pem

from veil.privacy.tee.attestation import AttestationRefused, Evidence, Policy, report_data, verify
from veil.privacy.tee.sevsnp import REPORT_BYTES, SevSnpVerifier, parse

TLS = b"server-tls-spki"
MEASUREMENT = bytes(range(48))


def snp_report(
    key: ec.EllipticCurvePrivateKey, data: bytes, *, policy: int = 0x30000, snp_svn: int = 8
) -> bytes:
    report = bytearray(REPORT_BYTES)
    struct.pack_into("<IIQ", report, 0, 3, 1, policy)
    struct.pack_into("<II", report, 0x30, 0, 1)
    report[0x50:0x90] = data
    report[0x90:0xC0] = MEASUREMENT
    tcb = bytes([3, 0, 0, 0, 0, 0, snp_svn, 115])
    report[0x180:0x188] = tcb
    report[0x1A0:0x1E0] = b"\x11" * 64
    r, s = decode_dss_signature(key.sign(bytes(report[:0x2A0]), ec.ECDSA(hashes.SHA384())))
    report[0x2A0:0x2E8] = r.to_bytes(72, "little")
    report[0x2E8:0x330] = s.to_bytes(72, "little")
    return bytes(report)


@pytest.fixture(scope="module")
def amd() -> tuple[object, ...]:
    return chain(ec.SECP384R1(), ("ARK-Test", "SEV-Test", "SEV-VCEK"))


def evidence(report: bytes, vcek_chain: str, nonce: bytes) -> Evidence:
    body = json.dumps({"report": base64.b64encode(report).decode(), "vcek_chain": vcek_chain})
    return Evidence("sev_snp", body.encode(), TLS, 1)


POLICY = Policy(frozenset({MEASUREMENT.hex()}), 8)


def test_well_formed_report_parses_and_verifies(amd: tuple) -> None:  # type: ignore[type-arg]
    ark, ask, vcek, key = amd
    nonce = os.urandom(32)
    report = snp_report(key, report_data(TLS, nonce, 1))
    fields = parse(report)
    assert fields.version == 3 and fields.measurement == MEASUREMENT
    assert fields.reported_tcb.snp == 8 and fields.reported_tcb.microcode == 115
    claims = verify(evidence(report, pem(vcek, ask), nonce), POLICY, nonce,
                    verifiers=[SevSnpVerifier(ark)])  # fmt: skip
    assert claims.measurement == MEASUREMENT.hex() and claims.security_version == 8
    assert claims.hardware_root_of_trust and claims.extra["experimental"]


@pytest.mark.parametrize("offset", [0x04, 0x55, 0x95, 0x182, 0x2A5])
def test_any_changed_byte_breaks_the_signature(amd: tuple, offset: int) -> None:  # type: ignore[type-arg]
    ark, ask, vcek, key = amd
    nonce = os.urandom(32)
    report = bytearray(snp_report(key, report_data(TLS, nonce, 1)))
    report[offset] ^= 0x01
    with pytest.raises(AttestationRefused, match="does not verify"):
        verify(evidence(bytes(report), pem(vcek, ask), nonce), POLICY, nonce,
               verifiers=[SevSnpVerifier(ark)])  # fmt: skip


def test_chain_to_another_root_debug_policy_and_old_tcb_are_refused(amd: tuple) -> None:  # type: ignore[type-arg]
    ark, ask, vcek, key = amd
    _other_ark, other_ask, other_vcek, other_key = chain(ec.SECP384R1(), ("X", "Y", "Z"))
    nonce = os.urandom(32)
    data = report_data(TLS, nonce, 1)
    verifier = [SevSnpVerifier(ark)]
    with pytest.raises(AttestationRefused, match="not signed by"):
        verify(evidence(snp_report(other_key, data), pem(other_vcek, other_ask), nonce),
               POLICY, nonce, verifiers=verifier)  # fmt: skip
    with pytest.raises(AttestationRefused, match="allows debugging"):
        verify(evidence(snp_report(key, data, policy=0x30000 | 1 << 19), pem(vcek, ask), nonce),
               POLICY, nonce, verifiers=verifier)  # fmt: skip
    with pytest.raises(AttestationRefused, match="below the policy's minimum"):
        verify(evidence(snp_report(key, data, snp_svn=7), pem(vcek, ask), nonce),
               POLICY, nonce, verifiers=verifier)  # fmt: skip
    with pytest.raises(AttestationRefused, match="another nonce"):
        verify(evidence(snp_report(key, data), pem(vcek, ask), nonce), POLICY, os.urandom(32),
               verifiers=verifier)  # fmt: skip
    with pytest.raises(AttestationRefused, match="bytes"):
        parse(b"\0" * 100)
