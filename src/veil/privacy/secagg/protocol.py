"""One round of secure aggregation by masking, as pure state machines (no I/O).

The protocol is that of Bonawitz et al. 2017 ("Practical Secure Aggregation for
Privacy-Preserving Machine Learning", §4, Figure 4, with the consistency round and signed views of
the actively secure variant, §6), optionally over the sparse neighbour graph of SecAgg+ (Bell et
al. 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", §3). One
`ClientSession` per client and one `ServerSession` per round; the transport moves the messages
of `veil.privacy.secagg.messages` between them:

=====  ============================================  ===========================================
phase  client                                        server
=====  ============================================  ===========================================
0      `ClientSession.advertise`                      `ServerSession.collect` each, then
                                                      `ServerSession.advertisements` (broadcast
                                                      to every client)
1      `ClientSession.share_keys`                     `ServerSession.route` each, then
                                                      `ServerSession.shares_for` each client
2      `ClientSession.receive_shares`, `mask`         `ServerSession.add_masked` each vector
3      `ClientSession.sign_request`                   `ServerSession.unmask_request` (to every
                                                      survivor), `add_signature` each
4      `ClientSession.unmask`                         `ServerSession.consistency_check` (to every
                                                      signer), `add_unmask_reply`, `finish`
=====  ============================================  ===========================================

Guarantees against a *malicious* server that may also control fewer than ``2t - |H|`` clients of
any share-holder set H (t the threshold; clients may drop out at any point):

* **One view.** Every key advertisement is signed over the digest of the whole round view
  (`RoundParams.view`: run, round, member list, threshold, graph degree, vector length,
  encoding and the agreed extras such as the distributed-noise plan). Every client checks every
  advertisement it is shown against its own view and its roster (`InconsistentView`,
  `KeySubstitution`) before it sends any share, so a server that tells two honest clients
  different stories is caught in phase 1. The threshold is part of the view and each client
  checks it against its own configuration (`veil.privacy.secagg.settings`), never the server's.
* **A graph the server cannot choose.** SecAgg+'s graph seed is the hash of every selected
  client's signed advertisement (`graph_seed`), which hold fresh keys: it is fixed only once
  every client has committed, and a SecAgg+ round needs every selected client's advertisement,
  so the server cannot grind for a graph by leaving advertisements out.
* **One unmask request** (the consistency round, Bonawitz §6). A survivor signs the request
  (survivors, dropped) it is shown, signs at most one per round, and reveals shares only when
  at least `threshold` of its own share holders signed the identical request. Two different
  requests that each reach t signatures in one holder set H need ``2t - |H|`` clients that sign
  both; with fewer corrupted clients, every share of one secret comes from one request, so the
  server never holds both the self-mask share and the key share of one client.
* The server learns only the sum of at least `threshold` inputs: a client answers a request
  only if at least `threshold` of its share holders survive.
* **Active-security bound.** `RoundParams` refuses ``3t <= 2|H|`` for the largest holder set H
  (Bonawitz et al. 2017, §6 and Appendix: with ``t > 2|H|/3`` two disjoint views cannot both reach
  t unless more than ``|H|/3`` clients are corrupted). In the complete graph H is every selected
  client, so up to ``n - t`` dropouts are tolerated with ``t = ⌊2n/3⌋ + 1``.

A wrong share is detected, not corrected: the server rebuilds each secret from exactly t shares
and checks it against what the owner signed in its advertisement (a SHA-256 commitment to the
self-mask secret; the masking public key), so one Shamir reconstruction per secret suffices.

Not covered: a server colluding with ``2t - |H|`` or more clients of one holder set; a server
that aborts rounds (it learns nothing, but the round is lost); and what the sum itself reveals
(add differential privacy for that).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from veil.crypto.identity import IdentityKey, IdentityPublicKey, SignatureRejected, signing_payload
from veil.privacy.secagg.errors import (
    InconsistentView,
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
    ConsistencyCheck,
    ConsistencySignature,
    EncryptedShares,
    KeyAdvertisement,
    UnmaskReply,
    UnmaskRequest,
    consistency_payload,
    key_advertisement_payload,
)
from veil.privacy.secagg.quantize import FixedPoint, UIntArray
from veil.privacy.secagg.shamir import combine, split

__all__ = [
    "ClientSession",
    "RoundGraph",
    "RoundParams",
    "RoundSummary",
    "ServerSession",
    "active_threshold",
    "graph_seed",
    "largest_holder_set",
]

_NONCE_BYTES = 12
_TAG_BYTES = 16
#: A share message holds the recipient's share of b_u then its share of s_u's secret.
_PLAINTEXT_BYTES = 2 * SECRET_BYTES
_CIPHERTEXT_BYTES = _NONCE_BYTES + _PLAINTEXT_BYTES + _TAG_BYTES
_SHARES_LABEL = "secagg-shares"
_VIEW_LABEL = "secagg-view"
_SEED_LABEL = "secagg-graph-seed"
_INT64_MAX = (1 << 63) - 1


def largest_holder_set(n_clients: int, degree: int | None) -> int:
    """The largest set of share holders (a client and its neighbours) in a round of
    `n_clients`: n for the complete graph; degree + 1, or degree + 2 when both are odd
    (the Harary graph of `veil.privacy.secagg.graph`)."""
    if degree is None:
        return n_clients
    return degree + 1 + (degree % 2 and n_clients % 2)


def smallest_holder_set(n_clients: int, degree: int | None) -> int:
    """The smallest set of share holders in a round of `n_clients`."""
    return n_clients if degree is None else degree + 1


def active_threshold(holders: int) -> int:
    """The smallest threshold that withstands a malicious server: ``⌊2|H|/3⌋ + 1`` for the
    largest holder set H (Bonawitz et al. 2017, §6)."""
    return 2 * holders // 3 + 1


@dataclass(frozen=True)
class RoundParams:
    """The round view: what every party of one round must agree on before it starts.

    `clients` are the selected clients (stored sorted; names distinct). `degree` None is
    SecAgg's complete graph, an int is SecAgg+'s degree (the graph's seed is derived from the
    clients' advertisements, `graph_seed`). A client's secrets are shared among its *holders*,
    itself and its neighbours, with Shamir threshold `threshold`: ``2 <= threshold <=`` the
    smallest holder set and, unless `require_active_bound` is False (tests of the attacks it
    prevents only), ``3 · threshold > 2 ·`` the largest holder set. `length` is the vector
    length; `fixed_point` the encoding; `binding` further agreed parameters (the settings'
    distributed-noise plan and encoding bounds) that are bound into `view` unread.
    """

    run_id: str
    round: int
    clients: tuple[str, ...]
    threshold: int
    degree: int | None
    length: int
    fixed_point: FixedPoint
    binding: bytes = b""
    require_active_bound: bool = True
    _view: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.run_id, str) or not self.run_id:
            raise ValueError("run_id must be a non-empty string")
        if not _is_int(self.round) or not 0 <= self.round <= _INT64_MAX:
            raise ValueError(f"round must be a non-negative int, got {self.round!r}")
        names = tuple(sorted(self.clients))
        if any(not isinstance(name, str) or not name or "\n" in name for name in names):
            raise ValueError("client names must be non-empty strings without newlines")
        if len(set(names)) != len(names):
            raise ValueError("client names must be distinct")
        if len(names) < 2:
            raise ValueError(f"secure aggregation needs at least 2 clients, got {len(names)}")
        object.__setattr__(self, "clients", names)
        n = len(names)
        if self.degree is not None and (not _is_int(self.degree) or not 1 <= self.degree < n):
            raise ValueError(
                f"degree must be between 1 and the number of clients minus one ({n - 1}), "
                f"got {self.degree!r}; use degree = None for the complete graph"
            )
        if not _is_int(self.length) or self.length < 1:
            raise ValueError(f"length must be a positive int, got {self.length!r}")
        if not isinstance(self.fixed_point, FixedPoint):
            raise TypeError("fixed_point must be a FixedPoint")
        if not isinstance(self.binding, bytes):
            raise TypeError("binding must be bytes")
        smallest = smallest_holder_set(n, self.degree)
        largest = largest_holder_set(n, self.degree)
        t = self.threshold
        if not _is_int(t) or not 2 <= t <= smallest:
            raise ValueError(
                f"threshold must be between 2 and {smallest} (the smallest set of share holders: "
                f"a client and its neighbours), got {t!r}"
            )
        if self.require_active_bound and 3 * t <= 2 * largest:
            raise ValueError(
                f"threshold {t} is not above two thirds of {largest} share holders: a malicious "
                "server could then gather t signatures on two different unmask requests and "
                f"learn one client's input; use at least {active_threshold(largest)} (Bonawitz "
                "et al. 2017, §6), or fewer clients per round"
            )
        object.__setattr__(self, "_view", self._digest())

    @property
    def view(self) -> bytes:
        """SHA-256 of the whole view: what every client signs with its keys."""
        return self._view

    def _digest(self) -> bytes:
        payload = signing_payload(
            _VIEW_LABEL,
            self.run_id,
            self.round,
            "\n".join(self.clients),
            self.threshold,
            -1 if self.degree is None else self.degree,
            self.length,
            self.fixed_point.modulus_bits,
            float(self.fixed_point.step).hex(),
            self.binding,
        )
        return hashlib.sha256(payload).digest()


def graph_seed(params: RoundParams, advertisements: Mapping[str, KeyAdvertisement]) -> bytes:
    """SecAgg+'s graph seed: SHA-256 over the view and every advertisement, in name order.

    The advertisements hold fresh keys and are signed before any client sees another's, so
    the server learns the graph only when it can no longer change it (it cannot leave an
    advertisement out either: a SecAgg+ round needs all of them)."""
    parts: list[bytes | str | int] = [_SEED_LABEL, params.view]
    for name in sorted(advertisements):
        parts += [name, advertisements[name].to_bytes()]
    return hashlib.sha256(signing_payload(*parts)).digest()


class RoundGraph:
    """Who masks with, and holds shares of, whom in one round: the complete graph, or the
    SecAgg+ graph of `params.degree` laid out by `seed` (`veil.privacy.secagg.graph`)."""

    def __init__(self, params: RoundParams, seed: bytes = b"") -> None:
        self.params = params
        self._graph = neighbours(params.clients, params.degree, seed)

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
    order (`advertise`, `share_keys`, `receive_shares`, `mask`, `sign_request`, `unmask`), each
    once (`sign_request` and `unmask` may be repeated with the identical request). ProtocolError
    when out of order.

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
        self._graph: RoundGraph | None = None
        self._identities: dict[str, IdentityPublicKey] = {}
        self._aeads: dict[str, AESGCM] = {}
        self._pair_seeds: dict[str, bytes] = {}
        self._self_seed = b""
        # Shares this client holds: peer -> (share of b_peer, share of s_peer).
        self._held: dict[str, tuple[bytes, bytes]] = {}
        self._completed: frozenset[str] = frozenset()
        self._signed: tuple[UnmaskRequest, ConsistencySignature] | None = None
        self._answered: tuple[UnmaskRequest, UnmaskReply] | None = None

    @property
    def completed(self) -> frozenset[str]:
        """U2 ∩ N(u) ∪ {u}: the neighbours whose shares arrived, and this client (after
        `receive_shares`); exactly the peers it masks with."""
        return self._completed

    @property
    def graph(self) -> RoundGraph:
        """The round's graph, known once `share_keys` has seen every advertisement."""
        if self._graph is None:
            raise ProtocolError(f"{self.name!r} has not seen the round's advertisements yet")
        return self._graph

    def advertise(self) -> KeyAdvertisement:
        """Phase 0: this round's two X25519 public keys and a commitment to the self-mask seed,
        signed with the identity key over the round view."""
        self._advance("new", "advertised")
        p = self.params
        enc = self._encryption_key.public_key().public_bytes_raw()
        mask = self._masking_key.public_key().public_bytes_raw()
        commitment = self_mask_commitment(self._b, p.run_id, p.round, self.name)
        payload = key_advertisement_payload(
            p.run_id, p.round, self.name, enc, mask, commitment, p.view
        )
        signature = self._identity.sign(payload)
        self._advertisement = KeyAdvertisement(self.name, enc, mask, signature, commitment, p.view)
        return self._advertisement

    def share_keys(
        self,
        advertisements: Mapping[str, KeyAdvertisement],
        peer_identities: Mapping[str, IdentityPublicKey],
    ) -> EncryptedShares:
        """Phase 1: check every advertisement the server broadcast, derive the round's graph,
        and send Shamir shares of the self-mask seed b_u and the masking key s_u, one
        AES-256-GCM ciphertext per neighbour that advertised.

        `peer_identities` is the trusted roster (name → Ed25519 identity), never taken from the
        server. InconsistentView if any advertisement was signed over another round view (the
        server told that peer another story); KeySubstitution if this client's own
        advertisement was not relayed unchanged, if an advertisement is not signed by its roster
        identity (or it has none), or if keys repeat; ProtocolError for an advertisement of a
        client outside the round, an unusable (low-order) key, or a SecAgg+ round in which a
        selected client's advertisement is missing (its graph could then be chosen by the
        server); NotEnoughShares if fewer than `threshold` of its holders (itself included)
        advertised. Clients without an advertisement have dropped out and are left out.
        """
        self._advance("advertised", "shared")
        p = self.params
        if advertisements.get(self.name) != self._advertisement:
            raise KeySubstitution(
                f"the server did not relay {self.name!r}'s own key advertisement unchanged"
            )
        for peer, advertisement in sorted(advertisements.items()):
            self._check_advertisement(peer, advertisement, peer_identities)
        if p.degree is not None:
            missing = sorted(set(p.clients) - advertisements.keys())
            if missing:
                raise ProtocolError(
                    f"SecAgg+ needs the advertisement of every selected client to derive the "
                    f"graph; {missing} are missing: the server must start a new round without them"
                )
        self._graph = RoundGraph(p, graph_seed(p, advertisements) if p.degree else b"")
        holders = set(self._graph.holders(self.name))
        live = {v: ad for v, ad in advertisements.items() if v in holders}
        self._identities = {v: peer_identities[v] for v in live if v != self.name}
        self._identities[self.name] = self._identity.public_key()
        keys = [
            k for ad in advertisements.values() for k in (ad.encryption_public, ad.masking_public)
        ]
        if len(set(keys)) != len(keys):
            raise KeySubstitution("two advertised public keys are equal: refusing reused keys")
        if len(live) < p.threshold:
            raise NotEnoughShares(
                f"only {len(live)} of {self.name!r}'s {len(holders)} share holders "
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
        index = {peer: self._graph.share_index(self.name, peer) for peer in live}
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

    def _check_advertisement(
        self,
        peer: str,
        advertisement: KeyAdvertisement,
        peer_identities: Mapping[str, IdentityPublicKey],
    ) -> None:
        p = self.params
        if advertisement.client != peer:
            raise KeySubstitution(
                f"the advertisement relayed for {peer!r} names {advertisement.client!r}"
            )
        if peer not in p.clients:
            raise ProtocolError(f"an advertisement of {peer!r}, which is not in this round")
        if peer == self.name:
            return
        identity = peer_identities.get(peer)
        if identity is None:
            raise KeySubstitution(
                f"{peer!r} advertised keys but has no identity in the roster: refusing them"
            )
        if advertisement.view != p.view:
            # Checked before the signature, to name the lie: the signature binds the view.
            raise InconsistentView(
                f"{peer!r} signed another view of run {p.run_id!r} round {p.round} than "
                f"{self.name!r} was given (members, threshold, graph, encoding or noise plan "
                "differ): the server told them different stories, or their configurations "
                "differ; no share was sent"
            )
        try:
            advertisement.verify(identity, p.run_id, p.round)
        except SignatureRejected:
            raise KeySubstitution(
                f"the key advertisement of {peer!r} is not signed by {peer!r}'s roster "
                "identity: the keys were substituted or altered"
            ) from None

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

    def sign_request(self, request: UnmaskRequest) -> ConsistencySignature:
        """Phase 3: sign the unmask request (who survived, who dropped) this client was shown.

        A client signs one request per round (the identical request again gets the identical
        signature; any other UnsafeUnmaskRequest), and only one it would answer: the checks of
        `unmask` on the sets come first.
        """
        if self._signed is not None:
            previous, signature = self._signed
            if request == previous:
                return signature
            raise UnsafeUnmaskRequest(
                f"{self.name!r} already signed another unmask request this round; the server "
                "shows different clients different survivor sets"
            )
        if self._state != "masked":
            raise ProtocolError(f"a consistency signature before {self.name!r} masked its input")
        self._check_request(request)
        p = self.params
        payload = consistency_payload(p.run_id, p.round, p.view, request.survivors, request.dropped)
        signature = ConsistencySignature(self.name, self._identity.sign(payload))
        self._signed = (request, signature)
        self._state = "signed"
        return signature

    def unmask(self, check: ConsistencyCheck) -> UnmaskReply:
        """Phase 4: this client's shares of each survivor's self-mask seed and of each dropped
        client's masking key, for the peers it holds shares of.

        UnsafeUnmaskRequest if `check.request` is not the request this client signed, if any
        forwarded signature over it fails to verify, if fewer than `threshold` of this client's
        share holders (itself included) signed it, or if an earlier, different request was
        answered (an identical repeat gets the identical reply).
        """
        request = check.request
        if self._answered is not None:
            previous, reply = self._answered
            if request == previous:
                return reply
            raise UnsafeUnmaskRequest(
                f"{self.name!r} already answered an unmask request this round; a second, "
                "different one could reveal both shares of one peer"
            )
        if self._signed is None:
            raise ProtocolError(f"unmask before {self.name!r} signed the unmask request")
        if request != self._signed[0]:
            raise UnsafeUnmaskRequest(
                f"the unmask request sent to {self.name!r} is not the one it signed: the server "
                "shows different clients different survivor sets"
            )
        p = self.params
        payload = consistency_payload(p.run_id, p.round, p.view, request.survivors, request.dropped)
        signers = {self.name}
        for signer, signature in sorted(check.signatures.items()):
            identity = self._identities.get(signer)
            if identity is None or signer not in request.survivors:
                continue  # not one of this client's share holders that survived
            try:
                identity.verify(signature, payload)
            except SignatureRejected:
                raise UnsafeUnmaskRequest(
                    f"the consistency signature of {signer!r} does not verify over the request "
                    f"sent to {self.name!r}: {signer!r} was shown another request"
                ) from None
            signers.add(signer)
        if len(signers) < p.threshold:
            raise UnsafeUnmaskRequest(
                f"only {len(signers)} of {self.name!r}'s share holders signed this unmask "
                f"request, fewer than the threshold {p.threshold}: no share is revealed"
            )
        mine = set(self.graph.holders(self.name))
        survivors, dropped = request.survivors, request.dropped
        reply = UnmaskReply(
            client=self.name,
            self_mask_shares={v: self._held[v][0] for v in sorted(survivors & mine)},
            key_shares={v: self._held[v][1] for v in sorted(dropped & mine)},
        )
        self._answered = (request, reply)
        self._state = "unmasked"
        return reply

    def _check_request(self, request: UnmaskRequest) -> None:
        """UnsafeUnmaskRequest unless the sets are disjoint, list this client as a survivor,
        name only clients of the round whose shares it holds, and leave at least `threshold`
        of its share holders surviving."""
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
        mine = set(self.graph.holders(self.name))
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

    def _share_ad(self, sender: str, recipient: str) -> bytes:
        p = self.params
        return signing_payload(_SHARES_LABEL, p.run_id, p.round, p.view, sender, recipient)

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
    `shares_for` closes routing, `unmask_request` closes input collection, `consistency_check`
    closes signature collection; a late message gets ProtocolError. With `identities` (the
    roster) it also checks advertisement and consistency signatures on arrival.
    """

    def __init__(
        self,
        params: RoundParams,
        identities: Mapping[str, IdentityPublicKey] | None = None,
    ) -> None:
        self.params = params
        self._identities = identities
        self._ads: dict[str, KeyAdvertisement] = {}
        self._graph: RoundGraph | None = None
        self._recipients: dict[str, frozenset[str]] = {}  # sender -> recipients (U2)
        self._inbox: dict[str, dict[str, bytes]] = {}  # recipient -> sender -> ciphertext
        self._masked: set[str] = set()
        self._sum: UIntArray | None = None
        self._request: UnmaskRequest | None = None
        self._signatures: dict[str, bytes] = {}
        self._check: ConsistencyCheck | None = None
        self._b_shares: dict[str, dict[int, bytes]] = {}
        self._s_shares: dict[str, dict[int, bytes]] = {}
        self._replied: set[str] = set()
        self._result: UIntArray | None = None
        self._phase = 0

    # phase 0 ------------------------------------------------------------------------------

    def collect(self, advertisement: KeyAdvertisement) -> None:
        """Accept one client's key advertisement (once per client, over this round's view)."""
        self._require_phase(0, "collect a key advertisement")
        name = advertisement.client
        if name not in self.params.clients:
            raise ProtocolError(f"{name!r} is not a selected client of this round")
        if name in self._ads:
            raise ProtocolError(f"{name!r} advertised keys twice")
        if advertisement.view != self.params.view:
            raise InconsistentView(f"{name!r} signed another view of this round")
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
        """Every advertisement collected (closes phase 0): what to broadcast to every client.

        NotEnoughShares for a SecAgg+ round in which a selected client did not advertise (the
        clients would refuse it: the graph seed needs every advertisement)."""
        if self._phase == 0:
            p = self.params
            missing = sorted(set(p.clients) - self._ads.keys())
            if p.degree is not None and missing:
                raise NotEnoughShares(
                    f"SecAgg+ round {p.round}: {missing} did not advertise keys, and the graph "
                    "needs every selected client's advertisement; start a new round without them"
                )
            self._graph = RoundGraph(p, graph_seed(p, self._ads) if p.degree else b"")
            self._phase = 1
        return dict(self._ads)

    @property
    def graph(self) -> RoundGraph:
        """The round's graph (after `advertisements`)."""
        if self._graph is None:
            raise ProtocolError("the graph is known once the advertisements are closed")
        return self._graph

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
        expected = self.graph.neighbours_of(sender) & self._ads.keys()
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
        if self._phase < 1:
            raise ProtocolError("shares_for before the advertisements were broadcast")
        self.graph.neighbours_of(client)
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
        """The request to send to every survivor for its consistency signature (closes phase 2;
        repeated calls return it).

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

    def add_signature(self, signature: ConsistencySignature) -> None:
        """Accept one survivor's consistency signature over the request (ProtocolError for a
        non-survivor, a second one, or, with a roster, one that does not verify)."""
        self._require_phase(3, "accept a consistency signature")
        assert self._request is not None
        name = signature.client
        if name not in self._request.survivors:
            raise ProtocolError(f"a consistency signature from {name!r}, which is not a survivor")
        if name in self._signatures:
            raise ProtocolError(f"{name!r} signed twice")
        if self._identities is not None:
            identity = self._identities.get(name)
            p = self.params
            payload = consistency_payload(
                p.run_id, p.round, p.view, self._request.survivors, self._request.dropped
            )
            try:
                if identity is None:
                    raise SignatureRejected(name)
                identity.verify(signature.signature, payload)
            except SignatureRejected:
                raise ProtocolError(
                    f"the consistency signature of {name!r} does not verify"
                ) from None
        self._signatures[name] = signature.signature

    # phase 4 ------------------------------------------------------------------------------

    def consistency_check(self) -> ConsistencyCheck:
        """The request and every signature collected, for every signer (closes phase 3).

        NotEnoughShares if some survivor has fewer than `threshold` signers among its share
        holders (it would refuse to answer)."""
        if self._check is not None:
            return self._check
        self._require_phase(3, "send the consistency check")
        assert self._request is not None
        p = self.params
        signers = set(self._signatures)
        for client in sorted(signers):
            count = len(set(self.graph.holders(client)) & signers)
            if count < p.threshold:
                raise NotEnoughShares(
                    f"only {count} of {client!r}'s share holders signed the unmask request, "
                    f"fewer than the threshold {p.threshold}"
                )
        self._check = ConsistencyCheck(self._request, dict(self._signatures))
        self._phase = 4
        return self._check

    def add_unmask_reply(self, reply: UnmaskReply) -> None:
        """Accept one signer's shares. ProtocolError for a reply from a client that did not
        sign, a second reply, or shares the request did not ask that client for."""
        self._require_phase(4, "accept an unmask reply")
        assert self._request is not None
        name = reply.client
        if name not in self._signatures:
            raise ProtocolError(f"an unmask reply from {name!r}, which did not sign the request")
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
            self._b_shares.setdefault(owner, {})[self.graph.share_index(owner, name)] = share
        for owner, share in reply.key_shares.items():
            self._s_shares.setdefault(owner, {})[self.graph.share_index(owner, name)] = share
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
        self._require_phase(4, "finish")
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
