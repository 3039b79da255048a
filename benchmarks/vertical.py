"""Benchmark: vertical learning under Paillier (issue 23), one run.

1. Vertical logistic regression (Hardy et al. 2017) on the 684 aligned German credit customers
   (bank: 19 features + intercept, payment company: 7), one epoch, batch 32, Paillier-2048:
   * old: the `phe` path as it was (`benchmarks/vertical_phe_lr.py`, kept for this only);
   * new: `veil.vertical.logistic` on `veil.privacy.he.paillier_fast`. Its randomness r^n mod
     n² is made ahead of time by each party's `RandomnessPool` (timed separately: "offline"),
     then the epoch runs with the pools frozen (no background work competing): "online";
   * plaintext: the same mini-batch Taylor-SGD in numpy.
   Targets: new online epoch >= 20x faster than old; the per-ciphertext critical path of an
   encryption (one multiplication by a pooled r^n) within 3x of one 4096-bit modular
   multiplication (a·b mod n², gmpy2), timed in the same run.
2. SecureBoost (`--secureboost`): seconds per tree, depth 3, 32 bins, on SYNTHETIC customers
   (default 10,000 x 20 features per party).

    python benchmarks/vertical.py [--quick] [--key-bits 2048] [--secureboost] [--no-lr]

Key generation is never timed. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import gmpy2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vertical_phe_lr  # the old `phe` path, for comparison only
from veil.privacy.he.paillier import generate_keypair
from veil.privacy.he.paillier_fast import FastPrivateKey, RandomnessPool
from veil.vertical.data import align, german_credit_parties
from veil.vertical.logistic import LRSettings, randomness_per_epoch, train_vertical_lr
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


def floor_and_critical_path(private: FastPrivateKey, repeats: int = 20000) -> dict[str, float]:
    """µs of one a·b mod n² (4096-bit n² for a 2048-bit key) and of one encryption with a
    pooled r^n (what remains on the critical path), best of 5 loops each."""
    pk = private.public
    a, b = (
        gmpy2.mpz(secrets.randbelow(int(pk.nsquare))),
        gmpy2.mpz(secrets.randbelow(int(pk.nsquare))),
    )
    rn = RandomnessPool(pk, workers=0).one()
    values = [secrets.randbelow(1 << 40) - (1 << 39) for _ in range(repeats)]
    best_mul = best_enc = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(repeats):
            a * b % pk.nsquare
        best_mul = min(best_mul, (time.perf_counter() - t0) / repeats)
        t0 = time.perf_counter()
        for v in values:
            pk.encrypt(v, rn)
        best_enc = min(best_enc, (time.perf_counter() - t0) / repeats)
    return {
        "modmul_us": round(best_mul * 1e6, 2),
        "encrypt_critical_path_us": round(best_enc * 1e6, 2),
        "critical_path_over_modmul": round(best_enc / best_mul, 2),
    }


def lr_benchmark(args: argparse.Namespace) -> dict[str, Any]:
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
    old = vertical_phe_lr.train_vertical_lr(
        xa, y, xp, vertical_phe_lr.LRSettings(epochs=1, batch_size=32), keypair=keypair
    )
    old_s = time.perf_counter() - t0
    private = FastPrivateKey.from_phe(keypair[1])
    need = randomness_per_epoch(n, xa.shape[1], xp.shape[1], settings, private.public)
    pools = (RandomnessPool(private.public, workers=2), RandomnessPool(private.public, workers=2))
    t0 = time.perf_counter()
    for pool, count in zip(pools, need, strict=True):
        pool.fill(count)
        pool.request(0)  # frozen: nothing runs in the background during the timed epoch
    offline_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    new = train_vertical_lr(xa, y, xp, settings, keypair=private, pools=pools)
    new_s = time.perf_counter() - t0
    for pool in pools:
        pool.close()
    plain_s = min(plaintext_epoch(xa, y, xp, settings) for _ in range(5))
    w_old = np.concatenate([old.bank.w, old.payment.w])
    w_new = np.concatenate([new.bank.w, new.payment.w])
    return {
        "rows": n,
        "features": {"bank": xa.shape[1] + 1, "payment": xp.shape[1]},
        "key_bits": args.key_bits,
        "old_phe_epoch_s": round(old_s, 3),
        "new_online_epoch_s": round(new_s, 3),
        "new_offline_randomness_s": round(offline_s, 3),
        "randomness_values": sum(need),
        "pool_misses": new.pool_misses,
        "plaintext_epoch_s": round(plain_s, 6),
        "speedup_new_over_old": round(old_s / new_s, 1),
        "speedup_incl_offline": round(old_s / (new_s + offline_s), 2),
        "new_over_plaintext": round(new_s / plain_s, 1),
        "max_weight_difference_old_new": float(np.max(np.abs(w_old - w_new))),
        "bytes_per_epoch": {
            "old": sum(len(m.payload) for m in old.transcript),
            "new": sum(len(m.payload) for m in new.transcript),
        },
        **floor_and_critical_path(private),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--key-bits", type=int, default=2048)
    parser.add_argument("--secureboost", action="store_true", help="also time SecureBoost")
    parser.add_argument("--no-lr", action="store_true", help="skip the logistic regression part")
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--trees", type=int, default=2)
    args = parser.parse_args()
    out: dict[str, Any] = {"benchmark": "vertical", "load_average": list(os.getloadavg())}
    if not args.no_lr:
        out["logistic"] = lr_benchmark(args)
        print(json.dumps(out["logistic"]), flush=True)
    if args.secureboost:
        out["secureboost"] = secureboost_benchmark(args)
    out["load_average_end"] = list(os.getloadavg())
    print(json.dumps(out))


def synthetic_parties(customers: int, features: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """SYNTHETIC aligned customers: `features` columns per party (half continuous, half with
    4 levels), labels from a logistic model with interactions over both parties' columns."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((customers, 2 * features))
    x[:, 1::2] = np.round(x[:, 1::2] * 1.5)  # ordinal columns
    z = x[:, :4].sum(1) - x[:, features : features + 4].sum(1) + x[:, 0] * x[:, features]
    y = (rng.random(customers) < 1 / (1 + np.exp(-z))).astype(np.int64)
    return x[:, :features], y, x[:, features:]


