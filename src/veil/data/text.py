"""Text classification corpora, tokenised with a model's own tokenizer into a Veil `Dataset`.

Two corpora are built in; neither is downloaded:

- ``"vader_lexicon"``: the 7,520 entries of the VADER sentiment lexicon that the PyPI package
  `vaderSentiment` ships (Hutto & Gilbert 2014, "VADER: A Parsimonious Rule-based Model for
  Sentiment Analysis of Social Media Text", ICWSM; MIT licence): words, slang, acronyms and
  emoticons, each rated from -4 to +4 by ten human raters. The label is the sign of the mean
  rating (no entry has mean 0): 4,173 negative, 3,347 positive. Real, human-labelled data.
- ``"synthetic_reviews"``: SYNTHETIC product reviews generated from templates
  (`veil.data.synthetic_text`); a `Dataset` made from it has ``synthetic=True``.

Features are token ids padded with the tokenizer's pad id, as float32 (ids below 2²⁴ are exact),
so they must never be scaled: `load_text_dataset` is the only way in.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Sequence
from typing import Any, Final

import numpy as np

from veil.config import TEXT_DATASETS
from veil.data.corpus import TextCorpus, tokenized
from veil.data.dataset import Dataset
from veil.data.synthetic_text import CLASS_NAMES, synthetic_reviews
from veil.errors import DataError

__all__ = ["TEXT_DATASET_NAMES", "TextCorpus", "load_text", "load_text_dataset"]

TEXT_DATASET_NAMES: Final[tuple[str, ...]] = TEXT_DATASETS
"""The names that `load_text` accepts (the config's `TEXT_DATASETS`)."""

#: Examples in the built-in synthetic corpus.
_SYNTHETIC_REVIEWS: Final[int] = 4000


def load_text(name: str) -> TextCorpus:
    """The built-in corpus `name` (one of `TEXT_DATASET_NAMES`); DataError otherwise, or when
    the package that ships it is not installed."""
    if name == "vader_lexicon":
        return _vader_lexicon()
    if name == "synthetic_reviews":
        texts, labels = synthetic_reviews(_SYNTHETIC_REVIEWS, seed=0)
        return TextCorpus("synthetic-reviews", tuple(texts), labels, CLASS_NAMES, synthetic=True)
    raise DataError(
        f"unknown text dataset {name!r}; choose one of: {', '.join(TEXT_DATASET_NAMES)}"
    )


def load_text_dataset(name: str, tokenizer: Any, max_length: int) -> Dataset:
    """The corpus `name` as token ids (n, `max_length`) from `tokenizer`, truncated and padded."""
    return tokenized(load_text(name), tokenizer, max_length)


def _vader_lexicon() -> TextCorpus:
    try:
        lexicon = importlib.resources.files("vaderSentiment").joinpath("vader_lexicon.txt")
        text = lexicon.read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise DataError(
            "dataset 'vader_lexicon' needs the 'vaderSentiment' package, which ships it: "
            "pip install 'veil[llm]'"
        ) from exc
    texts, ratings = _parse_lexicon(text.splitlines())
    labels = (np.asarray(ratings) > 0).astype(np.int64)
    return TextCorpus("vader-lexicon", tuple(texts), labels, ("negative", "positive"), False)


def _parse_lexicon(lines: Sequence[str]) -> tuple[list[str], list[float]]:
    """(token, mean rating) of each tab-separated lexicon line, skipping zero means."""
    texts: list[str] = []
    ratings: list[float] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        try:
            token, mean = fields[0], float(fields[1])
        except (IndexError, ValueError) as exc:
            raise DataError(f"vader_lexicon.txt line {number} is malformed: {line[:60]!r}") from exc
        if mean != 0:
            texts.append(token)
            ratings.append(mean)
    return texts, ratings
