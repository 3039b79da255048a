"""A finished run rebuilt from its folder for `veil audit` (`veil.privacy.audit`).

The config comes from the run store (`veil.db`), the final model from the checkpoint (opened
with the run's key file when it had one); the data and the initial model are rebuilt with the
run's own builders, so they are the run's records and weights.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from veil.assembly.data import federated_data
from veil.assembly.model import model, training_plan
from veil.config import RunConfig
from veil.crypto.envelope import load_key_file
from veil.errors import ConfigError, StoreError
from veil.models import get_parameters
from veil.privacy.audit.target import AuditedRun
from veil.result import RESULT_FILE, Result
from veil.seeding import Purpose, derive_seed
from veil.store import CHECKPOINT_FILE, RunStore, load_checkpoint

__all__ = ["load_run"]


def load_run(run_dir: str | Path, *, key_file: Path | None = None) -> AuditedRun:
    """Rebuild a finished run from its folder; `StoreError` naming what is missing."""
    path = Path(run_dir)
    result_path = path / RESULT_FILE
    if not result_path.is_file():
        raise StoreError(
            f"no {RESULT_FILE} in '{path}': pass the folder of a finished run (`veil run ... "
            "--out DIR`)"
        )
    try:
        result = Result.model_validate_json(result_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise StoreError(
            f"'{result_path}' is not a Veil result ({exc.__class__.__name__})"
        ) from None
    with RunStore.locate(path) as store:
        _, raw_config, _ = store.get_run(result.run_id)
    config = RunConfig.from_dict(raw_config, source=str(path))
    if config.data.resolved_task == "regression":
        raise ConfigError(
            f"veil audit measures classifiers (its canaries are mislabelled records and its "
            f"attacks score class probabilities), and run '{result.run_id}' is a regression; "
            "audit a classification run"
        )
    key_path = key_file or config.checkpoint.key_file
    key = load_key_file(key_path) if key_path is not None else None
    checkpoint = load_checkpoint(path / CHECKPOINT_FILE, key=key)
    fed = federated_data(config)
    init = model(config, fed, seed=derive_seed(config.seed, Purpose.MODEL_INIT))
    return AuditedRun(
        path=path,
        result=result,
        config=config,
        fed=fed,
        final=checkpoint.parameters,
        initial=get_parameters(init),
        plan=training_plan(config),
        build_model=partial(model, config, fed),
    )
