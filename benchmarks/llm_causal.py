"""Section 4 of `llm.py`: local training of a causal LM with LoRA on the model's device.

Model: a GPT-2-shaped causal LM initialised locally from a `GPT2Config` (no download; the
throughput of training does not depend on the weights' values), its frozen base placed by
`veil.devices.place_model` (bfloat16 on a GPU that supports it), rank-8 LoRA (alpha 16) on
`c_attn`. Data: SYNTHETIC random token sequences whose first half is a "prompt" (labels -100)
and second half the "response", the shape of an instruction pair.

Methods, each on a fresh copy of the same model and the same data, in turn (A B C A B C ...),
medians reported:

- ``non_private``: Veil's `train_epochs` with the token objective;
- ``veil_dpsgd``: Veil's `DPSGDTrainer` (Poisson sampling, clip 1, noise multiplier 1, noise
  from the host CSPRNG moved to the device);
- ``opacus_hooks``: Opacus's `PrivacyEngine` in hooks mode (when installed: `pip install -e
  .[bench]`), batches moved to the device, the same token loss.

On a CUDA GPU: GPT-2 small's shape (12 layers, 768 wide, 50 257 tokens: 124M parameters), 128
tokens, expected batch 8; peak GPU memory per method (`torch.cuda.max_memory_allocated`); and
Veil DP-SGD's peak memory on a 1B-parameter GPT-2 shape (20 layers, 2048 wide) with gradient
checkpointing, batch 8, 256 tokens. On a CPU-only machine the GPU part is skipped (the output
says so) and the tiny GPT-2 shape (2 layers, 64 wide, 512 tokens) is measured on the CPU, with
the process's peak resident memory.
"""

from __future__ import annotations

import copy
import resource
import statistics
import time
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from veil.devices import place_model
from veil.federation.messages import TrainingPlan
from veil.federation.objective import TOKEN_CROSS_ENTROPY
from veil.federation.training import train_epochs
from veil.models.transformer import CausalLM, LoRASettings, build_causal_lm
from veil.privacy.dp.dpsgd import DPSGDTrainer
from veil.privacy.dp.randomness import SecureRandom

