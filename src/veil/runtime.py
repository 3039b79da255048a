"""One federation's lifecycle: checkpoint, ledger, run store, rounds, result and report.

`run_federation` drives a federation that `veil.assembly.federation.assemble` built from the
config, in simulation (`veil.run`) and on a deployment's server (`veil.deployment.serve`):

1. open the run: a new run id, or with `resume` the checkpoint's (its parameters, strategy state
   and privacy account);
2. assemble every part; anything that can refuse the run does so here, before the run folder is
   touched;
3. charge the privacy ledger for every planned ε (reusing a resumed run's own charges);
4. record the run in the store, run the rounds (each one checkpointed, then recorded:
   `Recorder`), write result.json, release the ledger charges, finish the store, write the
   report. A failure or an interruption marks the run so in the store and keeps the finished
   rounds for `--resume`.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from torch import nn

from veil.assembly.data import (
    baseline_record,
    centralized_baseline,
    data_record,
    federated_data,
    final_evaluation,
)
from veil.assembly.federation import Federation, GatewayFactory, ServerSide, assemble
from veil.assembly.privacy import privacy_record
from veil.assembly.secure_aggregation.registry import backend
from veil.atomic import writing
from veil.config import RunConfig
from veil.data import FederatedData
from veil.errors import StoreError, VeilError
from veil.federation import RoundRecord, ServerObserver, Strategy
from veil.models.parameters import parameter_counts
from veil.privacy.dp.ledger import TOLERANCE, BudgetExceeded, PrivacyLedger
from veil.privacy.dp.policy import PrivacyPolicy
from veil.report.html import write_report
from veil.result import (
    RESULT_FILE,
    Communication,
    Result,
    RoundResult,
    Timing,
    compact_failures,
)
from veil.store import (
    CHECKPOINT_FILE,
    DB_NAME,
    Checkpoint,
    RunStore,
    atomic_write_text,
    load_checkpoint,
    save_checkpoint,
)
from veil.tensors import NamedArrays, total_bytes
from veil.transport.ray import RayTransport

__all__ = [
    "GatewayFactory",
    "Recorder",
    "ServerSide",
    "new_run_id",
    "run_federation",
    "run_tree_federation",
]


def run_federation(
    config: RunConfig,
    out_dir: str | Path | None,
    observers: Sequence[ServerObserver],
    *,
    fed: FederatedData | None = None,
    resume: bool = False,
    checkpoint_key: bytes | None = None,
    deployment: ServerSide | None = None,
    stop: Callable[[], bool] | None = None,
) -> Result:
    """One run. Simulation builds the data and an in-process transport; a deployment server
    passes `fed` (test data and client names only) and its `deployment` side (the factory of
    its network gateway, its PKI folder, the TLS key it serves).

    With `resume`, the run continues from `out_dir`'s checkpoint: same run id, parameters and
    strategy state, from the round after the checkpointed one; rounds already in the run store
    are kept, and a round redone after a crash replaces its row, so none is lost or counted
    twice. Under DP it continues the checkpoint's privacy account (refused if the configuration
    no longer matches it), draws fresh randomness, and reuses the ledger charges the run made
    when it started instead of charging again.

    With `stop`, the run ends before the first round that starts after it returns True: status
    "interrupted" in the result and the store, the finished rounds kept, no pooled baseline,
    the ledger's charges left unreleased (a resume reuses them).
    """
    if config.model.name == "gradient_boosting":
        return run_tree_federation(config, out_dir, resume=resume, stop=stop)
    started = time.perf_counter()
    out = Path(out_dir) if out_dir is not None else None
    if checkpoint_key is not None:
        checkpoint_key = backend(config.secure_aggregation).checkpoint_key(config, checkpoint_key)
    checkpoint = _load(out, checkpoint_key) if resume else None
    run_id = checkpoint.run_id if checkpoint else new_run_id()
    path = out / CHECKPOINT_FILE if out is not None else None
    recorder = Recorder(run_id, None, path, checkpoint_key)
    federation = assemble(
        config,
        run_id=run_id,
        fed=fed if fed is not None else federated_data(config),
        observers=[recorder, *observers],
        checkpoint=checkpoint,
        checkpoint_path=path,
        deployment=deployment,
    )
    recorder.privacy = federation.privacy
    # Everything that can refuse the run has run by now: only then touch the run folder.
    with ledger_writes(config):
        recorder.ledger = charge_ledger(
            config,
            federation.privacy,
            run_id,
            earlier=ledger_entries(checkpoint) if checkpoint else None,
        )
    store = RunStore(out / DB_NAME) if out is not None else None
    recorder.store = store
    earlier = _open_store(store, config, run_id, checkpoint, out, federation.start_round)
    try:
        with _recording(store, run_id):
            result = _run_rounds(
                config, federation, earlier, stop, in_process=deployment is None, started=started
            )
            _finish(config, result, out, store, recorder.ledger)
    finally:
        if isinstance(federation.gateway, RayTransport):
            federation.gateway.close()
    if out is not None:
        write_report(out)
    return result


def run_tree_federation(
    config: RunConfig,
    out_dir: str | Path | None,
    *,
    resume: bool = False,
    stop: Callable[[], bool] | None = None,
) -> Result:
    """A gradient-boosting run (`[model] name = "gradient_boosting"`, docs/trees.md): one
    boosting round per run round, each recorded in the store as it finishes; then result.json
    and the report. `stop` ends the run before a round (status "interrupted"). No checkpoints
    yet: `resume` is refused."""
    from veil.assembly.tree_result import (
        TREE_MODEL_FILE,
        tree_model_json,
        tree_result,
        tree_round_result,
    )
    from veil.assembly.trees import tree_federation

    if resume:
        raise StoreError("a gradient_boosting run cannot be resumed yet; start it again")
    started = time.perf_counter()
    out = Path(out_dir) if out_dir is not None else None
    run_id = new_run_id()
    trees = tree_federation(config, federated_data(config), run_id)
    store = RunStore(out / DB_NAME) if out is not None else None
    _open_store(store, config, run_id, None, out, 1)
    rounds: list[RoundResult] = []
    with _recording(store, run_id):
        for r in range(1, trees.plan.rounds + 1):
            if stop is not None and stop():
                break
            rounds.append(tree_round_result(config, trees, trees.booster.grow_round(r)))
            if store is not None:
                store.record_round(run_id, rounds[-1].model_dump())
        interrupted = len(rounds) < trees.plan.rounds
        result = tree_result(
            config, trees, run_id, rounds, interrupted=interrupted, started=started
        )
        model = tree_model_json(trees) if out is not None else None
        if out is not None and model is not None:
            atomic_write_text(out / TREE_MODEL_FILE, model)
        _finish(config, result, out, store, [])
    if out is not None:
        write_report(out)
    return result


@contextmanager
def _recording(store: RunStore | None, run_id: str) -> Iterator[None]:
    """Closes `store` after the body; when the body raises, first marks the run interrupted
    (Ctrl-C, a second signal) or failed. The checkpoint and the rows of the finished rounds
    stay, for --resume. The store may be what failed (disk full): then the original error is
    what the user needs to see."""
    try:
        yield
    except BaseException as exc:
        if store is not None:
            status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            with suppress(VeilError, sqlite3.Error):
                store.finish_run(run_id, status=status, final=None)
        raise
    finally:
        if store is not None:
            store.close()


def new_run_id() -> str:
    """A sortable, unique run id: UTC time plus 6 random hex digits."""
    return f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def _load(out: Path | None, key: bytes | None) -> Checkpoint:
    if out is None:
        raise StoreError("resuming needs the run folder that holds the checkpoint")
    return load_checkpoint(out / CHECKPOINT_FILE, key=key)


def _open_store(
    store: RunStore | None,
    config: RunConfig,
    run_id: str,
    checkpoint: Checkpoint | None,
    out: Path | None,
    start_round: int,
) -> list[RoundResult]:
    """Record the run's start in the store (or its resumption); the rounds it finished before."""
    if store is None:
        return []
    if checkpoint is None:
        store.start_run(
            run_id,
            name=config.name,
            mode=config.mode,
            config=config.to_dict(),
            out_dir=str(out.resolve()) if out else None,
        )
        return []
    store.resume_run(run_id)
    if checkpoint.round_result is not None:
        # The process may have died after the checkpoint and before the round's row.
        store.record_round(run_id, checkpoint.round_result)
    return [
        RoundResult.model_validate(r) for r in store.get_run(run_id)[2] if r["round"] < start_round
    ]


