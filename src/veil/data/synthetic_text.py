"""A SYNTHETIC text classification corpus: short product reviews generated from templates.

No package installed here ships a real text classification data set offline, so the transformer
examples and tests use this corpus. It is generated, not collected: every `Dataset` made from it is
named ``"synthetic-reviews"`` and has ``synthetic=True``.

Each review combines a product, an opinion phrase of its class (negative / positive) and neutral
filler; a fraction `label_noise` of the labels is flipped, so that no model reaches 100 %.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from veil.data.corpus import TextCorpus, tokenized
from veil.data.dataset import Dataset

CLASS_NAMES = ("negative", "positive")

_PRODUCTS = (
    "blender", "laptop", "kettle", "backpack", "headphones", "printer", "bicycle", "lamp",
    "camera", "chair", "router", "jacket", "toaster", "monitor", "drill", "tent",
)  # fmt: skip
_OPINIONS = (
    (
        "broke after a week", "is a waste of money", "stopped working quickly",
        "arrived damaged", "is noisy and slow", "disappointed me badly", "feels cheap and flimsy",
        "was returned for a refund", "never worked properly", "is the worst I have owned",
    ),
    (
        "works perfectly", "is worth every penny", "exceeded my expectations",
        "arrived early and intact", "is quiet and fast", "made me very happy",
        "feels solid and well built", "is the best I have owned", "works great every day",
        "is an excellent purchase",
    ),
)  # fmt: skip
_FILLERS = (
    "I bought it last month.", "My sister uses one too.", "It came in a blue box.",
    "I use it at home.", "Delivery took three days.", "I got it on sale.", "",
)  # fmt: skip


def synthetic_reviews(
    n_examples: int, *, seed: int, label_noise: float = 0.05
) -> tuple[list[str], np.ndarray]:
    """`n_examples` SYNTHETIC reviews and their labels (0 negative, 1 positive), balanced."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n_examples) % 2).astype(np.int64)
    texts = []
    for label in labels:
        product = _PRODUCTS[rng.integers(len(_PRODUCTS))]
        opinion = _OPINIONS[label][rng.integers(len(_OPINIONS[label]))]
        filler = _FILLERS[rng.integers(len(_FILLERS))]
        texts.append(f"The {product} {opinion}. {filler}".strip())
    flip = rng.random(n_examples) < label_noise
    labels[flip] = 1 - labels[flip]
    return texts, labels


def make_synthetic_text_dataset(
    tokenizer: Any, n_examples: int = 400, *, max_length: int = 16, seed: int = 0
) -> Dataset:
    """The SYNTHETIC review corpus tokenised with `tokenizer`: features are token ids (n, L)."""
    texts, labels = synthetic_reviews(n_examples, seed=seed)
    corpus = TextCorpus("synthetic-reviews", tuple(texts), labels, CLASS_NAMES, synthetic=True)
    return tokenized(corpus, tokenizer, max_length)
