"""One round of secure aggregation by masking, as pure state machines (no I/O).

The protocol is that of Bonawitz et al. 2017 ("Practical Secure Aggregation for
Privacy-Preserving Machine Learning", §4, Figure 4, honest-but-curious server variant with
authenticated key advertisements), optionally over the sparse neighbour graph of SecAgg+ (Bell
et al. 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", §3). One
`ClientSession` per client and one `ServerSession` per round; the transport moves the messages
of `veil.privacy.secagg.messages` between them:

=====  ============================================  ===========================================
phase  client                                        server
=====  ============================================  ===========================================
0      `ClientSession.advertise`                      `ServerSession.collect` each, then
                                                      `ServerSession.advertisements` (broadcast)
1      `ClientSession.share_keys`                     `ServerSession.route` each, then
                                                      `ServerSession.shares_for` each client
2      `ClientSession.receive_shares`, `mask`         `ServerSession.add_masked` each vector
3      `ClientSession.unmask`                         `ServerSession.unmask_request` (to every
                                                      survivor), `add_unmask_reply`, `finish`
=====  ============================================  ===========================================

Guarantees (honest-but-curious server; clients may drop out at any point):

* The server learns the sum of the survivors' encoded inputs mod 2^k and nothing more about any
  one input, as long as fewer than `RoundParams.threshold` clients of a neighbourhood collude
  with it. Every masked vector carries a self mask and (complete graph) n - 1 pairwise masks,
  so on its own it is uniformly distributed.
* The server cannot substitute keys: every client checks each neighbour's key advertisement
  against the neighbour's Ed25519 identity in the *roster* the client trusts (not one the
  server supplies) and raises `KeySubstitution` otherwise.
* A client never reveals both the self-mask share and the key share of the same peer: one
  `UnmaskRequest` per session (identical repeats get the identical reply), with disjoint sets.
  With ``threshold > neighbourhood / 2`` (enforced by default) a server that tells different
  clients different stories still cannot collect t shares of both kinds for one peer, since
  2t holders would be needed and each answers once.

A wrong share is detected, not corrected: the server rebuilds each secret from exactly t shares
and checks it against what the owner signed in its advertisement (a SHA-256 commitment to the
self-mask secret; the masking public key), so one Shamir reconstruction per secret suffices.

Not covered: the consistency-check round and signed unmask requests of the malicious-server
variant (Bonawitz §6).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from veil.crypto.identity import IdentityKey, IdentityPublicKey, SignatureRejected, signing_payload
from veil.privacy.secagg.errors import (
    KeySubstitution,
    NotEnoughShares,
    ProtocolError,
    ShareTampered,
    UnsafeUnmaskRequest,
)
from veil.privacy.secagg.graph import neighbours
from veil.privacy.secagg.masking import (
    SECRET_BYTES,
    agree,
    apply_masks,
    mask_sign,
    masking_key,
    pairwise_seed,
    self_mask_commitment,
    self_mask_seed,
    share_encryption_key,
)
from veil.privacy.secagg.messages import (
    EncryptedShares,
    KeyAdvertisement,
    UnmaskReply,
    UnmaskRequest,
    key_advertisement_payload,
)
from veil.privacy.secagg.quantize import FixedPoint, UIntArray
from veil.privacy.secagg.shamir import combine, split

__all__ = [
    "ClientSession",
    "RoundParams",
    "RoundSummary",
    "ServerSession",
    "majority_threshold",
]

_NONCE_BYTES = 12
_TAG_BYTES = 16
#: A share message holds the recipient's share of b_u then its share of s_u's secret.
_PLAINTEXT_BYTES = 2 * SECRET_BYTES
_CIPHERTEXT_BYTES = _NONCE_BYTES + _PLAINTEXT_BYTES + _TAG_BYTES
_SHARES_LABEL = "secagg-shares"
_INT64_MAX = (1 << 63) - 1


def majority_threshold(n_clients: int, degree: int | None) -> int:
    """The smallest threshold that `RoundParams` accepts by default: a strict majority of the
    largest share-holder set (a client and its neighbours)."""
    largest = n_clients if degree is None else degree + 1 + (degree % 2 and n_clients % 2)
    return largest // 2 + 1


@dataclass(frozen=True)
class RoundParams:
    """What every party of one round agrees on before it starts (the server announces it with
    the round; clients check what they can, e.g. that they are in `clients`).

    `clients` are the selected clients (stored sorted; names distinct). `degree` None is
    SecAgg's complete graph, an int is SecAgg+'s degree (see `veil.privacy.secagg.graph`;
    `graph_seed` of at least 16 fresh random bytes, ignored for the complete graph). A client's
    secrets are shared among its *holders*, itself and its neighbours, with Shamir threshold
    `threshold`: ``2 <= threshold <= `` the smallest holder set, and, unless
    `require_majority` is False, ``threshold >`` half of the largest holder set (see the
    module docstring for why). `length` is the vector length; `fixed_point` the encoding.
    """

    run_id: str
    round: int
    clients: tuple[str, ...]
    threshold: int
    degree: int | None
    graph_seed: bytes
    length: int
    fixed_point: FixedPoint
    require_majority: bool = True
    _graph: Mapping[str, frozenset[str]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.run_id, str) or not self.run_id:
            raise ValueError("run_id must be a non-empty string")
        if not _is_int(self.round) or not 0 <= self.round <= _INT64_MAX:
            raise ValueError(f"round must be a non-negative int, got {self.round!r}")
        names = tuple(sorted(self.clients))
        if any(not isinstance(name, str) or not name for name in names):
            raise ValueError("client names must be non-empty strings")
        if len(set(names)) != len(names):
            raise ValueError("client names must be distinct")
        if len(names) < 2:
            raise ValueError(f"secure aggregation needs at least 2 clients, got {len(names)}")
        object.__setattr__(self, "clients", names)
        if not isinstance(self.graph_seed, bytes):
            raise TypeError("graph_seed must be bytes")
        if not _is_int(self.length) or self.length < 1:
            raise ValueError(f"length must be a positive int, got {self.length!r}")
        if not isinstance(self.fixed_point, FixedPoint):
            raise TypeError("fixed_point must be a FixedPoint")
        graph = neighbours(names, self.degree, self.graph_seed)
        object.__setattr__(self, "_graph", graph)
        sizes = [len(peers) + 1 for peers in graph.values()]
        smallest, largest = min(sizes), max(sizes)
        t = self.threshold
        if not _is_int(t) or not 2 <= t <= smallest:
            raise ValueError(
                f"threshold must be between 2 and {smallest} (the smallest set of share holders: "
                f"a client and its neighbours), got {t!r}"
            )
        if self.require_majority and 2 * t <= largest:
            raise ValueError(
                f"threshold {t} is not a strict majority of {largest} share holders: a server "
                f"could then collect both kinds of share of one client; use at least "
                f"{largest // 2 + 1} (or require_majority=False, knowingly)"
            )

    def neighbours_of(self, client: str) -> frozenset[str]:
        """`client`'s neighbours (without itself)."""
        try:
            return self._graph[client]
        except KeyError:
            raise ProtocolError(f"{client!r} is not a selected client of this round") from None

    def holders(self, client: str) -> tuple[str, ...]:
        """Who may hold shares of `client`'s secrets: itself and its neighbours, sorted."""
        return tuple(sorted(self.neighbours_of(client) | {client}))

    def share_index(self, owner: str, holder: str) -> int:
        """The Shamir index (1-based) of `holder`'s share of `owner`'s secrets: its position in
        ``holders(owner)``."""
        holders = self.holders(owner)
        if holder not in holders:
            raise ProtocolError(f"{holder!r} holds no shares of {owner!r}: not a neighbour")
        return holders.index(holder) + 1


