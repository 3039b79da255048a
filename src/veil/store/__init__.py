"""Persistence: the SQLite run store, checkpoints and atomic file writes."""

from veil.atomic import atomic_write_bytes, atomic_write_text
from veil.store.checkpoint import CHECKPOINT_FILE, Checkpoint, load_checkpoint, save_checkpoint
from veil.store.runstore import DB_NAME, RunStore, RunSummary, find_stores

__all__ = [
    "CHECKPOINT_FILE",
    "DB_NAME",
    "Checkpoint",
    "RunStore",
    "RunSummary",
    "atomic_write_bytes",
    "atomic_write_text",
    "find_stores",
    "load_checkpoint",
    "save_checkpoint",
]
