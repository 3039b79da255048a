"""Instruction data for a causal language model: (instruction, response) pairs, tokenised so
that the loss counts the response tokens only, and split among organisations.

Two sources:

- ``"synthetic_instructions"``: a SYNTHETIC instruction set generated deterministically from
  templates and small fixed tables (`synthetic_instructions`): arithmetic ("What is 7 plus
  5?" → "12"), unit conversions ("Convert 3 kilometres to metres." → "3000 metres"), capitals
  ("What is the capital of France?" → "Paris") and opposites ("What is the opposite of hot?" →
  "cold"). Each pair's topic is its class, so a Dirichlet partition gives organisations
  different mixes of topics (non-IID).
- ``"instructions"``: one JSON Lines file per organisation (`read_jsonl`), each line
  ``{"instruction": ..., "response": ...}`` (loss on the response) or ``{"text": ...}``
  (loss on every token: plain documents).

**Tokens.** A pair becomes ``prompt + response + end-of-text`` with ``prompt =
PROMPT_TEMPLATE.format(instruction=...)``, prompt and response tokenised separately (so the
prompt's tokens are those a generation starts from). Inputs are the first L tokens, labels the
next tokens, shifted by one: label ``t`` is token ``t + 1``. Labels of prompt positions and of
padding are `IGNORE_INDEX`; inputs are right-padded with the tokenizer's pad id. One pair is one
example, so under DP-SGD one record is one instruction pair.

The features handed to Veil's splitting are inputs and labels side by side, ``(n, 2L)`` float32
(token ids and -100 are exact in float32); `split_tokens` separates them again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import numpy as np

from veil.data.dataset import Dataset
from veil.data.federated import ClientData, FederatedData
from veil.errors import DataError

__all__ = [
    "FIXED_PROMPTS",
    "IGNORE_INDEX",
    "PROMPT_TEMPLATE",
    "TOPICS",
    "InstructionSet",
    "fact_sentences",
    "instruction_dataset",
    "organisations_token_data",
    "read_jsonl",
    "split_tokens",
    "synthetic_instructions",
    "token_federated_data",
    "tokenize_pairs",
]

IGNORE_INDEX: Final[int] = -100
PROMPT_TEMPLATE: Final[str] = "Instruction: {instruction}\nResponse: "
TOPICS: Final[tuple[str, ...]] = ("arithmetic", "units", "capitals", "opposites")
#: Instructions whose greedy answers every run writes to result.json (one per topic).
FIXED_PROMPTS: Final[tuple[str, ...]] = (
    "What is 7 plus 5?",
    "Convert 3 kilometres to metres.",
    "What is the capital of France?",
    "What is the opposite of hot?",
)

_CAPITALS: Final[tuple[tuple[str, str], ...]] = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Poland", "Warsaw"), ("Greece", "Athens"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Ireland", "Dublin"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"), ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Canada", "Ottawa"),
    ("Mexico", "Mexico City"), ("Cuba", "Havana"), ("Turkey", "Ankara"), ("Russia", "Moscow"),
)  # fmt: skip
_UNITS: Final[tuple[tuple[str, str, int], ...]] = (
    ("kilometres", "metres", 1000), ("metres", "centimetres", 100), ("kilograms", "grams", 1000),
    ("hours", "minutes", 60), ("minutes", "seconds", 60), ("litres", "millilitres", 1000),
    ("days", "hours", 24), ("weeks", "days", 7), ("metres", "millimetres", 1000),
)  # fmt: skip
_OPPOSITES: Final[tuple[tuple[str, str], ...]] = (
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("light", "dark"),
    ("early", "late"), ("happy", "sad"), ("open", "closed"), ("full", "empty"), ("old", "new"),
    ("hard", "soft"), ("high", "low"), ("long", "short"), ("near", "far"), ("rich", "poor"),
    ("wet", "dry"), ("strong", "weak"), ("clean", "dirty"), ("loud", "quiet"), ("thick", "thin"),
)  # fmt: skip
_OPERATIONS: Final[tuple[tuple[str, Any], ...]] = (
    ("plus", lambda a, b: a + b), ("minus", lambda a, b: a - b), ("times", lambda a, b: a * b),
)  # fmt: skip


@dataclass(frozen=True)
class InstructionSet:
    """Instruction pairs, each with a topic (its class for splitting). An empty instruction
    marks a plain document (`response` holds the text; every token counts)."""

    name: str
    instructions: tuple[str, ...]
    responses: tuple[str, ...]
    topics: np.ndarray
    topic_names: tuple[str, ...]
    synthetic: bool


def synthetic_instructions(n: int, seed: int = 0) -> InstructionSet:
    """`n` SYNTHETIC instruction pairs, the same for the same `n` and `seed`: topics in turn
    (arithmetic, units, capitals, opposites), each pair drawn from its topic's templates."""
    rng = np.random.default_rng(seed)
    instructions, responses, topics = [], [], []
    for i in range(n):
        topic = i % len(TOPICS)
        instruction, response = _SYNTHETIC[topic](rng)
        instructions.append(instruction)
        responses.append(response)
        topics.append(topic)
    return InstructionSet(
        "synthetic-instructions",
        tuple(instructions),
        tuple(responses),
        np.asarray(topics, dtype=np.int64),
        TOPICS,
        synthetic=True,
    )


