"""A causal language model's run (`[model] name = "causal_lm"`): its instruction data, and what
result.json adds for it: the base model's scores and greedy generations for fixed prompts.

`language_model_record` gives result.json's ``language_model`` section:

- ``base``: the frozen base model's loss, perplexity and token accuracy on the held-out test
  set (the run's initial model: peft starts every LoRA B at zero, so the adapted model computes
  exactly what the base does);
- ``generations``: ``[{prompt, output}]``, the final model's greedy answers to a few fixed
  instructions (`veil.data.instructions.FIXED_PROMPTS` for the synthetic set; for JSON Lines
  data the first instruction of each organisation's file);
- ``model_dir``: the model folder's name (not its path); ``max_length``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from veil.assembly.model import model as build_run_model
from veil.assembly.model import run_objective
from veil.config import RunConfig
from veil.data import FederatedData, build_federated_data
from veil.data.instructions import (
    FIXED_PROMPTS,
    instruction_dataset,
    organisation_pairs,
    organisations_token_data,
    synthetic_instructions,
    token_federated_data,
)
from veil.errors import DataError
from veil.federation.training import as_tensors, evaluate
from veil.models import set_parameters
from veil.models.transformer import CausalLM, greedy_generate, load_tokenizer
from veil.seeding import Purpose, derive_seed
from veil.tensors import NamedArrays

__all__ = ["causal_model_dir", "instruction_data", "language_model_record"]

#: Pairs in the built-in SYNTHETIC instruction set.
SYNTHETIC_PAIRS = 1200
#: Most new tokens of a generation in result.json.
GENERATION_TOKENS = 16


def causal_model_dir(config: RunConfig) -> Path:
    """The causal LM's folder: `[model] model_dir`, else the tiny GPT-2 (built on first use)."""
    if config.model.model_dir is not None:
        return config.model.model_dir
    from veil.models.tiny_lm import default_causal_lm_dir

    return default_causal_lm_dir()


def instruction_data(config: RunConfig) -> FederatedData:
    """The run's instruction pairs, tokenised by the model's tokenizer and split: the SYNTHETIC
    set by `[data] partition` over its topics (a Dirichlet partition gives each organisation its
    own mix of topics), or each organisation's own JSON Lines file."""
    d = config.data
    tokenizer = load_tokenizer(causal_model_dir(config))
    seed = derive_seed(config.seed, Purpose.PARTITION)
    if d.dataset == "instructions":
        assert d.organisations is not None  # the config requires them
        return organisations_token_data(
            d.organisations,
            tokenizer,
            config.model.max_length,
            vocab_size=len(tokenizer),
            test_fraction=d.test_fraction,
            validation_fraction=d.validation_fraction,
            seed=seed,
        )
    pairs = synthetic_instructions(SYNTHETIC_PAIRS, seed=0)
    dataset, empty = instruction_dataset(pairs, tokenizer, config.model.max_length)
    if empty:
        raise DataError(
            f"{empty} instruction pairs keep no response token at max_length = "
            f"{config.model.max_length}; raise [model] max_length"
        )
    fed = build_federated_data(
        dataset,
        n_clients=config.federation.clients,
        partition=d.partition.kind,
        alpha=d.partition.alpha,
        test_fraction=d.test_fraction,
        validation_fraction=d.validation_fraction,
        scaling="none",
        seed=seed,
        min_examples=d.partition.min_examples,
    )
    return token_federated_data(fed, len(tokenizer))


def fixed_prompts(config: RunConfig) -> list[str]:
    """The instructions whose greedy answers result.json shows (module docstring)."""
    d = config.data
    if d.dataset == "instructions" and d.organisations is not None:
        return [pairs.instructions[0] for _, pairs in organisation_pairs(d.organisations)]
    return list(FIXED_PROMPTS)


def language_model_record(
    config: RunConfig, fed: FederatedData, final: NamedArrays
) -> dict[str, Any]:
    """result.json's ``language_model`` section (module docstring)."""
    from veil.data.instructions import PROMPT_TEMPLATE

    # The run's initial model (a resumed run's `initial` is its checkpoint's, not the base's).
    model = build_run_model(config, fed, seed=derive_seed(config.seed, Purpose.MODEL_INIT))
    assert isinstance(model, CausalLM)
    x, y = as_tensors(fed.x_test, fed.y_test)
    base = evaluate(model, x, y, fed.n_classes, run_objective(config, fed))
    set_parameters(model, final)
    tokenizer = load_tokenizer(causal_model_dir(config))
    generations = [
        {
            "prompt": prompt,
            "output": greedy_generate(
                model,
                tokenizer,
                PROMPT_TEMPLATE.format(instruction=prompt),
                max_new_tokens=GENERATION_TOKENS,
                max_length=config.model.max_length,
            ),
        }
        for prompt in fixed_prompts(config)
    ]
    return {
        "model_dir": causal_model_dir(config).name,
        "max_length": config.model.max_length,
        "base": base,
        "generations": generations,
    }
