"""The attestation interface: evidence bound to a TLS key, a nonce and a round, and a policy.

An `Attester` (inside the aggregator's trusted execution environment) produces a backend's raw
report over 64 bytes of `report_data`; a `Verifier` (at each client) checks that report against a
`Policy` and the nonce the client drew, and returns the `Claims` it proves. The binding::

    report_data = SHA-256(signing_payload("tee/report-data", tls_public_key, nonce, round))

padded with zeros to 64 bytes (the size of the report-data field of AMD SEV-SNP and Intel TDX
reports). `tls_public_key` is the DER SubjectPublicKeyInfo of the aggregator's TLS certificate
key, so evidence is fresh (the client's nonce), tied to one round, and tied to the key that
terminates the channel the client sends its update on (the TLS handshake proves possession of
that key). `veil.crypto.identity.signing_payload` makes the encoding unambiguous.

Shortest example::

    evidence = attest(attester, tls_key, nonce, round_=3)
    claims = verify(evidence, policy, nonce)     # AttestationRefused if anything is wrong
    assert claims.tls_public_key == tls_key      # the caller checks the channel's key
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Protocol

from veil.crypto.identity import signing_payload
from veil.privacy.tee.policy import (
    AttestationRefused,
    Policy,
    check_measurement,
    check_report_data,
    from_b64,
    to_b64,
)
from veil.privacy.tee.software_dev import SoftwareDevVerifier

__all__ = [
    "NONCE_BYTES",
    "REPORT_DATA_BYTES",
    "AttestationRefused",
    "Attester",
    "Claims",
    "Evidence",
    "Policy",
    "Verifier",
    "attest",
    "check_measurement",
    "check_report_data",
    "default_verifiers",
    "describe",
    "from_b64",
    "report_data",
    "to_b64",
    "verify",
]

#: Bytes of a client's challenge nonce (fresh from os.urandom for every round).
NONCE_BYTES = 32
#: Size of the report-data field of SEV-SNP and TDX reports; SHA-256 fills the first 32.
REPORT_DATA_BYTES = 64


@dataclass(frozen=True)
class Claims:
    """What verified evidence proves, as far as its backend's root of trust goes."""

    backend: str
    measurement: str
    security_version: int
    tls_public_key: bytes
    round: int
    #: False for `software_dev`: its signature proves nothing about the hardware.
    hardware_root_of_trust: bool
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """The one-line description logs and result.json use."""
        return describe(self.backend, hardware=self.hardware_root_of_trust)


def describe(backend: str, *, hardware: bool) -> str:
    """``"software_dev (no hardware root of trust)"`` and the like."""
    return backend if hardware else f"{backend} (no hardware root of trust)"


class Attester(Protocol):
    """The aggregator's side: a backend's raw report over `report_data`.

    `nonce` is passed for backends that carry it separately; every backend must bind it through
    `report_data` (which already contains it).
    """

    backend: str

    def evidence(self, nonce: bytes, report_data: bytes) -> bytes: ...


class Verifier(Protocol):
    """The client's side for one backend: check a raw report, return what it proves.

    Must raise AttestationRefused unless the report is authentic for its backend, its
    measurement is in `policy.allowed_measurements`, its security version is at least
    `policy.min_security_version`, and its report data equals `expected_report_data`.
    """

    backend: str

    def verify_report(
        self, report: bytes, policy: Policy, expected_report_data: bytes
    ) -> tuple[str, int, dict[str, Any]]: ...


@dataclass(frozen=True)
class Evidence:
    """What the aggregator sends a client: the raw report and the values it is bound to."""

    backend: str
    report: bytes
    tls_public_key: bytes
    round: int

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "backend": self.backend,
                "report": to_b64(self.report),
                "tls_public_key": to_b64(self.tls_public_key),
                "round": self.round,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Evidence:
        """Parse JSON evidence; AttestationRefused if it is malformed."""
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise AttestationRefused("malformed attestation evidence: not JSON") from None
        if not isinstance(raw, dict):
            raise AttestationRefused("malformed attestation evidence: not a JSON object")
        backend, round_ = raw.get("backend"), raw.get("round")
        if not isinstance(backend, str) or isinstance(round_, bool) or not isinstance(round_, int):
            raise AttestationRefused("malformed attestation evidence: backend or round missing")
        return cls(
            backend, from_b64(raw.get("report")), from_b64(raw.get("tls_public_key")), round_
        )


def report_data(tls_public_key: bytes, nonce: bytes, round_: int) -> bytes:
    """The 64-byte report data binding evidence to a TLS key, a nonce and a round."""
    digest = hashlib.sha256(signing_payload("tee/report-data", tls_public_key, nonce, round_))
    return digest.digest().ljust(REPORT_DATA_BYTES, b"\0")


def attest(attester: Attester, tls_public_key: bytes, nonce: bytes, round_: int) -> Evidence:
    """The aggregator's evidence answering a client's `nonce` for round `round_`."""
    report = attester.evidence(nonce, report_data(tls_public_key, nonce, round_))
    return Evidence(attester.backend, report, tls_public_key, round_)


def verify(
    evidence: Evidence,
    policy: Policy,
    nonce: bytes,
    *,
    verifiers: Collection[Verifier] | None = None,
) -> Claims:
    """Check `evidence` against `policy` for the challenge `nonce`; the claims it proves.

    AttestationRefused if no verifier handles its backend, if the report is not authentic, if
    the measurement or security version is not allowed, or if the report is not bound to
    (`evidence.tls_public_key`, `nonce`, `evidence.round`). The caller must still compare
    `claims.tls_public_key` with the key of its own channel and `claims.round` with its round.
    """
    if len(nonce) != NONCE_BYTES:
        raise AttestationRefused(f"a challenge nonce is {NONCE_BYTES} bytes, got {len(nonce)}")
    chosen = {v.backend: v for v in (verifiers if verifiers is not None else default_verifiers())}
    verifier = chosen.get(evidence.backend)
    if verifier is None:
        raise AttestationRefused(
            f"no verifier for attestation backend '{evidence.backend}'; accepted: {sorted(chosen)}"
        )
    expected = report_data(evidence.tls_public_key, nonce, evidence.round)
    measurement, svn, extra = verifier.verify_report(evidence.report, policy, expected)
    hardware = bool(extra.pop("hardware_root_of_trust", False))
    return Claims(
        backend=evidence.backend,
        measurement=measurement,
        security_version=svn,
        tls_public_key=evidence.tls_public_key,
        round=evidence.round,
        hardware_root_of_trust=hardware,
        extra=extra,
    )


def default_verifiers() -> list[Verifier]:
    """One verifier per built-in backend that takes evidence over the protocol."""
    return [SoftwareDevVerifier()]
