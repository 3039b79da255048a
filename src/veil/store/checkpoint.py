"""Checkpoints: the global model and the strategy's state after a round, written atomically.

The format is safetensors (a JSON header and raw little-endian buffers), which holds no code, so
loading a checkpoint cannot execute anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save

from veil.errors import StoreError
from veil.store.atomic import atomic_write_bytes
from veil.tensors import NamedArrays

_PARAM = "parameters/"
_STATE = "strategy/"


@dataclass(frozen=True)
class Checkpoint:
    """A run's position after `round`: what a resumed run starts from."""

    run_id: str
    round: int
    parameters: NamedArrays
    strategy_state: NamedArrays
    meta: dict[str, Any]


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> None:
    """Write `checkpoint` to `path` atomically."""
    tensors = {
        **{_PARAM + k: np.ascontiguousarray(v) for k, v in checkpoint.parameters.items()},
        **{_STATE + k: np.ascontiguousarray(v) for k, v in checkpoint.strategy_state.items()},
    }
    header = {
        "run_id": checkpoint.run_id,
        "round": str(checkpoint.round),
        "meta": json.dumps(checkpoint.meta, sort_keys=True),
    }
    atomic_write_bytes(path, save(tensors, metadata=header), mode=0o600)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint`; `StoreError` if missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"no checkpoint at '{path}'")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            header = handle.metadata()
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        return Checkpoint(
            run_id=header["run_id"],
            round=int(header["round"]),
            parameters={k[len(_PARAM) :]: v for k, v in tensors.items() if k.startswith(_PARAM)},
            strategy_state={
                k[len(_STATE) :]: v for k, v in tensors.items() if k.startswith(_STATE)
            },
            meta=json.loads(header["meta"]),
        )
    except (SafetensorError, KeyError, ValueError, TypeError) as exc:
        raise StoreError(
            f"checkpoint '{path}' is unreadable ({exc}); delete it to start over"
        ) from None