@dataclass(frozen=True)
class RoundSummary:
    """What happened in a round, for the round's record: who got how far."""

    selected: int
    advertised: int
    shared: int
    #: Clients whose masked vectors are in the sum.
    survivors: tuple[str, ...]
    #: Clients that shared keys but sent no masked vector (their masking keys were recovered).
    dropped: tuple[str, ...]
    #: Selected clients that never completed the key sharing (no masks with them exist).
    dropped_early: tuple[str, ...]
    unmask_replies: int


class ClientSession:
    """One client's side of one round. Use each session for one round only; call the methods in
    order (`advertise`, `share_keys`, `receive_shares`, `mask`, `unmask`), each once
    (`unmask` may be repeated with the identical request). ProtocolError when out of order.

    Keys and seeds come from the OS CSPRNG (X25519 keys from `cryptography`, the self-mask seed
    from `os.urandom`, Shamir coefficients from pycryptodome's `get_random_bytes`); none can be
    seeded.
    """

    def __init__(self, name: str, identity: IdentityKey, params: RoundParams) -> None:
        if name not in params.clients:
            raise ProtocolError(f"{name!r} is not a selected client of round {params.round}")
        self.name = name
        self.params = params
        self._identity = identity
        self._state = "new"
        self._encryption_key = x25519.X25519PrivateKey.generate()
        # The masking key comes from a 16-byte secret: that secret is what gets shared.
        self._masking_secret = os.urandom(SECRET_BYTES)
        self._masking_key = masking_key(self._masking_secret, params.run_id, params.round, name)
        # b_u is drawn now so that the advertisement can commit to it.
        self._b = os.urandom(SECRET_BYTES)
        self._advertisement: KeyAdvertisement | None = None
        self._aeads: dict[str, AESGCM] = {}
        self._pair_seeds: dict[str, bytes] = {}
        self._self_seed = b""
        # Shares this client holds: peer -> (share of b_peer, share of s_peer).
        self._held: dict[str, tuple[bytes, bytes]] = {}
        self._completed: frozenset[str] = frozenset()
        self._answered: tuple[UnmaskRequest, UnmaskReply] | None = None

    @property
    def completed(self) -> frozenset[str]:
        """U2 ∩ N(u) ∪ {u}: the neighbours whose shares arrived, and this client (after
        `receive_shares`); exactly the peers it masks with."""
        return self._completed

    def advertise(self) -> KeyAdvertisement:
        """Phase 0: this round's two X25519 public keys, signed with the identity key."""
        self._advance("new", "advertised")
        p = self.params
        enc = self._encryption_key.public_key().public_bytes_raw()
        mask = self._masking_key.public_key().public_bytes_raw()
        commitment = self_mask_commitment(self._b, p.run_id, p.round, self.name)
        payload = key_advertisement_payload(p.run_id, p.round, self.name, enc, mask, commitment)
        signature = self._identity.sign(payload)
        self._advertisement = KeyAdvertisement(self.name, enc, mask, signature, commitment)
        return self._advertisement

    def share_keys(
        self,
        advertisements: Mapping[str, KeyAdvertisement],
        peer_identities: Mapping[str, IdentityPublicKey],
    ) -> EncryptedShares:
        """Phase 1: check the broadcast advertisements and send Shamir shares of the self-mask
        seed b_u and the masking key s_u, one AES-256-GCM ciphertext per neighbour that
        advertised.

        `peer_identities` is the trusted roster (name → Ed25519 identity), never taken from the
        server. KeySubstitution if this client's own advertisement was not relayed unchanged,
        if a neighbour's advertisement is not signed by its roster identity (or it has none),
        or if keys repeat; ProtocolError for an unusable (low-order) key; NotEnoughShares if
        fewer than `threshold` of its holders (itself included) advertised. Neighbours without
        an advertisement have dropped out and are left out.
        """
        self._advance("advertised", "shared")
        p = self.params
        if advertisements.get(self.name) != self._advertisement:
            raise KeySubstitution(
                f"the server did not relay {self.name!r}'s own key advertisement unchanged"
            )
        live = {self.name: advertisements[self.name]}
        for peer in sorted(p.neighbours_of(self.name)):
            advertisement = advertisements.get(peer)
            if advertisement is None:
                continue
            if advertisement.client != peer:
                raise KeySubstitution(
                    f"the advertisement relayed for {peer!r} names {advertisement.client!r}"
                )
            identity = peer_identities.get(peer)
            if identity is None:
                raise KeySubstitution(
                    f"{peer!r} advertised keys but has no identity in the roster: refusing them"
                )
            try:
                advertisement.verify(identity, p.run_id, p.round)
            except SignatureRejected:
                raise KeySubstitution(
                    f"the key advertisement of {peer!r} is not signed by {peer!r}'s roster "
                    "identity: the keys were substituted or altered"
                ) from None
            live[peer] = advertisement
        keys = [k for ad in live.values() for k in (ad.encryption_public, ad.masking_public)]
        if len(set(keys)) != len(keys):
            raise KeySubstitution("two advertised public keys are equal: refusing reused keys")
        if len(live) < p.threshold:
            raise NotEnoughShares(
                f"only {len(live)} of {self.name!r}'s {len(p.holders(self.name))} share holders "
                f"(itself included) advertised keys; the threshold is {p.threshold}"
            )
        for peer, advertisement in live.items():
            if peer == self.name:
                continue
            try:
                enc_secret = agree(self._encryption_key, advertisement.encryption_public)
                mask_secret = agree(self._masking_key, advertisement.masking_public)
            except ValueError:
                raise ProtocolError(f"{peer!r} advertised an unusable X25519 public key") from None
            key = share_encryption_key(enc_secret, p.run_id, p.round, self.name, peer)
            self._aeads[peer] = AESGCM(key)
            self._pair_seeds[peer] = pairwise_seed(mask_secret, p.run_id, p.round, self.name, peer)

        b = self._b
        self._self_seed = self_mask_seed(b, p.run_id, p.round, self.name)
        index = {peer: p.share_index(self.name, peer) for peer in live}
        b_shares = split(b, p.threshold, list(index.values()))
        s_shares = split(self._masking_secret, p.threshold, list(index.values()))
        del b
        self._b = b""
        self._held[self.name] = (b_shares[index[self.name]], s_shares[index[self.name]])
        ciphertexts = {}
        for peer in sorted(self._aeads):
            nonce = os.urandom(_NONCE_BYTES)
            plaintext = b_shares[index[peer]] + s_shares[index[peer]]
            sealed = self._aeads[peer].encrypt(nonce, plaintext, self._share_ad(self.name, peer))
            ciphertexts[peer] = nonce + sealed
        return EncryptedShares(sender=self.name, ciphertexts=ciphertexts)

    def receive_shares(self, shares_for_me: Mapping[str, bytes]) -> None:
        """Phase 2a: decrypt and authenticate the share messages routed to this client
        (sender → ciphertext, all at once). ShareTampered if one fails authentication;
        ProtocolError if one comes from a client that is not a neighbour that advertised;
        NotEnoughShares if fewer than `threshold` holders (itself included) completed phase 1.
        """
        self._advance("shared", "received")
        for sender, ciphertext in shares_for_me.items():
            aead = self._aeads.get(sender)
            if aead is None:
                raise ProtocolError(
                    f"shares for {self.name!r} from {sender!r}, which is not a neighbour that "
                    "advertised keys this round"
                )
            if len(ciphertext) != _CIPHERTEXT_BYTES:
                raise ShareTampered(
                    f"the share message from {sender!r} is {len(ciphertext)} bytes, expected "
                    f"{_CIPHERTEXT_BYTES}"
                )
            nonce, sealed = ciphertext[:_NONCE_BYTES], ciphertext[_NONCE_BYTES:]
            try:
                plaintext = aead.decrypt(nonce, sealed, self._share_ad(sender, self.name))
            except InvalidTag:
                raise ShareTampered(
                    f"the share message from {sender!r} to {self.name!r} fails authentication: "
                    "altered, replayed or encrypted under another key"
                ) from None
            self._held[sender] = (plaintext[:SECRET_BYTES], plaintext[SECRET_BYTES:])
        self._completed = frozenset(self._held)
        if len(self._completed) < self.params.threshold:
            raise NotEnoughShares(
                f"only {len(self._completed)} of {self.name!r}'s share holders (itself "
                f"included) completed the key sharing; the threshold is {self.params.threshold}"
            )

    def mask(self, encoded: UIntArray) -> UIntArray:
        """Phase 2b: ``y = x + PRG(b_u) + Σ ±PRG(s_uv) mod 2^k`` over the peers of `completed`.

        `encoded` is this client's `FixedPoint.encode` output: shape ``(length,)`` and the
        round's dtype (ValueError/TypeError otherwise); it is not modified. Only one vector may
        be masked per session: two vectors under the same masks would reveal their difference.
        """
        p = self.params
        x = np.asarray(encoded)
        if x.shape != (p.length,):
            raise ValueError(f"the encoded vector has shape {x.shape}, expected ({p.length},)")
        if x.dtype != p.fixed_point.dtype:
            raise TypeError(
                f"the encoded vector has dtype {x.dtype}, expected the round's "
                f"{p.fixed_point.dtype}"
            )
        self._advance("received", "masked")
        y: UIntArray = np.array(x, dtype=p.fixed_point.dtype, order="C", copy=True)
        masks = [(self._self_seed, 1)]
        for peer in sorted(self._completed - {self.name}):
            masks.append((self._pair_seeds[peer], mask_sign(self.name, peer)))
        apply_masks(y, masks)
        return p.fixed_point.reduce(y)

    def unmask(self, request: UnmaskRequest) -> UnmaskReply:
        """Phase 3: this client's shares of each survivor's self-mask seed and of each dropped
        client's masking key, for the peers it holds shares of.

        UnsafeUnmaskRequest if the sets overlap, if this client is not among the survivors (or
        is listed as dropped), if they name clients outside the round, if fewer than
        `threshold` of this client's holders survive, if they place a neighbour this client
        holds no shares of, or if an earlier, different request was answered.
        """
        if self._answered is not None:
            previous, reply = self._answered
            if request == previous:
                return reply
            raise UnsafeUnmaskRequest(
                f"{self.name!r} already answered an unmask request this round; a second, "
                "different one could reveal both shares of one peer"
            )
        if self._state != "masked":
            raise ProtocolError(f"unmask before {self.name!r} masked its input")
        p = self.params
        survivors, dropped = request.survivors, request.dropped
        if survivors & dropped:
            raise UnsafeUnmaskRequest(
                f"the unmask request lists {sorted(survivors & dropped)} as both survivors and "
                "dropped: answering would reveal their inputs"
            )
        if self.name in dropped or self.name not in survivors:
            raise UnsafeUnmaskRequest(
                f"the unmask request does not list {self.name!r} as a survivor, but it sent its "
                "masked input"
            )
        unknown = (survivors | dropped) - set(p.clients)
        if unknown:
            raise UnsafeUnmaskRequest(f"the unmask request names unknown clients {sorted(unknown)}")
        mine = set(p.holders(self.name))
        living = survivors & mine
        if len(living) < p.threshold:
            raise UnsafeUnmaskRequest(
                f"only {len(living)} of {self.name!r}'s share holders survive, fewer than the "
                f"threshold {p.threshold}: the sum would reveal too few inputs"
            )
        foreign = ((survivors | dropped) & mine) - self._held.keys()
        if foreign:
            raise UnsafeUnmaskRequest(
                f"the unmask request asks {self.name!r} about {sorted(foreign)}, whose shares it "
                "never received"
            )
        reply = UnmaskReply(
            client=self.name,
            self_mask_shares={v: self._held[v][0] for v in sorted(survivors & mine)},
            key_shares={v: self._held[v][1] for v in sorted(dropped & mine)},
        )
        self._answered = (request, reply)
        self._state = "unmasked"
        return reply

    def _share_ad(self, sender: str, recipient: str) -> bytes:
        p = self.params
        return signing_payload(_SHARES_LABEL, p.run_id, p.round, sender, recipient)

    def _advance(self, expected: str, new: str) -> None:
        if self._state != expected:
            raise ProtocolError(
                f"{self.name!r}: cannot go to '{new}' from '{self._state}' (expected '{expected}')"
            )
        self._state = new


