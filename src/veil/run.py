"""`veil.run`: one federated run from a config, wired to a transport, a run store and a result.

This is the Python API behind `veil run`; the CLI is a thin layer over it. The run's parts are
built by `veil.assembly` and its lifecycle is `veil.runtime`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from veil.config import RunConfig, load_config
from veil.crypto.envelope import load_key_file
from veil.federation import ServerObserver
from veil.federation.training import torch_threads
from veil.result import RESULT_FILE, Result
from veil.runtime import run_federation
from veil.store import CHECKPOINT_FILE
from veil.store.lock import run_directory

__all__ = ["CHECKPOINT_FILE", "RESULT_FILE", "run"]


def run(
    config: RunConfig | str | Path,
    out_dir: str | Path | None = None,
    *,
    observers: Sequence[ServerObserver] = (),
    resume: bool = False,
    stop: Callable[[], bool] | None = None,
) -> Result:
    """Run one federation to completion and return its `Result`.

    `config` is a `RunConfig` or the path of a TOML file. With `out_dir`, the run writes
    `out_dir/result.json`, records its rounds in `out_dir/veil.db` as they finish, and checkpoints
    the global model after every round. `observers` receive round events (e.g. a progress bar).
    With `resume`, a run that crashed or was interrupted continues from `out_dir`'s checkpoint,
    privacy account included (`veil.runtime.run_federation`). When `stop` (e.g. a
    `veil.lifecycle.StopRequest`) returns True before a round, the run ends there: the result
    has status "interrupted" and the rounds finished so far, and the store marks the run
    interrupted.

    A full disk or a refused write raises `DiskFullError` / `WritePermissionError` naming the
    file; a `KeyboardInterrupt` marks the run interrupted, any other error failed.
    """
    if not isinstance(config, RunConfig):
        config = load_config(config)
    key = load_key_file(config.checkpoint.key_file) if config.checkpoint.key_file else None
    with torch_threads(config.federation.torch_threads):
        if out_dir is None:
            return run_federation(
                config, None, observers, resume=resume, checkpoint_key=key, stop=stop
            )
        with run_directory(out_dir):  # one run per folder
            return run_federation(
                config, out_dir, observers, resume=resume, checkpoint_key=key, stop=stop
            )
