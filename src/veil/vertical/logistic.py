"""Vertical logistic regression under Paillier encryption (Hardy et al. 2017, "Private
federated learning on vertically partitioned data via entity resolution and additively
homomorphic encryption"; the structure of FATE's hetero-LR with an arbiter).

Parties, on rows aligned by PSI (same ids, same order):

* the **bank** (label holder, Hardy's "B"): features X_A with an intercept column, labels y,
  weights w_A;
* the **payment company** (feature holder, Hardy's "A"): features X_P, weights w_P;
* the **coordinator** (Hardy's "C", FATE's arbiter): holds the Paillier private key and nothing
  else. Run it at a party trusted by both not to collude (a consortium operator, an auditor).

One mini-batch B of m rows (batch order from a seed both parties share), with the Taylor loss
of Hardy et al.: for u = u_A + u_P and ỹ = 2y - 1, loss ≈ log 2 - ỹu/2 + u²/8 and the residual
d = u/4 - ỹ/2, so the gradient of party k is X_k^T d / m (+ l2 · w_k):

1. payment -> bank: [[u_P]] = Enc(X_P w_P) row by row, and [[Σ u_P²]] (for the loss).
2. bank: [[4d]] = [[u_P]] · Enc(u_A - 2ỹ) and [[loss]] homomorphically;
   bank -> payment: [[4d]]; bank -> coordinator: [[loss]].
3. each party k: [[X_k^T d]] packed, masked by r_k uniform in Z_n (Enc(m + r) mod n) ->
   coordinator.
4. coordinator -> each party: (m + r_k) mod n, uniform, so it learns nothing; the party removes
   r_k and decodes its own gradient.

What each learns: the payment company sees ciphertexts and its own gradient, never labels,
residuals or the bank's features; the bank sees ciphertexts of the payment company's scores and
its own gradient; the coordinator sees the batch losses (it decides convergence) and uniformly
masked values. A coordinator colluding with either party breaks this (it holds the key).
Prediction for a new customer needs both partial scores: the bank adds u_P, sent in the clear by
the payment company for that customer (so the bank learns that one score).
Masks and Paillier randomness come from `secrets` (os.urandom).

Arithmetic: `veil.privacy.he.paillier_fast` (textbook Paillier on gmpy2, g = n + 1). Each
party precomputes its encryption randomness r^n mod n² in a background `RandomnessPool`, so an
encryption on the critical path is one multiplication mod n². Fixed point: scores u at 2^-24,
features and loss coefficients at 2^-16. The bank sends [[4d · 2^24]] = [[u_P]] · Enc(u_A - 2ỹ)
under fresh randomness: the payment company made [[u_P]] and knows its randomness, so without
a fresh factor it could strip it and read the residual, hence the label. Each party packs its
encrypted gradient into as few plaintexts as the key allows (slots of `_slot_bits`: value bits
+ log2(batch size) + sign) before masking, so the coordinator decrypts one value per party and
batch (two under a 1024-bit test key) instead of one per feature.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gmpy2
import numpy as np
import numpy.typing as npt
from phe import PaillierPrivateKey as PrivateKey
from phe import PaillierPublicKey as PublicKey

from veil.errors import ConfigError, DataError, VeilError
from veil.privacy.he.paillier_fast import (
    FastPrivateKey,
    FastPublicKey,
    Mpz,
    PackError,
    RandomnessPool,
    Slots,
    encrypted_dot,
    pack,
    private_key_for,
    quantise,
    slot_bits,
    unpack_signed,
)

__all__ = [
    "BANK",
    "COORDINATOR",
    "PAYMENT",
    "Bank",
    "Coordinator",
    "LRSettings",
    "Message",
    "PaymentCompany",
    "ProtocolError",
    "VerticalLRResult",
    "randomness_per_epoch",
    "train_vertical_lr",
]

BANK, PAYMENT, COORDINATOR = "bank", "payment", "coordinator"
SCORE_BITS = 24  # fractional bits of scores and residuals
FEATURE_BITS = 16  # fractional bits of features and of the loss coefficients
_FEATURE_LIMIT = 32.0  # |x| of a (standardised) feature must stay below this
_RESIDUAL_BITS = 10  # |4d| = |u - 2ỹ| below 2^10


class ProtocolError(VeilError):
    """A vertical-LR message is malformed or does not belong to this key."""


@dataclass(frozen=True)
class LRSettings:
    """Training settings: epochs (at most), batch size, step size, L2 strength, and the change
    of the mean epoch loss below which training stops (the coordinator's convergence check)."""

    epochs: int = 5
    batch_size: int = 32
    learning_rate: float = 0.1
    l2: float = 1e-3
    tolerance: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("epochs and batch_size must be at least 1")
        if not (self.learning_rate > 0 and self.l2 >= 0 and self.tolerance >= 0):
            raise ConfigError("learning_rate must be > 0, l2 and tolerance >= 0")


@dataclass(frozen=True)
class Message:
    """One message of the transcript: who sent what to whom (the exact bytes)."""

    sender: str
    receiver: str
    topic: str
    payload: bytes


def _slot_bits(batch_size: int) -> int:
    """Budget of one gradient slot: |x·2^16| < 2^21, |4d·2^24| < 2^34, batch_size summands."""
    value_bits = FEATURE_BITS + 5 + SCORE_BITS + _RESIDUAL_BITS
    return slot_bits(value_bits, batch_size)


def _hex(values: list[Mpz]) -> list[str]:
    return [format(int(v), "x") for v in values]


def _load(public: FastPublicKey, raw: Any) -> list[Mpz]:
    if not isinstance(raw, list):
        raise ProtocolError("malformed encrypted vector")
    try:
        return [public.check(int(c, 16)) for c in raw]
    except (TypeError, ValueError):
        raise ProtocolError("malformed encrypted vector") from None
    except PackError:
        raise ProtocolError("an encrypted value is out of range for this key") from None


def _body(payload: bytes) -> dict[str, Any]:
    try:
        body = json.loads(payload)
    except ValueError:
        raise ProtocolError("malformed vertical-LR message: not JSON") from None
    if not isinstance(body, dict):
        raise ProtocolError("malformed vertical-LR message")
    return body


class _Learner:
    """What both data holders share: weights, masked decryption of their gradient, the step."""

    def __init__(
        self,
        x: npt.NDArray[np.float64],
        public: FastPublicKey,
        settings: LRSettings,
        pool: RandomnessPool,
    ):
        self.x = np.asarray(x, np.float64)
        if self.x.size and float(np.max(np.abs(self.x))) >= _FEATURE_LIMIT:
            raise DataError(
                f"a feature value reaches {_FEATURE_LIMIT:g} in absolute value: standardise "
                "the columns (vertical LR packs fixed-point values with that bound)"
            )
        self.q = quantise(self.x, FEATURE_BITS)
        self.w = np.zeros(self.x.shape[1])
        self.public = public
        self.settings = settings
        self.pool = pool
        self.slots = Slots.fit(public, _slot_bits(settings.batch_size))
        self._masks: list[int] = []

    def _masked_gradient(self, rows: npt.NDArray[np.int64], d: list[Mpz]) -> bytes:
        """[[X_rows^T · 4d·2^(24+16)]] packed into slots, each packed value masked with a
        uniform r in Z_n under fresh randomness."""
        products = encrypted_dot(d, self.q[rows], self.public.nsquare)
        per = self.slots.per_plaintext
        masked, self._masks = [], []
        for start in range(0, len(products), per):
            packed = pack(products[start : start + per], self.slots.bits, self.public.nsquare)
            r = secrets.randbelow(int(self.public.n))
            masked.append(self.public.add(packed, self.public.encrypt(r, self.pool.take())))
            self._masks.append(r)
        return json.dumps({"masked": _hex(masked)}).encode()

    def _step(
        self, rows: npt.NDArray[np.int64], decrypted: bytes, penalise: npt.NDArray[np.bool_]
    ) -> None:
        values = _body(decrypted).get("values")
        if not isinstance(values, list) or len(values) != len(self._masks):
            raise ProtocolError("the coordinator returned a gradient of the wrong length")
        n = int(self.public.n)
        slots: list[int] = []
        per, width = self.slots.per_plaintext, len(self.w)
        for index, (v, r) in enumerate(zip(values, self._masks, strict=True)):
            m = (int(v, 16) - r) % n
            count = min(per, width - index * per)
            try:
                slots += unpack_signed(m - n if m > n // 2 else m, count, self.slots.bits)
            except PackError:
                raise ProtocolError(
                    "a gradient slot overflowed (residuals beyond 2^10?): lower learning_rate"
                ) from None
        scale = 4.0 * 2.0 ** (SCORE_BITS + FEATURE_BITS) * len(rows)
        grad = np.array(slots, np.float64) / scale
        grad = grad + self.settings.l2 * self.w * penalise
        self.w = self.w - self.settings.learning_rate * grad

    def scores(self, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        """Partial scores X_k w_k of `rows` (for prediction)."""
        return np.asarray(self.x[rows] @ self.w, np.float64)


class PaymentCompany(_Learner):
    """The feature holder: it never receives labels, residuals in the clear, or the bank's data."""

    def partial_scores(self, rows: npt.NDArray[np.int64]) -> bytes:
        """[[u_P · 2^24]] per row and [[Σ (u_P · 2^24)²]], fresh randomness each."""
        u = quantise(self.scores(rows), SCORE_BITS).tolist()
        enc = self.public.encrypt
        body = {
            "u": _hex([enc(v, self.pool.take()) for v in u]),
            "u2": _hex([enc(sum(v * v for v in u), self.pool.take())]),
        }
        return json.dumps(body).encode()

    def gradient(self, rows: npt.NDArray[np.int64], residuals: bytes) -> bytes:
        d = _load(self.public, _body(residuals).get("d"))
        if len(d) != len(rows):
            raise ProtocolError("the bank sent residuals for another batch")
        return self._masked_gradient(rows, d)

    def update(self, rows: npt.NDArray[np.int64], decrypted: bytes) -> None:
        self._step(rows, decrypted, np.ones_like(self.w, dtype=bool))


class Bank(_Learner):
    """The label holder; its features get an intercept column (the last weight, not penalised)."""

    def __init__(
        self,
        x: npt.NDArray[np.float64],
        labels: npt.NDArray[np.int64],
        public: FastPublicKey,
        settings: LRSettings,
        pool: RandomnessPool,
    ):
        x = np.asarray(x, np.float64)
        super().__init__(np.hstack([x, np.ones((x.shape[0], 1))]), public, settings, pool)
        self.y_signed = 2.0 * np.asarray(labels, np.float64) - 1.0
        self._d: list[Mpz] = []

    def residuals(self, rows: npt.NDArray[np.int64], partial: bytes) -> tuple[bytes, bytes]:
        """([[4d · 2^24]] for the payment company, [[8 · 2^48 · batch loss sum]] for the
        coordinator), both under fresh randomness."""
        body = _body(partial)
        u_p, u2 = _load(self.public, body.get("u")), _load(self.public, body.get("u2"))
        if len(u_p) != len(rows) or len(u2) != 1:
            raise ProtocolError("the payment company sent scores for another batch")
        pk, u_a, y = self.public, self.scores(rows), self.y_signed[rows]
        known = quantise(u_a - 2.0 * y, SCORE_BITS).tolist()
        self._d = [
            pk.rerandomise(pk.add_plain(c, k), self.pool.take())
            for c, k in zip(u_p, known, strict=True)
        ]
        # 8 · 2^48 · Σ loss = 8·2^48·(m log 2 - ½Σỹu_A + ⅛Σu_A²) + 8·2^48·Σ e u_P + Σ U_P²,
        # e = u_A/4 - ỹ/2 at 2^-16, U_P = u_P·2^24: the cross term is shifted up by 2^(24-16+3).
        e = quantise(0.25 * u_a - 0.5 * y, FEATURE_BITS)[:, None]
        (cross,) = encrypted_dot(u_p, e, pk.nsquare)
        cross = gmpy2.powmod(cross, 1 << (SCORE_BITS - FEATURE_BITS + 3), pk.nsquare)
        plain = len(rows) * math.log(2) - 0.5 * float(y @ u_a) + 0.125 * float(u_a @ u_a)
        scaled = round(plain * 8.0 * 2.0 ** (2 * SCORE_BITS))
        loss = pk.add(pk.add_plain(cross, scaled), u2[0])
        # The key holder could read a ciphertext's randomness, built here from the payment
        # company's and our per-row coefficients; fresh randomness hides it.
        loss = pk.rerandomise(loss, self.pool.take())
        return (
            json.dumps({"d": _hex(self._d), "scale_bits": SCORE_BITS}).encode(),
            json.dumps({"loss": _hex([loss]), "rows": len(rows)}).encode(),
        )

    def gradient(self, rows: npt.NDArray[np.int64]) -> bytes:
        return self._masked_gradient(rows, self._d)

    def update(self, rows: npt.NDArray[np.int64], decrypted: bytes) -> None:
        penalise = np.ones_like(self.w, dtype=bool)
        penalise[-1] = False
        self._step(rows, decrypted, penalise)


class Coordinator:
    """Holds the private key; decrypts masked values and batch losses, decides convergence."""

    def __init__(self, private: FastPrivateKey):
        self.public, self._private = private.public, private
        self.losses: list[float] = []

    def unmask(self, masked: bytes) -> bytes:
        cts = _load(self.public, _body(masked).get("masked"))
        values = [format(self._private.decrypt(c), "x") for c in cts]
        return json.dumps({"values": values}).encode()

    def batch_loss(self, message: bytes) -> float:
        body = _body(message)
        (loss,) = _load(self.public, body.get("loss"))
        scale = 8.0 * 2.0 ** (2 * SCORE_BITS) * max(1, int(body.get("rows", 1)))
        return self._private.decrypt_signed(loss) / scale


@dataclass
class VerticalLRResult:
    """Trained parties, per-epoch mean Taylor loss, whether it converged, and the transcript;
    `pool_misses` counts encryptions whose randomness was not ready in the pool."""

    bank: Bank
    payment: PaymentCompany
    losses: list[float]
    converged: bool
    epochs: int
    transcript: list[Message] = field(default_factory=list)
    key_bits: int = 0
    pool_misses: int = 0

    def predict_proba(
        self, bank_rows: npt.NDArray[np.int64], payment_rows: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.float64]:
        """P(y = 1) for customers given by their row in each party's aligned data: both
        partial scores are needed."""
        z = self.bank.scores(bank_rows) + self.payment.scores(payment_rows)
        return np.asarray(1.0 / (1.0 + np.exp(-z)), np.float64)


def randomness_per_epoch(
    rows: int,
    bank_features: int,
    payment_features: int,
    settings: LRSettings,
    public: FastPublicKey,
) -> tuple[int, int]:
    """How many r^n values (bank, payment company) one epoch consumes: the bank one per row
    (residuals), one per batch (loss) and one per packed gradient; the payment company one per
    row (scores), one per batch (Σu²) and one per packed gradient."""
    batches = math.ceil(rows / settings.batch_size)
    per = Slots.fit(public, _slot_bits(settings.batch_size)).per_plaintext
    bank = rows + batches * (1 + math.ceil((bank_features + 1) / per))
    payment = rows + batches * (1 + math.ceil(payment_features / per))
    return bank, payment


@dataclass
class _Run:
    """The three parties of one training run and its transcript."""

    coordinator: Coordinator
    bank: Bank
    payment: PaymentCompany
    transcript: list[Message] = field(default_factory=list)

    def send(self, sender: str, receiver: str, topic: str, payload: bytes) -> bytes:
        self.transcript.append(Message(sender, receiver, topic, payload))
        return payload

    def batch(self, rows: npt.NDArray[np.int64]) -> float:
        """One mini-batch; returns its mean loss."""
        payment, bank, coordinator, send = self.payment, self.bank, self.coordinator, self.send
        partial = send(PAYMENT, BANK, "partial_scores", payment.partial_scores(rows))
        d_msg, loss_msg = bank.residuals(rows, partial)
        send(BANK, PAYMENT, "residuals", d_msg)
        loss = coordinator.batch_loss(send(BANK, COORDINATOR, "loss", loss_msg))
        for name, learner, masked in (
            (PAYMENT, payment, payment.gradient(rows, d_msg)),
            (BANK, bank, bank.gradient(rows)),
        ):
            send(name, COORDINATOR, "masked_gradient", masked)
            reply = send(COORDINATOR, name, "unmasked", coordinator.unmask(masked))
            learner.update(rows, reply)
        return loss


def train_vertical_lr(
    bank_x: npt.NDArray[np.float64],
    labels: npt.NDArray[np.int64],
    payment_x: npt.NDArray[np.float64],
    settings: LRSettings,
    *,
    key_bits: int = 2048,
    keypair: tuple[PublicKey, PrivateKey] | FastPrivateKey | None = None,
    pools: tuple[RandomnessPool, RandomnessPool] | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> VerticalLRResult:
    """Train on aligned rows (row i of both matrices is the same customer); every message
    crosses as bytes and is recorded in the transcript. `keypair` lets tests pass a shorter
    (weaker, faster) key; otherwise the coordinator makes a `key_bits` key. `pools` (bank's,
    payment company's) are randomness pools for that key, e.g. filled ahead of time; by default
    each party starts one background thread that keeps one epoch's randomness ahead."""
    if len(bank_x) != len(payment_x) or len(bank_x) != len(labels):
        raise ConfigError("bank and payment rows must be aligned (run PSI and `align` first)")
    if len(labels) == 0:
        raise ConfigError("the intersection is empty: there is nothing to train on")
    private = private_key_for(keypair, key_bits)
    public = private.public
    own_pools = pools is None
    if pools is None:
        need = randomness_per_epoch(
            len(labels), bank_x.shape[1], payment_x.shape[1], settings, public
        )
        pools = (
            RandomnessPool(public, workers=1, target=need[0]),
            RandomnessPool(public, workers=1, target=need[1]),
        )
    run = _Run(
        Coordinator(private),
        Bank(bank_x, labels, public, settings, pools[0]),
        PaymentCompany(payment_x, public, settings, pools[1]),
    )
    rng = np.random.default_rng(settings.seed)  # batch order only; shared by both parties
    losses: list[float] = []
    converged = False
    epoch = 0
    try:
        for epoch in range(1, settings.epochs + 1):
            order = rng.permutation(len(labels))
            total = 0.0
            for start in range(0, len(order), settings.batch_size):
                rows = order[start : start + settings.batch_size]
                total += run.batch(rows) * len(rows)
            losses.append(total / len(labels))
            if on_epoch is not None:
                on_epoch(epoch, losses[-1])
            if len(losses) > 1 and abs(losses[-2] - losses[-1]) < settings.tolerance:
                converged = True
                break
    finally:
        misses = pools[0].misses + pools[1].misses
        if own_pools:
            pools[0].close()
            pools[1].close()
    return VerticalLRResult(
        run.bank, run.payment, losses, converged, epoch, run.transcript, public.bits, misses
    )
