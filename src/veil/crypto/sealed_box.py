"""Encryption to a node's public key: HPKE (RFC 9180) with X25519, HKDF-SHA256 and AES-256-GCM.

Each node has, next to its Ed25519 identity key (which signs), an X25519 encryption key (which
receives): `veil pki issue` writes it and binds its public half into the node's certificate, so
that anyone holding the federation's CA certificate can encrypt to a node without trusting the
channel the key came through. Key separation: a signing key never decrypts, and back.

Shortest example::

    key = EncryptionKey.generate()
    blob = seal_to(key.public_bytes(), b"secret", info=b"what-and-for-whom")
    assert open_box(key, blob, info=b"what-and-for-whom") == b"secret"

`info` binds the context (purpose, key id, recipient): a box opened with other `info` fails.
Files: the private key is PKCS#8 PEM (unencrypted, mode 0600).
"""

from __future__ import annotations

from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from veil.atomic import atomic_write_bytes
from veil.crypto.identity import signing_payload
from veil.crypto.keyfile import read_private
from veil.errors import UserError

__all__ = ["PUBLIC_BYTES", "BoxError", "EncryptionKey", "derive_key", "open_box", "seal_to"]

PUBLIC_BYTES = 32
_SUITE = Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.AES_256_GCM)


class BoxError(UserError):
    """A sealed box does not open: another recipient, other `info`, or altered bytes."""


class EncryptionKey:
    """An X25519 private key that opens boxes sealed to its public key. Its repr shows no
    key material."""

    __slots__ = ("_key",)

    def __init__(self, key: x25519.X25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def generate(cls) -> EncryptionKey:
        """A fresh key from the OS CSPRNG."""
        return cls(x25519.X25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | Path) -> EncryptionKey:
        """Read a PKCS#8 PEM X25519 private key; UserError if absent or not one."""
        path = Path(path)
        if not path.exists():
            raise UserError(
                f"no encryption key at '{path}' (nodes issued by an older version of Veil have "
                "none); reissue the node with `veil pki issue DIR NAME --role client --overwrite`"
            )
        data = read_private(path, "encryption key")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            raise UserError(f"'{path}' is not an unencrypted PEM private key") from None
        if not isinstance(key, x25519.X25519PrivateKey):
            raise UserError(f"'{path}' holds a {type(key).__name__}, not an X25519 key")
        return cls(key)

    def save(self, path: str | Path) -> None:
        """Write the private key atomically as PKCS#8 PEM with mode 0600."""
        pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        atomic_write_bytes(path, pem, mode=0o600)

    def public_bytes(self) -> bytes:
        """The raw 32-byte public key (what a certificate carries)."""
        return self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def __repr__(self) -> str:
        return f"EncryptionKey(public={self.public_bytes().hex()})"


def seal_to(public_key: bytes, plaintext: bytes, *, info: bytes) -> bytes:
    """HPKE base-mode single-shot encryption of `plaintext` to the raw X25519 `public_key`.

    A fresh ephemeral key per call: two seals of the same plaintext differ. ValueError if the
    public key is not 32 bytes.
    """
    if len(public_key) != PUBLIC_BYTES:
        raise ValueError(f"an X25519 public key is {PUBLIC_BYTES} bytes, got {len(public_key)}")
    recipient = x25519.X25519PublicKey.from_public_bytes(public_key)
    return _SUITE.encrypt(plaintext, recipient, info=info)


def open_box(key: EncryptionKey, blob: bytes, *, info: bytes) -> bytes:
    """The plaintext of a `seal_to` output; BoxError if it does not open (one message)."""
    try:
        return _SUITE.decrypt(blob, key._key, info=info)
    except (InvalidTag, ValueError):
        raise BoxError(
            "a sealed box does not open: it was sealed to another key or for another purpose, "
            "or it was altered"
        ) from None


def derive_key(key: bytes, *context: bytes | str | int, length: int = 32) -> bytes:
    """HKDF-SHA256 of `key` with `info = signing_payload(*context)`: a key for one purpose,
    never equal to one derived for another context."""
    return HKDF(
        algorithm=hashes.SHA256(), length=length, salt=None, info=signing_payload(*context)
    ).derive(key)
