"""THE OLD PATH, kept for `benchmarks/vertical.py` only: vertical logistic regression under
`phe` Paillier as it was before the fast layer (`veil.vertical.logistic` is the maintained one).

Vertical logistic regression under Paillier encryption (Hardy et al. 2017, "Private
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
2. bank: [[d]] = ([[u_P]] + u_A)/4 - ỹ/2 and [[loss]] homomorphically;
   bank -> payment: [[d]]; bank -> coordinator: [[loss]].
3. each party k: [[X_k^T d]], masked by r_k uniform in Z_n (Enc(m + r) mod n) -> coordinator.
4. coordinator -> each party: (m + r_k) mod n, uniform, so it learns nothing; the party removes
   r_k and decodes its own gradient.

What each learns: the payment company sees ciphertexts and its own gradient, never labels,
residuals or the bank's features; the bank sees ciphertexts of the payment company's scores and
its own gradient; the coordinator sees the batch losses (it decides convergence) and uniformly
masked values. A coordinator colluding with either party breaks this (it holds the key).
Prediction for a new customer needs both partial scores: the bank adds u_P, sent in the clear by
the payment company for that customer (so the bank learns that one score).
Masks and Paillier randomness come from `secrets` / `random.SystemRandom` (os.urandom).
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
from phe import EncodedNumber, EncryptedNumber
from phe import PaillierPrivateKey as PrivateKey
from phe import PaillierPublicKey as PublicKey

from veil.errors import ConfigError, VeilError
from veil.privacy.he.paillier import generate_keypair

__all__ = [
    "BANK",
    "COORDINATOR",
    "PAYMENT",
    "Bank",
    "Coordinator",
    "LRSettings",
    "Message",
    "PaymentCompany",
    "VerticalLRResult",
    "train_vertical_lr",
]

BANK, PAYMENT, COORDINATOR = "bank", "payment", "coordinator"
_PRECISION = 2.0**-24  # fixed-point step: equal exponents, so encrypted sums need no alignment


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


def _encode(public: PublicKey, value: float, *, power: int = 1) -> EncodedNumber:
    # power = 2 encodes at the exponent of a product of two fixed-point values.
    return EncodedNumber.encode(public, float(value), precision=_PRECISION**power)


def _encrypt(public: PublicKey, value: float) -> EncryptedNumber:
    return public.encrypt(float(value), precision=_PRECISION)


def _dump(values: list[EncryptedNumber]) -> list[list[Any]]:
    # No re-randomisation here: values for a party without the key need none, and whatever
    # reaches the key holder is re-randomised first (a fresh mask encryption, or obfuscate()).
    return [[format(v.ciphertext(be_secure=False), "x"), v.exponent] for v in values]


def _load(public: PublicKey, raw: Any) -> list[EncryptedNumber]:
    try:
        out = [EncryptedNumber(public, int(c, 16), int(e)) for c, e in raw]
    except (TypeError, ValueError):
        raise ProtocolError("malformed encrypted vector") from None
    if any(not 0 < v.ciphertext(be_secure=False) < public.nsquare for v in out):
        raise ProtocolError("an encrypted value is out of range for this key")
    return out


def _dot_products(
    public: PublicKey, values: list[EncryptedNumber], x: npt.NDArray[np.float64]
) -> list[tuple[int, int]]:
    """[[Σ_i values_i · x_ik]] for each column k, as (raw ciphertext, exponent): products of
    powers with gmpy2 (the same arithmetic as `phe`'s scalar multiplication, batched; values
    must share one exponent, which fixed-precision encoding guarantees)."""
    exponents = {v.exponent for v in values}
    if len(exponents) != 1:
        raise ProtocolError("encrypted values with mixed exponents")
    x_exponent = _encode(public, 1.0).exponent
    q = np.rint(np.asarray(x, np.float64) * float(EncodedNumber.BASE) ** -x_exponent)
    nsquare = gmpy2.mpz(public.nsquare)
    cts = [gmpy2.mpz(v.ciphertext(be_secure=False)) for v in values]
    inverses = [gmpy2.invert(c, nsquare) for c in cts]
    out = []
    for k in range(q.shape[1]):
        acc = gmpy2.mpz(1)
        for c, c_inv, e in zip(cts, inverses, q[:, k], strict=True):
            if e > 0:
                acc = acc * gmpy2.powmod(c, int(e), nsquare) % nsquare
            elif e < 0:
                acc = acc * gmpy2.powmod(c_inv, int(-e), nsquare) % nsquare
        out.append((int(acc), values[0].exponent + x_exponent))
    return out


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

    def __init__(self, x: npt.NDArray[np.float64], public: PublicKey, settings: LRSettings):
        self.x = np.asarray(x, np.float64)
        self.w = np.zeros(self.x.shape[1])
        self.public = public
        self.settings = settings
        self._masks: list[tuple[int, int]] = []

    def _masked_gradient(self, rows: npt.NDArray[np.int64], d: list[EncryptedNumber]) -> bytes:
        n, nsquare = self.public.n, self.public.nsquare
        masked, self._masks = [], []
        products = _dot_products(self.public, d, self.x[rows])
        for ct, exponent in products:
            r = secrets.randbelow(n)
            ct = ct * self.public.raw_encrypt(r) % nsquare
            masked.append([format(ct, "x"), exponent])
            self._masks.append((r, exponent))
        return json.dumps({"masked": masked}).encode()

    def _step(
        self, rows: npt.NDArray[np.int64], decrypted: bytes, penalise: npt.NDArray[np.bool_]
    ) -> None:
        values = _body(decrypted).get("values")
        if not isinstance(values, list) or len(values) != len(self._masks):
            raise ProtocolError("the coordinator returned a gradient of the wrong length")
        n = self.public.n
        grad = np.array(
            [
                EncodedNumber(self.public, (int(v, 16) - r) % n, e).decode()
                for v, (r, e) in zip(values, self._masks, strict=True)
            ]
        ) / len(rows)
        grad = grad + self.settings.l2 * self.w * penalise
        self.w = self.w - self.settings.learning_rate * grad

    def scores(self, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        """Partial scores X_k w_k of `rows` (for prediction)."""
        return np.asarray(self.x[rows] @ self.w, np.float64)


class PaymentCompany(_Learner):
    """The feature holder: it never receives labels, residuals in the clear, or the bank's data."""

    def partial_scores(self, rows: npt.NDArray[np.int64]) -> bytes:
        u = self.scores(rows)
        body = {
            "u": _dump([_encrypt(self.public, v) for v in u]),
            "u2": _dump([_encrypt(self.public, float(np.sum(u**2)))]),
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
        public: PublicKey,
        settings: LRSettings,
    ):
        x = np.asarray(x, np.float64)
        super().__init__(np.hstack([x, np.ones((x.shape[0], 1))]), public, settings)
        self.y_signed = 2.0 * np.asarray(labels, np.float64) - 1.0
        self._d: list[EncryptedNumber] = []

    def residuals(self, rows: npt.NDArray[np.int64], partial: bytes) -> tuple[bytes, bytes]:
        """([[d]] for the payment company, [[batch loss sum]] for the coordinator)."""
        body = _body(partial)
        u_p, u2 = _load(self.public, body.get("u")), _load(self.public, body.get("u2"))
        if len(u_p) != len(rows) or len(u2) != 1:
            raise ProtocolError("the payment company sent scores for another batch")
        u_a, y = self.scores(rows), self.y_signed[rows]
        quarter, eighth = _encode(self.public, 0.25), _encode(self.public, 0.125)
        self._d = [
            u * quarter + _encode(self.public, 0.25 * a - 0.5 * t, power=2)
            for u, a, t in zip(u_p, u_a, y, strict=True)
        ]
        # Σ loss = m log 2 - ½ Σ ỹ(u_A + u_P) + ⅛ Σ (u_A² + 2 u_A u_P + u_P²)
        ((ct, exponent),) = _dot_products(self.public, u_p, (0.25 * u_a - 0.5 * y)[:, None])
        cross = EncryptedNumber(self.public, ct, exponent)
        plain = len(rows) * math.log(2) - 0.5 * float(y @ u_a) + 0.125 * float(u_a @ u_a)
        loss = cross + u2[0] * eighth + _encode(self.public, plain, power=2)
        # The key holder could read a ciphertext's randomness, here built from our per-row
        # coefficients; fresh randomness hides it.
        loss.obfuscate()
        return (
            json.dumps({"d": _dump(self._d)}).encode(),
            json.dumps({"loss": _dump([loss]), "rows": len(rows)}).encode(),
        )

    def gradient(self, rows: npt.NDArray[np.int64]) -> bytes:
        return self._masked_gradient(rows, self._d)

    def update(self, rows: npt.NDArray[np.int64], decrypted: bytes) -> None:
        penalise = np.ones_like(self.w, dtype=bool)
        penalise[-1] = False
        self._step(rows, decrypted, penalise)


