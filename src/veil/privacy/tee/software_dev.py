"""`software_dev`: attestation evidence with NO hardware root of trust, for development.

The "report" is JSON signed by an Ed25519 key the aggregator process generated itself::

    {"format": "veil-software-dev-v1", "measurement": hex, "security_version": int,
     "report_data": base64 (64 bytes), "signing_key": base64 (32 bytes), "signature": base64}

signed over ``signing_payload("tee/software_dev", format, measurement, security_version,
report_data, signing_key)``. The signature proves only that whoever holds that key produced the
report: a malicious server can produce the same report for any measurement. It exercises the
whole protocol (freshness, TLS binding, policy) so that a hardware backend can replace it, and
`SoftwareDevVerifier` refuses it unless the policy sets ``allow_insecure_dev = true``.
"""

from __future__ import annotations

import json
from typing import Any

from veil.crypto.identity import IdentityKey, IdentityPublicKey, SignatureRejected, signing_payload
from veil.errors import UserError
from veil.privacy.tee.policy import (
    AttestationRefused,
    Policy,
    check_measurement,
    check_report_data,
    from_b64,
    to_b64,
)

__all__ = ["BACKEND", "FORMAT", "SoftwareDevAttester", "SoftwareDevVerifier"]

BACKEND = "software_dev"
FORMAT = "veil-software-dev-v1"


def _payload(measurement: str, svn: int, report_data: bytes, key: bytes) -> bytes:
    return signing_payload("tee/software_dev", FORMAT, measurement, svn, report_data, key)


class SoftwareDevAttester:
    """Signs JSON reports with a local Ed25519 key (a fresh one per process by default)."""

    backend = BACKEND

    def __init__(
        self, measurement: str, *, security_version: int = 0, key: IdentityKey | None = None
    ) -> None:
        self.measurement = measurement
        self.security_version = security_version
        self.key = key or IdentityKey.generate()

    def evidence(self, nonce: bytes, report_data: bytes) -> bytes:
        public = self.key.public_bytes()
        signature = self.key.sign(
            _payload(self.measurement, self.security_version, report_data, public)
        )
        return json.dumps(
            {
                "format": FORMAT,
                "measurement": self.measurement,
                "security_version": self.security_version,
                "report_data": to_b64(report_data),
                "signing_key": to_b64(public),
                "signature": to_b64(signature),
            },
            sort_keys=True,
        ).encode()


class SoftwareDevVerifier:
    """Checks `software_dev` reports; refuses them all unless `policy.allow_insecure_dev`."""

    backend = BACKEND

    def verify_report(
        self, report: bytes, policy: Policy, expected_report_data: bytes
    ) -> tuple[str, int, dict[str, Any]]:
        if not policy.allow_insecure_dev:
            raise AttestationRefused(
                "the aggregator sent software_dev evidence, which has no hardware root of "
                "trust; refused (set [tee] allow_insecure_dev = true for development only)"
            )
        raw = _parse(report)
        measurement, svn = raw["measurement"], raw["security_version"]
        data, key = _from(raw["report_data"]), _from(raw["signing_key"])
        try:
            IdentityPublicKey.from_bytes(key).verify(
                _from(raw["signature"]), _payload(measurement, svn, data, key)
            )
        except (SignatureRejected, UserError):
            raise AttestationRefused(
                "software_dev evidence rejected: its signature does not verify (altered report)"
            ) from None
        check_report_data(data, expected_report_data)
        check_measurement(measurement, svn, policy)
        return measurement, svn, {"hardware_root_of_trust": False, "signing_key": key.hex()}


def _parse(report: bytes) -> dict[str, Any]:
    try:
        raw = json.loads(report)
    except (ValueError, UnicodeDecodeError):
        raise AttestationRefused("malformed software_dev report: not JSON") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise AttestationRefused(f"malformed software_dev report: not a {FORMAT} object")
    svn = raw.get("security_version")
    if not isinstance(raw.get("measurement"), str) or isinstance(svn, bool):
        raise AttestationRefused("malformed software_dev report: bad measurement")
    if not isinstance(svn, int):
        raise AttestationRefused("malformed software_dev report: bad security_version")
    return raw


def _from(value: object) -> bytes:
    return from_b64(value, "software_dev report")
