"""One secure-aggregation round end to end, in memory, every message through its wire encoding."""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace

import numpy as np
import pytest

from veil.crypto.identity import IdentityKey, IdentityPublicKey
from veil.privacy.dp.randomness import SeededRandom
from veil.privacy.secagg import (
    ClientSession,
    ConsistencyCheck,
    EncryptedShares,
    FixedPoint,
    InconsistentView,
    KeyAdvertisement,
    KeySubstitution,
    NotEnoughShares,
    ProtocolError,
    RoundGraph,
    RoundParams,
    ServerSession,
    ShareTampered,
    UnmaskReply,
    UnmaskRequest,
    UnsafeUnmaskRequest,
    active_threshold,
)
from veil.privacy.secagg.messages import key_advertisement_payload
from veil.privacy.secagg.protocol import largest_holder_set

LENGTH = 257


@dataclass
class Federation:
    names: list[str]
    identities: dict[str, IdentityKey]

    @property
    def roster(self) -> dict[str, IdentityPublicKey]:
        return {name: key.public_key() for name, key in self.identities.items()}


def federation(n: int) -> Federation:
    names = [f"org-{i:02d}" for i in range(n)]
    return Federation(names, {name: IdentityKey.generate() for name in names})


def make_params(
    fed: Federation,
    *,
    threshold: int | None = None,
    degree: int | None = None,
    round: int = 1,
    bits: int = 32,
    length: int = LENGTH,
) -> RoundParams:
    n = len(fed.names)
    return RoundParams(
        run_id="run-1",
        round=round,
        clients=tuple(fed.names),
        threshold=threshold or active_threshold(largest_holder_set(n, degree)),
        degree=degree,
        length=length,
        fixed_point=FixedPoint.fit(n, 1.0, bits),
    )


