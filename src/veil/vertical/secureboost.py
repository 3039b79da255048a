"""Vertical SecureBoost (Cheng, Fan, Jin, Liu, Chen, Papadopoulos, Yang 2021, "SecureBoost: A
Lossless Federated Learning Framework"): gradient-boosted trees across a bank (the active party:
labels and its own columns) and a payment company (the passive party: its columns), on rows
aligned by PSI.

Per tree:

1. bank: g and h of every row at the current margin, fixed point at 2^-24, both packed into one
   plaintext per row (g + h · 2^s, s = `slot_bits`: value bits + log2(rows) + sign) and
   encrypted with the bank's Paillier key (`veil.privacy.he.paillier_fast`, randomness from a
   pool); bank -> payment: the ciphertexts.
2. for each node to split (level by level), bank -> payment: the node's rows; payment: per
   feature and bin, the product of the rows' ciphertexts (the encrypted (Σg, Σh) of the bin),
   features in an order secret to it (drawn per tree), cells packed several to a ciphertext
   and re-randomised; payment -> bank: those. Of two siblings only the smaller is asked for: the
   bank subtracts it from the parent's histogram in plaintext.
3. bank: decrypts, finds the best split over its own columns (plaintext histograms) and the
   payment company's candidates (a position in the secret order and a bin) with XGBoost's loss
   change (`veil.trees.split`, through `veil.vertical.boosting.best_split`).
4. a split on the payment company's column: bank -> payment: (node, candidate, bin, the node's
   rows); the payment company keeps (feature, threshold) under a random record id and returns
   the id and which of the node's rows go left. The bank's tree stores only that id.
5. leaves (bank): weight -G/(H + λ) · learning rate.

Prediction walks each tree; at a payment-company node the bank sends the record id and the rows
to route, and gets back left/right for each.

What each party learns (the leak, as FATE states it): the payment company learns the rows of
every node (the partition of the aligned customers the trees make) and its own features' split
thresholds; never labels, gradients or hessians (only ciphertexts under the bank's key, test
`test_passive_party_receives_only_ciphertexts_and_row_ids`) nor the bank's columns. The bank
learns, for every split on the payment company's columns, which of the node's customers fall
left and which right (and at prediction, the same for the customers scored), plus a bin index
of a feature it cannot name; never the payment company's values. Mitigation of the first leak
(Cheng et al.'s reduced-leakage variant): `first_tree_active_only` builds the first tree on the
bank's columns alone, without sending gradients, so the partition the payment company sees
first (the one closest to the labels) is never shown to it.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from phe import PaillierPrivateKey, PaillierPublicKey

from veil.errors import ConfigError, VeilError
from veil.privacy.he.paillier_fast import (
    FastPrivateKey,
    FastPublicKey,
    Mpz,
    PackError,
    RandomnessPool,
    pack,
    private_key_for,
    quantise,
    slot_bits,
    unpack_signed,
)
from veil.vertical.boosting import (
    BoostSettings,
    Histogram,
    Node,
    Tree,
    apply_bins,
    best_split,
    bin_edges,
    gradients,
    grow_tree,
    split_key,
    tree_margins,
)
from veil.vertical.logistic import BANK, PAYMENT, Message

__all__ = [
    "GRADIENT_BITS",
    "ActiveParty",
    "PassiveParty",
    "SecureBoostError",
    "SecureBoostResult",
    "train_secureboost",
]

GRADIENT_BITS = 24  # fractional bits of g and h


class SecureBoostError(VeilError):
    """A SecureBoost message is malformed, refers to something unknown, or overflowed."""


def _body(payload: bytes) -> dict[str, Any]:
    try:
        body = json.loads(payload)
    except ValueError:
        raise SecureBoostError("malformed SecureBoost message: not JSON") from None
    if not isinstance(body, dict):
        raise SecureBoostError("malformed SecureBoost message")
    return body


def _rows(raw: Any, limit: int) -> npt.NDArray[np.int64]:
    rows = np.asarray(raw, np.int64) if isinstance(raw, list) else np.zeros(0, np.int64)
    if not isinstance(raw, list) or (rows.size and (rows.min() < 0 or rows.max() >= limit)):
        raise SecureBoostError("a SecureBoost message names rows that do not exist")
    return rows


@dataclass
class Channel:
    """Every message between the parties, as bytes, in order."""

    transcript: list[Message] = field(default_factory=list)

    def send(self, sender: str, receiver: str, topic: str, payload: bytes) -> bytes:
        self.transcript.append(Message(sender, receiver, topic, payload))
        return payload


class PassiveParty:
    """The payment company: its binned columns, encrypted (g, h) of the current tree, and its
    split records (feature, threshold) under random ids. Talks only in bytes."""

    def __init__(
        self,
        x: npt.NDArray[np.floating],
        bins: int,
        public: FastPublicKey,
        pool: RandomnessPool | None = None,
    ):
        self.public = public
        self.pool = pool if pool is not None else RandomnessPool(public, workers=1, target=32)
        self.data: dict[str, npt.NDArray[np.float64]] = {"train": np.asarray(x, np.float64)}
        self.edges = bin_edges(self.data["train"], bins)
        self.bins = tuple(len(e) + 1 for e in self.edges)
        binned = apply_bins(self.data["train"], self.edges)
        offsets = np.cumsum((0, *self.bins[:-1]))
        self._cells = (binned.astype(np.int64) + offsets).tolist()  # cell of each row, feature
        self._gh: list[Mpz] = []
        self._slot = 0
        self._order: list[int] = []
        self.records: dict[str, tuple[int, float]] = {}

    def add_dataset(self, name: str, x: npt.NDArray[np.floating]) -> None:
        """Rows to score later (`route`), aligned with the bank's rows of the same name."""
        self.data[name] = np.asarray(x, np.float64)

    def receive_gradients(self, payload: bytes) -> None:
        """Store the tree's encrypted (g, h) and draw this tree's secret feature order."""
        body = _body(payload)
        raw, slot = body.get("gh"), body.get("slot_bits")
        if not isinstance(raw, list) or len(raw) != len(self._cells) or not isinstance(slot, int):
            raise SecureBoostError("the encrypted gradients do not match this party's rows")
        try:
            self._gh = [self.public.check(int(c, 16)) for c in raw]
        except (TypeError, ValueError, PackError):
            raise SecureBoostError("malformed or out-of-range encrypted gradients") from None
        self._slot = slot
        self._order = list(range(len(self.bins)))
        secrets.SystemRandom().shuffle(self._order)

    def histograms(self, payload: bytes) -> bytes:
        """Encrypted (Σg, Σh) per feature (secret order) and bin of a node's rows, packed."""
        body = _body(payload)
        rows = _rows(body.get("rows"), len(self._cells))
        if not self._gh:
            raise SecureBoostError("histograms asked for before the tree's gradients arrived")
        nsquare, gh, cells = self.public.nsquare, self._gh, self._cells
        acc: list[Mpz | None] = [None] * sum(self.bins)
        for i in rows.tolist():
            c = gh[i]
            for k in cells[i]:
                a = acc[k]
                acc[k] = c if a is None else a * c % nsquare
        offsets = np.cumsum((0, *self.bins[:-1])).tolist()
        ordered = [acc[offsets[j] + b] or 1 for j in self._order for b in range(self.bins[j])]
        per = max(1, (self.public.bits - 2) // (2 * self._slot))
        packed = [
            self.public.rerandomise(
                pack(ordered[s : s + per], 2 * self._slot, nsquare), self.pool.take()
            )
            for s in range(0, len(ordered), per)
        ]
        reply = {
            "node": body.get("node"),
            "bins": [self.bins[j] for j in self._order],
            "packed": [format(int(c), "x") for c in packed],
        }
        return json.dumps(reply).encode()

    def split(self, payload: bytes) -> bytes:
        """Keep (feature, threshold) of candidate (position, bin) under a fresh record id;
        return the id and which of the node's rows go left."""
        body = _body(payload)
        position, b = body.get("candidate"), body.get("bin")
        if not (isinstance(position, int) and 0 <= position < len(self._order)):
            raise SecureBoostError("a split names a candidate this party never offered")
        feature = self._order[position]
        if not (isinstance(b, int) and 0 <= b < self.bins[feature] - 1):
            raise SecureBoostError("a split names a bin this feature does not have")
        threshold = float(self.edges[feature][b])
        record = secrets.token_hex(8)
        self.records[record] = (feature, threshold)
        rows = _rows(body.get("rows"), len(self._cells))
        left = self.data["train"][rows, feature] < threshold
        return json.dumps({"record": record, "left": left.astype(int).tolist()}).encode()

    def route(self, payload: bytes) -> bytes:
        """Which of `rows` of dataset `dataset` go left at record `record`."""
        body = _body(payload)
        record, dataset = body.get("record"), body.get("dataset")
        if record not in self.records or dataset not in self.data:
            raise SecureBoostError("unknown split record or dataset")
        feature, threshold = self.records[str(record)]
        x = self.data[str(dataset)]
        left = x[_rows(body.get("rows"), len(x)), feature] < threshold
        return json.dumps({"left": left.astype(int).tolist()}).encode()

    def close(self) -> None:
        self.pool.close()


class ActiveParty:
    """The bank: labels, its binned columns, the private key, and the trees (its own splits as
    (feature, threshold); the payment company's as record ids)."""

    def __init__(
        self,
        x: npt.NDArray[np.floating],
        y: npt.NDArray[np.floating],
        settings: BoostSettings,
        private: FastPrivateKey,
        pool: RandomnessPool,
    ):
        self.x = np.asarray(x, np.float64)
        self.y = np.asarray(y, np.float64)
        self.settings = settings
        self.private, self.public, self.pool = private, private.public, pool
        self.edges = bin_edges(self.x, settings.bins)
        self.bins = tuple(len(e) + 1 for e in self.edges)
        self.binned = apply_bins(self.x, self.edges)
        self.passive_hist: dict[int, Histogram] = {}
        self._slot = 0

    def encrypt_gradients(self, g: npt.NDArray[np.float64], h: npt.NDArray[np.float64]) -> bytes:
        """[[G_i + H_i · 2^s]] per row: g and h at 2^-24, packed in one plaintext."""
        magnitude = max(1.0, float(np.max(np.abs(g))), float(np.max(h)))
        value_bits = GRADIENT_BITS + math.ceil(math.log2(magnitude)) + 1
        self._slot = slot_bits(value_bits, len(g))
        if 4 * self._slot > self.public.bits - 2:
            raise ConfigError("the Paillier key is too short for the gradient slots")
        gq, hq = quantise(g, GRADIENT_BITS).tolist(), quantise(h, GRADIENT_BITS).tolist()
        enc, shift = self.public.encrypt, self._slot
        cts = [enc(a + (b << shift), self.pool.take()) for a, b in zip(gq, hq, strict=True)]
        self.passive_hist = {}
        return json.dumps({"gh": [format(int(c), "x") for c in cts], "slot_bits": shift}).encode()

    def decode_histogram(self, payload: bytes) -> Histogram:
        """The payment company's (Σg, Σh) per (candidate, bin) from its packed reply."""
        body = _body(payload)
        bins, raw = body.get("bins"), body.get("packed")
        if not isinstance(bins, list) or not isinstance(raw, list):
            raise SecureBoostError("malformed histogram reply")
        cells = sum(int(b) for b in bins)
        per = max(1, (self.public.bits - 2) // (2 * self._slot))
        values: list[int] = []
        try:
            for index, c in enumerate(raw):
                count = min(per, cells - index * per)
                plain = self.private.decrypt_signed(self.public.check(int(c, 16)))
                values += unpack_signed(plain, 2 * count, self._slot)
        except (TypeError, ValueError, PackError) as exc:
            raise SecureBoostError(f"bad histogram reply: {exc}") from None
        width = max(bins)
        g, h = np.zeros((len(bins), width)), np.zeros((len(bins), width))
        flat = np.array(values, np.float64).reshape(-1, 2) / 2.0**GRADIENT_BITS
        start = 0
        for j, b in enumerate(bins):
            g[j, :b], h[j, :b] = flat[start : start + b, 0], flat[start : start + b, 1]
            start += b
        return Histogram(g, h, tuple(int(b) for b in bins))


@dataclass
class SecureBoostResult:
    """The bank's trees, the base margin, the parties (for prediction) and the transcript."""

    trees: list[Tree]
    active: ActiveParty
    passive: PassiveParty
    channel: Channel
    train_losses: list[float]
    key_bits: int

    def predict_margin(
        self, bank_x: npt.NDArray[np.floating], dataset: str
    ) -> npt.NDArray[np.float64]:
        """Margins of rows whose bank columns are `bank_x` and whose payment company rows are
        its dataset `dataset` (same order): routing at its splits is asked for by message."""
        x = np.asarray(bank_x, np.float64)

        def goes_left(node: Node, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
            return np.asarray(self._route(node.owner, node.key, x, rows, dataset), bool)

        return tree_margins(self.trees, len(x), goes_left)

    def _route(
        self,
        owner: str | None,
        key: object,
        x: npt.NDArray[np.float64],
        rows: npt.NDArray[np.int64],
        dataset: str,
    ) -> npt.NDArray[np.bool_]:
        if owner == BANK:
            feature, threshold = split_key(key)
            return np.asarray(x[rows, feature] < threshold, np.bool_)
        ask = json.dumps({"record": key, "dataset": dataset, "rows": rows.tolist()}).encode()
        self.channel.send(BANK, PAYMENT, "route", ask)
        reply = self.channel.send(PAYMENT, BANK, "routed", self.passive.route(ask))
        return np.asarray(_body(reply)["left"], np.bool_)

    def predict_proba(
        self, bank_x: npt.NDArray[np.floating], dataset: str
    ) -> npt.NDArray[np.float64]:
        """P(y = 1) (binary objective)."""
        return np.asarray(1.0 / (1.0 + np.exp(-self.predict_margin(bank_x, dataset))), np.float64)


@dataclass
class _TreeRound:
    """The split finder and partitioner of one tree (callbacks of `grow_tree`)."""

    active: ActiveParty
    passive: PassiveParty
    channel: Channel
    g: npt.NDArray[np.float64]
    h: npt.NDArray[np.float64]
    use_passive: bool

    def passive_histogram(self, tree: Tree, index: int, rows: npt.NDArray[np.int64]) -> Histogram:
        cache = self.active.passive_hist
        parent = tree.nodes[index].parent
        if parent >= 0:
            p = tree.nodes[parent]
            sibling = p.right if index == p.left else p.left
            if parent in cache and sibling in cache:
                cache[index] = cache[parent] - cache[sibling]
                return cache[index]
        ask = json.dumps({"node": index, "rows": rows.tolist()}).encode()
        self.channel.send(BANK, PAYMENT, "node_rows", ask)
        reply = self.channel.send(PAYMENT, BANK, "histograms", self.passive.histograms(ask))
        cache[index] = self.active.decode_histogram(reply)
        return cache[index]

    def find(
        self, tree: Tree, index: int, rows: npt.NDArray[np.int64]
    ) -> tuple[str, float, object] | None:
        a = self.active
        own = best_split(
            Histogram.of(a.binned[rows], self.g[rows], self.h[rows], a.bins), a.settings
        )
        theirs = None
        if self.use_passive:
            theirs = best_split(self.passive_histogram(tree, index, rows), a.settings)
        if theirs is not None and (own is None or theirs.loss_change > own.loss_change):
            return PAYMENT, theirs.loss_change, (theirs.feature, theirs.bin)
        if own is None:
            return None
        return BANK, own.loss_change, (own.feature, float(a.edges[own.feature][own.bin]))

    def partition(
        self, index: int, owner: str, key: object, rows: npt.NDArray[np.int64]
    ) -> tuple[npt.NDArray[np.bool_], object]:
        if owner == BANK:
            feature, threshold = split_key(key)
            return np.asarray(self.active.x[rows, feature] < threshold, np.bool_), key
        candidate, b = split_key(key)
        ask = {"node": index, "candidate": candidate, "bin": int(b), "rows": rows.tolist()}
        payload = self.channel.send(BANK, PAYMENT, "split", json.dumps(ask).encode())
        reply = _body(self.channel.send(PAYMENT, BANK, "split_record", self.passive.split(payload)))
        left = np.asarray(reply.get("left"), np.bool_)
        if left.shape != rows.shape:
            raise SecureBoostError("the split reply does not cover the node's rows")
        return left, str(reply.get("record"))


def _loss(objective: str, y: npt.NDArray[np.float64], margin: npt.NDArray[np.float64]) -> float:
    if objective == "binary":
        return float(np.mean(np.logaddexp(0.0, margin) - y * margin))
    return float(np.mean((margin - y) ** 2) / 2)


def train_secureboost(
    bank_x: npt.NDArray[np.floating],
    labels: npt.NDArray[np.floating],
    payment_x: npt.NDArray[np.floating],
    settings: BoostSettings,
    *,
    key_bits: int = 2048,
    keypair: tuple[PaillierPublicKey, PaillierPrivateKey] | FastPrivateKey | None = None,
    pools: tuple[RandomnessPool, RandomnessPool] | None = None,
    on_tree: Callable[[int, float], None] | None = None,
) -> SecureBoostResult:
    """Train on aligned rows; every message crosses as bytes and is recorded. The bank makes a
    `key_bits` Paillier key (`keypair`: tests pass a short one). `pools` (the bank's, the
    payment company's) hold randomness for that key, e.g. filled ahead of time; by default each
    party runs one background thread (the bank's keeps a tree's worth ahead)."""
    if not len(bank_x) == len(payment_x) == len(labels) or len(labels) == 0:
        raise ConfigError("bank and payment rows must be aligned and non-empty (run PSI first)")
    private = private_key_for(keypair, key_bits)
    own_pools = pools is None
    if pools is None:
        pools = (
            RandomnessPool(private.public, workers=1, target=len(labels)),
            RandomnessPool(private.public, workers=1, target=32),
        )
    channel = Channel()
    key_message = json.dumps({"n": format(int(private.public.n), "x")}).encode()
    channel.send(BANK, PAYMENT, "public_key", key_message)
    active = ActiveParty(bank_x, labels, settings, private, pools[0])
    passive = PassiveParty(payment_x, settings.bins, private.public, pools[1])
    margin = np.zeros(len(labels))
    trees, losses = [], []
    try:
        for t in range(settings.trees):
            g, h = gradients(settings.objective, active.y, margin)
            use_passive = not (settings.first_tree_active_only and t == 0)
            if use_passive:
                passive.receive_gradients(
                    channel.send(BANK, PAYMENT, "gradients", active.encrypt_gradients(g, h))
                )
            job = _TreeRound(active, passive, channel, g, h, use_passive)
            tree, update = grow_tree(
                np.arange(len(labels)), g, h, settings, job.find, job.partition
            )
            margin += update
            trees.append(tree)
            losses.append(_loss(settings.objective, active.y, margin))
            if on_tree is not None:
                on_tree(t + 1, losses[-1])
    finally:
        if own_pools:
            pools[0].close()
    return SecureBoostResult(trees, active, passive, channel, losses, private.public.bits)
