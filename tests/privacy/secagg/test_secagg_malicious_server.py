"""A malicious coordinator against the real client state machines.

Each test plays a server that lies: it shows different clients different unmask requests, a
different round, or a smaller round, and does whatever it can with what the honest clients give
it. The honest clients are the production `ClientSession` / `SecAggParticipant` objects. What the
server learns is then worked out exactly from the shares it collected (`revealed_sums`): every
set of clients whose sum it could unmask. The guarantee under test: no such set has fewer than
`threshold` clients, and no lie gets a share out of an honest client.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np
import pytest
from test_secagg_protocol import Federation, federation, inputs, make_params

from veil.crypto.identity import IdentityKey
from veil.federation.messages import ProtocolInstruction
from veil.privacy.secagg import (
    ClientSession,
    ConsistencyCheck,
    FixedPoint,
    InconsistentView,
    ProtocolError,
    RoundParams,
    ServerSession,
    UnmaskRequest,
    UnsafeUnmaskRequest,
)
from veil.privacy.secagg.layout import UpdateLayout
from veil.privacy.secagg.messages import ConsistencySignature, EncryptedShares
from veil.privacy.secagg.participant import SecAggParticipant
from veil.privacy.secagg.protocol import RoundGraph, largest_holder_set
from veil.privacy.secagg.roster import StaticRoster
from veil.privacy.secagg.settings import SecAggSettings, params_to_bytes
from veil.privacy.secagg.wire import SETUP, SHARE, Advertised, KeyBundle


@dataclass
class Masked:
    """A round after phase 2, run honestly: the server holds every masked vector."""

    fed: Federation
    params: RoundParams
    graph: RoundGraph
    clients: dict[str, ClientSession]
    encoded: dict[str, np.ndarray]
    masked: dict[str, np.ndarray]


def masked_round(n: int, degree: int | None = None, *, majority: bool = False) -> Masked:
    """`majority`: the weaker threshold of the honest-but-curious protocol (a strict majority of
    the holder set), so that the consistency round alone has to stop the attack."""
    fed = federation(n)
    params = make_params(fed, degree=degree)
    if majority:
        holders = largest_holder_set(n, degree)
        params = replace(params, threshold=holders // 2 + 1, require_active_bound=False)
    server = ServerSession(params)
    clients = {name: ClientSession(name, fed.identities[name], params) for name in fed.names}
    for client in clients.values():
        server.collect(client.advertise())
    ads = server.advertisements()
    for client in clients.values():
        server.route(client.share_keys(ads, fed.roster))
    encoded = inputs(params)
    masked = {}
    for name, client in clients.items():
        client.receive_shares(server.shares_for(name))
        masked[name] = client.mask(encoded[name])
    return Masked(fed, params, server.graph, clients, encoded, masked)


@dataclass
class Loot:
    """What the lying server got out of the honest clients."""

    b_shares: dict[str, set[str]]  # owner -> holders that revealed their share of b_owner
    s_shares: dict[str, set[str]]  # owner -> holders that revealed their share of s_owner
    refusals: list[str]
    answered: set[UnmaskRequest]


def lie(round_: Masked, shown: Mapping[str, UnmaskRequest]) -> Loot:
    """Show each client its own request, then forward to each signer the signatures of every
    client that signed the same request (the best a liar can do: a signature over another
    request fails to verify), and collect every share the clients release."""
    loot = Loot({}, {}, [], set())
    signed: dict[str, tuple[UnmaskRequest, ConsistencySignature]] = {}
    for name, request in shown.items():
        try:
            signed[name] = (request, round_.clients[name].sign_request(request))
        except UnsafeUnmaskRequest as exc:
            loot.refusals.append(f"{name}: {exc}")
    for name, (request, _) in signed.items():
        same = {v: sig.signature for v, (r, sig) in signed.items() if r == request}
        try:
            reply = round_.clients[name].unmask(ConsistencyCheck(request, same))
        except UnsafeUnmaskRequest as exc:
            loot.refusals.append(f"{name}: {exc}")
            continue
        loot.answered.add(request)
        for owner in reply.self_mask_shares:
            loot.b_shares.setdefault(owner, set()).add(name)
        for owner in reply.key_shares:
            loot.s_shares.setdefault(owner, set()).add(name)
    return loot


def revealed_sums(round_: Masked, loot: Loot) -> list[frozenset[str]]:
    """Every smallest set of clients whose sum of inputs the server can unmask from the masked
    vectors it holds and the secrets it can rebuild (those with at least `threshold` shares).

    A client's masked vector carries its self mask (removable when its b is rebuilt) and one
    pairwise mask per neighbour (removable when either end's masking key is rebuilt; otherwise
    it cancels only in a sum that holds both ends). So the unmaskable sums are the unions of the
    components of the graph of non-removable pairwise masks whose members all have a rebuilt b.
    """
    t = round_.params.threshold
    b_known = {v for v, holders in loot.b_shares.items() if len(holders) >= t}
    s_known = {v for v, holders in loot.s_shares.items() if len(holders) >= t}
    names = list(round_.params.clients)
    component = {name: name for name in names}

    def find(v: str) -> str:
        while component[v] != v:
            v = component[v]
        return v

    for u in names:
        for v in round_.clients[u].completed - {u}:
            if u not in s_known and v not in s_known:
                component[find(u)] = find(v)
    groups: dict[str, set[str]] = {}
    for name in names:
        groups.setdefault(find(name), set()).add(name)
    return [frozenset(g) for g in groups.values() if g <= b_known]


def assert_nothing_below_threshold(round_: Masked, loot: Loot) -> None:
    t = round_.params.threshold
    for revealed in revealed_sums(round_, loot):
        assert len(revealed) >= t, f"the server unmasks the sum of {sorted(revealed)} (< {t})"
    if round_.params.degree is None:
        # In the complete graph only one request can gather t signatures at all.
        assert len(loot.answered) <= 1, "two different unmask requests were answered"


def test_the_reveal_model_sees_a_single_client_when_secrets_leak() -> None:
    # The checker itself: b and s of one client rebuilt => that client alone is revealed.
    round_ = masked_round(5)
    everyone = set(round_.params.clients)
    loot = Loot({"org-00": everyone}, {"org-00": everyone}, [], set())
    assert frozenset({"org-00"}) in revealed_sums(round_, loot)
    honest = Loot({v: everyone for v in everyone}, {}, [], set())
    assert revealed_sums(round_, honest) == [frozenset(everyone)]


def _neighbours_dropped_for_each(round_: Masked, victim: str) -> dict[str, UnmaskRequest]:
    """The issue's attack: every client is told that the victim's neighbours, except itself,
    dropped. No client is asked for both kinds of share of one peer, yet the victim's holders
    give b_victim and each neighbour's other holders give its masking key."""
    everyone = frozenset(round_.params.clients)
    neighbours = round_.graph.neighbours_of(victim)
    return {
        w: UnmaskRequest(everyone - (neighbours - {w}), frozenset(neighbours - {w}))
        for w in everyone
    }