SIGMA, CLIP, LEARNING_RATE, BATCH = 1.0, 1.0, 0.05, 8
LORA = LoRASettings(rank=8, alpha=16, target_modules=("c_attn",))
GPT2_SMALL: dict[str, int] = {"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50257}
GPT2_1B: dict[str, int] = {"n_layer": 20, "n_head": 16, "n_embd": 2048, "vocab_size": 50257}
TINY: dict[str, int] = {"n_layer": 2, "n_head": 2, "n_embd": 64, "vocab_size": 512}

Trainer = Callable[[nn.Module, torch.Tensor, torch.Tensor], None]


def causal_section(*, quick: bool) -> dict[str, Any]:
    """Section 4's measurements (module docstring), on a GPU when there is one."""
    if not torch.cuda.is_available():
        print("no CUDA GPU: skipping the GPU part of section 4; measuring the tiny GPT-2 on CPU")
        row = throughput(torch.device("cpu"), TINY, seq=32, examples=64 if quick else 256)
        return {"device": "cpu", "gpu": "skipped: no CUDA GPU", "tiny_gpt2_cpu": row}
    device = torch.device("cuda")
    small = throughput(device, GPT2_SMALL, seq=128, examples=64 if quick else 256)
    one_b = peak_memory_1b(device, seq=256)
    return {
        "device": torch.cuda.get_device_name(device),
        "bf16_frozen_base": torch.cuda.is_bf16_supported(),
        "gpt2_small": small,
        "gpt2_1b_dpsgd_checkpointed": one_b,
    }


def model_of(shape: dict[str, int], device: torch.device, *, checkpointing: bool) -> CausalLM:
    """A GPT-2-shaped causal LM with LoRA, placed on `device` (bf16 base where supported)."""
    from transformers import GPT2Config

    last = shape["vocab_size"] - 1
    config = GPT2Config(
        n_positions=1024,
        bos_token_id=last,
        eos_token_id=last,
        n_layer=shape["n_layer"],
        n_head=shape["n_head"],
        n_embd=shape["n_embd"],
        vocab_size=shape["vocab_size"],
    )
    model = build_causal_lm(config=config, lora=LORA, gradient_checkpointing=checkpointing, seed=0)
    place_model(model, device)
    return model


def tokens(examples: int, seq: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SYNTHETIC sequences: inputs (float ids, as Veil's data) and next-token labels whose
    first half is -100 (the "prompt")."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (examples, seq + 1), generator=generator)
    x, y = ids[:, :-1].float(), ids[:, 1:].clone()
    y[:, : seq // 2] = -100
    return x, y


def throughput(
    device: torch.device, shape: dict[str, int], *, seq: int, examples: int, repeats: int = 3
) -> dict[str, Any]:
    """Samples/s and peak memory of the three trainers on `shape` (module docstring)."""
    initial = model_of(shape, device, checkpointing=False)
    x, y = tokens(examples, seq, shape["vocab_size"])
    methods: dict[str, Trainer] = {"non_private": _plain, "veil_dpsgd": _veil}
    try:
        import opacus

        methods["opacus_hooks"] = _opacus
        version: str | None = opacus.__version__
    except ImportError:
        version = None
    times: dict[str, list[float]] = {name: [] for name in methods}
    peaks: dict[str, float] = {}
    for name, fn in methods.items():  # warm-up, and each method's peak memory
        peaks[name] = _peak(device, partial(_fresh, fn, initial, x, y))
    for _ in range(repeats):
        for name, fn in methods.items():
            model = copy.deepcopy(initial)
            _sync(device)
            start = time.perf_counter()
            fn(model, x, y)
            _sync(device)
            times[name].append(time.perf_counter() - start)
    trainable = sum(p.numel() for p in initial.parameters() if p.requires_grad)
    total = sum(p.numel() for p in initial.parameters())
    return {
        "parameters": total,
        "trainable_parameters": trainable,
        "tokens_per_example": seq,
        "examples": examples,
        "expected_batch": BATCH,
        **{
            f"{n}_samples_per_s": round(examples / statistics.median(t), 1)
            for n, t in times.items()
        },
        "peak_memory_mb": {n: round(v, 1) for n, v in peaks.items()},
        "peak_memory_kind": "GPU allocated" if device.type == "cuda" else "process max RSS",
        "opacus": version,
    }


def _fresh(fn: Trainer, initial: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    fn(copy.deepcopy(initial), x, y)


def peak_memory_1b(device: torch.device, *, seq: int) -> dict[str, Any]:
    """Veil DP-SGD's peak GPU memory on the 1B GPT-2 shape, checkpointed, expected batch 8."""
    model = model_of(GPT2_1B, device, checkpointing=True)
    x, y = tokens(32, seq, GPT2_1B["vocab_size"])
    total = sum(p.numel() for p in model.parameters())
    peak = _peak(device, lambda: _veil(model, x, y))
    return {"parameters": total, "tokens_per_example": seq, "peak_memory_mb": round(peak, 1)}


def _plan() -> TrainingPlan:
    return TrainingPlan(epochs=1, batch_size=BATCH, learning_rate=LEARNING_RATE)


def _plain(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    train_epochs(model, x, y, _plan(), torch.Generator().manual_seed(0), TOKEN_CROSS_ENTROPY)


def _veil(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    trainer = DPSGDTrainer(
        noise_multiplier=SIGMA,
        clip_norm=CLIP,
        source=SecureRandom(),
        loss=TOKEN_CROSS_ENTROPY.per_example,
    )
    trainer.train(model, x, y, _plan(), torch.Generator())


def _opacus(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    from opacus import PrivacyEngine

    device = next(p.device for p in model.parameters())
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=BATCH, shuffle=True
    )
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private, optimizer, loader = PrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=SIGMA,
            max_grad_norm=CLIP,
            poisson_sampling=True,
            grad_sample_mode="hooks",
        )
        private.train()
        for xb, yb in loader:
            optimizer.zero_grad()
            loss = TOKEN_CROSS_ENTROPY(private(xb.to(device)), yb.to(device))
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device: torch.device, fn: Callable[[], None]) -> float:
    """MiB at the peak while `fn` runs: GPU memory allocated on a GPU, else the process's
    maximum resident set so far (it never decreases, so later methods report at least it)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def print_causal(section: dict[str, Any]) -> None:
    """Section 4's headline numbers as plain lines."""
    print(f"causal LM with LoRA on {section['device']}:")
    for key in ("gpt2_small", "tiny_gpt2_cpu"):
        row = section.get(key)
        if not row:
            continue
        print(f"  {key}: {row['parameters']:,} parameters, {row['tokens_per_example']} tokens")
        for name in ("non_private", "veil_dpsgd", "opacus_hooks"):
            if f"{name}_samples_per_s" in row:
                print(
                    f"    {name:<14} {row[f'{name}_samples_per_s']:>8} samples/s, peak "
                    f"{row['peak_memory_mb'][name]} MiB ({row['peak_memory_kind']})"
                )
    if "gpu" in section:
        print(f"  GPU part: {section['gpu']}")
    one_b = section.get("gpt2_1b_dpsgd_checkpointed")
    if one_b:
        print(f"  1B DP-SGD, checkpointed, batch {BATCH}: peak {one_b['peak_memory_mb']} MiB")
