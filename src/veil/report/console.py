"""Terminal output: a live progress bar during a run, then a per-round table and a summary."""

from __future__ import annotations

from types import TracebackType

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from veil.federation import RoundRecord, Strategy
from veil.result import Result
from veil.tensors import NamedArrays


class ProgressDisplay:
    """A `ServerObserver` that shows rounds and the clients of the current round as progress bars.

    Use it as a context manager around `veil.run(..., observers=[display])`.
    """

    def __init__(self, rounds: int, console: Console | None = None) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
            transient=False,
        )
        self._rounds = self._progress.add_task("rounds", total=rounds, info="")
        self._clients = self._progress.add_task("clients", total=1, info="")

    def __enter__(self) -> ProgressDisplay:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def on_round_start(self, round_: int, selected: int) -> None:
        self._progress.reset(self._clients, total=selected, info=f"round {round_}")

    def on_client_done(self, round_: int, client: str) -> None:
        self._progress.advance(self._clients)

    def on_round_end(
        self, record: RoundRecord, parameters: NamedArrays, strategy: Strategy
    ) -> None:
        acc, r2 = record.metrics.get("accuracy"), record.metrics.get("r2")
        info = f"accuracy {acc:.3f}" if acc is not None else ""
        if acc is None and r2 is not None:  # a regression's headline
            info = f"R² {r2:.3f}"
        self._progress.update(self._rounds, advance=1, info=info)


#: Said of a pooled baseline under [privacy] (`centralized_baseline.outside_guarantee`).
BASELINE_NOTE = "trained on the pooled data without DP: outside the privacy guarantee"

#: What each neighbouring relation a privacy record may state means.
NEIGHBOURING = {
    "zero_out": "zero-out: one unit's data replaced by a null one that contributes nothing "
    "(sizes are published; same figures as add-or-remove)",
    "replace": "replace: one unit's data swapped for another's",
    "add_or_remove": "add or remove one unit",
}


def rounds_table(result: Result) -> Table:
    """One row per round: clients, dropouts, metrics, ε and traffic. Skipped rounds are dim."""
    table = Table(
        title=f"Run {result.run_id}: {result.name}", title_justify="left", box=box.SIMPLE_HEAD
    )
    columns = {
        "train_loss": "train loss",
        "loss": "test loss",
        "accuracy": "test acc",
        "auc": "test AUC",
        "mse": "test MSE",
        "mae": "test MAE",
        "r2": "test R²",
        "federated_accuracy": "fed acc",
        "federated_r2": "fed R²",
    }
    keys = [k for k in columns if any(k in r.metrics for r in result.rounds)]
    headers = ["round", "clients", "dropped", *(columns[k] for k in keys), "ε", "kB up", "kB down"]
    for column in (*headers, "s"):
        table.add_column(column, justify="right")
    for r in result.rounds:
        cells = [str(r.round), str(r.clients), str(r.dropped)]
        cells += [_metric(k, r.metrics[k]) if k in r.metrics else "" for k in keys]
        cells += [
            f"{r.epsilon:.3f}" if r.epsilon is not None else "-",
            f"{r.bytes_up / 1e3:.1f}",
            f"{r.bytes_down / 1e3:.1f}",
            f"{r.duration_s:.2f}",
        ]
        table.add_row(*cells, style=None if r.applied else "dim")
    return table


def summary_table(result: Result) -> Table:
    """The final metrics, the baseline, the privacy record and the cost of the run."""
    table = Table(title="Summary", show_header=False, title_justify="left", box=box.SIMPLE)
    table.add_column("what", style="bold")
    table.add_column("value")
    for key, value in result.final.items():
        table.add_row(f"final {key}", f"{value:.4f}")
    baseline = result.centralized_baseline
    if baseline is not None:
        outside = getattr(baseline, "outside_guarantee", False)
        # A classifier's headline is its accuracy, a regression's its R².
        r2 = getattr(baseline, "r2", None)
        label, headline = ("accuracy", baseline.accuracy) if r2 is None else ("R²", r2)
        table.add_row(
            f"centralized baseline {label}",
            (f"{headline:.4f}" if isinstance(headline, float) else "-")
            + (f" ({BASELINE_NOTE})" if outside else ""),
        )
        probe = getattr(result.centralized_baseline, "linear_probe_accuracy", None)
        if probe is not None:
            table.add_row("linear probe accuracy (frozen encoder)", f"{probe:.4f}")
    table.add_row("aggregation", _aggregation_note(result.privacy.aggregation))
    table.add_row(
        "communication",
        f"{_size(result.communication.bytes_up)} up, {_size(result.communication.bytes_down)} down",
    )
    c = result.communication
    if c.update_bytes_per_client is not None and c.update_fraction_of_model is not None:
        table.add_row(
            "upload per client and round",
            f"{_size(c.update_bytes_per_client)} ({c.update_fraction_of_model:.3%} of the "
            f"model in float32; compression {c.compression})",
        )
    table.add_row("time", f"{result.timing.total_s:.1f} s")
    return table