def _holders_told_one_story(round_: Masked, victim: str) -> dict[str, UnmaskRequest]:
    """Two stories: the victim's holders hear "everyone survived", the rest "its neighbours
    dropped"."""
    everyone = frozenset(round_.params.clients)
    holders = set(round_.graph.holders(victim))
    neighbours = round_.graph.neighbours_of(victim)
    survived = UnmaskRequest(everyone, frozenset())
    dropped = UnmaskRequest(everyone - neighbours, frozenset(neighbours))
    return {v: survived if v in holders else dropped for v in everyone}


@pytest.mark.parametrize("strategy", [_neighbours_dropped_for_each, _holders_told_one_story])
@pytest.mark.parametrize("majority", [False, True])
@pytest.mark.parametrize(("n", "degree"), [(12, 4), (40, 8)])
def test_secagg_plus_neighbour_key_recovery_is_refused(
    n: int,
    degree: int,
    majority: bool,
    strategy: Callable[[Masked, str], dict[str, UnmaskRequest]],
) -> None:
    # Attack 1: self-mask shares of the victim from its holders, masking-key shares of each of
    # its neighbours from that neighbour's other holders.
    for victim in ("org-00", "org-05", "org-11"):
        round_ = masked_round(n, degree, majority=majority)
        loot = lie(round_, strategy(round_, victim))
        assert_nothing_below_threshold(round_, loot)
        assert frozenset({victim}) not in revealed_sums(round_, loot)