def _run_rounds(
    config: RunConfig,
    federation: Federation,
    earlier: list[RoundResult],
    stop: Callable[[], bool] | None,
    *,
    in_process: bool,
    started: float,
) -> Result:
    """Run the rounds left and shape the result (timed from `started`, a perf_counter)."""
    f = federation
    records = f.server.run(config.federation.rounds, start_round=f.start_round, stop=stop)
    last = records[-1].round if records else f.start_round - 1
    interrupted = last < config.federation.rounds
    rounds = [*earlier, *(round_result(r) for r in records)]
    final, classification = final_evaluation(config, f.fed, f.server.parameters)
    if not final and rounds:
        # No held-out test set (a coordinator without data): the members' own evaluation of
        # the last evaluated model, named as such.
        evaluated = [
            r.metrics for r in rounds if any(k.startswith("federated_") for k in r.metrics)
        ]
        if evaluated:
            final = {k: v for k, v in evaluated[-1].items() if k.startswith("federated_")}
    baseline = (
        centralized_baseline(config, f.fed, f.initial)
        if config.federation.centralized_baseline and in_process and not interrupted
        else None
    )
    upload = f.backend.upload_reference(config, f.initial, f.privacy)
    return Result(
        run_id=f.run_id,
        name=config.name,
        mode=config.mode,
        status="interrupted" if interrupted else "finished",
        rounds_planned=config.federation.rounds,
        interrupted_by=getattr(stop, "signal_name", None) if interrupted else None,
        final=final,
        centralized_baseline=baseline_record(config, baseline),
        rounds=rounds,
        privacy=privacy_record(config, f.privacy, f.session),
        communication=communication(rounds, f.model, upload, config),
        timing=Timing(total_s=time.perf_counter() - started),
        pipeline=f.pipeline.describe(),
        strategy=f.server.strategy.name,
        clients=len(f.fed.clients),
        dataset={"name": f.fed.dataset_name, "synthetic": f.fed.synthetic},
        data=data_record(config, f.fed),
        classification=classification,
        **({"attack": f.attack.describe()} if f.attack else {}),
        **_language_model(config, f),
    )


