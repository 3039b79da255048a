"""Ed25519 identity keys and the unambiguous signing payload."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from veil.crypto.identity import IdentityKey, IdentityPublicKey, SignatureRejected, signing_payload
from veil.errors import UserError


def test_sign_and_verify_round_trip() -> None:
    key = IdentityKey.generate()
    message = signing_payload("update", "run-1", 7, b"\x00digest")
    signature = key.sign(message)
    assert len(signature) == 64
    key.public_key().verify(signature, message)
    assert len(key.public_bytes()) == 32
    IdentityPublicKey.from_bytes(key.public_bytes()).verify(signature, message)


def test_tampered_message_or_signature_is_rejected() -> None:
    key = IdentityKey.generate()
    message = signing_payload("update", 1)
    signature = key.sign(message)
    with pytest.raises(SignatureRejected):
        key.public_key().verify(signature, signing_payload("update", 2))
    forged = bytes([signature[0] ^ 1]) + signature[1:]
    with pytest.raises(SignatureRejected):
        key.public_key().verify(forged, message)
    with pytest.raises(SignatureRejected):
        IdentityKey.generate().public_key().verify(signature, message)


def test_save_and_load(tmp_path: Path) -> None:
    key = IdentityKey.generate()
    key.save(tmp_path / "identity.key")
    key.public_key().save(tmp_path / "identity.pub")
    assert stat.S_IMODE(os.stat(tmp_path / "identity.key").st_mode) == 0o600
    assert b"BEGIN PRIVATE KEY" in (tmp_path / "identity.key").read_bytes()
    loaded = IdentityKey.load(tmp_path / "identity.key")
    public = IdentityPublicKey.load(tmp_path / "identity.pub")
    assert loaded.public_key() == public == key.public_key()
    public.verify(loaded.sign(b"m"), b"m")
    assert key.private_pem().decode() not in repr(key)


def test_load_errors_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no identity key"):
        IdentityKey.load(tmp_path / "missing.key")
    (tmp_path / "junk.pub").write_text("junk")
    with pytest.raises(UserError, match="not a PEM public key"):
        IdentityPublicKey.load(tmp_path / "junk.pub")
    with pytest.raises(UserError, match="32 bytes"):
        IdentityPublicKey.from_bytes(b"short")


def test_signing_payload_layout() -> None:
    assert signing_payload() == b"veil-v1"
    assert signing_payload(b"ab") == b"veil-v1" + b"b" + (2).to_bytes(8, "big") + b"ab"
    assert signing_payload(-1) == b"veil-v1" + b"i" + (8).to_bytes(8, "big") + b"\xff" * 8
    assert signing_payload("ab", "c") != signing_payload("a", "bc")
    assert signing_payload("1") != signing_payload(1) != signing_payload(b"1")
    with pytest.raises(ValueError):
        signing_payload(1 << 63)
    with pytest.raises(TypeError):
        signing_payload(True)
    with pytest.raises(TypeError):
        signing_payload(1.5)  # type: ignore[arg-type]


_part = st.one_of(
    st.binary(max_size=12),
    st.text(max_size=6),
    st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1),
)


@given(st.lists(_part, max_size=5), st.lists(_part, max_size=5))
def test_different_part_lists_never_give_the_same_payload(
    a: list[bytes | str | int], b: list[bytes | str | int]
) -> None:
    same = len(a) == len(b) and all(
        type(x) is type(y) and x == y for x, y in zip(a, b, strict=False)
    )
    assert (signing_payload(*a) == signing_payload(*b)) == same


@given(st.lists(st.binary(max_size=4), max_size=4))
def test_concatenation_collisions_are_separated(parts: list[bytes]) -> None:
    # The same bytes split differently must give a different payload.
    joined = b"".join(parts)
    if [joined] != parts:
        assert signing_payload(*parts) != signing_payload(joined)
