"""Build the configured model for a data set's shape."""

from __future__ import annotations

import torch
from torch import nn

from veil.config import ModelConfig
from veil.models.cnn import SmallCNN
from veil.models.tabular import MLP, LinearRegression, LogisticRegression


def build_model(
    config: ModelConfig,
    *,
    n_features: int,
    n_classes: int,
    image_shape: tuple[int, int, int] | None = None,
    seed: int | None = None,
) -> nn.Module:
    """A fresh model with `n_classes` outputs (1 for regression); with `seed`, its initial
    weights depend only on the seed (for a transformer: the head and adapters; the pretrained
    base comes from its files)."""
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_model(
                config, n_features=n_features, n_classes=n_classes, image_shape=image_shape
            )
    if config.name == "causal_lm":
        return _causal_lm(config)
    if config.name == "transformer":
        from veil.models.transformer import LoRASettings, build_sequence_classifier

        lora = config.lora
        return build_sequence_classifier(
            n_classes,
            model_dir=config.model_dir,
            lora=LoRASettings(
                rank=lora.rank,
                alpha=lora.alpha,
                dropout=lora.dropout,
                target_modules=tuple(lora.target_modules) if lora.target_modules else None,
            ),
            gradient_checkpointing=config.gradient_checkpointing,
        )
    if config.name == "logistic":
        return LogisticRegression(n_features, n_classes)
    if config.name == "linear":
        return LinearRegression(n_features, n_classes)
    if config.name == "mlp":
        return MLP(n_features, config.hidden, n_classes, config.dropout)
    if image_shape is None:
        raise ValueError("the CNN needs image data (a data set with an image shape)")
    return SmallCNN(image_shape, n_classes, config.channels, config.dropout)


def _causal_lm(config: ModelConfig) -> nn.Module:
    """`[model] name = "causal_lm"`: the causal LM in `model_dir` (default: the tiny GPT-2 of
    `veil.models.tiny_lm`, built on first use) with LoRA adapters."""
    from veil.models.tiny_lm import default_causal_lm_dir
    from veil.models.transformer import LoRASettings, build_causal_lm

    lora = config.lora
    return build_causal_lm(
        model_dir=config.model_dir if config.model_dir is not None else default_causal_lm_dir(),
        lora=LoRASettings(
            rank=lora.rank,
            alpha=lora.alpha,
            dropout=lora.dropout,
            target_modules=tuple(lora.target_modules) if lora.target_modules else None,
        ),
        gradient_checkpointing=config.gradient_checkpointing,
    )