class Coordinator:
    """Holds the private key; decrypts masked values and batch losses, decides convergence."""

    def __init__(self, public: PublicKey, private: PrivateKey):
        self.public, self._private = public, private
        self.losses: list[float] = []

    def unmask(self, masked: bytes) -> bytes:
        raw = _body(masked).get("masked")
        cts = _load(self.public, raw)
        values = [
            format(self._private.raw_decrypt(c.ciphertext(be_secure=False)), "x") for c in cts
        ]
        return json.dumps({"values": values}).encode()

    def batch_loss(self, message: bytes) -> float:
        body = _body(message)
        (loss,) = _load(self.public, body.get("loss"))
        return float(self._private.decrypt(loss)) / max(1, int(body.get("rows", 1)))


@dataclass
class VerticalLRResult:
    """Trained parties, per-epoch mean Taylor loss, whether it converged, and the transcript."""

    bank: Bank
    payment: PaymentCompany
    losses: list[float]
    converged: bool
    epochs: int
    transcript: list[Message] = field(default_factory=list)
    key_bits: int = 0

    def predict_proba(
        self, bank_rows: npt.NDArray[np.int64], payment_rows: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.float64]:
        """P(y = 1) for customers given by their row in each party's aligned data: both
        partial scores are needed."""
        z = self.bank.scores(bank_rows) + self.payment.scores(payment_rows)
        return np.asarray(1.0 / (1.0 + np.exp(-z)), np.float64)