def privacy_table(result: Result) -> Table:
    """The privacy record: what is guaranteed, to whom, and the numbers to recompute it."""
    p = result.privacy
    extra = p.model_extra or {}
    table = Table(title="Privacy record", show_header=False, title_justify="left", box=box.SIMPLE)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("aggregation", _aggregation_note(p.aggregation))
    if p.attestation is not None:
        table.add_row("  attestation", p.attestation)
    secure = p.secure_aggregation
    if isinstance(secure, dict):
        dropouts = sum(int(r.aggregation.get("recovered_dropouts", 0)) for r in result.rounds)
        clipped = sum(int(r.aggregation.get("clipped", 0)) for r in result.rounds)
        table.add_row(
            "  secure aggregation",
            f"{secure.get('protocol')}, threshold {secure.get('threshold')}, "
            f"{secure.get('modulus_bits')}-bit; {dropouts} dropouts recovered, "
            f"{clipped} values clipped; identities: {secure.get('identities')}",
        )
    if p.epsilon is None or p.delta is None:
        table.add_row("guarantee", "none: no differential privacy, the model is not DP-protected")
        return table
    unit = "one record of one organisation" if p.unit == "record" else "one whole organisation"
    table.add_row("guarantee", f"(ε = {p.epsilon:.3f}, δ = {p.delta:g})-DP for {unit}")
    relation = extra.get("neighbouring")
    if isinstance(relation, str):
        table.add_row("neighbours", NEIGHBOURING.get(relation, relation))
    target = extra.get("target")
    if isinstance(target, dict):
        table.add_row("target", f"ε ≤ {target.get('epsilon')}, δ = {target.get('delta')}")
    rdp = extra.get("epsilon_rdp")
    cross_check = f"; RDP cross-check ε = {rdp:.3f}" if isinstance(rdp, float) else ""
    table.add_row("accountant", f"{p.accountant}{cross_check}")
    if "accounting" in extra or "per_organisation" in extra:
        table.add_row("recompute", "veil privacy verify RESULT_JSON (an independent accountant)")
    if p.mechanism is not None:
        m = p.mechanism
        table.add_row(
            "mechanism",
            f"σ = {m.noise_multiplier:.4g}, C = {m.clip_norm:.4g}, "
            f"q = {m.sampling_rate:.4g}, steps = {m.steps}",
        )
        noise = (m.model_extra or {}).get("noise")
        if noise:
            table.add_row("noise", str(noise))
    distributed = extra.get("distributed_dp")
    if isinstance(distributed, dict):
        rows = [r for r in distributed.get("rounds", []) if "client_stddev" in r]
        if rows:
            table.add_row(
                "  distributed DP",
                f"d = {distributed.get('dimension')}, t = {rows[-1].get('threshold')}, "
                f"γ = {rows[-1].get('step'):.4g}, σ_c = {rows[-1].get('client_stddev'):.4g}, "
                f"τ = {max(r.get('tau', 0.0) for r in rows):.3g} (last round; every round in "
                "result.json)",
            )
    for org in extra.get("per_organisation", []):
        mech = org["mechanism"]
        table.add_row(
            f"  {org['name']}",
            f"ε = {org['epsilon']:.3f} (σ = {mech['noise_multiplier']:.3f}, "
            f"q = {mech['sampling_rate']:.3f}, steps = {mech['steps']})",
        )
    return table


def _metric(key: str, value: float) -> str:
    """A round's metric as a table cell: errors in the target's units (MSE, MAE, which may be
    large) with 1 decimal, everything else with 4."""
    return f"{value:.1f}" if key in ("mse", "mae") else f"{value:.4f}"


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _aggregation_note(aggregation: str) -> str:
    if aggregation == "plain":
        return "plain: the server sees every client's update"
    if aggregation == "secagg":
        return "secagg: the server sees only masked updates and their sum"
    if aggregation == "tee":
        return "tee: updates go in the clear to an aggregator the clients attested"
    return aggregation


def print_result(result: Result, console: Console) -> None:
    """The per-round table, the summary, the privacy record and, once `veil audit` has run,
    the audit."""
    console.print(rounds_table(result))
    console.print(summary_table(result))
    console.print(privacy_table(result))
    audit = (result.model_extra or {}).get("audit")
    if isinstance(audit, dict):
        from veil.report.audit import audit_table

        console.print(audit_table(audit))