def secureboost_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per tree (depth 3, 32 bins): online with pooled randomness, and the offline
    randomness (one r^n per customer and tree for the bank, a few per node for the payment
    company), on SYNTHETIC customers."""
    from veil.vertical.boosting import BoostSettings
    from veil.vertical.secureboost import train_secureboost

    n = 2000 if args.quick else args.customers
    xa, y, xp = synthetic_parties(n, 20)
    private = FastPrivateKey.from_phe(generate_keypair(args.key_bits)[1])
    settings = BoostSettings(trees=args.trees, max_depth=3, bins=32)
    pools = (RandomnessPool(private.public, workers=2), RandomnessPool(private.public, workers=2))
    t0 = time.perf_counter()
    pools[0].fill(n * args.trees)
    pools[1].fill(200 * args.trees)
    for pool in pools:
        pool.request(0)
    offline_s = time.perf_counter() - t0
    times: list[float] = []
    t0 = time.perf_counter()

    def tree(index: int, loss: float) -> None:
        times.append(time.perf_counter() - t0 - sum(times))

    boost = train_secureboost(xa, y, xp, settings, keypair=private, pools=pools, on_tree=tree)
    misses = pools[0].misses + pools[1].misses
    randomness = pools[0].made + pools[1].made
    boost.passive.close()
    pools[0].close()
    topics: dict[str, int] = {}
    for m in boost.channel.transcript:
        topics[m.topic] = topics.get(m.topic, 0) + len(m.payload)
    return {
        "customers": n,
        "features_per_party": 20,
        "trees": args.trees,
        "depth": 3,
        "bins": 32,
        "key_bits": args.key_bits,
        "online_s_per_tree": [round(t, 2) for t in times],
        "offline_randomness_s_per_tree": round(offline_s / args.trees, 2),
        "randomness_values": randomness,
        "pool_misses": misses,
        "bytes_per_topic": topics,
        "payment_splits": sum(
            1 for t in boost.trees for node in t.nodes if node.owner == "payment"
        ),
        "train_loss": [round(v, 4) for v in boost.train_losses],
    }


if __name__ == "__main__":
    main()
