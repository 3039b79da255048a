"""ECDH private set intersection (PSI) over customer ids: one designated party learns the
intersection, or only its size; the other learns only the size of the designated party's set.

Protocol (Diffie-Hellman PSI, Huberman, Franklin and Hogg 1999; the construction behind
OpenMined's `openmined-psi`), with the receiver R (the designated party, set X, secret a) and
the sender S (set Y, secret b), both semi-honest, on P-256 (`veil.crypto.commutative`):

1. R -> S: ``a·H(x)`` for each x in X, in R's order (`PsiReceiver.request`).
2. S -> R: ``b·(a·H(x))`` for each received element (same order; sorted instead in
   ``reveal = "size"`` mode so R cannot tell which of its ids matched), and ``b·H(y)`` for each y
   in Y, sorted (`PsiSender.respond`).
3. R computes ``a·(b·H(y))`` and matches: x is in the intersection iff ``ab·H(x)`` is among them
   (`PsiReceiver.finish`).

What crosses the wire: |X| + 2|X| + |Y| 32-byte x-coordinates of pseudorandom points. S learns
|X|; R learns |Y| and the intersection (or its size). Ids are deduplicated first, so duplicates
do not reveal multiplicities. Both sides must use the same `reveal` mode; the sender enforces
its own.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from veil.crypto.commutative import POINT_BYTES, BlindingKey
from veil.errors import UserError

__all__ = [
    "PROTOCOL",
    "PsiError",
    "PsiReceiver",
    "PsiResult",
    "PsiSender",
    "Reveal",
    "intersect_locally",
]

PROTOCOL = "veil-ecdh-psi-p256-v1"
Reveal = Literal["intersection", "size"]


class PsiError(UserError):
    """A PSI message is malformed, from another protocol, or asks for another reveal mode."""


@dataclass(frozen=True)
class PsiResult:
    """What the designated party learned: the intersection (None in size-only mode), its size,
    and both set sizes."""

    intersection: tuple[str, ...] | None
    size: int
    own_size: int
    peer_size: int


def _unique(ids: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for identifier in ids:
        if not isinstance(identifier, str):
            raise PsiError(f"ids must be strings, got {type(identifier).__name__}")
        seen.setdefault(identifier, None)
    return list(seen)


def _pack(points: list[bytes]) -> str:
    return base64.b64encode(b"".join(points)).decode("ascii")


def _unpack(text: Any) -> list[bytes]:
    if not isinstance(text, str):
        raise PsiError("malformed PSI message: points must be base64 text")
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        raise PsiError("malformed PSI message: points are not base64") from None
    if len(raw) % POINT_BYTES:
        raise PsiError("malformed PSI message: truncated point list")
    return [raw[i : i + POINT_BYTES] for i in range(0, len(raw), POINT_BYTES)]


def _load(message: bytes, keys: set[str]) -> dict[str, Any]:
    try:
        body = json.loads(message)
    except (ValueError, UnicodeDecodeError):
        raise PsiError("malformed PSI message: not JSON") from None
    if not isinstance(body, dict) or body.get("protocol") != PROTOCOL or not keys <= set(body):
        raise PsiError(f"not a {PROTOCOL} message; are both parties running the same Veil?")
    return body


def _blind(key: BlindingKey, points: list[bytes]) -> list[bytes]:
    try:
        return key.blind_all(points)
    except ValueError:
        raise PsiError("a PSI message holds a value that is not a P-256 point") from None


class PsiReceiver:
    """The designated party: sends `request()`, then `finish(response)` gives the result."""

    def __init__(self, ids: Iterable[str], *, reveal: Reveal = "intersection") -> None:
        self._ids = _unique(ids)
        self._reveal = reveal
        self._key = BlindingKey()

    def request(self) -> bytes:
        """Step 1: the blinded hashes of our ids, in our order."""
        blinded = [self._key.blind_identifier(i) for i in self._ids]
        body = {"protocol": PROTOCOL, "reveal": self._reveal, "points": _pack(blinded)}
        return json.dumps(body).encode()

    def finish(self, response: bytes) -> PsiResult:
        """Step 3: match the sender's double-blinded set against ours."""
        body = _load(response, {"ours", "theirs", "reveal"})
        if body["reveal"] != self._reveal:
            raise PsiError(f"the sender answered in reveal = {body['reveal']!r} mode")
        ours = _unpack(body["ours"])
        if len(ours) != len(self._ids):
            raise PsiError("the sender returned a different number of elements than we sent")
        theirs = set(_blind(self._key, _unpack(body["theirs"])))
        peer_size = len(_unpack(body["theirs"]))
        if self._reveal == "size":
            size = sum(1 for point in ours if point in theirs)
            return PsiResult(None, size, len(self._ids), peer_size)
        common = tuple(i for i, point in zip(self._ids, ours, strict=True) if point in theirs)
        return PsiResult(common, len(common), len(self._ids), peer_size)


class PsiSender:
    """The other party: `respond(request)` blinds both sets; it learns only the request's size."""

    def __init__(self, ids: Iterable[str], *, reveal: Reveal = "intersection") -> None:
        self._ids = _unique(ids)
        self._reveal = reveal
        self._key = BlindingKey()
        self._own: list[bytes] | None = None
        #: Size of the receiver's set, known after `respond`.
        self.peer_size: int | None = None

    def prepare(self) -> None:
        """Blind our own set now (it does not depend on the request): the sender can do this
        before the receiver connects. `respond` calls it if needed."""
        if self._own is None:
            self._own = sorted(self._key.blind_identifier(i) for i in self._ids)

    def respond(self, request: bytes) -> bytes:
        """Step 2; PsiError if the request is malformed or asks for another reveal mode."""
        body = _load(request, {"points", "reveal"})
        if body["reveal"] != self._reveal:
            raise PsiError(
                f"the receiver asked for reveal = {body['reveal']!r}, but this party allows only "
                f"{self._reveal!r}; agree on one mode"
            )
        ours = _blind(self._key, _unpack(body["points"]))
        self.peer_size = len(ours)
        if self._reveal == "size":
            ours.sort()
        self.prepare()
        assert self._own is not None
        theirs = self._own
        reply = {
            "protocol": PROTOCOL,
            "reveal": self._reveal,
            "ours": _pack(ours),
            "theirs": _pack(theirs),
        }
        return json.dumps(reply).encode()


def intersect_locally(
    receiver_ids: Iterable[str], sender_ids: Iterable[str], *, reveal: Reveal = "intersection"
) -> PsiResult:
    """Run both halves in one process (simulation and tests): the same messages as over gRPC."""
    receiver = PsiReceiver(receiver_ids, reveal=reveal)
    sender = PsiSender(sender_ids, reveal=reveal)
    return receiver.finish(sender.respond(receiver.request()))
