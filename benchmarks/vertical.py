"""Benchmark: epoch time of vertical logistic regression under Paillier (Hardy et al. 2017,
`veil.vertical.logistic`) against the same mini-batch Taylor-SGD in plaintext numpy on the same
aligned German credit rows, same run (issue 9; FATE reports about 7.5x for its hetero-LR, against
its own distributed plaintext LR).

Both run one epoch, batch 32, on the bank/payment-company intersection (684 rows; --quick: 96
rows). The Paillier key is 2048 bits (key generation is not timed). The ratio is dominated by
one Paillier encryption per row (the payment company's partial scores) and one fixed-point
exponentiation per row and feature (the encrypted gradients).

    python benchmarks/vertical.py [--quick] [--key-bits 2048]

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from veil.privacy.he.paillier import generate_keypair
from veil.vertical.data import align, german_credit_parties
from veil.vertical.logistic import LRSettings, train_vertical_lr
from veil.vertical.psi import intersect_locally


def plaintext_epoch(xa: np.ndarray, y: np.ndarray, xp: np.ndarray, s: LRSettings) -> float:
    x = np.hstack([xa, np.ones((len(y), 1)), xp]).astype(np.float64)
    w = np.zeros(x.shape[1])
    order = np.random.default_rng(s.seed).permutation(len(y))
    t0 = time.perf_counter()
    for start in range(0, len(y), s.batch_size):
        rows = order[start : start + s.batch_size]
        d = 0.25 * (x[rows] @ w) - 0.5 * (2.0 * y[rows] - 1.0)
        w = w - s.learning_rate * (x[rows].T @ d / len(rows) + s.l2 * w)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--key-bits", type=int, default=2048)
    args = parser.parse_args()
    bank, payment = german_credit_parties(seed=0)
    common = intersect_locally(bank.ids, payment.ids).intersection
    assert common is not None
    b, p = align(bank, common), align(payment, common)
    assert b.labels is not None
    n = 96 if args.quick else len(common)
    xa, y, xp = b.features[:n], b.labels[:n], p.features[:n]
    settings = LRSettings(epochs=1, batch_size=32)
    keypair = generate_keypair(args.key_bits)
    t0 = time.perf_counter()
    result = train_vertical_lr(xa, y, xp, settings, keypair=keypair)
    encrypted_s = time.perf_counter() - t0
    plain_s = min(plaintext_epoch(xa, y, xp, settings) for _ in range(5))
    wire = sum(len(m.payload) for m in result.transcript)
    print(
        json.dumps(
            {
                "benchmark": "vertical",
                "rows": n,
                "features": {"bank": xa.shape[1] + 1, "payment": xp.shape[1]},
                "key_bits": args.key_bits,
                "paillier_epoch_s": round(encrypted_s, 3),
                "plaintext_epoch_s": round(plain_s, 6),
                "ratio": round(encrypted_s / plain_s, 1),
                "bytes_per_epoch": wire,
                "ms_per_row": round(1000 * encrypted_s / n, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
