"""Checkpoints: the global model and the strategy's state after a round, written atomically.

The format is safetensors (a JSON header and raw little-endian buffers), which holds no code, so
loading a checkpoint cannot execute anything. With a key, the file is sealed with AES-256-GCM
envelope encryption (`veil.crypto.envelope`): unreadable and tamper-evident at rest.

With differential privacy the checkpoint also carries the privacy account (the accountant's
composed events and the ledger charges the run made, as JSON in the header), so a resumed run
continues the same account; and the checkpointed round's result row, so the run store can be
completed if the process died between the two writes.

Safetensors stores tensors by name, not in the order given; the header keeps the order of the
parameters and of the strategy's state, so a resumed run gets them back in the model's order
(a deployment's members check the parameter layout, order included, when they join).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

from veil.atomic import atomic_write_bytes
from veil.crypto.envelope import MAGIC, SealedDataError, open_sealed, seal
from veil.errors import StoreError
from veil.tensors import NamedArrays

_PARAM = "parameters/"
_STATE = "strategy/"
_AAD = b"veil-checkpoint-v1"


#: The checkpoint file of a run folder.
CHECKPOINT_FILE = "checkpoint.safetensors"


@dataclass(frozen=True)
class Checkpoint:
    """A run's position after `round`: what a resumed run starts from."""

    run_id: str
    round: int
    parameters: NamedArrays
    strategy_state: NamedArrays
    meta: dict[str, Any]
    #: The privacy account after `round` (JSON data; None without DP or from an older Veil).
    privacy: dict[str, Any] | None = None
    #: `round`'s row of `result.json` (`RoundResult` as JSON data), if the writer gave it.
    round_result: dict[str, Any] | None = None


def save_checkpoint(path: str | Path, checkpoint: Checkpoint, *, key: bytes | None = None) -> None:
    """Write `checkpoint` to `path` atomically; sealed under `key` when one is given.

    A model or strategy state holding NaN or Inf is refused (`StoreError`): a resumed run must
    never start from a poisoned model."""
    for kind, arrays in (
        ("parameter", checkpoint.parameters),
        ("strategy state", checkpoint.strategy_state),
    ):
        for name, arr in arrays.items():
            if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
                raise StoreError(
                    f"refusing to checkpoint round {checkpoint.round}: {kind} '{name}' is not "
                    "finite (NaN or Inf)"
                )
    tensors = {
        **{_PARAM + k: np.ascontiguousarray(v) for k, v in checkpoint.parameters.items()},
        **{_STATE + k: np.ascontiguousarray(v) for k, v in checkpoint.strategy_state.items()},
    }
    header = {
        "run_id": checkpoint.run_id,
        "round": str(checkpoint.round),
        "meta": json.dumps(checkpoint.meta, sort_keys=True),
        "order": json.dumps(
            {"parameters": list(checkpoint.parameters), "strategy": list(checkpoint.strategy_state)}
        ),
    }
    if checkpoint.privacy is not None:
        header["privacy"] = json.dumps(checkpoint.privacy, sort_keys=True, allow_nan=False)
    if checkpoint.round_result is not None:
        header["round_result"] = json.dumps(checkpoint.round_result, sort_keys=True)
    raw = save(tensors, metadata=header)
    if key is not None:
        raw = seal(raw, key, associated_data=_AAD)
    atomic_write_bytes(path, raw, mode=0o600)


def load_checkpoint(path: str | Path, *, key: bytes | None = None) -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint`; `StoreError` if missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"no checkpoint at '{path}'")
    raw = path.read_bytes()
    if raw.startswith(MAGIC):
        if key is None:
            raise StoreError(
                f"checkpoint '{path}' is encrypted; give the key file it was sealed with"
            )
        try:
            raw = open_sealed(raw, key, associated_data=_AAD)
        except SealedDataError as exc:
            raise StoreError(f"checkpoint '{path}': {exc}") from None
    try:
        tensors = load(raw)
        size = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + size])["__metadata__"]
        order = _object(header.get("order")) or {}
        return Checkpoint(
            run_id=header["run_id"],
            round=int(header["round"]),
            parameters=_ordered(
                {k[len(_PARAM) :]: v for k, v in tensors.items() if k.startswith(_PARAM)},
                order.get("parameters"),
            ),
            strategy_state=_ordered(
                {k[len(_STATE) :]: v for k, v in tensors.items() if k.startswith(_STATE)},
                order.get("strategy"),
            ),
            meta=json.loads(header["meta"]),
            privacy=_object(header.get("privacy")),
            round_result=_object(header.get("round_result")),
        )
    except (SafetensorError, KeyError, ValueError, TypeError) as exc:
        raise StoreError(
            f"checkpoint '{path}' is unreadable ({exc}); delete it to start over"
        ) from None


def _ordered(arrays: NamedArrays, order: object) -> NamedArrays:
    """`arrays` in the saved `order` (a checkpoint from an older Veil has none: as stored)."""
    if order is None:
        return arrays
    if not isinstance(order, list) or sorted(map(str, order)) != sorted(arrays):
        raise ValueError("the header's tensor order does not name the tensors it holds")
    return {name: arrays[name] for name in order}


def _object(text: str | None) -> dict[str, Any] | None:
    """A JSON object from the header, or None when absent."""
    if text is None:
        return None
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("a checkpoint header entry is not a JSON object")
    return value
