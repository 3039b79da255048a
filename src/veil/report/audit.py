"""The privacy audit in the terminal: the measured lower bound next to the promised ε."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.table import Table


def _num(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else "-"


def _ci(metrics: dict[str, Any], key: str) -> str:
    """`value [low, high]` when the audit recorded an interval for `key`, else `value`."""
    interval = metrics.get(f"{key}_interval")
    if isinstance(interval, list | tuple) and len(interval) == 2:
        return f"{_num(metrics.get(key))} [{_num(interval[0])}, {_num(interval[1])}]"
    return _num(metrics.get(key))


def audit_table(audit: dict[str, Any]) -> Table:
    """One table of what `veil audit` measured (the `audit` section of result.json)."""
    table = Table(title="Privacy audit", show_header=False, title_justify="left", box=box.SIMPLE)
    table.add_column("what", style="bold")
    table.add_column("value")
    epsilon, lower = audit.get("epsilon"), audit.get("epsilon_lower")
    claim = f"ε = {_num(epsilon)}, δ = {audit.get('delta'):g}" if epsilon is not None else "none"
    table.add_row("accountant (upper bound)", claim)
    canaries = audit.get("canaries") or {}
    if lower is not None:
        best = canaries.get("best") or {}
        table.add_row(
            "canaries (lower bound)",
            f"ε ≥ {_num(lower)} at {audit.get('confidence', 0):.0%} confidence "
            f"({best.get('correct')} of {best.get('guesses')} {best.get('kind')}-canary guesses "
            f"right, {canaries.get('organisation')})",
        )
    elif canaries.get("skipped"):
        table.add_row("canaries", f"skipped: {canaries['skipped']}")
    if audit.get("exceeds_epsilon"):
        table.add_row(
            "verdict",
            "[bold red]the measured lower bound exceeds the accountant's ε: the run does not "
            "deliver its claimed guarantee[/]",
        )
    elif lower is not None and epsilon is not None:
        table.add_row("verdict", "consistent: the lower bound stays below the accountant's ε")
    elif lower is not None:
        table.add_row("verdict", f"no differential privacy: the run leaks at least ε = {lower:.3f}")
    if canaries.get("trainer"):
        table.add_row("canaries: trained by", str(canaries["trainer"]))
    if canaries.get("preprocessing"):
        table.add_row("canaries: input canaries", str(canaries["preprocessing"]))
    membership = audit.get("membership")
    if membership:
        for name in ("loss_threshold", "lira"):
            m = membership[name]
            label = "LiRA" if name == "lira" else "loss threshold"
            extra = f", {m['shadows']} shadows" if "shadows" in m else ""
            table.add_row(
                f"membership: {label}",
                f"AUC {_ci(m, 'auc')}, TPR {_ci(m, 'tpr_at_1_percent_fpr')} at 1% FPR, "
                f"{_ci(m, 'tpr_at_0_1_percent_fpr')} at 0.1% FPR{extra}",
            )
        m = membership["loss_threshold"]
        if "auc_interval" in m:
            fpr_high = (m.get("fpr_at_0_1_percent_interval") or [None, None])[1]
            table.add_row(
                "membership: intervals",
                f"in brackets, two-sided {m.get('confidence', 0):.0%} confidence intervals: AUC "
                f"by DeLong, TPR by Clopper-Pearson over {m.get('members')} members; with "
                f"{m.get('non_members')} non-members the FPR reached at the 0.1% point may be "
                f"up to {_num(fpr_high)}",
            )
    inversion = audit.get("inversion")
    if inversion:
        quality = (
            f"SSIM {_num(inversion['ssim'])} (best {_num(inversion['best_ssim'])})"
            if "ssim" in inversion
            else f"relative error {_num(inversion['relative_error'])} "
            f"(best {_num(inversion['best_relative_error'])})"
        )
        table.add_row("inversion: server sees", str(inversion["server_sees"]))
        table.add_row(
            f"inversion: {inversion['attack']}",
            f"{quality} over {inversion['client_records']} records of {inversion['client']}",
        )
    table.add_row("time", f"{_num(audit.get('duration_s'), 1)} s")
    return table