class ServerSession:
    """The server's side of one round: relays keys and shares, sums the masked vectors as they
    arrive (one running sum; no per-client vector is kept), and removes the masks.

    Phases close in order: the first `advertisements` call closes key collection, the first
    `shares_for` closes routing, `unmask_request` closes input collection; a late message gets
    ProtocolError. This keeps every client's view of who completed each phase consistent.
    With `identities` (the roster) it also checks advertisement signatures on arrival.
    """

    def __init__(
        self,
        params: RoundParams,
        identities: Mapping[str, IdentityPublicKey] | None = None,
    ) -> None:
        self.params = params
        self._identities = identities
        self._ads: dict[str, KeyAdvertisement] = {}
        self._recipients: dict[str, frozenset[str]] = {}  # sender -> recipients (U2)
        self._inbox: dict[str, dict[str, bytes]] = {}  # recipient -> sender -> ciphertext
        self._masked: set[str] = set()
        self._sum: UIntArray | None = None
        self._request: UnmaskRequest | None = None
        self._b_shares: dict[str, dict[int, bytes]] = {}
        self._s_shares: dict[str, dict[int, bytes]] = {}
        self._replied: set[str] = set()
        self._result: UIntArray | None = None
        self._phase = 0

    # phase 0 ------------------------------------------------------------------------------

    def collect(self, advertisement: KeyAdvertisement) -> None:
        """Accept one client's key advertisement (once per client)."""
        self._require_phase(0, "collect a key advertisement")
        name = advertisement.client
        self.params.neighbours_of(name)  # ProtocolError for a client not selected
        if name in self._ads:
            raise ProtocolError(f"{name!r} advertised keys twice")
        if self._identities is not None:
            identity = self._identities.get(name)
            if identity is None:
                raise KeySubstitution(f"{name!r} has no identity in the roster")
            try:
                advertisement.verify(identity, self.params.run_id, self.params.round)
            except SignatureRejected:
                raise KeySubstitution(
                    f"the key advertisement of {name!r} is not signed by its roster identity"
                ) from None
        self._ads[name] = advertisement

    def advertisements(self) -> dict[str, KeyAdvertisement]:
        """Every advertisement collected (closes phase 0): what to broadcast."""
        if self._phase == 0:
            self._phase = 1
        return dict(self._ads)

    def advertisements_for(self, client: str) -> dict[str, KeyAdvertisement]:
        """The advertisements `client` needs: its own and its neighbours' (closes phase 0)."""
        holders = self.params.holders(client)
        return {v: ad for v, ad in self.advertisements().items() if v in holders}

    # phase 1 ------------------------------------------------------------------------------

    def route(self, shares: EncryptedShares) -> None:
        """Accept one client's share messages. The recipients must be exactly its neighbours
        that advertised (ProtocolError otherwise), so that all views of U2 agree."""
        self._require_phase(1, "route shares")
        sender = shares.sender
        if sender not in self._ads:
            raise ProtocolError(f"shares from {sender!r}, which advertised no keys")
        if sender in self._recipients:
            raise ProtocolError(f"{sender!r} sent its shares twice")
        expected = self.params.neighbours_of(sender) & self._ads.keys()
        if set(shares.ciphertexts) != expected:
            raise ProtocolError(
                f"{sender!r} sent shares to {sorted(shares.ciphertexts)}, expected exactly its "
                f"neighbours that advertised: {sorted(expected)}"
            )
        self._recipients[sender] = frozenset(expected)
        for recipient, ciphertext in shares.ciphertexts.items():
            self._inbox.setdefault(recipient, {})[sender] = ciphertext

    def shares_for(self, client: str) -> dict[str, bytes]:
        """The share messages for `client`, sender → ciphertext (closes phase 1)."""
        self.params.neighbours_of(client)
        if self._phase < 1:
            raise ProtocolError("shares_for before the advertisements were broadcast")
        if self._phase == 1:
            self._phase = 2
        return dict(self._inbox.get(client, {}))

    # phase 2 ------------------------------------------------------------------------------

    def add_masked(self, client: str, masked: UIntArray) -> None:
        """Add one client's masked vector to the running sum (the vector is not kept).

        ProtocolError if `client` did not complete phase 1, already sent one, or the vector
        has the wrong shape or dtype."""
        self._require_phase(2, "accept a masked vector")
        p = self.params
        if client not in self._recipients:
            raise ProtocolError(f"a masked vector from {client!r}, which did not share its keys")
        if client in self._masked:
            raise ProtocolError(f"{client!r} sent a masked vector twice")
        y = np.asarray(masked)
        if y.shape != (p.length,) or y.dtype != p.fixed_point.dtype:
            raise ProtocolError(
                f"the masked vector of {client!r} has shape {y.shape} and dtype {y.dtype}, "
                f"expected ({p.length},) and {p.fixed_point.dtype}"
            )
        if self._sum is None:
            self._sum = np.array(y, dtype=p.fixed_point.dtype, order="C", copy=True)
        else:
            np.add(self._sum, y, out=self._sum)
        self._masked.add(client)

    # phase 3 ------------------------------------------------------------------------------

    def unmask_request(self) -> UnmaskRequest:
        """The request to send to every survivor (closes phase 2; repeated calls return it).

        NotEnoughShares if some secret the server will need has fewer than `threshold`
        surviving holders, so the round cannot complete."""
        if self._request is not None:
            return self._request
        if self._phase < 2:
            raise ProtocolError("unmask_request before the shares were delivered")
        p = self.params
        survivors = frozenset(self._masked)
        dropped = frozenset(self._recipients) - survivors
        if not survivors:
            raise NotEnoughShares(
                f"no masked vector arrived ({len(self._recipients)} of {len(p.clients)} "
                "clients shared keys): nothing to aggregate"
            )
        for owner in sorted(survivors | dropped):
            alive = len(self._holders(owner) & survivors)
            if alive < p.threshold:
                kind = "self-mask seed" if owner in survivors else "masking key"
                raise NotEnoughShares(
                    f"the {kind} of {owner!r} has {alive} surviving share holders, fewer than "
                    f"the threshold {p.threshold} ({len(survivors)} of {len(p.clients)} "
                    "selected clients sent masked vectors)"
                )
        self._request = UnmaskRequest(survivors=survivors, dropped=dropped)
        self._phase = 3
        return self._request

    def add_unmask_reply(self, reply: UnmaskReply) -> None:
        """Accept one survivor's shares. ProtocolError for a reply from a non-survivor, a
        second reply, or shares the request did not ask that client for."""
        self._require_phase(3, "accept an unmask reply")
        assert self._request is not None
        name = reply.client
        if name not in self._request.survivors:
            raise ProtocolError(f"an unmask reply from {name!r}, which is not a survivor")
        if name in self._replied:
            raise ProtocolError(f"{name!r} replied twice")
        for shares, expected, kind in (
            (reply.self_mask_shares, self._request.survivors, "self-mask"),
            (reply.key_shares, self._request.dropped, "key"),
        ):
            for owner, share in shares.items():
                if owner not in expected or name not in self._holders(owner):
                    raise ProtocolError(f"{name!r} sent a {kind} share of {owner!r} unasked")
                if len(share) != SECRET_BYTES:
                    raise ProtocolError(f"{name!r} sent a {kind} share of {len(share)} bytes")
        for owner, share in reply.self_mask_shares.items():
            self._b_shares.setdefault(owner, {})[self.params.share_index(owner, name)] = share
        for owner, share in reply.key_shares.items():
            self._s_shares.setdefault(owner, {})[self.params.share_index(owner, name)] = share
        self._replied.add(name)

    def finish(self) -> UIntArray:
        """The sum of the survivors' encoded inputs mod 2^k (the round's dtype; decode it with
        `FixedPoint.decode`). Removes each survivor's self mask and the pairwise masks between
        each dropped client and its surviving neighbours. Repeated calls return the same array.

        NotEnoughShares (naming the secret, the shares and replies received, and the threshold)
        if a secret has fewer than `threshold` shares; ProtocolError if the shares are
        inconsistent (a reconstructed masking key that does not match its advertisement).
        """
        if self._result is not None:
            return self._result
        self._require_phase(3, "finish")
        assert self._request is not None and self._sum is not None
        p = self.params
        masks: list[tuple[bytes, int]] = []
        for owner in sorted(self._request.survivors):
            b = self._reconstruct(self._b_shares.get(owner, {}), owner, "self-mask seed")
            if self_mask_commitment(b, p.run_id, p.round, owner) != (
                self._ads[owner].self_mask_commitment
            ):
                raise ProtocolError(
                    f"the self-mask seed of {owner!r} rebuilt from the shares does not match its "
                    "commitment: some client sent a wrong share"
                )
            masks.append((self_mask_seed(b, p.run_id, p.round, owner), -1))
        for owner in sorted(self._request.dropped):
            secret = self._reconstruct(self._s_shares.get(owner, {}), owner, "masking key")
            key = masking_key(secret, p.run_id, p.round, owner)
            if key.public_key().public_bytes_raw() != self._ads[owner].masking_public:
                raise ProtocolError(
                    f"the masking key of {owner!r} reconstructed from the shares does not match "
                    "its advertised public key: some client sent a wrong share"
                )
            for peer in sorted(self._recipients[owner] & self._request.survivors):
                secret = agree(key, self._ads[peer].masking_public)
                seed = pairwise_seed(secret, p.run_id, p.round, owner, peer)
                # `peer` added mask_sign(peer, owner) · PRG(seed); take it away.
                masks.append((seed, -mask_sign(peer, owner)))
        total = self._sum
        apply_masks(total, masks)
        self._result = p.fixed_point.reduce(total)
        self._sum = None
        return self._result

    @property
    def survivors(self) -> frozenset[str]:
        """Clients whose masked vectors were added (so far)."""
        return frozenset(self._masked)

    @property
    def dropped(self) -> frozenset[str]:
        """Clients that shared their keys but sent no masked vector: those whose masking keys
        the server reconstructs. Empty before `unmask_request`."""
        return self._request.dropped if self._request is not None else frozenset()

    def summary(self) -> RoundSummary:
        """Counts of each phase and the names of the survivors and of the dropped clients."""
        return RoundSummary(
            selected=len(self.params.clients),
            advertised=len(self._ads),
            shared=len(self._recipients),
            survivors=tuple(sorted(self._masked)),
            dropped=tuple(sorted(self.dropped)),
            dropped_early=tuple(sorted(set(self.params.clients) - self._recipients.keys())),
            unmask_replies=len(self._replied),
        )

    # helpers ------------------------------------------------------------------------------

    def _holders(self, owner: str) -> frozenset[str]:
        """Who received shares of `owner`'s secrets: itself and the recipients it sent to."""
        return self._recipients[owner] | {owner}

    def _reconstruct(self, shares: Mapping[int, bytes], owner: str, what: str) -> bytes:
        t = self.params.threshold
        if len(shares) < t:
            survivors = len(self._request.survivors) if self._request is not None else 0
            raise NotEnoughShares(
                f"cannot reconstruct the {what} of {owner!r}: {len(shares)} shares from "
                f"{len(self._replied)} unmask replies of {survivors} survivors; the threshold "
                f"is {t}"
            )
        # Exactly t shares: the result is checked against the client's commitment (self-mask
        # seed) or advertised public key (masking key), so one combine suffices.
        first = dict(sorted(shares.items())[:t])
        secret = combine(first, t)
        return secret

    def _require_phase(self, phase: int, action: str) -> None:
        if self._phase != phase:
            raise ProtocolError(f"cannot {action} in phase {self._phase} (expected {phase})")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
