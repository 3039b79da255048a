"""`run_vertical`: PSI between the bank and the payment company, then one vertical model, and
`result.json` with the intersection size, the model's metrics next to a centralised logistic
regression on the pooled columns, and what each party learned.

In this single-machine run the parties are objects in one process that talk only through the
serialised messages of `veil.vertical.psi`, `logistic` and `split` (the bytes are counted); PSI
between two real processes over mutual TLS is `veil psi serve` / `veil psi join`.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from phe import PaillierPrivateKey, PaillierPublicKey
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss, roc_auc_score

from veil.atomic import atomic_write_text
from veil.errors import DataError
from veil.result import RESULT_FILE, Result
from veil.vertical.boosting import BoostSettings
from veil.vertical.config import VerticalConfig
from veil.vertical.data import Party, align, german_credit_parties
from veil.vertical.logistic import PAYMENT, LRSettings, Message, train_vertical_lr
from veil.vertical.psi import PsiReceiver, PsiSender
from veil.vertical.secureboost import SecureBoostResult, train_secureboost
from veil.vertical.split import SplitSettings, train_split

__all__ = ["RESULT_FILE", "run_vertical"]


_LEARNED = {
    "logistic": {
        "bank": "the intersection (ids); Paillier ciphertexts of the payment company's partial "
        "scores; its own gradient",
        "payment": "the intersection ids (sent by the bank to align rows); ciphertexts of the "
        "residuals; its own gradient. Never labels, residuals or bank features in the clear",
        "coordinator": "the mean Taylor loss of each batch; uniformly masked gradient values",
    },
    "split": {
        "bank": "the intersection; the payment company's embeddings (noised if "
        "embedding_noise > 0)",
        "payment": "the intersection ids; gradients with respect to its embeddings (label-DP "
        "noised if gradient_noise > 0). Never labels or bank features",
    },
    "secureboost": {
        "bank": "the intersection; for each split on a payment-company column, which of the "
        "node's customers go left or right (and the same for customers it scores); a bin index "
        "of a column it cannot name. Never payment-company values",
        "payment": "the intersection ids; the rows of every tree node it is asked about (the "
        "trees' partition of the customers; none of the first tree's with "
        "first_tree_active_only); Paillier ciphertexts of gradients and hessians under the "
        "bank's key; its own split thresholds. Never labels, gradients, hessians or bank "
        "features in the clear",
    },
}


def _metrics(y: npt.NDArray[np.int64], p: npt.NDArray[np.float64]) -> dict[str, float]:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return {
        "auc": float(roc_auc_score(y, p)),
        "accuracy": float(np.mean((p >= 0.5) == (y == 1))),
        "loss": float(log_loss(y, p, labels=[0, 1])),
    }


def _bytes(transcript: list[Message]) -> tuple[int, int, int]:
    up = sum(len(m.payload) for m in transcript if m.sender == PAYMENT)
    down = sum(len(m.payload) for m in transcript if m.receiver == PAYMENT)
    return up, down, sum(len(m.payload) for m in transcript)


def run_vertical(
    config: VerticalConfig,
    out_dir: str | Path,
    *,
    keypair: tuple[PaillierPublicKey, PaillierPrivateKey] | None = None,
) -> dict[str, Any]:
    """Run PSI and training; write and return `result.json`. `keypair` (tests) replaces the
    coordinator's fresh `key_bits` key."""
    started = time.perf_counter()
    d = config.data
    bank, payment = german_credit_parties(
        bank_fraction=d.bank_fraction, payment_fraction=d.payment_fraction, seed=d.seed
    )
    receiver = PsiReceiver(bank.ids, reveal=config.psi.reveal)
    request = receiver.request()
    response = PsiSender(payment.ids, reveal=config.psi.reveal).respond(request)
    psi = receiver.finish(response)
    psi_s = time.perf_counter() - started
    result: dict[str, Any] = {
        "run_id": uuid.uuid4().hex[:12],
        "name": config.name,
        "mode": "simulation",
        "kind": "vertical",
        "model": config.model,
        "psi": {
            "reveal": config.psi.reveal,
            "intersection_size": psi.size,
            "bank_rows": len(bank.ids),
            "payment_rows": len(payment.ids),
            "bytes": len(request) + len(response),
            "seconds": round(psi_s, 3),
        },
        "dataset": {"name": "german_credit", "synthetic": False},
    }
    if psi.intersection is None:
        raise DataError(
            "PSI ran in reveal = 'size' mode: the bank learned only the size "
            f"({psi.size}), so there are no aligned rows to train on; set [psi] reveal = "
            "'intersection' to train"
        )
    if psi.size < 10:
        raise DataError(f"only {psi.size} customers in common: too few to train on")
    result.update(
        _train(config, align(bank, psi.intersection), align(payment, psi.intersection), keypair)
    )
    result["timing"] = {
        "total_s": round(time.perf_counter() - started, 3),
        "psi_s": round(psi_s, 3),
    }
    Result.model_validate(result)  # the result.json contract (docs/results.md)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / RESULT_FILE, Result.model_validate(result).to_json())
    return result


