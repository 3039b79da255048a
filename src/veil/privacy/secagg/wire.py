"""The bodies of SecAgg's protocol steps as they travel through a federation's transport.

Stages, in order (each a `ProtocolInstruction` to every client still in the round):

=================  =====================================  =====================================
stage              server → client                        client → server
=================  =====================================  =====================================
``secagg/setup``   the round's `RoundParams`              `Advertised`: key advertisement and
                                                          the credential proving its identity
``secagg/share``   `KeyBundle`: every client's            `EncryptedShares`
                   advertisement and credential
``secagg/deliver`` the share ciphertexts for this client  empty (acknowledged)
(fit)              the global model                       the masked vector
``secagg/sign``    `UnmaskRequest`                        `ConsistencySignature`
``secagg/unmask``  `ConsistencyCheck`                     `UnmaskReply`
=================  =====================================  =====================================

JSON with base64 for bytes; no pickle. Anything malformed raises ProtocolError.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from veil.privacy.secagg.errors import ProtocolError
from veil.privacy.secagg.messages import KeyAdvertisement

SETUP = "secagg/setup"
SHARE = "secagg/share"
DELIVER = "secagg/deliver"
SIGN = "secagg/sign"
UNMASK = "secagg/unmask"


@dataclass(frozen=True)
class Advertised:
    """A client's answer to the set-up: its signed keys and its credential (a certificate in a
    deployment, nothing in a simulation)."""

    advertisement: KeyAdvertisement
    credential: bytes

    def to_bytes(self) -> bytes:
        return _dump(
            {
                "advertisement": _b64(self.advertisement.to_bytes()),
                "credential": _b64(self.credential),
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Advertised:
        raw = _load(data, "key advertisement")
        return cls(
            KeyAdvertisement.from_bytes(_unb64(raw.get("advertisement"))),
            _unb64(raw.get("credential")),
        )


@dataclass(frozen=True)
class KeyBundle:
    """Every advertisement (and credential) of the round: each client checks them all against
    its own view and derives the SecAgg+ graph from them."""

    advertisements: Mapping[str, Advertised]

    def to_bytes(self) -> bytes:
        return _dump({name: _b64(a.to_bytes()) for name, a in self.advertisements.items()})

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyBundle:
        raw = _load(data, "key bundle")
        return cls({str(k): Advertised.from_bytes(_unb64(v)) for k, v in raw.items()})


def shares_to_bytes(shares: Mapping[str, bytes]) -> bytes:
    """The share ciphertexts routed to one client, by sender."""
    return _dump({sender: _b64(c) for sender, c in shares.items()})


def shares_from_bytes(data: bytes) -> dict[str, bytes]:
    return {str(k): _unb64(v) for k, v in _load(data, "share delivery").items()}


def _dump(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True).encode()


def _load(data: bytes, what: str) -> dict[str, Any]:
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError(f"malformed {what}: not JSON") from None
    if not isinstance(raw, dict):
        raise ProtocolError(f"malformed {what}: not a JSON object")
    return raw


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object) -> bytes:
    if not isinstance(value, str):
        raise ProtocolError("malformed message: expected base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("malformed message: invalid base64") from None
