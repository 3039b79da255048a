"""Split learning on column-split data (Vepakomma et al. 2018, "Split learning for health";
the vertical "SplitNN" with one bottom network per party).

Each party's bottom network maps its own features to an embedding. The payment company sends
its embeddings of a mini-batch to the bank; the bank's top network trains on the concatenation
of both embeddings with the labels, and returns to the payment company only the gradient of the
loss with respect to the payment company's embeddings, from which it updates its bottom network.

Optional differential privacy, both per record and accounted with `veil.privacy.dp.accountant`:

* embedding DP (protects the payment company's features from the bank): each embedding row is
  clipped to L2 norm `embedding_clip` and Gaussian noise of std `embedding_noise ·
  embedding_clip` is added before it leaves the payment company;
* label DP (protects the bank's labels from the payment company): each returned gradient row is
  clipped to `gradient_clip` and noised likewise with `gradient_noise`.

Batches are a shuffle of the rows, so each record is released once per epoch. Replacing one
record moves its clipped row by at most 2C: a Gaussian mechanism with multiplier σ/2, composed
once per epoch (PLD accountant). The noise comes from `SecureRandom` unless a test passes a
seeded source with ``production=False`` (in production a seeded source is refused). At
prediction time embeddings travel without noise (only training is accounted).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from veil.errors import ConfigError
from veil.privacy.dp.accountant import Accountant
from veil.privacy.dp.randomness import RandomSource, SecureRandom, require_secure
from veil.vertical.logistic import BANK, PAYMENT, Message

__all__ = ["SplitResult", "SplitSettings", "train_split"]


@dataclass(frozen=True)
class SplitSettings:
    """Network sizes, training and DP settings (noise multipliers of 0 mean no DP)."""

    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 0.01
    embedding_dim: int = 4
    hidden: int = 16
    weight_decay: float = 1e-4
    embedding_noise: float = 0.0
    embedding_clip: float = 1.0
    gradient_noise: float = 0.0
    gradient_clip: float = 1.0
    delta: float = 1e-5
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.epochs, self.batch_size, self.embedding_dim, self.hidden) < 1:
            raise ConfigError("epochs, batch_size, embedding_dim and hidden must be at least 1")
        if min(self.embedding_noise, self.gradient_noise) < 0:
            raise ConfigError("noise multipliers must be >= 0 (0 turns DP off)")
        if min(self.embedding_clip, self.gradient_clip, self.learning_rate) <= 0:
            raise ConfigError("clip norms and learning_rate must be > 0")
        if not 0 < self.delta < 1:
            raise ConfigError("delta must be in (0, 1)")


def _bottom(inputs: int, settings: SplitSettings) -> nn.Module:
    return nn.Sequential(
        nn.Linear(inputs, settings.hidden),
        nn.ReLU(),
        nn.Linear(settings.hidden, settings.embedding_dim),
    )


def _clip_and_noise(
    rows: npt.NDArray[np.float32], clip: float, noise: float, random: RandomSource
) -> npt.NDArray[np.float32]:
    if noise == 0:
        return rows
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    clipped = rows * np.minimum(1.0, clip / np.maximum(norms, 1e-12))
    gauss = random.standard_normal(clipped.size).reshape(clipped.shape)
    return np.asarray(clipped + noise * clip * gauss, np.float32)


def _to_bytes(array: npt.NDArray[np.float32]) -> bytes:
    return np.ascontiguousarray(array, dtype="<f4").tobytes()


def _from_bytes(payload: bytes, rows: int, width: int) -> npt.NDArray[np.float32]:
    if len(payload) != rows * width * 4:
        raise ConfigError("a split-learning message has the wrong size")
    return np.frombuffer(payload, dtype="<f4").reshape(rows, width).copy()


def _epsilon(noise: float, epochs: int, delta: float) -> float | None:
    if noise == 0:
        return None
    accountant = Accountant("pld")
    accountant.compose_gaussian(noise / 2.0, epochs)
    return accountant.epsilon(delta)


@dataclass
class SplitResult:
    """The three networks, per-epoch training loss, ε of each DP channel (None if off), and the
    transcript of what crossed between the parties."""

    bank_bottom: nn.Module
    payment_bottom: nn.Module
    top: nn.Module
    losses: list[float]
    epsilon_embeddings: float | None
    epsilon_labels: float | None
    transcript: list[Message] = field(default_factory=list)

    def predict_proba(
        self, bank_x: npt.NDArray[np.float32], payment_x: npt.NDArray[np.float32]
    ) -> npt.NDArray[np.float64]:
        """P(y = 1): both parties' bottom networks are needed."""
        with torch.no_grad():
            h = torch.cat(
                [
                    self.bank_bottom(torch.as_tensor(bank_x, dtype=torch.float32)),
                    self.payment_bottom(torch.as_tensor(payment_x, dtype=torch.float32)),
                ],
                dim=1,
            )
            return torch.sigmoid(self.top(h)).squeeze(1).double().numpy()


