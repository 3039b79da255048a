"""AES-256-GCM envelope encryption at rest."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.crypto.envelope import (
    MAGIC,
    SealedDataError,
    generate_key_file,
    load_key_file,
    open_sealed,
    seal,
)
from veil.errors import UserError

KEK = bytes(range(32))


@settings(max_examples=50)
@given(st.binary(max_size=2048), st.binary(max_size=64))
def test_round_trip(plaintext: bytes, associated_data: bytes) -> None:
    blob = seal(plaintext, KEK, associated_data=associated_data)
    assert blob.startswith(MAGIC)
    assert open_sealed(blob, KEK, associated_data=associated_data) == plaintext


def test_two_seals_of_the_same_plaintext_differ() -> None:
    assert seal(b"checkpoint", KEK) != seal(b"checkpoint", KEK)


def test_wrong_key_is_refused() -> None:
    blob = seal(b"secret", KEK)
    with pytest.raises(SealedDataError, match="wrong key, tampered, or not a Veil envelope"):
        open_sealed(blob, os.urandom(32))


def test_wrong_associated_data_is_refused() -> None:
    blob = seal(b"secret", KEK, associated_data=b"run-1")
    with pytest.raises(SealedDataError):
        open_sealed(blob, KEK, associated_data=b"run-2")
    with pytest.raises(SealedDataError):
        open_sealed(blob, KEK)


def test_every_flipped_byte_is_refused() -> None:
    blob = seal(b"a small payload", KEK, associated_data=b"ctx")
    for i in range(len(blob)):  # header (magic, nonces, wrapped key) and ciphertext alike
        tampered = bytearray(blob)
        tampered[i] ^= 0x01
        with pytest.raises(SealedDataError):
            open_sealed(bytes(tampered), KEK, associated_data=b"ctx")


def test_truncated_or_foreign_blobs_are_refused() -> None:
    blob = seal(b"payload", KEK)
    for bad in (b"", MAGIC, blob[:-1], blob[:40], b"not an envelope at all" * 5):
        with pytest.raises(SealedDataError):
            open_sealed(bad, KEK)
    assert isinstance(SealedDataError("x"), UserError)


def test_kek_must_be_32_bytes() -> None:
    with pytest.raises(ValueError):
        seal(b"x", b"short")


def test_key_file_round_trip_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "veil.key"
    generate_key_file(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    key = load_key_file(path)
    assert len(key) == 32
    assert open_sealed(seal(b"x", key), key) == b"x"
    with pytest.raises(UserError, match="refusing to overwrite"):
        generate_key_file(path)
    assert load_key_file(path) == key


def test_key_file_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no key file"):
        load_key_file(tmp_path / "missing.key")
    path = tmp_path / "veil.key"
    generate_key_file(path)
    os.chmod(path, 0o644)
    with pytest.raises(UserError, match="chmod 600"):
        load_key_file(path)
    os.chmod(path, 0o600)
    path.write_text("!!! not base64 !!!")
    with pytest.raises(UserError, match="not base64"):
        load_key_file(path)
    path.write_text("c2hvcnQ=\n")  # "short"
    with pytest.raises(UserError, match="expected 32"):
        load_key_file(path)
