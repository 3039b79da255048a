"""ECDH PSI: exact intersection for the designated party, only sizes for the other, and the
messages carry only pseudorandom curve points."""

from __future__ import annotations

import base64
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.crypto.commutative import POINT_BYTES, BlindingKey, hash_to_point
from veil.vertical.psi import PsiError, PsiReceiver, PsiSender, intersect_locally

ids = st.lists(st.text(min_size=0, max_size=12), max_size=25)


@settings(max_examples=25, deadline=None)
@given(ids, ids)
def test_intersection_is_exact(bank: list[str], payment: list[str]) -> None:
    result = intersect_locally(bank, payment)
    assert result.intersection is not None
    assert set(result.intersection) == set(bank) & set(payment)
    assert len(result.intersection) == len(set(result.intersection))  # duplicates collapse
    assert (result.own_size, result.peer_size) == (len(set(bank)), len(set(payment)))


def test_order_follows_the_receiver() -> None:
    result = intersect_locally(["c", "a", "b", "a"], ["a", "b", "c", "z"])
    assert result.intersection == ("c", "a", "b")


@pytest.mark.parametrize(
    ("bank", "payment", "size"),
    [
        ([], [], 0),
        ([], ["x"], 0),
        (["x"], [], 0),
        (["a", "b"], ["c", "d"], 0),
        (["a"] * 5, ["a"], 1),
    ],
)
def test_edge_cases(bank: list[str], payment: list[str], size: int) -> None:
    result = intersect_locally(bank, payment)
    assert result.size == size and result.intersection is not None
    assert len(result.intersection) == size


def test_size_only_mode_reveals_no_ids() -> None:
    bank = [f"id{i}" for i in range(40)]
    payment = [f"id{i}" for i in range(25, 90)]
    result = intersect_locally(bank, payment, reveal="size")
    assert result.intersection is None and result.size == 15
    # The sender returns our double-blinded elements sorted, not in our order: we cannot tell
    # which of our ids matched.
    receiver, sender = PsiReceiver(bank, reveal="size"), PsiSender(payment, reveal="size")
    ours = _points(json.loads(sender.respond(receiver.request()))["ours"])
    assert ours == sorted(ours)


def test_reveal_mode_is_enforced_by_the_sender() -> None:
    receiver = PsiReceiver(["a"], reveal="intersection")
    with pytest.raises(PsiError, match="allows only 'size'"):
        PsiSender(["a"], reveal="size").respond(receiver.request())


def _points(text: str) -> list[bytes]:
    raw = base64.b64decode(text)
    return [raw[i : i + POINT_BYTES] for i in range(0, len(raw), POINT_BYTES)]


def test_wire_holds_only_blinded_points_and_sizes() -> None:
    bank = [f"customer-{i}" for i in range(30)]
    payment = [f"customer-{i}" for i in range(20, 60)]
    receiver, sender = PsiReceiver(bank), PsiSender(payment)
    request = receiver.request()
    response = sender.respond(request)
    wire = request + response
    for identifier in bank + payment:
        assert identifier.encode() not in wire
    # Unblinded hashes never cross: the points are all blinded by a secret scalar.
    hashes = {hash_to_point(i) for i in bank + payment}
    body_q, body_r = json.loads(request), json.loads(response)
    crossed = _points(body_q["points"]) + _points(body_r["ours"]) + _points(body_r["theirs"])
    assert not hashes & set(crossed)
    assert len(crossed) == 2 * len(bank) + len(payment)
    assert set(body_q) == {"protocol", "reveal", "points"}
    assert set(body_r) == {"protocol", "reveal", "ours", "theirs"}
    assert sender.peer_size == len(bank)  # all the sender learns
    # The sender's own set arrives sorted, so its order reveals nothing either.
    assert _points(body_r["theirs"]) == sorted(_points(body_r["theirs"]))


def test_blinding_commutes() -> None:
    a, b = BlindingKey(), BlindingKey()
    h = hash_to_point("customer-42")
    assert a.blind(b.blind(h)) == b.blind(a.blind(h))
    assert a.blind(h) != b.blind(h) != h


def test_points_off_the_curve_are_refused() -> None:
    receiver = PsiReceiver(["a"])
    body = json.loads(receiver.request())
    rng = random.Random(0)
    for _ in range(64):  # about half of all x are not on P-256
        x = rng.randbytes(POINT_BYTES)
        try:
            BlindingKey().blind(x)
        except ValueError:
            break
    else:
        pytest.fail("no invalid x-coordinate found")
    body["points"] = base64.b64encode(x).decode()
    with pytest.raises(PsiError, match="not a P-256 point"):
        PsiSender(["a"]).respond(json.dumps(body).encode())


@pytest.mark.parametrize("message", [b"not json", b"{}", b'{"protocol": "other"}'])
def test_malformed_messages_are_refused(message: bytes) -> None:
    with pytest.raises(PsiError):
        PsiSender(["a"]).respond(message)