def _arithmetic(rng: np.random.Generator) -> tuple[str, str]:
    name, op = _OPERATIONS[int(rng.integers(len(_OPERATIONS)))]
    a, b = (int(v) for v in rng.integers(0, 13, size=2))
    return f"What is {a} {name} {b}?", str(op(a, b))


def _units(rng: np.random.Generator) -> tuple[str, str]:
    big, small, factor = _UNITS[int(rng.integers(len(_UNITS)))]
    amount = int(rng.integers(1, 10))
    return f"Convert {amount} {big} to {small}.", f"{amount * factor} {small}"


def _capitals(rng: np.random.Generator) -> tuple[str, str]:
    country, capital = _CAPITALS[int(rng.integers(len(_CAPITALS)))]
    if rng.random() < 0.5:
        return f"What is the capital of {country}?", capital
    return f"Name the capital city of {country}.", capital


def _opposites(rng: np.random.Generator) -> tuple[str, str]:
    word, other = _OPPOSITES[int(rng.integers(len(_OPPOSITES)))]
    if rng.random() < 0.5:
        word, other = other, word
    return f"What is the opposite of {word}?", other


_SYNTHETIC: Final = (_arithmetic, _units, _capitals, _opposites)


def fact_sentences(n: int, seed: int = 0) -> list[str]:
    """`n` SYNTHETIC plain sentences stating the facts of the instruction set's tables ("7 plus
    5 is 12.", "The capital of France is Paris.", ...), not in the instruction format: the
    text the tiny base model of `veil.models.tiny_lm` is pretrained on."""
    rng = np.random.default_rng(seed)
    sentences = []
    for i in range(n):
        instruction, response = _SYNTHETIC[i % len(TOPICS)](rng)
        sentences.append(_as_statement(instruction, response))
    return sentences


def _as_statement(instruction: str, response: str) -> str:
    if instruction.startswith("What is the capital of "):
        return f"The capital of {instruction[23:-1]} is {response}."
    if instruction.startswith("Name the capital city of "):
        return f"{response} is the capital city of {instruction[25:-1]}."
    if instruction.startswith("What is the opposite of "):
        return f"The opposite of {instruction[24:-1]} is {response}."
    if instruction.startswith("Convert "):
        amount_unit = instruction[8:].split(" to ")[0]
        return f"{amount_unit} is {response}."
    return f"{instruction[8:-1]} is {response}."  # "What is 7 plus 5?" -> "7 plus 5 is 12."


def read_jsonl(path: Path, *, name: str = "instructions") -> InstructionSet:
    """The pairs of one JSON Lines file: per line an object with "instruction" and "response"
    strings, or with a "text" string (a plain document). All in one topic ("file")."""
    instructions: list[str] = []
    responses: list[str] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}; give a UTF-8 JSON Lines file") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        instruction, response = _pair(line, path, number)
        instructions.append(instruction)
        responses.append(response)
    if not responses:
        raise DataError(f"{path} holds no instruction pairs; one JSON object per line")
    return InstructionSet(
        name,
        tuple(instructions),
        tuple(responses),
        np.zeros(len(responses), dtype=np.int64),
        ("file",),
        synthetic=False,
    )


def _pair(line: str, path: Path, number: int) -> tuple[str, str]:
    where = f"{path.name} line {number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where} is not JSON: {exc.msg}") from exc
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected a JSON object")
    if isinstance(row.get("text"), str) and "instruction" not in row:
        return "", str(row["text"])
    instruction, response = row.get("instruction"), row.get("response")
    if not isinstance(instruction, str) or not isinstance(response, str):
        raise DataError(f'{where}: give "instruction" and "response" strings, or a "text" string')
    return instruction, response


