"""The decryption steps of a CKKS round as they travel through a federation's transport.

=================  ========================================  ==================================
stage              server → client                           client → server
=================  ========================================  ==================================
``ckks/confirm``   `ConfirmRequest` to every member: the      `Confirmation`: the member's
                   round's member set, each member's name     Ed25519 signature of the set
                   and the SHA-256 of its upload              digest, and its credential
``ckks/decrypt``   `DecryptRequest` to the decryptors: the    `DecryptReply`: the flooded,
                   member set with every signature and        rounded plaintext sum
                   credential, and every member's upload
=================  ========================================  ==================================

Layout of every message: a 4-byte little-endian header length, a JSON header, then raw bytes
(a credential, the uploads one after another, or the values as little-endian float64). No
pickle; anything malformed raises CkksError.

What a member signs (`confirmation_payload`) binds the run, the round, the key id, its own name
and the digest of the whole member set (`member_set_digest`: every name with the hash of its
exact upload, in name order), so a signature is worth nothing for another set, round, run or
key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from veil.crypto.identity import signing_payload
from veil.privacy.he.ckks import CkksError

CONFIRM = "ckks/confirm"
DECRYPT = "ckks/decrypt"
_HEADER_LENGTH = 4
_DIGEST_BYTES = 32
_SIGNATURE_BYTES = 64


@dataclass(frozen=True)
class Member:
    """One member of a round's sum: its name and the SHA-256 of its exact upload."""

    name: str
    digest: bytes


@dataclass(frozen=True)
class SignedMember:
    """A member, its signature of the member set and the credential that proves its key."""

    name: str
    digest: bytes
    signature: bytes
    credential: bytes


def upload_digest(blob: bytes) -> bytes:
    """SHA-256 of one member's upload: every byte of its fixed-size frames, padding included."""
    return hashlib.sha256(blob).digest()


def member_set_digest(run_id: str, round_: int, key_id: str, members: Sequence[Member]) -> bytes:
    """SHA-256 of the member set of one round's sum (order-independent: sorted by name)."""
    parts: list[bytes | str | int] = ["veil-ckks-member-set", run_id, round_, key_id]
    for m in sorted(members, key=lambda m: m.name):
        parts += [m.name, m.digest]
    return hashlib.sha256(signing_payload(*parts)).digest()


def confirmation_payload(
    run_id: str, round_: int, key_id: str, client: str, set_digest: bytes
) -> bytes:
    """What member `client` signs to confirm that its upload is in the set `set_digest`."""
    return signing_payload("veil-ckks-confirm", run_id, round_, key_id, client, set_digest)


@dataclass(frozen=True)
class ConfirmRequest:
    run_id: str
    round: int
    key_id: str
    members: tuple[Member, ...]

    def to_bytes(self) -> bytes:
        header = {
            "run_id": self.run_id,
            "round": self.round,
            "key_id": self.key_id,
            "members": [[m.name, m.digest.hex()] for m in self.members],
        }
        return pack_message(header, b"")

    @classmethod
    def from_bytes(cls, data: bytes) -> ConfirmRequest:
        header, body = unpack_message(data, "confirmation request")
        if body:
            raise CkksError("malformed confirmation request: unexpected bytes after the header")
        try:
            members = tuple(
                Member(_name(entry[0]), _digest(entry[1])) for entry in _list(header["members"])
            )
            return cls(str(header["run_id"]), _int(header["round"]), str(header["key_id"]), members)
        except (KeyError, TypeError, ValueError, IndexError):
            raise CkksError("malformed confirmation request header") from None


