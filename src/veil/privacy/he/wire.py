"""The decryption step of a CKKS round as it travels through a federation's transport.

=================  ========================================  ==================================
stage              server → decryptor                        decryptor → server
=================  ========================================  ==================================
``ckks/decrypt``   `DecryptRequest`: the encrypted sum        `DecryptReply`: the flooded,
                   (frames), the key id, how many             rounded plaintext sum
                   contributions it holds
=================  ========================================  ==================================

Layout of both: a 4-byte little-endian header length, a JSON header, then raw bytes (the
frames, or the values as little-endian float64). No pickle; anything malformed raises CkksError.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from veil.privacy.he.ckks import CkksError

DECRYPT = "ckks/decrypt"
_HEADER_LENGTH = 4


@dataclass(frozen=True)
class DecryptRequest:
    run_id: str
    round: int
    key_id: str
    #: How many ciphertexts the server added (each client's count slot adds 1).
    count: int
    frames: bytes

    def to_bytes(self) -> bytes:
        header = {"run_id": self.run_id, "round": self.round, "key_id": self.key_id}
        return pack_message(header | {"count": self.count}, self.frames)

    @classmethod
    def from_bytes(cls, data: bytes) -> DecryptRequest:
        header, body = unpack_message(data, "decryption request")
        try:
            return cls(
                str(header["run_id"]),
                int(header["round"]),
                str(header["key_id"]),
                int(header["count"]),
                body,
            )
        except (KeyError, TypeError, ValueError):
            raise CkksError("malformed decryption request header") from None


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
    try:
        header = json.loads(data[_HEADER_LENGTH : _HEADER_LENGTH + n])
    except (ValueError, UnicodeDecodeError):
        raise CkksError(f"malformed {what}: the header is not JSON") from None
    if not isinstance(header, dict):
        raise CkksError(f"malformed {what}: the header is not a JSON object")
    return header, data[_HEADER_LENGTH + n :]
