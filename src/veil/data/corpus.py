"""A labelled text corpus, and its tokenisation into a Veil `Dataset` of token ids.

Shared by the named corpora of `veil.data.text` and the generator of `veil.data.synthetic_text`,
which both build a `TextCorpus` and tokenise it with a model's own tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from veil.data.dataset import Dataset
from veil.errors import DataError

__all__ = ["TextCorpus", "tokenized"]


@dataclass(frozen=True)
class TextCorpus:
    """Labelled texts: ``labels[i]`` (0..k-1) names ``class_names[labels[i]]`` for ``texts[i]``."""

    name: str
    texts: tuple[str, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]
    synthetic: bool


def tokenized(corpus: TextCorpus, tokenizer: Any, max_length: int) -> Dataset:
    """`corpus` tokenised by `tokenizer` into a `Dataset` of token ids (n, `max_length`)."""
    from veil.models.transformer import tokenize  # torch loads only when texts are tokenised

    if max_length < 2:
        raise DataError(
            f"max_length must be at least 2 (room for the special tokens), got {max_length}"
        )
    return Dataset(
        name=corpus.name,
        features=tokenize(tokenizer, corpus.texts, max_length),
        labels=corpus.labels,
        feature_names=tuple(f"token_{i}" for i in range(max_length)),
        class_names=corpus.class_names,
        synthetic=corpus.synthetic,
    )
