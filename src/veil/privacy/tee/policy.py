"""What every attestation backend's verifier checks evidence against: the client's `Policy`, the
measurement and report-data checks, the base64 encoding of bytes inside JSON evidence, and the
`AttestationRefused` they raise.

The backends (`software_dev`, `sevsnp`, `tdx`) build on this module, and `attestation` (the
evidence format, `attest` and `verify` with the built-in verifiers) builds on them, so that the
front door can name its default backends without the backends importing it back.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from dataclasses import dataclass

from veil.errors import VeilError

__all__ = [
    "AttestationRefused",
    "Policy",
    "check_measurement",
    "check_report_data",
    "from_b64",
    "to_b64",
]


class AttestationRefused(VeilError):
    """Evidence that does not satisfy the verifier's policy: the client must not send updates."""


@dataclass(frozen=True)
class Policy:
    """What a client accepts as an attested aggregator.

    `allowed_measurements` are lowercase hex digests of the aggregator's code and configuration
    (for `software_dev`, `veil.privacy.tee.measurement.measure`); `min_security_version` is the
    lowest security version number (TCB/SVN) accepted; `allow_insecure_dev` accepts evidence with
    no hardware root of trust (`software_dev`), for development only.
    """

    allowed_measurements: frozenset[str]
    min_security_version: int = 0
    allow_insecure_dev: bool = False


def check_measurement(measurement: str, svn: int, policy: Policy) -> None:
    """AttestationRefused unless the measurement is allowed and the SVN high enough."""
    if measurement not in policy.allowed_measurements:
        raise AttestationRefused(
            f"measurement {measurement[:16]}… is not in the policy's allowed measurements "
            f"({', '.join(sorted(m[:16] + '…' for m in policy.allowed_measurements))}): the "
            "aggregator runs other code or another configuration than this client trusts"
        )
    if svn < policy.min_security_version:
        raise AttestationRefused(
            f"security version {svn} is below the policy's minimum "
            f"{policy.min_security_version}: the aggregator's platform is not patched"
        )


def check_report_data(found: bytes, expected: bytes) -> None:
    """AttestationRefused unless the report's data is the expected binding (constant time)."""
    if not hmac.compare_digest(found, expected):
        raise AttestationRefused(
            "attestation evidence is not bound to this challenge: it was made for another "
            "nonce, round or TLS key (a replay, or evidence from another server)"
        )


def to_b64(data: bytes) -> str:
    """Base64 text of `data` (how bytes travel inside JSON evidence)."""
    return base64.b64encode(data).decode("ascii")


def from_b64(value: object, what: str = "attestation evidence") -> bytes:
    """The bytes of base64 text; AttestationRefused naming `what` if it is not base64 text."""
    if not isinstance(value, str):
        raise AttestationRefused(f"malformed {what}: expected base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise AttestationRefused(f"malformed {what}: invalid base64") from None
