"""Benchmark: training samples per second, non-private vs Veil DP-SGD vs Opacus, same run.

Models: the MLP on breast-cancer-shaped SYNTHETIC tabular data (30 features, 2 classes) and the
small CNN on scikit-learn's 8x8 digits (real data). Each method trains the same model from the
same initial weights for the same number of epochs with expected batch size 64 on one thread;
throughput is examples visited per second of training. The methods run in turn, repeat after
repeat (A B C ... A B C ...), and every ratio is the median over repeats of the per-repeat ratio.

Non-private baselines, each labelled:

* ``non_private_veil``: Veil's own hand-optimised loop (`train_epochs`, the loop of non-private
  clients): the strictest baseline, and the one issue 4's target is stated against.
* ``non_private_torch``: the standard PyTorch loop, as PyTorch's tutorials write it: plain
  tensor batches (a `randperm` per epoch, one slice per step), `torch.optim.SGD`,
  `F.cross_entropy`, `zero_grad` / `backward` / `step`.
* ``non_private_torch_dataloader``: the same with a `DataLoader` over a `TensorDataset`
  (shuffled), the most common form.

Private methods: ``veil_dpsgd`` (`DPSGDTrainer`, secure noise), and Opacus (`pip install -e
.[bench]`; skipped when not installed) in hooks and ghost-clipping modes, each fed the same kind
of tensor batches Veil uses (``opacus_*_tensors``: Poisson masks, one gather per batch, no
per-example DataLoader) and through its typical `DPDataLoader` (``opacus_*_loader``); see
`opacus_dpsgd.py`. The fair comparison is Veil against the fastest Opacus variant of the run
(`opacus_fair`, `veil_speedup_vs_opacus_fair`).

Targets (issue 4): Veil DP-SGD at most 2x slower than non-private (Veil's loop) on the MLP;
never slower than Opacus. `veil_clipping_path` names the per-sample clipping implementation
Veil chose for the model (`veil.privacy.dp.per_sample`).

    python benchmarks/dpsgd.py [--quick] [--batch 256] [--repeats 5]

The last stdout line is one JSON object (with the load average before and after).
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
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

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


LEARNING_RATE = 0.05


def run_plain(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    plan = TrainingPlan(epochs=epochs, batch_size=BATCH, learning_rate=LEARNING_RATE)
    train_epochs(model, x, y, plan, torch.Generator().manual_seed(0))


def run_torch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    """The standard PyTorch loop over plain tensor batches (no DataLoader)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x), BATCH):
            idx = order[start : start + BATCH]
            optimizer.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()  # type: ignore[no-untyped-call]
            optimizer.step()


def run_torch_dataloader(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    """The standard PyTorch loop as its tutorials write it: a DataLoader over a TensorDataset."""
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    model.train()
    for _ in range(epochs):
        for xb, yb in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()  # type: ignore[no-untyped-call]
            optimizer.step()


def run_veil(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    plan = TrainingPlan(epochs=epochs, batch_size=BATCH, learning_rate=LEARNING_RATE)
    trainer = DPSGDTrainer(noise_multiplier=SIGMA, clip_norm=CLIP, source=SecureRandom())
    trainer.train(model, x, y, plan, torch.Generator())


def opacus_runner(mode: str, feed: str) -> Trainer:
    """Opacus in `mode` ("hooks" or "ghost"), fed through `feed` ("tensors" or "loader")."""

    def run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
        train_opacus(
            model,
            x,
            y,
            batch=BATCH,
            learning_rate=LEARNING_RATE,
            noise_multiplier=SIGMA,
            clip=CLIP,
            epochs=epochs,
            grad_sample_mode=mode,
            feed=feed,
        )

    return run


NON_PRIVATE = ("non_private_veil", "non_private_torch", "non_private_torch_dataloader")
OPACUS = (
    "opacus_hooks_tensors",
    "opacus_ghost_tensors",
    "opacus_hooks_loader",
    "opacus_ghost_loader",
)


def methods_for(with_opacus: bool) -> dict[str, Trainer]:
    methods: dict[str, Trainer] = {
        "non_private_veil": run_plain,
        "non_private_torch": run_torch,
        "non_private_torch_dataloader": run_torch_dataloader,
        "veil_dpsgd": run_veil,
    }
    if with_opacus:
        for name in OPACUS:
            _, mode, feed = name.split("_")
            methods[name] = opacus_runner(mode, feed)
    return methods


def ratios(times: dict[str, list[float]]) -> dict[str, float | str]:
    """Same-run ratios: each private method's slowdown against each non-private loop, and
    Veil's speed-up over each Opacus variant; `..._fair` is against the fastest of them."""
    row: dict[str, float | str] = {}
    private = ["veil_dpsgd", *(name for name in OPACUS if name in times)]
    for base in NON_PRIVATE:
        for name in private:
            row[f"{name}_slowdown_vs_{base}"] = paired_ratio(times[name], times[base])
    for name in OPACUS:
        if name in times:
            row[f"veil_speedup_vs_{name}"] = paired_ratio(times[name], times["veil_dpsgd"])
    if "opacus_hooks_tensors" in times:
        fair = min(OPACUS, key=lambda name: statistics.median(times[name]))
        row["opacus_fair"] = fair
        row["veil_speedup_vs_opacus_fair"] = row[f"veil_speedup_vs_{fair}"]
    return row


def load_average() -> float:
    """The 1-minute load average, or -1 where /proc/loadavg is missing."""
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return -1.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and repeats")
    parser.add_argument("--batch", type=int, default=64, help="expected batch size (64)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats (5)")
    args = parser.parse_args(argv)
    global BATCH
    BATCH = args.batch
    torch.set_num_threads(1)
    epochs, repeats = (1, 2) if args.quick else (3, args.repeats)
    try:
        import opacus

        opacus_version: str | None = opacus.__version__
    except ImportError:
        opacus_version = None
    cases: dict[str, tuple[Callable[[], nn.Module], tuple[torch.Tensor, torch.Tensor]]] = {
        "mlp": (lambda: MLP(30, [64], 2), synthetic_tabular(4000)),
        "cnn": (lambda: SmallCNN((1, 8, 8), 10), digits()),
    }
    load_before = load_average()
    results = {}
    for name, (factory, (x, y)) in cases.items():
        torch.manual_seed(0)
        initial = factory()
        times = measure(methods_for(opacus_version is not None), initial, x, y, epochs, repeats)
        row: dict[str, float | str] = {
            f"{method}_samples_per_s": round(epochs * len(x) / statistics.median(t), 1)
            for method, t in times.items()
        }
        row["veil_clipping_path"] = PerSampleClipper(copy.deepcopy(initial)).method
        row.update(ratios(times))
        results[name] = row
        print(name, json.dumps(row), file=sys.stderr)
    mlp_slowdown = results["mlp"]["veil_dpsgd_slowdown_vs_non_private_veil"]
    summary = {
        "benchmark": "dpsgd",
        "quick": args.quick,
        "torch": torch.__version__,
        "opacus": opacus_version,
        "batch": BATCH,
        "epochs": epochs,
        "repeats": repeats,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "results": results,
        "target_mlp_slowdown_le_2": float(mlp_slowdown) <= 2.0,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