def tokenize_pairs(
    tokenizer: Any, instructions: Sequence[str], responses: Sequence[str], max_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Inputs (n, `max_length`) float32 and labels (n, `max_length`) int64 of the pairs (module
    docstring): labels are the next tokens, `IGNORE_INDEX` on prompt and padding positions."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if eos is None:
        raise DataError("the tokenizer has no end-of-text token; save the model with one")
    n = len(responses)
    x = np.full((n, max_length), pad, dtype=np.float32)
    y = np.full((n, max_length), IGNORE_INDEX, dtype=np.int64)
    prompts = [PROMPT_TEMPLATE.format(instruction=i) if i else "" for i in instructions]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if n else []
    response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"] if n else []
    for row, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        full = [*p, *r, eos][: max_length + 1]
        x[row, : len(full) - 1] = full[:-1]
        first = max(len(p) - 1, 0)  # label t is token t + 1: the first response token's slot
        y[row, first : len(full) - 1] = full[first + 1 :]
    return x, y


def instruction_dataset(
    pairs: InstructionSet, tokenizer: Any, max_length: int
) -> tuple[Dataset, int]:
    """`pairs` as a `Dataset` whose features are inputs and labels side by side (n, 2L) and
    whose classes are the topics; and how many pairs kept no response token (a prompt longer
    than `max_length`), which train nothing."""
    x, y = tokenize_pairs(tokenizer, pairs.instructions, pairs.responses, max_length)
    empty = int(((y != IGNORE_INDEX).sum(axis=1) == 0).sum())
    names = (*(f"input_{i}" for i in range(max_length)), *(f"label_{i}" for i in range(max_length)))
    topic_names = pairs.topic_names if len(pairs.topic_names) >= 2 else (*pairs.topic_names, "-")
    dataset = Dataset(
        name=pairs.name,
        features=np.concatenate([x, y.astype(np.float32)], axis=1),
        labels=pairs.topics,
        feature_names=tuple(names),
        class_names=topic_names,
        synthetic=pairs.synthetic,
    )
    return dataset, empty


def split_tokens(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inputs (n, L) float32 and labels (n, L) int64 from side-by-side features (n, 2L)."""
    width = features.shape[1] // 2
    return (
        np.ascontiguousarray(features[:, :width], dtype=np.float32),
        features[:, width:].astype(np.int64),
    )


def token_federated_data(fed: FederatedData, vocab_size: int) -> FederatedData:
    """`fed` (split from an `instruction_dataset`) with every client's and the test set's
    features cut back into inputs and token labels; `n_classes` becomes the vocabulary size
    (the model's outputs per position), the topics stay as `class_names`."""
    clients = []
    for c in fed.clients:
        x_train, y_train = split_tokens(c.x_train)
        x_val, y_val = split_tokens(c.x_val)
        clients.append(
            ClientData(c.name, x_train, y_train, x_val, y_val, c.preprocessing, file=c.file)
        )
    x_test, y_test = split_tokens(fed.x_test)
    return replace(
        fed,
        clients=clients,
        x_test=x_test,
        y_test=y_test,
        n_features=int(x_test.shape[1]),
        n_classes=vocab_size,
        feature_names=fed.feature_names[: x_test.shape[1]],
        x_test_raw=None,
    )


def organisation_pairs(files: Mapping[str, Path]) -> list[tuple[str, InstructionSet]]:
    """Each organisation's pairs, from its JSON Lines file."""
    return [(name, read_jsonl(path, name=name)) for name, path in files.items()]


def organisations_token_data(
    files: Mapping[str, Path],
    tokenizer: Any,
    max_length: int,
    *,
    vocab_size: int,
    test_fraction: float,
    validation_fraction: float,
    seed: int,
) -> FederatedData:
    """A federation whose organisations each train on their own JSON Lines file: from each
    file a random `test_fraction` of the pairs joins the held-out test set, and a random
    `validation_fraction` of the rest stays for the organisation's own validation (the same
    `seed` gives the same split)."""
    rng = np.random.default_rng(seed)
    clients: list[ClientData] = []
    tests: list[tuple[np.ndarray, np.ndarray]] = []
    for name, pairs in organisation_pairs(files):
        x, y = tokenize_pairs(tokenizer, pairs.instructions, pairs.responses, max_length)
        order = rng.permutation(len(x))
        n_test = min(round(test_fraction * len(x)), len(x) - 1)
        n_val = min(round(validation_fraction * (len(x) - n_test)), len(x) - n_test - 1)
        test, val, train = np.split(order, [n_test, n_test + n_val])
        tests.append((x[test], y[test]))
        clients.append(ClientData(name, x[train], y[train], x[val], y[val], file=files[name].name))
    return FederatedData(
        dataset_name="instructions",
        synthetic=False,
        n_features=max_length,
        n_classes=vocab_size,
        image_shape=None,
        feature_names=tuple(f"input_{i}" for i in range(max_length)),
        class_names=("file", "-"),
        clients=clients,
        x_test=np.concatenate([t[0] for t in tests]),
        y_test=np.concatenate([t[1] for t in tests]),
        scaling="none",
    )
