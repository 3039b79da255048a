"""A tiny GPT-2-style causal language model, built locally (nothing is downloaded): the default
`model_dir` of `[model] name = "causal_lm"`, for tests, CI and the example.

`build_tiny_causal_lm(folder)` trains a byte-level BPE tokenizer (`TOKENIZER_VOCAB` tokens) on
the SYNTHETIC texts of `veil.data.instructions`, initialises a 2-layer, 64-wide GPT-2 from a
fixed seed, pretrains it briefly (`PRETRAIN_STEPS` steps of Adam, one thread) on SYNTHETIC
plain sentences stating the facts of the instruction set's tables ("The capital of France is
Paris.", "7 plus 5 is 12."), never in the instruction format, and saves both with
`save_pretrained` (about 10 s on one CPU core). So the base knows some facts but not how to
answer an instruction: that is what federated LoRA tuning teaches it. The same torch and
tokenizers versions on the same kind of CPU build the same files, so every party's frozen base
has the same fingerprint; in a deployment, build it once and give every party the folder.

`default_causal_lm_dir()` builds it once into a cache folder (``$VEIL_CACHE_DIR`` or
``~/.cache/veil``) and reuses it. To use a real model, point `model_dir` at any Hugging Face
causal LM folder (see docs/llm.md).

    python -m veil.models.tiny_lm FOLDER    # build it into FOLDER
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Final

import torch

__all__ = [
    "TINY_MODEL_NAME",
    "TOKENIZER_VOCAB",
    "build_tiny_causal_lm",
    "default_causal_lm_dir",
    "train_tokenizer",
]

#: The cache folder's name; the version changes whenever the built files would.
TINY_MODEL_NAME: Final[str] = "tiny-gpt2-instruct-v2"
TOKENIZER_VOCAB: Final[int] = 512
#: Longest sequence the tiny model takes (GPT-2's `n_positions`).
TINY_POSITIONS: Final[int] = 128
_SPECIAL: Final[tuple[str, ...]] = ("<|endoftext|>",)
#: Pretraining: steps, sentences per batch, Adam's learning rate, tokens per sentence at most.
PRETRAIN_STEPS: Final[int] = 600
_PRETRAIN_BATCH: Final[int] = 32
_PRETRAIN_LR: Final[float] = 3e-3
_PRETRAIN_LENGTH: Final[int] = 24


def default_causal_lm_dir() -> Path:
    """The tiny model's folder in the cache, built on first use (concurrent first uses are
    safe: each builds into a temporary folder and the first rename wins)."""
    root = Path(os.environ.get("VEIL_CACHE_DIR") or Path.home() / ".cache" / "veil")
    folder = root / "models" / TINY_MODEL_NAME
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{TINY_MODEL_NAME}-", dir=folder.parent))
    try:
        build_tiny_causal_lm(staging)
        try:
            staging.rename(folder)
        except OSError:
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def build_tiny_causal_lm(folder: Path) -> Path:
    """Build the tiny GPT-2 and its tokenizer into `folder` (module docstring); return it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from veil.data.instructions import fact_sentences
    from veil.models.transformer import quietly

    facts = fact_sentences(8000, seed=54321)
    tokenizer = train_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=TINY_POSITIONS,
        n_layer=2,
        n_head=2,
        n_embd=64,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        # No dropout: training draws no randomness outside the run's seeded generators, so a
        # run on this model is reproducible.
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config)
        quietly(lambda: _pretrain(model, tokenizer, facts))
    folder.mkdir(parents=True, exist_ok=True)
    quietly(lambda: model.save_pretrained(folder))  # no progress bar
    tokenizer.save_pretrained(folder)
    return folder


def train_tokenizer() -> Any:
    """A byte-level BPE tokenizer of `TOKENIZER_VOCAB` tokens (any text encodes; unseen words
    take more tokens), trained on the SYNTHETIC fact sentences and instruction pairs of
    `veil.data.instructions`, with "<|endoftext|>" as end-of-text and padding token. The same
    tokenizers version trains the same tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from veil.data.instructions import PROMPT_TEMPLATE, fact_sentences, synthetic_instructions

    pairs = synthetic_instructions(4000, seed=12345)
    corpus = fact_sentences(8000, seed=54321) + [
        PROMPT_TEMPLATE.format(instruction=i) + r
        for i, r in zip(pairs.instructions, pairs.responses, strict=True)
    ]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=list(_SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=core, eos_token=_SPECIAL[0], bos_token=_SPECIAL[0], pad_token=_SPECIAL[0]
    )


def _pretrain(model: torch.nn.Module, tokenizer: Any, sentences: list[str]) -> None:
    """Full next-token training of `model` on `sentences` (module docstring), deterministic:
    one thread, batches drawn from the torch seed the caller fixed."""
    eos = tokenizer.eos_token_id
    rows = [[*ids, eos][:_PRETRAIN_LENGTH] for ids in tokenizer(sentences)["input_ids"]]
    tokens = torch.full((len(rows), _PRETRAIN_LENGTH), eos, dtype=torch.long)
    labels = torch.full((len(rows), _PRETRAIN_LENGTH), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
        labels[i, : len(row)] = torch.tensor(row)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        optimiser = torch.optim.Adam(model.parameters(), lr=_PRETRAIN_LR)
        model.train()
        for _ in range(PRETRAIN_STEPS):
            idx = torch.randint(0, len(rows), (_PRETRAIN_BATCH,))
            loss = model(input_ids=tokens[idx], labels=labels[idx]).loss
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    finally:
        torch.set_num_threads(threads)
    model.train(False)


if __name__ == "__main__":  # pragma: no cover - a command-line convenience
    if len(sys.argv) != 2:
        sys.exit("usage: python -m veil.models.tiny_lm FOLDER")
    print(build_tiny_causal_lm(Path(sys.argv[1])))
