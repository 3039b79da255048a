"""Certificate chains of hardware attestation (AMD ARK → ASK → VCEK, Intel root → PCK)."""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from veil.privacy.tee.policy import AttestationRefused

__all__ = ["load_pem_chain", "verify_chain"]


def load_pem_chain(data: bytes, what: str) -> list[x509.Certificate]:
    """The PEM certificates in `data`; AttestationRefused if there are none or one is bad."""
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise AttestationRefused(f"malformed {what}: not PEM certificates") from None
    return certs


def verify_chain(
    chain: Sequence[x509.Certificate],
    trusted_root: x509.Certificate,
    *,
    what: str,
    at: dt.datetime | None = None,
) -> x509.Certificate:
    """The leaf of `chain` (leaf first, ending below or at the root), after checking each link's
    signature up to `trusted_root` and every validity period; AttestationRefused otherwise."""
    if not chain:
        raise AttestationRefused(f"{what}: empty certificate chain")
    now = at or dt.datetime.now(dt.UTC)
    links = list(chain)
    if links[-1] != trusted_root:
        links.append(trusted_root)
    for cert in links:
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise AttestationRefused(
                f"{what}: certificate '{cert.subject.rfc4514_string()}' is not valid now"
            )
    for child, parent in itertools.pairwise(links):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature):
            raise AttestationRefused(
                f"{what}: '{child.subject.rfc4514_string()}' is not signed by "
                f"'{parent.subject.rfc4514_string()}' (not the vendor's chain)"
            ) from None
    return links[0]