def _every_client_its_own_request(
    round_: Masked, target: frozenset[str]
) -> dict[str, UnmaskRequest]:
    everyone = frozenset(round_.params.clients)
    others = sorted(everyone - target)
    shown = {}
    for i, name in enumerate(sorted(everyone)):
        victim = others[i % len(others)]
        if victim == name:
            victim = others[(i + 1) % len(others)]
        shown[name] = UnmaskRequest(everyone - {victim}, frozenset({victim}))
    return shown


def _two_groups(round_: Masked, target: frozenset[str]) -> dict[str, UnmaskRequest]:
    everyone = sorted(round_.params.clients)
    others = [v for v in everyone if v not in target]
    half = len(others) // 2
    first, second = frozenset(others[:half]), frozenset(others[half:])
    a = UnmaskRequest(target | first, second)
    b = UnmaskRequest(target | second, first)
    return {v: a if v in target or v in first else b for v in everyone}


@pytest.mark.parametrize("majority", [False, True])
@pytest.mark.parametrize("n", [11, 12])
@pytest.mark.parametrize("strategy", [_every_client_its_own_request, _two_groups])
def test_complete_graph_sub_threshold_sums_are_refused(
    n: int,
    strategy: Callable[[Masked, frozenset[str]], dict[str, UnmaskRequest]],
    majority: bool,
) -> None:
    # Attack 3: inconsistent requests to recover the masking keys of every client outside a
    # small target set, leaving the sum of the target alone.
    round_ = masked_round(n, majority=majority)
    target = frozenset(round_.params.clients[:2])
    loot = lie(round_, strategy(round_, target))
    assert loot.refusals
    assert_nothing_below_threshold(round_, loot)
    assert target not in revealed_sums(round_, loot)


def test_the_honest_request_still_reveals_only_the_sum() -> None:
    round_ = masked_round(7)
    everyone = frozenset(round_.params.clients)
    request = UnmaskRequest(everyone, frozenset())
    loot = lie(round_, dict.fromkeys(everyone, request))
    assert not loot.refusals
    assert revealed_sums(round_, loot) == [everyone]


# --- split views, against the production participant ------------------------------------------


def _participants(
    n: int, degree: int | None = None
) -> tuple[Federation, dict[str, SecAggParticipant], UpdateLayout]:
    fed = federation(n)
    layout = UpdateLayout.of({"w": np.zeros(16, np.float32)}, SecAggSettings().sum_bounds)
    settings = SecAggSettings(round_size=n, neighbours=degree)
    roster = StaticRoster(fed.roster)
    participants = {
        name: SecAggParticipant(name, fed.identities[name], roster, settings, layout)
        for name in fed.names
    }
    return fed, participants, layout


def _instruction(stage: str, body: bytes, round_: int = 1) -> ProtocolInstruction:
    return ProtocolInstruction(run_id="run-1", round=round_, stage=stage, body=body)


def _plan(fed: Federation, clients: tuple[str, ...], layout: UpdateLayout) -> RoundParams:
    return SecAggSettings(round_size=len(fed.names)).plan_round("run-1", 1, clients, layout)


def test_a_two_client_round_shown_to_one_client_is_refused() -> None:
    # Attack 2: X is shown the round {X, A} with threshold 2; everyone else the real round.
    fed, participants, layout = _participants(5)
    real = _plan(fed, tuple(fed.names), layout)
    small = RoundParams(
        run_id="run-1",
        round=1,
        clients=("org-00", "org-01"),
        threshold=2,
        degree=None,
        length=layout.length,
        fixed_point=real.fixed_point,
        binding=real.binding,
    )
    with pytest.raises(ProtocolError, match="threshold 2"):
        participants["org-00"].handle(_instruction(SETUP, params_to_bytes(small)))


