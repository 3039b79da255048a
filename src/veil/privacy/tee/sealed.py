"""Sealed storage: data encrypted under a key derived from a sealing secret and a measurement.

A TEE seals data to its measurement: only the same code and configuration on the same platform
can unseal it. Here the sealing secret is a key file (a TEE would take it from the hardware:
SEV-SNP's MSG_KEY_REQ, SGX's EGETKEY) and the measurement is the aggregator's
(`veil.privacy.tee.measurement.measure`)::

    key = HKDF-SHA256(secret, salt = "veil-tee-seal-v1", info = signing_payload("tee/seal",
                      measurement), 32 bytes)

and data is sealed with AES-256-GCM envelope encryption (`veil.crypto.envelope`), with the
measurement in the authenticated data. A changed aggregator binary or aggregation config gives
another key, so it cannot unseal what the old one sealed. Without hardware, whoever holds the key
file and can compute a measurement can unseal: this is binding, not isolation.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from veil.crypto.envelope import KEY_BYTES, SealedDataError, open_sealed, seal
from veil.crypto.identity import signing_payload

__all__ = ["SALT", "seal_to_measurement", "sealing_key", "unseal"]

SALT = b"veil-tee-seal-v1"


def sealing_key(secret: bytes, measurement: str) -> bytes:
    """The 32-byte key that seals data to `measurement` under `secret` (HKDF-SHA256)."""
    if len(secret) < KEY_BYTES:
        raise ValueError(f"a sealing secret has at least {KEY_BYTES} bytes")
    hkdf = HKDF(hashes.SHA256(), KEY_BYTES, SALT, signing_payload("tee/seal", measurement))
    return hkdf.derive(secret)


def seal_to_measurement(
    data: bytes, secret: bytes, measurement: str, *, context: bytes = b""
) -> bytes:
    """`data` sealed so that only `measurement` (and the same `context`) can unseal it."""
    key = sealing_key(secret, measurement)
    return seal(data, key, associated_data=signing_payload("tee/sealed", measurement, context))


def unseal(blob: bytes, secret: bytes, measurement: str, *, context: bytes = b"") -> bytes:
    """The data of `seal_to_measurement`; SealedDataError if the measurement, the secret or
    the context differ, or the blob was altered."""
    key = sealing_key(secret, measurement)
    try:
        return open_sealed(
            blob, key, associated_data=signing_payload("tee/sealed", measurement, context)
        )
    except SealedDataError:
        raise SealedDataError(
            "cannot unseal: sealed by another aggregator measurement (changed code or "
            "aggregation config), another sealing secret, or altered"
        ) from None
