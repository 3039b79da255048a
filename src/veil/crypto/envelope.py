"""Encryption at rest: AES-256-GCM envelope encryption of checkpoints, caches and exports.

Every `seal` draws a fresh 256-bit data key that encrypts the payload; the data key itself is
encrypted ("wrapped") under the long-lived key-encryption key (KEK), which lives in a 0600 key
file and never touches the data directly. So the KEK encrypts only 32-byte keys (no nonce-reuse
risk from large or many payloads), and re-keying a store means re-wrapping small keys.

Shortest example::

    generate_key_file(Path("veil.key"))            # once; keep it out of the run folder
    kek = load_key_file(Path("veil.key"))
    blob = seal(checkpoint_bytes, kek, associated_data=b"run-42/round-7")
    assert open_sealed(blob, kek, associated_data=b"run-42/round-7") == checkpoint_bytes

Format (version 1), all fields fixed-size except the last::

    b"VEIL-ENV1" (9) | key nonce (12) | wrapped data key (32 + 16 tag) | data nonce (12)
    | ciphertext + 16-byte tag

The data key is wrapped with AES-GCM under the KEK (authenticated data: the magic). The payload is
encrypted with AES-GCM under the data key; its authenticated data is the whole header (magic,
nonces, wrapped key) followed by the caller's `associated_data`, so changing any header byte, the
ciphertext, or the context the caller binds (a path, a run id) makes `open_sealed` fail.
Nonces are 96-bit random values; each key encrypts exactly one message.

What it does not protect: the payload length is visible, and a blob can be replaced by another
blob sealed under the same KEK with the same associated data (bind a context to prevent it).
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from veil.atomic import atomic_write_bytes
from veil.crypto.keyfile import read_private
from veil.errors import UserError

__all__ = [
    "KEY_BYTES",
    "MAGIC",
    "SealedDataError",
    "generate_key_file",
    "load_key_file",
    "open_sealed",
    "seal",
]

MAGIC = b"VEIL-ENV1"
KEY_BYTES = 32
_NONCE_BYTES = 12
_TAG_BYTES = 16
_WRAPPED_BYTES = KEY_BYTES + _TAG_BYTES
_HEADER_BYTES = len(MAGIC) + _NONCE_BYTES + _WRAPPED_BYTES + _NONCE_BYTES
_ERROR = "cannot decrypt: wrong key, tampered, or not a Veil envelope"


class SealedDataError(UserError):
    """An envelope does not open: wrong key, altered bytes, other associated data, not one."""


def generate_key_file(path: Path) -> None:
    """Write a new random 256-bit key (os.urandom) as base64 text to `path`, mode 0600.

    Refuses (UserError) to overwrite an existing file: losing a KEK loses every sealed blob.
    """
    path = Path(path)
    if path.exists():
        raise UserError(
            f"key file '{path}' already exists; refusing to overwrite it "
            "(everything sealed under it would become unreadable)"
        )
    key = os.urandom(KEY_BYTES)
    atomic_write_bytes(path, base64.b64encode(key) + b"\n", mode=0o600)


def load_key_file(path: Path) -> bytes:
    """The 32-byte key in `path` (base64 text, as `generate_key_file` writes it).

    UserError if the file is missing, not base64 of exactly 32 bytes, or readable or writable by
    group or others (the message says how to fix the permissions).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"no key file at '{path}'; create one with generate_key_file")
    text = read_private(path, "key file").strip()
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise UserError(f"key file '{path}' is not base64 text") from None
    if len(key) != KEY_BYTES:
        raise UserError(f"key file '{path}' holds {len(key)} bytes, expected {KEY_BYTES}")
    return key


def seal(plaintext: bytes, key_encryption_key: bytes, *, associated_data: bytes = b"") -> bytes:
    """Encrypt and authenticate `plaintext` under a fresh data key wrapped by the KEK.

    `associated_data` is authenticated but not stored: pass the same bytes to `open_sealed`.
    Two seals of the same plaintext differ (fresh key and nonces). ValueError if the KEK is not
    32 bytes.
    """
    _check_kek(key_encryption_key)
    data_key = AESGCM.generate_key(bit_length=256)
    key_nonce = os.urandom(_NONCE_BYTES)
    wrapped = AESGCM(key_encryption_key).encrypt(key_nonce, data_key, MAGIC)
    data_nonce = os.urandom(_NONCE_BYTES)
    header = MAGIC + key_nonce + wrapped + data_nonce
    ciphertext = AESGCM(data_key).encrypt(data_nonce, plaintext, header + associated_data)
    return header + ciphertext


def open_sealed(blob: bytes, key_encryption_key: bytes, *, associated_data: bytes = b"") -> bytes:
    """The plaintext of a `seal` output; SealedDataError on any failure (one message for all).

    ValueError if the KEK is not 32 bytes (a programming error, not a data error).
    """
    _check_kek(key_encryption_key)
    if len(blob) < _HEADER_BYTES + _TAG_BYTES or not blob.startswith(MAGIC):
        raise SealedDataError(_ERROR)
    offset = len(MAGIC)
    key_nonce = blob[offset : offset + _NONCE_BYTES]
    offset += _NONCE_BYTES
    wrapped = blob[offset : offset + _WRAPPED_BYTES]
    offset += _WRAPPED_BYTES
    data_nonce = blob[offset : offset + _NONCE_BYTES]
    header = blob[:_HEADER_BYTES]
    try:
        data_key = AESGCM(key_encryption_key).decrypt(key_nonce, wrapped, MAGIC)
        return AESGCM(data_key).decrypt(data_nonce, blob[_HEADER_BYTES:], header + associated_data)
    except InvalidTag:
        raise SealedDataError(_ERROR) from None


def _check_kek(key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise ValueError(f"the key-encryption key must be {KEY_BYTES} bytes")
