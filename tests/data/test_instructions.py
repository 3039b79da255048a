"""Instruction data for causal LMs (`veil.data.instructions`) and the token-level objective.

Data: the SYNTHETIC instruction set and a byte-level BPE tokenizer trained here from it
(`veil.models.tiny_lm.train_tokenizer`, no download).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from extras import require
from veil.data import build_federated_data
from veil.data.instructions import (
    IGNORE_INDEX,
    PROMPT_TEMPLATE,
    TOPICS,
    instruction_dataset,
    organisations_token_data,
    read_jsonl,
    synthetic_instructions,
    token_federated_data,
    tokenize_pairs,
)
from veil.errors import DataError
from veil.federation.objective import TOKEN_CROSS_ENTROPY, token_metrics, token_sums

require("transformers")


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from veil.models.tiny_lm import train_tokenizer

    return train_tokenizer()


def test_synthetic_set_is_deterministic_labelled_and_correct() -> None:
    pairs = synthetic_instructions(200, seed=3)
    again = synthetic_instructions(200, seed=3)
    assert pairs.instructions == again.instructions and pairs.responses == again.responses
    assert pairs.synthetic and "synthetic" in pairs.name
    assert np.bincount(pairs.topics).tolist() == [50] * len(TOPICS)
    for instruction, response in zip(pairs.instructions, pairs.responses, strict=True):
        if instruction.startswith("What is ") and instruction.split()[3] == "plus":
            a, b = int(instruction.split()[2]), int(instruction.split()[4].rstrip("?"))
            assert int(response) == a + b
    assert synthetic_instructions(200, seed=4).instructions != pairs.instructions


def test_labels_count_response_tokens_only(tokenizer: Any) -> None:
    instructions, responses = ["What is 2 plus 3?", ""], ["5", "The capital of Peru is Lima."]
    x, y = tokenize_pairs(tokenizer, instructions, responses, max_length=24)
    assert x.shape == y.shape == (2, 24) and x.dtype == np.float32 and y.dtype == np.int64
    prompt = tokenizer(PROMPT_TEMPLATE.format(instruction=instructions[0]))["input_ids"]
    answer = tokenizer("5")["input_ids"]
    eos = tokenizer.eos_token_id
    full = [*prompt, *answer, eos]
    # Inputs: the pair's tokens then padding; labels: the next token at response positions only.
    assert x[0, : len(full) - 1].astype(int).tolist() == full[:-1]
    counted = np.flatnonzero(y[0] != IGNORE_INDEX)
    assert counted.tolist() == list(range(len(prompt) - 1, len(full) - 1))
    assert y[0, counted].tolist() == [*answer, eos]
    # A plain text (no instruction): every next token counts.
    text = tokenizer(responses[1])["input_ids"]
    assert y[1, : len(text)].tolist() == [*text[1:], eos]
    assert (y[1, len(text) :] == IGNORE_INDEX).all()


def test_a_prompt_longer_than_max_length_keeps_no_response(tokenizer: Any) -> None:
    pairs = synthetic_instructions(8)
    dataset, empty = instruction_dataset(pairs, tokenizer, max_length=4)
    assert empty == 8 and dataset.features.shape == (8, 8)


def test_split_keeps_topics_skewed_and_tokens_intact(tokenizer: Any) -> None:
    pairs = synthetic_instructions(400)
    dataset, empty = instruction_dataset(pairs, tokenizer, max_length=24)
    assert empty == 0
    fed = build_federated_data(
        dataset,
        n_clients=3,
        partition="dirichlet",
        alpha=0.3,
        test_fraction=0.2,
        validation_fraction=0.1,
        scaling="none",
        seed=0,
    )
    tokens = token_federated_data(fed, len(tokenizer))
    assert tokens.n_features == 24 and tokens.n_classes == len(tokenizer)
    assert tokens.x_test.shape == tokens.y_test.shape == (80, 24)
    inputs, labels = tokenize_pairs(tokenizer, pairs.instructions, pairs.responses, 24)
    known = {tuple(row) for row in np.concatenate([inputs, labels], axis=1).tolist()}
    for client in tokens.clients:
        assert client.y_train.dtype == np.int64
        rows = np.concatenate([client.x_train, client.y_train], axis=1).tolist()
        assert all(tuple(row) in known for row in rows)
    # Non-IID: before the tokens were cut apart the labels were topics; their mixes differ.
    mixes = [np.bincount(c.y_train, minlength=len(TOPICS)) / c.n_train for c in fed.clients]
    assert max(float(np.abs(mixes[i] - mixes[j]).max()) for i, j in ((0, 1), (0, 2), (1, 2))) > 0.2


def test_jsonl_files_per_organisation(tmp_path: Path, tokenizer: Any) -> None:
    rows = [{"instruction": f"What is {i} plus 1?", "response": str(i + 1)} for i in range(20)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "Lima is in Peru."}) + "\n" * 3)
    fed = organisations_token_data(
        {"a": tmp_path / "a.jsonl", "b": tmp_path / "b.jsonl"},
        tokenizer,
        16,
        vocab_size=len(tokenizer),
        test_fraction=0.2,
        validation_fraction=0.0,
        seed=0,
    )
    assert [c.name for c in fed.clients] == ["a", "b"]
    assert [c.n_train for c in fed.clients] == [16, 1]  # b's only line trains, none is held out
    assert fed.y_test.shape == (4, 16) and fed.clients[0].file == "a.jsonl"
    (tmp_path / "bad.jsonl").write_text('{"instruction": "no response"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl line 1"):
        read_jsonl(tmp_path / "bad.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no instruction pairs"):
        read_jsonl(tmp_path / "empty.jsonl")


def test_token_objective_counts_response_tokens_only() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 5, generator=generator)
    y = torch.randint(0, 7, (3, 5), generator=generator)
    y[0, :2] = IGNORE_INDEX
    y[2, :] = IGNORE_INDEX  # no response token at all
    keep = y != IGNORE_INDEX
    token_losses = F.cross_entropy(logits, y.clamp(min=0), reduction="none")
    expected_mean = float(token_losses[keep].mean())
    assert float(TOKEN_CROSS_ENTROPY(logits, y)) == pytest.approx(expected_mean, rel=1e-6)
    per = TOKEN_CROSS_ENTROPY.per_example(logits, y)
    assert per.shape == (3,)
    assert float(per[0]) == pytest.approx(float(token_losses[0, 2:].mean()), rel=1e-6)
    assert float(per[2]) == 0.0  # an example without response tokens contributes nothing
    loss_sum, correct, counted = token_sums(logits, y)
    assert counted == int(keep.sum()) == 8
    assert correct == int(((logits.argmax(1) == y) & keep).sum())
    metrics = token_metrics(loss_sum, correct, counted)
    assert metrics["perplexity"] == pytest.approx(np.exp(expected_mean), rel=1e-6)
    assert token_metrics(0.0, 0, 0) == {}
