"""Ed25519 node identity: each organisation's long-lived signing key.

An identity key signs what a node sends that must not be forged or replayed: its SecAgg key
shares, its model updates, its manifests. The TLS key in the node's certificate authenticates the
channel; the identity key authenticates the content, so a signature stays checkable after the
channel is gone (in a log, a checkpoint, a relayed message).

Shortest example::

    key = IdentityKey.generate()
    payload = signing_payload("update", run_id, round_number, digest)
    signature = key.sign(payload)
    key.public_key().verify(signature, payload)   # raises SignatureRejected if forged

Files: the private key is PKCS#8 PEM (unencrypted, mode 0600), the public key is
SubjectPublicKeyInfo PEM. `veil pki issue` writes both next to the node's TLS certificate.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from veil.atomic import atomic_write_bytes
from veil.crypto.keyfile import read_private
from veil.errors import UserError, VeilError

__all__ = [
    "DOMAIN",
    "IdentityKey",
    "IdentityPublicKey",
    "SignatureRejected",
    "signing_payload",
]

#: Prefix of every signed payload: a signature made for Veil v1 is never valid for anything else.
DOMAIN = b"veil-v1"

_TAG_BYTES = b"b"
_TAG_STR = b"s"
_TAG_INT = b"i"
_INT_MIN = -(1 << 63)
_INT_MAX = (1 << 63) - 1


class SignatureRejected(VeilError):
    """A signature does not verify: the message was altered, or another key signed it."""


def signing_payload(*parts: bytes | str | int) -> bytes:
    """The unambiguous byte string to sign for the sequence `parts`.

    Layout: ``b"veil-v1"`` then, for each part, a one-byte type tag (``b"b"`` bytes, ``b"s"``
    str, ``b"i"`` int), its length as an 8-byte big-endian unsigned integer, and its bytes
    (str: UTF-8; int: 8-byte big-endian two's complement, so -2**63 <= value < 2**63).

    Why: signing a plain concatenation is ambiguous — ``("ab", "c")`` and ``("a", "bc")`` give
    the same bytes, so a signature over one would be accepted for the other. With every part
    length-prefixed and typed, the encoding is uniquely decodable: two different part lists
    (different values, order, count or types, e.g. ``"1"`` vs ``1`` vs ``b"1"``) never produce
    the same payload. The ``veil-v1`` prefix separates Veil signatures from any other use of the
    same key.

    Raises TypeError for any other part type (bool included) and ValueError for an int outside
    the signed 64-bit range.
    """
    out = bytearray(DOMAIN)
    for part in parts:
        if isinstance(part, bool) or not isinstance(part, bytes | str | int):
            raise TypeError(f"cannot sign a part of type {type(part).__name__}")
        if isinstance(part, bytes):
            tag, data = _TAG_BYTES, part
        elif isinstance(part, str):
            tag, data = _TAG_STR, part.encode("utf-8")
        else:
            if not _INT_MIN <= part <= _INT_MAX:
                raise ValueError(f"integer {part} does not fit in a signed 64-bit field")
            tag, data = _TAG_INT, part.to_bytes(8, "big", signed=True)
        out += tag
        out += len(data).to_bytes(8, "big")
        out += data
    return bytes(out)


class IdentityPublicKey:
    """An Ed25519 public key that verifies a node's signatures."""

    __slots__ = ("_key",)

    def __init__(self, key: ed25519.Ed25519PublicKey) -> None:
        self._key = key

    @classmethod
    def from_bytes(cls, raw: bytes) -> IdentityPublicKey:
        """The key from its raw 32-byte encoding; UserError if it is not one."""
        if len(raw) != 32:
            raise UserError(f"an Ed25519 public key is 32 bytes, got {len(raw)}")
        try:
            return cls(ed25519.Ed25519PublicKey.from_public_bytes(raw))
        except ValueError as exc:
            raise UserError(f"not an Ed25519 public key: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> IdentityPublicKey:
        """Read a PEM (SubjectPublicKeyInfo) Ed25519 public key; UserError if absent or wrong."""
        path = Path(path)
        data = _read(path, "identity public key")
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError:
            raise UserError(f"'{path}' is not a PEM public key") from None
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise UserError(f"'{path}' holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key)

    def public_bytes(self) -> bytes:
        """The raw 32-byte encoding (what travels in messages)."""
        return self._key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def public_pem(self) -> bytes:
        """The SubjectPublicKeyInfo PEM encoding (what `save` writes)."""
        return self._key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def save(self, path: str | Path) -> None:
        """Write the PEM encoding atomically (mode 0644)."""
        atomic_write_bytes(path, self.public_pem(), mode=0o644)

    def verify(self, signature: bytes, message: bytes) -> None:
        """Return if `signature` is this key's signature of `message`; else SignatureRejected."""
        try:
            self._key.verify(signature, message)
        except InvalidSignature:
            raise SignatureRejected(
                "signature rejected: the message was altered or signed by another key"
            ) from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IdentityPublicKey) and self.public_bytes() == other.public_bytes()

    def __hash__(self) -> int:
        return hash(self.public_bytes())

    def __repr__(self) -> str:
        return f"IdentityPublicKey({self.public_bytes().hex()})"


class IdentityKey:
    """An Ed25519 private key. Its repr never shows key material."""

    __slots__ = ("_key",)

    def __init__(self, key: ed25519.Ed25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def generate(cls) -> IdentityKey:
        """A fresh key from the OS CSPRNG."""
        return cls(ed25519.Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | Path) -> IdentityKey:
        """Read an unencrypted PKCS#8 PEM Ed25519 private key; UserError if absent or wrong."""
        path = Path(path)
        data = read_private(path, "identity key")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            raise UserError(f"'{path}' is not an unencrypted PEM private key") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise UserError(f"'{path}' holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key)

    def private_pem(self) -> bytes:
        """PKCS#8 PEM of the private key, for writing to a 0600 file; never print it."""
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def save(self, path: str | Path) -> None:
        """Write the private key atomically as PKCS#8 PEM with mode 0600."""
        atomic_write_bytes(path, self.private_pem(), mode=0o600)

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of `message` (build it with `signing_payload`)."""
        return self._key.sign(message)

    def public_key(self) -> IdentityPublicKey:
        """The matching public key."""
        return IdentityPublicKey(self._key.public_key())

    def public_bytes(self) -> bytes:
        """The raw 32-byte public key."""
        return self.public_key().public_bytes()

    def __repr__(self) -> str:
        return f"IdentityKey(public={self.public_bytes().hex()})"


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"no {what} at '{path}'") from None
    except OSError as exc:
        raise UserError(f"cannot read {what} '{path}': {exc.strerror}") from None