def _language_model(config: RunConfig, f: Federation) -> dict[str, Any]:
    """result.json's ``language_model`` section of a causal LM's run (base model's scores,
    generations: `veil.assembly.language_model`); nothing for other models or without a
    held-out test set."""
    if config.model.name != "causal_lm" or f.fed.y_test.shape[0] == 0:
        return {}
    from veil.assembly.language_model import language_model_record

    return {"language_model": language_model_record(config, f.fed, f.server.parameters)}


def _finish(
    config: RunConfig,
    result: Result,
    out: Path | None,
    store: RunStore | None,
    charges: Sequence[Mapping[str, Any]],
) -> None:
    """Write result.json, release the ledger's charges (a finished run), finish the store."""
    if out is not None:
        atomic_write_text(out / RESULT_FILE, result.to_json())
    if result.status == "finished":
        with ledger_writes(config):
            mark_released(config, charges)
    if store is not None:
        store.finish_run(result.run_id, status=result.status, final=result.final)


def communication(
    rounds: Sequence[RoundResult], model: nn.Module, upload: NamedArrays, config: RunConfig
) -> Communication:
    """Bytes moved, and how one client's upload compares with the whole model in float32 (the
    frozen base of a LoRA model included: what full fine-tuning would send)."""
    trainable, total = parameter_counts(model)
    update_bytes = total_bytes(upload)
    per_client = [r.bytes_up / r.clients for r in rounds if r.clients]
    return Communication(
        bytes_up=sum(r.bytes_up for r in rounds),
        bytes_down=sum(r.bytes_down for r in rounds),
        update_bytes_per_client=update_bytes,
        bytes_up_per_client_round=sum(per_client) / len(per_client) if per_client else 0.0,
        trainable_parameters=trainable,
        model_parameters=total,
        model_bytes_float32=4 * total,
        update_fraction_of_model=update_bytes / (4 * total),
        compression=config.compression.kind if config.compression else "none",
    )


def round_result(record: RoundRecord) -> RoundResult:
    """A round's row of result.json and of the run store."""
    return RoundResult(
        round=record.round,
        selected=record.selected,
        clients=record.completed,
        dropped=record.dropped,
        metrics=record.metrics,
        epsilon=record.epsilon,
        applied=record.applied,
        bytes_up=record.bytes_up,
        bytes_down=record.bytes_down,
        duration_s=record.duration_s,
        **compact_failures([(f.client, f.reason) for f in record.failures]),
        aggregation=record.aggregation,
    )


# -- the privacy ledger ----------------------------------------------------------------------


def ledger_writes(config: RunConfig) -> AbstractContextManager[None]:
    """Names a full disk or a refused write of the privacy ledger (`veil.atomic.writing`)."""
    ledger = config.privacy.ledger if config.privacy is not None else None
    return writing(ledger) if ledger is not None else nullcontext()