@dataclass(frozen=True)
class Confirmation:
    client: str
    signature: bytes
    credential: bytes

    def to_bytes(self) -> bytes:
        return pack_message(
            {"client": self.client, "signature": self.signature.hex()}, self.credential
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Confirmation:
        header, body = unpack_message(data, "confirmation")
        try:
            return cls(str(header["client"]), _signature(header["signature"]), body)
        except (KeyError, TypeError, ValueError):
            raise CkksError("malformed confirmation header") from None


@dataclass(frozen=True)
class DecryptRequest:
    run_id: str
    round: int
    key_id: str
    members: tuple[SignedMember, ...]
    #: Every member's upload, in the order of `members`, each of the same fixed size.
    uploads: bytes

    def to_bytes(self) -> bytes:
        header = {
            "run_id": self.run_id,
            "round": self.round,
            "key_id": self.key_id,
            "members": [
                {
                    "name": m.name,
                    "digest": m.digest.hex(),
                    "signature": m.signature.hex(),
                    "credential": base64.b64encode(m.credential).decode("ascii"),
                }
                for m in self.members
            ],
        }
        return pack_message(header, self.uploads)

    @classmethod
    def from_bytes(cls, data: bytes) -> DecryptRequest:
        header, body = unpack_message(data, "decryption request")
        try:
            members = tuple(
                SignedMember(
                    _name(m["name"]),
                    _digest(m["digest"]),
                    _signature(m["signature"]),
                    base64.b64decode(str(m["credential"]), validate=True),
                )
                for m in _list(header["members"])
            )
            return cls(
                str(header["run_id"]),
                _int(header["round"]),
                str(header["key_id"]),
                members,
                body,
            )
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise CkksError("malformed decryption request header") from None

    def split_uploads(self, size: int) -> list[bytes]:
        """Each member's upload; CkksError unless there is exactly one of `size` bytes per
        member."""
        if len(self.uploads) != size * len(self.members):
            raise CkksError(
                f"a decryption request for {len(self.members)} members must carry "
                f"{len(self.members)} uploads of {size} bytes, got {len(self.uploads)} bytes"
            )
        return [self.uploads[i * size : (i + 1) * size] for i in range(len(self.members))]


@dataclass(frozen=True)
class DecryptReply:
    client: str
    key_id: str
    values: npt.NDArray[np.float64]

    def to_bytes(self) -> bytes:
        body = np.ascontiguousarray(self.values, dtype="<f8").tobytes()
        return pack_message({"client": self.client, "key_id": self.key_id}, body)

    @classmethod
    def from_bytes(cls, data: bytes) -> DecryptReply:
        header, body = unpack_message(data, "decryption reply")
        if len(body) % 8:
            raise CkksError("a decryption reply's values are not float64")
        values = np.frombuffer(body, dtype="<f8").astype(np.float64)
        if not np.isfinite(values).all():
            raise CkksError("a decryption reply holds NaN or Inf")
        return cls(str(header.get("client")), str(header.get("key_id")), values)


def pack_message(header: dict[str, Any], body: bytes) -> bytes:
    raw = json.dumps(header, sort_keys=True).encode()
    return len(raw).to_bytes(_HEADER_LENGTH, "little") + raw + body


def unpack_message(data: bytes, what: str) -> tuple[dict[str, Any], bytes]:
    if len(data) < _HEADER_LENGTH:
        raise CkksError(f"malformed {what}: too short")
    n = int.from_bytes(data[:_HEADER_LENGTH], "little")
    if _HEADER_LENGTH + n > len(data):
        raise CkksError(f"malformed {what}: the header runs past the end")
    try:
        header = json.loads(data[_HEADER_LENGTH : _HEADER_LENGTH + n])
    except (ValueError, UnicodeDecodeError):
        raise CkksError(f"malformed {what}: the header is not JSON") from None
    if not isinstance(header, dict):
        raise CkksError(f"malformed {what}: the header is not a JSON object")
    return header, data[_HEADER_LENGTH + n :]


def _list(value: object) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError("not a list")
    return value


def _name(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError("a member name is a non-empty string")
    return value


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("not an integer")
    return value


def _digest(value: object) -> bytes:
    raw = bytes.fromhex(str(value))
    if len(raw) != _DIGEST_BYTES:
        raise ValueError("a digest is 32 bytes")
    return raw


def _signature(value: object) -> bytes:
    raw = bytes.fromhex(str(value))
    if len(raw) != _SIGNATURE_BYTES:
        raise ValueError("an Ed25519 signature is 64 bytes")
    return raw