@pytest.mark.parametrize("lie_about", ["members", "binding", "encoding"])
def test_a_different_view_is_detected_before_any_share_is_released(lie_about: str) -> None:
    fed, participants, layout = _participants(7)
    real = _plan(fed, tuple(fed.names), layout)
    victim = "org-00"
    if lie_about == "members":
        # The victim is told that org-06 is not in the round.
        other = _plan(fed, tuple(fed.names[:6]), layout)
    elif lie_about == "binding":
        other = replace(real, binding=real.binding.replace(b"clip_range", b"clip_rangf"))
    else:
        other = replace(real, fixed_point=FixedPoint(32, real.fixed_point.step * 2))
    if lie_about == "binding":
        # Another noise plan or other encoding bounds: the victim's own configuration says no.
        with pytest.raises(ProtocolError, match="noise plan"):
            participants[victim].handle(_instruction(SETUP, params_to_bytes(other)))
        return
    ads = {
        name: Advertised.from_bytes(
            p.handle(_instruction(SETUP, params_to_bytes(other if name == victim else real)))
        )
        for name, p in participants.items()
    }
    shown = KeyBundle({v: a for v, a in ads.items() if v in other.clients})
    with pytest.raises(InconsistentView, match="another view"):
        participants[victim].handle(_instruction(SHARE, shown.to_bytes()))
    # Every honest peer notices too, from the victim's advertisement.
    for name in fed.names[1:6]:
        with pytest.raises(InconsistentView, match="'org-00' signed another view"):
            participants[name].handle(_instruction(SHARE, KeyBundle(ads).to_bytes()))


def test_secagg_plus_refuses_a_bundle_with_an_advertisement_left_out() -> None:
    # Leaving an advertisement out would let the server pick among 2^n graph seeds.
    fed, participants, layout = _participants(8, degree=4)
    settings = SecAggSettings(round_size=8, neighbours=4)
    params = settings.plan_round("run-1", 1, tuple(fed.names), layout)
    ads = {
        name: Advertised.from_bytes(p.handle(_instruction(SETUP, params_to_bytes(params))))
        for name, p in participants.items()
    }
    partial = KeyBundle({v: a for v, a in ads.items() if v != "org-05"})
    with pytest.raises(ProtocolError, match="every selected client"):
        participants["org-00"].handle(_instruction(SHARE, partial.to_bytes()))
    shares = EncryptedShares.from_bytes(
        participants["org-01"].handle(_instruction(SHARE, KeyBundle(ads).to_bytes()))
    )
    assert len(shares.ciphertexts) == 4  # its neighbours in the graph all the clients derive


def test_a_seeded_server_graph_is_not_accepted() -> None:
    # The graph depends on every advertisement: two rounds with the same members and view get
    # different graphs, and the server cannot know either before all clients have committed.
    layouts = []
    for _ in range(2):
        round_ = masked_round(12, degree=4)
        layouts.append({v: round_.graph.neighbours_of(v) for v in round_.params.clients})
    assert layouts[0] != layouts[1]


def test_identity_keys_are_the_roster_ones() -> None:
    # A participant refuses an advertisement signed by a key outside its roster even when the
    # view matches (the server cannot stand in for a member).
    fed, participants, layout = _participants(4)
    params = _plan(fed, tuple(fed.names), layout)
    ads = {
        name: Advertised.from_bytes(p.handle(_instruction(SETUP, params_to_bytes(params))))
        for name, p in participants.items()
    }
    impostor = ClientSession("org-03", IdentityKey.generate(), params)
    ads["org-03"] = Advertised(impostor.advertise(), b"")
    with pytest.raises(Exception, match="roster identity"):
        participants["org-00"].handle(_instruction(SHARE, KeyBundle(ads).to_bytes()))