def _train(
    config: VerticalConfig,
    bank: Party,
    payment: Party,
    keypair: tuple[PaillierPublicKey, PaillierPrivateKey] | None,
) -> dict[str, Any]:
    assert bank.labels is not None
    y = bank.labels
    order = np.random.default_rng(config.data.seed).permutation(len(y))
    cut = round(len(y) * (1 - config.data.test_fraction))
    train, test = order[:cut], order[cut:]
    if config.model == "secureboost":
        return _train_secureboost(config, bank, payment, keypair, (train, test))
    pooled = np.hstack([bank.features, payment.features])
    central = LogisticRegression(max_iter=2000).fit(pooled[train], y[train])
    baseline = _metrics(y[test], central.predict_proba(pooled[test])[:, 1])
    rounds: list[dict[str, Any]] = []

    def epoch(index: int, loss: float) -> None:
        rounds.append({"round": index, "clients": 2, "dropped": 0, "metrics": {"train_loss": loss}})

    privacy: dict[str, Any] = {"unit": None, "epsilon": None, "delta": None, "accountant": None}
    train_s = time.perf_counter()
    if config.model == "logistic":
        c = config.logistic
        settings = LRSettings(
            epochs=c.epochs,
            batch_size=c.batch_size,
            learning_rate=c.learning_rate,
            l2=c.l2,
            tolerance=c.tolerance,
            seed=config.data.seed,
        )
        lr = train_vertical_lr(
            bank.features[train],
            y[train],
            payment.features[train],
            settings,
            key_bits=c.key_bits,
            keypair=keypair,
            on_epoch=epoch,
        )
        scores = bank.features[test].astype(np.float64) @ lr.bank.w[:-1] + lr.bank.w[-1]
        scores = scores + payment.features[test].astype(np.float64) @ lr.payment.w
        final = _metrics(y[test], 1.0 / (1.0 + np.exp(-scores)))
        transcript = lr.transcript
        privacy["protection"] = f"paillier-{lr.key_bits} (key held by the coordinator)"
        extra: dict[str, Any] = {"converged": lr.converged, "epochs": lr.epochs}
    else:
        s = config.split
        settings_split = SplitSettings(**s.model_dump(), seed=config.data.seed)
        split = train_split(
            bank.features[train], y[train], payment.features[train], settings_split, on_epoch=epoch
        )
        final = _metrics(y[test], split.predict_proba(bank.features[test], payment.features[test]))
        transcript = split.transcript
        eps = [e for e in (split.epsilon_embeddings, split.epsilon_labels) if e is not None]
        if eps:
            privacy.update(
                unit="record",
                epsilon=max(eps),
                delta=s.delta,
                accountant="dp-accounting PLD (Gaussian, replace-one as sensitivity 2C)",
                embeddings_epsilon=split.epsilon_embeddings,
                labels_epsilon=split.epsilon_labels,
            )
        privacy["protection"] = "split learning"
        extra = {"epochs": s.epochs}
    up, down, total = _bytes(transcript)
    return {
        "final": final,
        "centralized_baseline": baseline,
        "rounds": rounds,
        "privacy": {**privacy, "aggregation": "plain"},
        "communication": {"bytes_up": up, "bytes_down": down, "bytes_total": total},
        "train_s": round(time.perf_counter() - train_s, 3),
        "learned": _LEARNED[config.model],
        "rows": {"train": len(train), "test": len(test)},
        **extra,
    }


def _xgboost_baseline(
    pooled: npt.NDArray[np.float32],
    y: npt.NDArray[np.int64],
    split: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]],
    settings: BoostSettings,
) -> dict[str, float]:
    """Centralised XGBoost (`hist`) on the pooled columns with SecureBoost's settings."""
    try:
        import xgboost
    except ImportError:
        raise DataError(
            "the SecureBoost baseline needs XGBoost: pip install 'veil[trees]'"
        ) from None
    train, test = split
    model = xgboost.XGBClassifier(
        n_estimators=settings.trees,
        max_depth=settings.max_depth,
        max_bin=settings.bins,
        learning_rate=settings.learning_rate,
        reg_lambda=settings.reg_lambda,
        min_child_weight=settings.min_child_weight,
        gamma=settings.gamma,
        base_score=0.5,
        tree_method="hist",
        n_jobs=1,
    )
    model.fit(pooled[train], y[train])
    return _metrics(y[test], model.predict_proba(pooled[test])[:, 1])


def _train_secureboost(
    config: VerticalConfig,
    bank: Party,
    payment: Party,
    keypair: tuple[PaillierPublicKey, PaillierPrivateKey] | None,
    split: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]],
) -> dict[str, Any]:
    assert bank.labels is not None
    y, (train, test), c = bank.labels, split, config.secureboost
    settings = BoostSettings(**c.model_dump(exclude={"key_bits"}))
    baseline = _xgboost_baseline(np.hstack([bank.features, payment.features]), y, split, settings)
    rounds: list[dict[str, Any]] = []

    def tree(index: int, loss: float) -> None:
        rounds.append({"round": index, "clients": 2, "dropped": 0, "metrics": {"train_loss": loss}})

    started = time.perf_counter()
    boost: SecureBoostResult = train_secureboost(
        bank.features[train],
        y[train],
        payment.features[train],
        settings,
        key_bits=c.key_bits,
        keypair=keypair,
        on_tree=tree,
    )
    train_s = time.perf_counter() - started
    boost.passive.add_dataset("test", payment.features[test])
    final = _metrics(y[test], boost.predict_proba(bank.features[test], "test"))
    boost.passive.close()
    up, down, total = _bytes(boost.channel.transcript)
    return {
        "final": final,
        "centralized_baseline": {**baseline, "model": "xgboost (pooled columns, same settings)"},
        "rounds": rounds,
        "privacy": {
            "unit": None,
            "epsilon": None,
            "delta": None,
            "accountant": None,
            "aggregation": "plain",
            "protection": f"paillier-{boost.key_bits} (key held by the bank)",
            "first_tree_active_only": c.first_tree_active_only,
        },
        "communication": {"bytes_up": up, "bytes_down": down, "bytes_total": total},
        "train_s": round(train_s, 3),
        "learned": _LEARNED["secureboost"],
        "rows": {"train": len(train), "test": len(test)},
        "trees": len(boost.trees),
    }