def ledger_entries(checkpoint: Checkpoint) -> list[dict[str, Any]]:
    """The ledger charges a checkpointed run made when it started."""
    entries = (checkpoint.privacy or {}).get("ledger", [])
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def charge_ledger(
    config: RunConfig,
    privacy: PrivacyPolicy | None,
    run_id: str,
    *,
    earlier: Sequence[Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Charge every planned ε before the run starts (all budgets checked first); returns the
    charges as ``{"dataset_id", "charge_id"}``, which the checkpoints carry.

    A resumed run passes the charges its checkpoint holds (`earlier`): each one the ledger
    still holds for this run, covering what is planned, is reused rather than charged again;
    whatever is not covered is charged now, so a resume neither double-charges nor leaves the
    run uncounted.
    """
    p = config.privacy
    if p is None or privacy is None or p.ledger is None:
        return []
    planned = privacy.charges(p.dataset_id or config.name)
    with PrivacyLedger(p.ledger) as ledger:
        kept: list[dict[str, Any]] = []
        charges = []
        for c in planned:
            reused = _reusable_charge(ledger, c.dataset_id, c.epsilon, c.delta, run_id, earlier)
            if reused is None:
                charges.append(c)
            else:
                kept.append({"dataset_id": c.dataset_id, "charge_id": reused})
        for c in charges:
            budget = ledger.budget(c.dataset_id)
            if c.epsilon > budget.epsilon_remaining + TOLERANCE or (
                c.delta > budget.delta_remaining + TOLERANCE
            ):
                raise BudgetExceeded(
                    c.dataset_id,
                    requested=(c.epsilon, c.delta),
                    remaining=(budget.epsilon_remaining, budget.delta_remaining),
                )
        return kept + [
            {
                "dataset_id": c.dataset_id,
                "charge_id": ledger.charge(
                    c.dataset_id,
                    epsilon=c.epsilon,
                    delta=c.delta,
                    who=config.name,
                    what=_charge_what(run_id),
                    mechanism="dp-sgd" if p.unit == "record" else "dp-fedavg",
                    parameters=c.parameters,
                ).id,
            }
            for c in charges
        ]


def _charge_what(run_id: str) -> str:
    return f"federated training run {run_id}"


def _reusable_charge(
    ledger: PrivacyLedger,
    dataset_id: str,
    epsilon: float,
    delta: float,
    run_id: str,
    earlier: Sequence[Mapping[str, Any]] | None,
) -> int | None:
    """The id of a charge this run made before a crash that covers (ε, δ) for `dataset_id`."""
    ids = {e.get("charge_id") for e in earlier or () if e.get("dataset_id") == dataset_id}
    for charge in ledger.charges(dataset_id) if ids else ():
        if (
            charge.id in ids
            and charge.what == _charge_what(run_id)
            and charge.epsilon + TOLERANCE >= epsilon
            and charge.delta + TOLERANCE >= delta
        ):
            return charge.id
    return None


def mark_released(config: RunConfig, charges: Sequence[Mapping[str, Any]]) -> None:
    """Mark a finished run's charges released (its results are out)."""
    if charges and config.privacy is not None and config.privacy.ledger is not None:
        with PrivacyLedger(config.privacy.ledger) as ledger:
            for charge in charges:
                ledger.mark_released(int(charge["charge_id"]))


# -- checkpoints and the run store -----------------------------------------------------------

#: The fields of a round the run store keeps (JSON data), which a checkpoint carries too.
_STORED_ROW = (
    "round",
    "clients",
    "dropped",
    "selected",
    "applied",
    "metrics",
    "epsilon",
    "bytes_up",
    "bytes_down",
    "duration_s",
    "failures",
    "aggregation",
)


class Recorder:
    """Writes each finished round to the checkpoint file, then to the run store.

    The checkpoint comes first and carries the privacy account with the round composed (the
    privacy observer runs before this one) and the ledger charges: nothing of a round is
    released (its row, the next round's model) before its account is on disk. It also carries
    the round's row, which a resumed run writes to the store if the process died in between.
    """

    def __init__(
        self,
        run_id: str,
        store: RunStore | None,
        checkpoint: Path | None,
        key: bytes | None = None,
        *,
        privacy: PrivacyPolicy | None = None,
    ) -> None:
        self.run_id = run_id
        self.store = store
        self.checkpoint = checkpoint
        self.key = key
        self.privacy = privacy
        #: The ledger charges of the run (`charge_ledger`).
        self.ledger: list[dict[str, Any]] = []

    def on_round_start(self, round_: int, selected: int) -> None:
        pass

    def on_client_done(self, round_: int, client: str) -> None:
        pass

    def on_round_end(
        self, record: RoundRecord, parameters: NamedArrays, strategy: Strategy
    ) -> None:
        row = round_result(record).model_dump()
        if self.checkpoint is not None:
            privacy = (
                {"account": self.privacy.state(), "ledger": self.ledger}
                if self.privacy is not None
                else None
            )
            save_checkpoint(
                self.checkpoint,
                Checkpoint(
                    run_id=self.run_id,
                    round=record.round,
                    parameters=parameters,
                    strategy_state=strategy.state(),
                    meta={"strategy": strategy.name},
                    privacy=privacy,
                    round_result={k: row[k] for k in _STORED_ROW if k in row},
                ),
                key=self.key,
            )
        if self.store is not None:
            self.store.record_round(self.run_id, row)