def train_vertical_lr(
    bank_x: npt.NDArray[np.float64],
    labels: npt.NDArray[np.int64],
    payment_x: npt.NDArray[np.float64],
    settings: LRSettings,
    *,
    key_bits: int = 2048,
    keypair: tuple[PublicKey, PrivateKey] | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> VerticalLRResult:
    """Train on aligned rows (row i of both matrices is the same customer); every message
    crosses as bytes and is recorded in the transcript. `keypair` lets tests pass a shorter
    (weaker, faster) key; otherwise the coordinator makes a `key_bits` key."""
    if len(bank_x) != len(payment_x) or len(bank_x) != len(labels):
        raise ConfigError("bank and payment rows must be aligned (run PSI and `align` first)")
    if len(labels) == 0:
        raise ConfigError("the intersection is empty: there is nothing to train on")
    public, private = keypair if keypair is not None else generate_keypair(key_bits)
    coordinator = Coordinator(public, private)
    bank = Bank(bank_x, labels, public, settings)
    payment = PaymentCompany(payment_x, public, settings)
    transcript: list[Message] = []

    def send(sender: str, receiver: str, topic: str, payload: bytes) -> bytes:
        transcript.append(Message(sender, receiver, topic, payload))
        return payload

    rng = np.random.default_rng(settings.seed)  # batch order only; shared by both parties
    losses: list[float] = []
    converged = False
    epoch = 0
    for epoch in range(1, settings.epochs + 1):
        order = rng.permutation(len(labels))
        total = 0.0
        for start in range(0, len(order), settings.batch_size):
            rows = order[start : start + settings.batch_size]
            partial = send(PAYMENT, BANK, "partial_scores", payment.partial_scores(rows))
            d_msg, loss_msg = bank.residuals(rows, partial)
            send(BANK, PAYMENT, "residuals", d_msg)
            total += coordinator.batch_loss(send(BANK, COORDINATOR, "loss", loss_msg)) * len(rows)
            for name, learner, masked in (
                (PAYMENT, payment, payment.gradient(rows, d_msg)),
                (BANK, bank, bank.gradient(rows)),
            ):
                send(name, COORDINATOR, "masked_gradient", masked)
                reply = send(COORDINATOR, name, "unmasked", coordinator.unmask(masked))
                learner.update(rows, reply)
        losses.append(total / len(labels))
        if on_epoch is not None:
            on_epoch(epoch, losses[-1])
        if len(losses) > 1 and abs(losses[-2] - losses[-1]) < settings.tolerance:
            converged = True
            break
    return VerticalLRResult(
        bank, payment, losses, converged, epoch, transcript, public.n.bit_length()
    )
