"""Trusted execution: attested aggregation, report parsers and sealed storage (signed run
manifests: `veil.crypto.manifest`).

See docs/tee.md for what each backend proves and what it does not. `software_dev` has no
hardware root of trust; the SEV-SNP and TDX parsers are EXPERIMENTAL (not verified on hardware).
"""

from veil.privacy.tee.attestation import (
    AttestationRefused,
    Attester,
    Claims,
    Evidence,
    Policy,
    Verifier,
    attest,
    report_data,
    verify,
)

__all__ = [
    "AttestationRefused",
    "Attester",
    "Claims",
    "Evidence",
    "Policy",
    "Verifier",
    "attest",
    "report_data",
    "verify",
]