def inputs(params: RoundParams, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    fp = params.fixed_point
    return {
        name: fp.encode(rng.uniform(-1, 1, params.length), 1.0, SeededRandom(seed + i)).values
        for i, name in enumerate(params.clients)
    }


def wire(message):  # every message crosses the "network" as bytes
    return type(message).from_bytes(message.to_bytes())


@dataclass
class Outcome:
    total: np.ndarray
    masked: dict[str, np.ndarray]
    server: ServerSession


def run_round(
    fed: Federation,
    params: RoundParams,
    encoded: dict[str, np.ndarray],
    *,
    drop_before_advertising: Collection[str] = (),
    drop_after_sharing: Collection[str] = (),
    silent_at_unmask: Collection[str] = (),
) -> Outcome:
    server = ServerSession(params, identities=fed.roster)
    clients = {
        name: ClientSession(name, fed.identities[name], params)
        for name in params.clients
        if name not in drop_before_advertising
    }
    for client in clients.values():
        server.collect(wire(client.advertise()))
    ads = {v: wire(ad) for v, ad in server.advertisements().items()}
    for client in clients.values():
        server.route(wire(client.share_keys(ads, fed.roster)))
    masked = {}
    for name, client in clients.items():
        if name in drop_after_sharing:
            continue
        client.receive_shares(server.shares_for(name))
        masked[name] = client.mask(encoded[name])
        server.add_masked(name, masked[name])
    unmask(server, clients, silent=silent_at_unmask)
    return Outcome(server.finish(), masked, server)


def unmask(
    server: ServerSession, clients: Mapping[str, ClientSession], silent: Collection[str] = ()
) -> None:
    """The honest server's consistency round and unmask round, every message on the wire."""
    request = wire(server.unmask_request())
    for name in sorted(request.survivors):
        server.add_signature(wire(clients[name].sign_request(request)))
    check = wire(server.consistency_check())
    for name in sorted(check.signatures):
        if name not in silent:
            server.add_unmask_reply(wire(clients[name].unmask(check)))


def expected_sum(params: RoundParams, encoded: dict[str, np.ndarray], names) -> np.ndarray:
    total = sum(
        (encoded[name].astype(np.uint64) for name in names), np.zeros(params.length, np.uint64)
    )
    return (total % params.fixed_point.modulus).astype(params.fixed_point.dtype)


def test_the_unmasked_sum_is_exact() -> None:
    fed = federation(5)
    params = make_params(fed)
    encoded = inputs(params)
    outcome = run_round(fed, params, encoded)
    assert outcome.total.dtype == np.uint32
    assert np.array_equal(outcome.total, expected_sum(params, encoded, params.clients))
    summary = outcome.server.summary()
    assert (summary.selected, summary.advertised, summary.shared) == (5, 5, 5)
    assert summary.dropped == () and summary.unmask_replies == 5
    for name, y in outcome.masked.items():
        assert not np.array_equal(y, encoded[name])


def test_decoded_sum_matches_the_float_sum() -> None:
    fed = federation(4)
    params = make_params(fed, bits=20)  # a modulus that is not a machine word
    rng = np.random.default_rng(3)
    floats = {name: rng.uniform(-1, 1, LENGTH) for name in params.clients}
    fp = params.fixed_point
    encoded = {
        name: fp.encode(x, 1.0, SeededRandom(i)).values
        for i, (name, x) in enumerate(floats.items())
    }
    outcome = run_round(fed, params, encoded)
    decoded = fp.decode(outcome.total)
    assert np.all(np.abs(decoded - sum(floats.values())) <= 4 * fp.step)


def test_dropouts_after_sharing_with_exactly_threshold_survivors() -> None:
    fed = federation(7)
    params = make_params(fed)  # threshold 5: above two thirds of 7
    assert params.threshold == 5
    encoded = inputs(params)
    dropped = fed.names[1:3]
    outcome = run_round(fed, params, encoded, drop_after_sharing=dropped)
    survivors = [name for name in fed.names if name not in dropped]
    assert np.array_equal(outcome.total, expected_sum(params, encoded, survivors))
    assert outcome.server.dropped == frozenset(dropped)
    assert outcome.server.summary().survivors == tuple(survivors)


def test_one_survivor_fewer_than_threshold_cannot_complete() -> None:
    fed = federation(7)
    params = make_params(fed)
    with pytest.raises(NotEnoughShares, match="threshold 5"):
        run_round(fed, params, inputs(params), drop_after_sharing=fed.names[:3])


def test_too_few_unmask_replies_raise_not_enough_shares() -> None:
    fed = federation(7)
    params = make_params(fed)
    with pytest.raises(NotEnoughShares, match="4 unmask replies of 5 survivors"):
        run_round(
            fed,
            params,
            inputs(params),
            drop_after_sharing=fed.names[:2],
            silent_at_unmask=fed.names[2:3],
        )


def test_dropouts_before_advertising_are_left_out() -> None:
    fed = federation(7)
    params = make_params(fed)  # threshold 5
    encoded = inputs(params)
    outcome = run_round(
        fed, params, encoded, drop_before_advertising=["org-00"], drop_after_sharing=["org-06"]
    )
    survivors = fed.names[1:6]
    assert np.array_equal(outcome.total, expected_sum(params, encoded, survivors))
    summary = outcome.server.summary()
    assert summary.dropped_early == ("org-00",)
    assert summary.dropped == ("org-06",)


def test_secagg_plus_degree_six_among_ten_with_two_dropouts() -> None:
    fed = federation(10)
    params = make_params(fed, degree=6)
    assert params.threshold == 5  # above two thirds of 7 holders
    encoded = inputs(params)
    dropped = ["org-02", "org-07"]
    outcome = run_round(fed, params, encoded, drop_after_sharing=dropped)
    graph = outcome.server.graph
    for name in params.clients:
        assert len(graph.neighbours_of(name)) == 6
    survivors = [name for name in fed.names if name not in dropped]
    assert np.array_equal(outcome.total, expected_sum(params, encoded, survivors))


def test_a_substituted_key_is_refused() -> None:
    fed = federation(5)
    params = make_params(fed)
    server = ServerSession(params)  # a server that does not check, and lies
    clients = {name: ClientSession(name, fed.identities[name], params) for name in fed.names}
    for client in clients.values():
        server.collect(client.advertise())
    ads = server.advertisements()
    victim = "org-03"
    impostor = IdentityKey.generate()  # not in the roster
    forged_key = os.urandom(32)
    commitment = ads[victim].self_mask_commitment
    forged = KeyAdvertisement(
        victim,
        ads[victim].encryption_public,
        forged_key,
        impostor.sign(
            key_advertisement_payload(
                params.run_id,
                params.round,
                victim,
                ads[victim].encryption_public,
                forged_key,
                commitment,
                params.view,
            )
        ),
        commitment,
        params.view,
    )
    with pytest.raises(KeySubstitution, match="org-03"):
        clients["org-00"].share_keys({**ads, victim: forged}, fed.roster)
    # The same check on the server side, when it is given the roster.
    with pytest.raises(KeySubstitution, match="org-03"):
        ServerSession(params, identities=fed.roster).collect(forged)


def test_own_advertisement_and_roster_are_checked() -> None:
    fed = federation(4)
    params = make_params(fed)
    clients = {name: ClientSession(name, fed.identities[name], params) for name in fed.names}
    ads = {name: client.advertise() for name, client in clients.items()}
    other = dict(ads)
    other["org-00"] = ads["org-01"]
    with pytest.raises(KeySubstitution, match="own key advertisement"):
        clients["org-00"].share_keys(other, fed.roster)
    roster = fed.roster
    del roster["org-02"]
    with pytest.raises(KeySubstitution, match="org-02"):
        clients["org-01"].share_keys(ads, roster)


def test_masks_differ_between_rounds_for_the_same_input() -> None:
    fed = federation(4)
    first = make_params(fed, round=1)
    second = replace(first, round=2)
    encoded = inputs(first)
    one = run_round(fed, first, encoded)
    two = run_round(fed, second, encoded)
    assert np.array_equal(one.total, two.total)
    for name in fed.names:
        assert not np.array_equal(one.masked[name], two.masked[name])
        assert np.mean(one.masked[name] == two.masked[name]) < 0.01


def _chi_square_p_value(counts: np.ndarray) -> float:
    """Upper-tail p-value of Pearson's statistic for uniform counts (Wilson–Hilferty)."""
    expected = counts.sum() / counts.size
    statistic = float(((counts - expected) ** 2 / expected).sum())
    dof = counts.size - 1
    z = ((statistic / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_masked_vectors_look_uniform() -> None:
    # Inputs all zero: whatever structure a vector has comes from the masks. Significance:
    # a correct implementation fails with probability 1e-9 per vector (the masks come from the
    # CSPRNG); the unmasked input would give p ≈ 0.
    fed = federation(5)
    params = make_params(fed, length=1 << 15)
    zeros = {name: np.zeros(params.length, np.uint32) for name in fed.names}
    outcome = run_round(fed, params, zeros, drop_after_sharing=["org-04"])
    for y in outcome.masked.values():
        counts = np.bincount(y.view(np.uint8), minlength=256)
        assert _chi_square_p_value(counts) > 1e-9
    assert _chi_square_p_value(np.bincount(zeros["org-00"].view(np.uint8), minlength=256)) < 1e-9


def _masked_clients(fed: Federation, params: RoundParams, drop: Collection[str] = ()):
    server = ServerSession(params)
    clients = {name: ClientSession(name, fed.identities[name], params) for name in fed.names}
    for client in clients.values():
        server.collect(client.advertise())
    ads = server.advertisements()
    for client in clients.values():
        server.route(client.share_keys(ads, fed.roster))
    encoded = inputs(params)
    for name, client in clients.items():
        if name not in drop:
            client.receive_shares(server.shares_for(name))
            server.add_masked(name, client.mask(encoded[name]))
    return clients, server


def test_unmask_refuses_unsafe_requests() -> None:
    fed = federation(5)
    params = make_params(fed)  # threshold 4
    clients, _ = _masked_clients(fed, params)
    client = clients["org-00"]
    everyone = frozenset(fed.names)
    unsafe = [
        (UnmaskRequest(everyone, frozenset({"org-01"})), "both survivors and dropped"),
        (UnmaskRequest(everyone - {"org-00"}, frozenset({"org-00"})), "as a survivor"),
        (UnmaskRequest(frozenset({"org-00", "org-01"}), frozenset()), "threshold"),
        (UnmaskRequest(everyone | {"mallory"}, frozenset()), "unknown"),
    ]
    for request, message in unsafe:
        with pytest.raises(UnsafeUnmaskRequest, match=message):
            client.sign_request(request)
    first = UnmaskRequest(everyone - {"org-04"}, frozenset({"org-04"}))
    signatures = {name: clients[name].sign_request(first).signature for name in first.survivors}
    assert client.sign_request(first).signature == signatures["org-00"]  # identical repeat
    with pytest.raises(UnsafeUnmaskRequest, match="already signed"):
        client.sign_request(UnmaskRequest(everyone, frozenset()))
    reply = client.unmask(ConsistencyCheck(first, signatures))
    assert set(reply.key_shares) == {"org-04"}
    assert set(reply.self_mask_shares) == everyone - {"org-04"}
    assert client.unmask(ConsistencyCheck(first, signatures)) == reply  # harmless repeat
    with pytest.raises(UnsafeUnmaskRequest, match="already answered"):
        client.unmask(ConsistencyCheck(UnmaskRequest(everyone, frozenset()), signatures))


def test_unmask_refuses_a_peer_it_holds_no_shares_of() -> None:
    fed = federation(5)
    params = make_params(fed)
    server = ServerSession(params)
    clients = {name: ClientSession(name, fed.identities[name], params) for name in fed.names}
    for name, client in clients.items():
        if name != "org-04":  # org-04 drops before advertising
            server.collect(client.advertise())
    ads = server.advertisements()
    for name, client in clients.items():
        if name != "org-04":
            server.route(client.share_keys(ads, fed.roster))
    client = clients["org-00"]
    client.receive_shares(server.shares_for("org-00"))
    client.mask(np.zeros(params.length, np.uint32))
    with pytest.raises(UnsafeUnmaskRequest, match="never received"):
        client.sign_request(UnmaskRequest(frozenset(fed.names[:4]), frozenset({"org-04"})))


def test_tampered_or_misrouted_share_messages_are_rejected() -> None:
    fed = federation(4)
    params = make_params(fed)
    server = ServerSession(params)
    clients = {name: ClientSession(name, fed.identities[name], params) for name in fed.names}
    for client in clients.values():
        server.collect(client.advertise())
    ads = server.advertisements()
    for client in clients.values():
        server.route(client.share_keys(ads, fed.roster))
    inbox = server.shares_for("org-00")
    tampered = bytearray(inbox["org-01"])
    tampered[20] ^= 1
    with pytest.raises(ShareTampered, match="org-01"):
        clients["org-00"].receive_shares({**inbox, "org-01": bytes(tampered)})
    # org-01's message for org-02, delivered to org-03 as if from org-01.
    misrouted = server.shares_for("org-02")["org-01"]
    with pytest.raises(ShareTampered, match="org-01"):
        clients["org-03"].receive_shares({**server.shares_for("org-03"), "org-01": misrouted})


@pytest.mark.parametrize("kind", ["self-mask", "key"])
def test_a_wrong_share_is_detected(kind: str) -> None:
    fed = federation(5)
    params = make_params(fed)  # threshold 4
    clients, server = _masked_clients(fed, params, drop=["org-04"])
    request = server.unmask_request()
    for name in sorted(request.survivors):
        server.add_signature(clients[name].sign_request(request))
    check = server.consistency_check()
    for name in sorted(request.survivors):
        reply = clients[name].unmask(check)
        if name == "org-00":
            b, s = dict(reply.self_mask_shares), dict(reply.key_shares)
            if kind == "self-mask":
                b["org-02"] = bytes(16)
            else:
                s["org-04"] = bytes(16)
            reply = UnmaskReply(name, b, s)
        server.add_unmask_reply(reply)
    with pytest.raises(ProtocolError, match=r"inconsistent|does not match"):
        server.finish()


def test_session_order_and_single_use() -> None:
    fed = federation(3)
    params = make_params(fed)
    clients, server = _masked_clients(fed, params)
    with pytest.raises(ProtocolError):
        clients["org-00"].mask(np.zeros(params.length, np.uint32))  # a second vector
    with pytest.raises(ProtocolError, match="twice"):
        server.add_masked("org-00", np.zeros(params.length, np.uint32))
    fresh = ServerSession(params)
    with pytest.raises(ProtocolError):
        fresh.route(EncryptedShares("org-00", {}))
    with pytest.raises(ProtocolError, match="not a selected client"):
        ClientSession("mallory", IdentityKey.generate(), params)


def test_server_rejects_malformed_masked_vectors() -> None:
    fed = federation(3)
    params = make_params(fed)
    server = ServerSession(params)
    clients = {name: ClientSession(name, fed.identities[name], params) for name in fed.names}
    for client in clients.values():
        server.collect(client.advertise())
    ads = server.advertisements()
    for name in ("org-00", "org-01"):
        server.route(clients[name].share_keys(ads, fed.roster))
    server.shares_for("org-00")
    with pytest.raises(ProtocolError, match="did not share"):
        server.add_masked("org-02", np.zeros(params.length, np.uint32))
    with pytest.raises(ProtocolError, match="shape"):
        server.add_masked("org-00", np.zeros(params.length + 1, np.uint32))
    with pytest.raises(ProtocolError, match="dtype"):
        server.add_masked("org-00", np.zeros(params.length, np.uint64))


def test_client_does_not_modify_its_input() -> None:
    fed = federation(3)
    params = make_params(fed)
    encoded = inputs(params)
    copies = {name: x.copy() for name, x in encoded.items()}
    run_round(fed, params, encoded)
    for name in fed.names:
        assert np.array_equal(encoded[name], copies[name])


def test_round_params_validation() -> None:
    fed = federation(6)
    with pytest.raises(ValueError, match="two thirds"):
        make_params(fed, threshold=4)
    relaxed = replace(make_params(fed), threshold=3, require_active_bound=False)
    assert relaxed.threshold == 3
    with pytest.raises(ValueError, match="between 2 and 6"):
        make_params(fed, threshold=7)
    with pytest.raises(ValueError, match="between 2 and 3"):
        make_params(fed, degree=2, threshold=4)
    with pytest.raises(ValueError, match="distinct"):
        replace(make_params(fed), clients=("a", "a", "b"))
    params = make_params(fed)
    assert params.clients == tuple(sorted(fed.names))
    graph = RoundGraph(params)
    assert graph.holders("org-00") == params.clients
    assert graph.share_index("org-00", "org-02") == 3
    # The view digest changes with every field the clients must agree on.
    views = {
        replace(params, **change).view
        for change in (
            {},
            {"clients": (*fed.names[:5], "org-99")},
            {"threshold": 6},
            {"length": LENGTH + 1},
            {"binding": b"noise"},
            {"fixed_point": FixedPoint(32, params.fixed_point.step * 2)},
        )
    }
    assert len(views) == 6


def test_messages_round_trip_and_reject_garbage() -> None:
    ad = KeyAdvertisement("a", bytes(32), bytes(range(32)), bytes(64), bytes(32), bytes(32))
    shares = EncryptedShares("a", {"b": b"\x00\x01", "c": b""})
    request = UnmaskRequest(frozenset({"a", "b"}), frozenset({"c"}))
    reply = UnmaskReply("a", {"a": bytes(32)}, {"c": bytes(32)})
    for message in (ad, shares, request, reply):
        assert type(message).from_bytes(message.to_bytes()) == message
    bad = [
        b"not json",
        b"[]",
        b'{"type":"UnmaskRequest","version":1,"survivors":[],"dropped":[]}',
        ad.to_bytes().replace(b'"version":1', b'"version":2'),
        ad.to_bytes().replace(b'"client":"a"', b'"client":"a","extra":1'),
        ad.to_bytes().replace(b'"client":"a"', b'"client":7'),
        ad.to_bytes()[:-5] + b'!!"}',
    ]
    for data in bad:
        with pytest.raises(ProtocolError):
            KeyAdvertisement.from_bytes(data)
    with pytest.raises(ProtocolError, match="32 bytes"):
        KeyAdvertisement("a", bytes(31), bytes(32), bytes(64), bytes(32), bytes(32))


def test_an_advertisement_over_another_view_is_refused_before_any_share() -> None:
    fed = federation(5)
    params = make_params(fed)
    other = replace(params, clients=tuple(fed.names[:4]))  # a server's second story
    honest = {name: ClientSession(name, fed.identities[name], params) for name in fed.names}
    told_other = ClientSession("org-00", fed.identities["org-00"], other)
    ads = {name: c.advertise() for name, c in honest.items() if name != "org-00"}
    ads["org-00"] = told_other.advertise()
    with pytest.raises(InconsistentView, match="'org-00' signed another view"):
        honest["org-01"].share_keys(ads, fed.roster)
    with pytest.raises(InconsistentView, match="another view"):
        told_other.share_keys({v: a for v, a in ads.items() if v != "org-04"}, fed.roster)
    with pytest.raises(InconsistentView, match="another view"):
        ServerSession(params, identities=fed.roster).collect(ads["org-00"])
