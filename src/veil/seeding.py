"""Deterministic seeds for simulation: every random choice in a run derives from the run's seed.

Choices are keyed by what they are for (selection, dropout, shuffling) and by round and client,
so a run is reproducible, and a resumed run draws what the uninterrupted one would have drawn.
These seeds drive data shuffling and client selection only: DP noise and cryptographic keys never
come from here.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch


class Purpose(IntEnum):
    """What a derived seed is used for; keeps streams for different purposes independent."""

    PARTITION = 1
    MODEL_INIT = 2
    SELECT_FIT = 3
    SELECT_EVALUATE = 4
    DROPOUT = 5
    LOCAL_TRAINING = 6
    BASELINE = 7
    ATTACK = 8
    STRAGGLER = 9


def derive_seed(root: int, purpose: Purpose, *keys: int) -> int:
    """A 63-bit seed determined by the root seed, the purpose and the keys (round, client, ...)."""
    state = np.random.SeedSequence([root, int(purpose), *keys]).generate_state(2, np.uint32)
    return (int(state[0]) << 31 | int(state[1])) & (2**63 - 1)


def numpy_rng(root: int, purpose: Purpose, *keys: int) -> np.random.Generator:
    """A NumPy generator for (root, purpose, keys)."""
    return np.random.default_rng(derive_seed(root, purpose, *keys))


def torch_generator(root: int, purpose: Purpose, *keys: int) -> torch.Generator:
    """A CPU torch generator for (root, purpose, keys)."""
    return torch.Generator().manual_seed(derive_seed(root, purpose, *keys))