@dataclass
class _Parties:
    """Both parties' networks and optimisers: the bank's bottom and top (it holds the labels),
    the payment company's bottom."""

    bank_bottom: nn.Module
    payment_bottom: nn.Module
    top: nn.Module
    bank_opt: torch.optim.Optimizer
    payment_opt: torch.optim.Optimizer

    @classmethod
    def build(cls, bank_features: int, payment_features: int, settings: SplitSettings) -> _Parties:
        bank_bottom = _bottom(bank_features, settings)
        payment_bottom = _bottom(payment_features, settings)
        top = nn.Sequential(nn.ReLU(), nn.Linear(2 * settings.embedding_dim, 1))
        bank_opt = torch.optim.Adam(
            [*bank_bottom.parameters(), *top.parameters()],
            lr=settings.learning_rate,
            weight_decay=settings.weight_decay,
        )
        payment_opt = torch.optim.Adam(
            payment_bottom.parameters(),
            lr=settings.learning_rate,
            weight_decay=settings.weight_decay,
        )
        return cls(bank_bottom, payment_bottom, top, bank_opt, payment_opt)

    def step(
        self,
        xa: torch.Tensor,
        xp: torch.Tensor,
        y: torch.Tensor,
        settings: SplitSettings,
        random: RandomSource,
        transcript: list[Message],
    ) -> float:
        """One batch, as the two parties exchange it (each message added to `transcript`);
        returns the batch's summed loss."""
        m, e = len(y), settings.embedding_dim
        # Payment company: embed, protect, send.
        h_p = self.payment_bottom(xp)
        sent = _clip_and_noise(
            h_p.detach().numpy(), settings.embedding_clip, settings.embedding_noise, random
        )
        payload = _to_bytes(sent)
        transcript.append(Message(PAYMENT, BANK, "embeddings", payload))
        # Bank: top network on both embeddings.
        h_p_bank = torch.tensor(_from_bytes(payload, m, e), requires_grad=True)
        logits = self.top(torch.cat([self.bank_bottom(xa), h_p_bank], dim=1)).squeeze(1)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, y)
        self.bank_opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        self.bank_opt.step()
        assert h_p_bank.grad is not None
        # Per-row gradients of the summed loss, so that clipping bounds each label's effect.
        grad = _clip_and_noise(
            (h_p_bank.grad * m).numpy(), settings.gradient_clip, settings.gradient_noise, random
        )
        reply = _to_bytes(grad)
        transcript.append(Message(BANK, PAYMENT, "embedding_gradients", reply))
        # Payment company: back-propagate the received gradient (mean over the batch).
        self.payment_opt.zero_grad()
        h_p.backward(torch.as_tensor(_from_bytes(reply, m, e)) / m)
        self.payment_opt.step()
        return float(loss.detach()) * m


def train_split(
    bank_x: npt.NDArray[np.float32],
    labels: npt.NDArray[np.int64],
    payment_x: npt.NDArray[np.float32],
    settings: SplitSettings,
    *,
    random: RandomSource | None = None,
    production: bool = True,
    on_epoch: Callable[[int, float], None] | None = None,
) -> SplitResult:
    """Train on aligned rows; the payment company's half only ever sees embedding gradients.

    `random` draws the DP noise (default: a fresh `SecureRandom`); in `production` (the
    default) a seeded source is refused with a `ConfigError`, before any training.
    """
    random = random if random is not None else SecureRandom()
    require_secure(random, production=production, what="split learning's DP noise")
    if len(bank_x) != len(payment_x) or len(bank_x) != len(labels) or len(labels) == 0:
        raise ConfigError("bank and payment rows must be aligned and non-empty (run PSI first)")
    torch.manual_seed(settings.seed)
    parties = _Parties.build(bank_x.shape[1], payment_x.shape[1], settings)
    xa = torch.as_tensor(bank_x, dtype=torch.float32)
    xp = torch.as_tensor(payment_x, dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.float32)
    transcript: list[Message] = []
    rng = np.random.default_rng(settings.seed)  # batch order, shared by both parties
    losses: list[float] = []
    for epoch in range(1, settings.epochs + 1):
        total = 0.0
        order = rng.permutation(len(labels))
        for start in range(0, len(order), settings.batch_size):
            rows = torch.as_tensor(order[start : start + settings.batch_size])
            total += parties.step(xa[rows], xp[rows], y[rows], settings, random, transcript)
        losses.append(total / len(labels))
        if on_epoch is not None:
            on_epoch(epoch, losses[-1])
    return SplitResult(
        parties.bank_bottom,
        parties.payment_bottom,
        parties.top,
        losses,
        _epsilon(settings.embedding_noise, settings.epochs, settings.delta),
        _epsilon(settings.gradient_noise, settings.epochs, settings.delta),
        transcript,
    )
