"""The messages of one secure-aggregation round, with a safe, explicit wire encoding.

Each message is a frozen dataclass whose constructor validates its fields, and whose
`to_bytes` / `from_bytes` use UTF-8 JSON: an object with ``"type"`` (the message name),
``"version"`` (1) and the fields, byte strings in standard base64. `from_bytes` accepts exactly
those keys and types (ProtocolError otherwise), so a peer can send nothing but data: no pickle,
no eval, no object construction by name.

The phases (Bonawitz et al. 2017, §4 and the actively secure variant of §6; see
`veil.privacy.secagg.protocol`):

0. client → server `KeyAdvertisement` (signed over the round view); the server broadcasts them.
1. client → server `EncryptedShares`; the server routes each ciphertext to its recipient.
2. client → server its masked vector (a uint array, carried by the transport).
3. server → client `UnmaskRequest`; client → server `ConsistencySignature` over it.
4. server → client `ConsistencyCheck` (the request and the signatures collected);
   client → server `UnmaskReply`.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeVar

from veil.crypto.identity import IdentityPublicKey, signing_payload
from veil.privacy.secagg.errors import ProtocolError

__all__ = [
    "ConsistencyCheck",
    "ConsistencySignature",
    "EncryptedShares",
    "KeyAdvertisement",
    "UnmaskReply",
    "UnmaskRequest",
    "consistency_payload",
    "key_advertisement_payload",
]

_M = TypeVar("_M")
_VERSION = 1
_PUBLIC_KEY_BYTES = 32
_SIGNATURE_BYTES = 64
_COMMITMENT_BYTES = 32
_VIEW_BYTES = 32
_KEYS_LABEL = "secagg-keys"
_CONSISTENCY_LABEL = "secagg-consistency"


def key_advertisement_payload(
    run_id: str,
    round: int,
    client: str,
    encryption_public: bytes,
    masking_public: bytes,
    self_mask_commitment: bytes,
    view: bytes,
) -> bytes:
    """What a client signs to advertise its keys: ``signing_payload("secagg-keys", run_id,
    round, client, encryption_public, masking_public, self_mask_commitment, view)``, where
    `view` is the SHA-256 digest of the whole round as this client was told it
    (`RoundParams.view`): a peer told another story sees a different digest."""
    return signing_payload(
        _KEYS_LABEL,
        run_id,
        round,
        client,
        encryption_public,
        masking_public,
        self_mask_commitment,
        view,
    )


def consistency_payload(
    run_id: str, round: int, view: bytes, survivors: Iterable[str], dropped: Iterable[str]
) -> bytes:
    """What a client signs in the consistency round (Bonawitz et al. 2017, §6): the survivor
    and dropout sets of the unmask request it was shown, in its round view."""
    return signing_payload(
        _CONSISTENCY_LABEL,
        run_id,
        round,
        view,
        "\n".join(sorted(survivors)),
        "\n".join(sorted(dropped)),
    )


@dataclass(frozen=True)
class KeyAdvertisement:
    """A client's two fresh X25519 public keys for one round (raw 32 bytes each: one to encrypt
    share messages, one for pairwise masks) and a commitment to its self-mask secret (SHA-256,
    so that the server can check the secret it rebuilds from shares), signed by its Ed25519
    identity key over `key_advertisement_payload`."""

    client: str
    encryption_public: bytes
    masking_public: bytes
    signature: bytes
    self_mask_commitment: bytes
    #: The digest of the round view the client signed (`RoundParams.view`).
    view: bytes

    def __post_init__(self) -> None:
        _check_name(self.client, "client")
        _check_bytes(self.encryption_public, "encryption_public", _PUBLIC_KEY_BYTES)
        _check_bytes(self.masking_public, "masking_public", _PUBLIC_KEY_BYTES)
        _check_bytes(self.signature, "signature", _SIGNATURE_BYTES)
        _check_bytes(self.self_mask_commitment, "self_mask_commitment", _COMMITMENT_BYTES)
        _check_bytes(self.view, "view", _VIEW_BYTES)

    def payload(self, run_id: str, round: int) -> bytes:
        """The signed payload of this advertisement in run `run_id`, round `round`."""
        return key_advertisement_payload(
            run_id,
            round,
            self.client,
            self.encryption_public,
            self.masking_public,
            self.self_mask_commitment,
            self.view,
        )

    def verify(self, identity: IdentityPublicKey, run_id: str, round: int) -> None:
        """Return if `identity` signed this advertisement for this run and round; else
        `veil.crypto.identity.SignatureRejected`."""
        identity.verify(self.signature, self.payload(run_id, round))

    def to_bytes(self) -> bytes:
        return _dump(
            self,
            client=self.client,
            encryption_public=_b64(self.encryption_public),
            masking_public=_b64(self.masking_public),
            signature=_b64(self.signature),
            self_mask_commitment=_b64(self.self_mask_commitment),
            view=_b64(self.view),
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyAdvertisement:
        keys = (
            "client",
            "encryption_public",
            "masking_public",
            "signature",
            "self_mask_commitment",
            "view",
        )
        fields = _load(data, cls, keys)
        return _build(
            cls,
            client=_str(fields, "client"),
            encryption_public=_bytes(fields, "encryption_public"),
            masking_public=_bytes(fields, "masking_public"),
            signature=_bytes(fields, "signature"),
            self_mask_commitment=_bytes(fields, "self_mask_commitment"),
            view=_bytes(fields, "view"),
        )


@dataclass(frozen=True)
class EncryptedShares:
    """One client's share messages: ``ciphertexts[recipient]`` is the AES-256-GCM encryption of
    the recipient's shares of the sender's self-mask seed and masking key."""

    sender: str
    ciphertexts: Mapping[str, bytes]

    def __post_init__(self) -> None:
        _check_name(self.sender, "sender")
        object.__setattr__(self, "ciphertexts", _frozen_map(self.ciphertexts, "ciphertexts"))

    def to_bytes(self) -> bytes:
        return _dump(self, sender=self.sender, ciphertexts=_b64_map(self.ciphertexts))

    @classmethod
    def from_bytes(cls, data: bytes) -> EncryptedShares:
        fields = _load(data, cls, ("sender", "ciphertexts"))
        return _build(
            cls, sender=_str(fields, "sender"), ciphertexts=_bytes_map(fields, "ciphertexts")
        )


@dataclass(frozen=True)
class UnmaskRequest:
    """The server's claim of who survived: `survivors` sent masked inputs, `dropped` completed
    the key sharing but sent none. Disjoint sets of client names."""

    survivors: frozenset[str]
    dropped: frozenset[str]

    def __post_init__(self) -> None:
        object.__setattr__(self, "survivors", _name_set(self.survivors, "survivors"))
        object.__setattr__(self, "dropped", _name_set(self.dropped, "dropped"))

    def to_bytes(self) -> bytes:
        return _dump(self, survivors=sorted(self.survivors), dropped=sorted(self.dropped))

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskRequest:
        fields = _load(data, cls, ("survivors", "dropped"))
        return _build(
            cls,
            survivors=frozenset(_str_list(fields, "survivors")),
            dropped=frozenset(_str_list(fields, "dropped")),
        )


@dataclass(frozen=True)
class ConsistencySignature:
    """A survivor's signature over the unmask request it was shown
    (`consistency_payload`): it signs one request per round, and answers only a request that
    at least `threshold` of its share holders signed the same way."""

    client: str
    signature: bytes

    def __post_init__(self) -> None:
        _check_name(self.client, "client")
        _check_bytes(self.signature, "signature", _SIGNATURE_BYTES)

    def to_bytes(self) -> bytes:
        return _dump(self, client=self.client, signature=_b64(self.signature))

    @classmethod
    def from_bytes(cls, data: bytes) -> ConsistencySignature:
        fields = _load(data, cls, ("client", "signature"))
        return _build(cls, client=_str(fields, "client"), signature=_bytes(fields, "signature"))


@dataclass(frozen=True)
class ConsistencyCheck:
    """The server's unmask request again, with the consistency signatures it collected (signer
    → signature). A client checks them before it reveals any share."""

    request: UnmaskRequest
    signatures: Mapping[str, bytes]

    def __post_init__(self) -> None:
        if not isinstance(self.request, UnmaskRequest):
            raise ProtocolError("request must be an UnmaskRequest")
        object.__setattr__(self, "signatures", _frozen_map(self.signatures, "signatures"))

    def to_bytes(self) -> bytes:
        return _dump(
            self,
            survivors=sorted(self.request.survivors),
            dropped=sorted(self.request.dropped),
            signatures=_b64_map(self.signatures),
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> ConsistencyCheck:
        fields = _load(data, cls, ("survivors", "dropped", "signatures"))
        request = _build(
            UnmaskRequest,
            survivors=frozenset(_str_list(fields, "survivors")),
            dropped=frozenset(_str_list(fields, "dropped")),
        )
        return _build(cls, request=request, signatures=_bytes_map(fields, "signatures"))


@dataclass(frozen=True)
class UnmaskReply:
    """A surviving client's answer: its share of each survivor's self-mask seed
    (`self_mask_shares`) and of each dropped client's masking key (`key_shares`), by peer."""

    client: str
    self_mask_shares: Mapping[str, bytes]
    key_shares: Mapping[str, bytes]

    def __post_init__(self) -> None:
        _check_name(self.client, "client")
        object.__setattr__(
            self, "self_mask_shares", _frozen_map(self.self_mask_shares, "self_mask_shares")
        )
        object.__setattr__(self, "key_shares", _frozen_map(self.key_shares, "key_shares"))

    def to_bytes(self) -> bytes:
        return _dump(
            self,
            client=self.client,
            self_mask_shares=_b64_map(self.self_mask_shares),
            key_shares=_b64_map(self.key_shares),
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskReply:
        fields = _load(data, cls, ("client", "self_mask_shares", "key_shares"))
        return _build(
            cls,
            client=_str(fields, "client"),
            self_mask_shares=_bytes_map(fields, "self_mask_shares"),
            key_shares=_bytes_map(fields, "key_shares"),
        )


# --- validation -----------------------------------------------------------------------------


def _check_name(value: object, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"{what} must be a non-empty string, got {value!r}")


def _check_bytes(value: object, what: str, size: int | None = None) -> None:
    if not isinstance(value, bytes):
        raise ProtocolError(f"{what} must be bytes, got {type(value).__name__}")
    if size is not None and len(value) != size:
        raise ProtocolError(f"{what} must be {size} bytes, got {len(value)}")


def _frozen_map(value: object, what: str) -> Mapping[str, bytes]:
    if not isinstance(value, Mapping):
        raise ProtocolError(f"{what} must be a mapping, got {type(value).__name__}")
    for key, item in value.items():
        _check_name(key, f"a key of {what}")
        _check_bytes(item, f"{what}[{key!r}]")
    return MappingProxyType(dict(value))


def _name_set(value: object, what: str) -> frozenset[str]:
    if not isinstance(value, Iterable) or isinstance(value, str | bytes):
        raise ProtocolError(f"{what} must be a set of names, got {type(value).__name__}")
    names = frozenset(value)
    for name in names:
        _check_name(name, f"a member of {what}")
    return names


# --- encoding -------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64_map(mapping: Mapping[str, bytes]) -> dict[str, str]:
    return {key: _b64(value) for key, value in sorted(mapping.items())}


def _dump(message: object, **fields: Any) -> bytes:
    document = {"type": type(message).__name__, "version": _VERSION, **fields}
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _load(data: bytes, cls: type, keys: tuple[str, ...]) -> dict[str, Any]:
    name = cls.__name__
    try:
        document = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as exc:
        raise ProtocolError(f"a {name} message is not UTF-8 JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ProtocolError(f"a {name} message is a JSON object")
    if document.get("type") != name:
        raise ProtocolError(f"expected a {name} message, got type {document.get('type')!r}")
    if document.get("version") != _VERSION:
        raise ProtocolError(f"unsupported {name} version {document.get('version')!r}")
    expected = {"type", "version", *keys}
    if set(document) != expected:
        extra = sorted(set(document) - expected)
        missing = sorted(expected - set(document))
        raise ProtocolError(f"a {name} message has unexpected {extra} / missing {missing} keys")
    return document


def _build(cls: type[_M], **fields: Any) -> _M:
    try:
        return cls(**fields)
    except ProtocolError as exc:
        raise ProtocolError(f"invalid {cls.__name__} message: {exc}") from None


def _str(fields: Mapping[str, Any], key: str) -> str:
    value = fields[key]
    if not isinstance(value, str):
        raise ProtocolError(f"field {key!r} must be a string")
    return value


def _bytes(fields: Mapping[str, Any], key: str) -> bytes:
    return _unb64(fields[key], key)


def _unb64(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise ProtocolError(f"field {what!r} must be a base64 string")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ProtocolError(f"field {what!r} is not valid base64") from None


def _bytes_map(fields: Mapping[str, Any], key: str) -> dict[str, bytes]:
    value = fields[key]
    if not isinstance(value, dict):
        raise ProtocolError(f"field {key!r} must be an object")
    return {str(name): _unb64(item, f"{key}[{name!r}]") for name, item in value.items()}


def _str_list(fields: Mapping[str, Any], key: str) -> list[str]:
    value = fields[key]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ProtocolError(f"field {key!r} must be a list of strings")
    if len(set(value)) != len(value):
        raise ProtocolError(f"field {key!r} lists a name twice")
    return value
