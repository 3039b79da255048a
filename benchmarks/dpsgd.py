"""Benchmark: training samples per second, non-private vs Veil DP-SGD vs Opacus, same run.

Models: the MLP on breast-cancer-shaped SYNTHETIC tabular data (30 features, 2 classes) and the
small CNN on scikit-learn's 8x8 digits (real data). Each method trains the same model from the
same initial weights for the same number of epochs with expected batch size 64 on one thread;
throughput is examples visited per second of training. Opacus (hooks mode, Poisson sampling
through its DPDataLoader, `pip install -e .[bench]`) is skipped when not installed.

Targets (issue 4): Veil DP-SGD at most 2x slower than non-private on the MLP; never slower than
Opacus. The non-private baseline is Veil's own SGD loop (`train_epochs`, the loop of non-private
clients). `veil_clipping_path` names the per-sample clipping implementation Veil chose for the
model (`veil.privacy.dp.per_sample`).

    python benchmarks/dpsgd.py [--quick] [--batch 256]

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

from opacus_dpsgd import train_opacus
from veil.federation.messages import TrainingPlan
from veil.federation.training import train_epochs
from veil.models import MLP, SmallCNN
from veil.privacy.dp.dpsgd import DPSGDTrainer
from veil.privacy.dp.per_sample import PerSampleClipper
from veil.privacy.dp.randomness import SecureRandom

SIGMA, CLIP = 1.0, 1.0


def synthetic_tabular(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SYNTHETIC data: 30 standard-normal features, labels from a fixed linear rule."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 30)).astype(np.float32)
    y = (x @ rng.standard_normal(30) > 0).astype(np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    return torch.from_numpy(d.data.astype(np.float32) / 16), torch.from_numpy(d.target)


Trainer = Callable[[nn.Module, torch.Tensor, torch.Tensor, int], None]


def measure(
    methods: dict[str, Trainer],
    initial: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    repeats: int,
) -> dict[str, list[float]]:
    """Seconds per repeat of each method, run in turn (A B C A B C ...) so that drifts in the
    machine's speed hit every method alike; each trains a fresh copy of `initial`."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    for fn in methods.values():  # warm-up: first-call costs inside torch and Opacus
        fn(copy.deepcopy(initial), x[:256], y[:256], 1)
    for _ in range(repeats):
        for name, fn in methods.items():
            model = copy.deepcopy(initial)
            start = time.perf_counter()
            fn(model, x, y, epochs)
            times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(slow: list[float], fast: list[float]) -> float:
    """Median over repeats of slow/fast, pairing the runs of the same repeat."""
    return round(statistics.median(s / f for s, f in zip(slow, fast, strict=True)), 2)


BATCH = 64  # the expected batch size; --batch changes it


def run_plain(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    plan = TrainingPlan(epochs=epochs, batch_size=BATCH, learning_rate=0.05)
    train_epochs(model, x, y, plan, torch.Generator().manual_seed(0))


def run_veil(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    plan = TrainingPlan(epochs=epochs, batch_size=BATCH, learning_rate=0.05)
    trainer = DPSGDTrainer(noise_multiplier=SIGMA, clip_norm=CLIP, source=SecureRandom())
    trainer.train(model, x, y, plan, torch.Generator())


def run_opacus(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    train_opacus(
        model,
        x,
        y,
        batch=BATCH,
        learning_rate=0.05,
        noise_multiplier=SIGMA,
        clip=CLIP,
        epochs=epochs,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and repeats")
    parser.add_argument("--batch", type=int, default=64, help="expected batch size (64)")
    args = parser.parse_args(argv)
    global BATCH
    BATCH = args.batch
    torch.set_num_threads(1)
    epochs, repeats = (1, 2) if args.quick else (3, 5)
    try:
        import opacus

        opacus_version: str | None = opacus.__version__
    except ImportError:
        opacus_version = None
    cases: dict[str, tuple[Callable[[], nn.Module], tuple[torch.Tensor, torch.Tensor]]] = {
        "mlp": (lambda: MLP(30, [64], 2), synthetic_tabular(4000)),
        "cnn": (lambda: SmallCNN((1, 8, 8), 10), digits()),
    }
    results = {}
    for name, (factory, (x, y)) in cases.items():
        torch.manual_seed(0)
        initial = factory()
        methods: dict[str, Trainer] = {
            "non_private": run_plain,
            "veil_dpsgd": run_veil,
        }
        if opacus_version:
            methods["opacus_hooks"] = run_opacus
        times = measure(methods, initial, x, y, epochs, repeats)
        row: dict[str, float | str] = {
            f"{method}_samples_per_s": round(epochs * len(x) / statistics.median(t), 1)
            for method, t in times.items()
        }
        row["veil_clipping_path"] = PerSampleClipper(copy.deepcopy(initial)).method
        row["veil_slowdown_vs_non_private"] = paired_ratio(
            times["veil_dpsgd"], times["non_private"]
        )
        if opacus_version:
            row["opacus_slowdown_vs_non_private"] = paired_ratio(
                times["opacus_hooks"], times["non_private"]
            )
            row["veil_speedup_vs_opacus"] = paired_ratio(times["opacus_hooks"], times["veil_dpsgd"])
        results[name] = row
        print(name, json.dumps(row), file=sys.stderr)
    summary = {
        "benchmark": "dpsgd",
        "quick": args.quick,
        "torch": torch.__version__,
        "opacus": opacus_version,
        "batch": BATCH,
        "epochs": epochs,
        "results": results,
        "target_mlp_slowdown_le_2": float(results["mlp"]["veil_slowdown_vs_non_private"]) <= 2.0,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
