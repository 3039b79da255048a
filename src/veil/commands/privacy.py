"""`veil query` and `veil budget`: differentially private statistics against a privacy ledger.

`veil query` validates the query, reads the column and calibrates the noise first (no release
yet), then charges the ledger (committed to disk) and only then computes and prints the answer,
inside `PrivacyLedger.spend`. A query over budget stops at the charge with `BudgetExceeded`,
before any answer exists; the main CLI prints it on one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from veil.privacy.dp.ledger import Budget, PrivacyLedger


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `query` and `budget` (with `show` and `set`) to the `veil` subcommands."""
    from veil.privacy.dp.queries import MECHANISMS, QUERY_KINDS

    p_query = sub.add_parser(
        "query",
        help="answer a differentially private statistic of one CSV column, charged to a ledger",
        description="Charge the ledger first, then compute and print one DP answer. Bounds are "
        "declared, never read from the data; values outside them are clamped.",
    )
    p_query.add_argument("csv", type=Path, help="the CSV file")
    p_query.add_argument("--column", required=True, help="the numeric column")
    p_query.add_argument("--kind", required=True, choices=QUERY_KINDS, help="the statistic")
    p_query.add_argument("--lower", required=True, type=float, help="declared lower bound")
    p_query.add_argument("--upper", required=True, type=float, help="declared upper bound")
    p_query.add_argument("--epsilon", required=True, type=float, help="ε this query spends")
    p_query.add_argument(
        "--delta", type=float, default=0.0, help="δ this query spends (gaussian only; default 0)"
    )
    p_query.add_argument(
        "--mechanism",
        choices=MECHANISMS,
        default="laplace",
        help="discrete laplace (pure ε-DP, default) or discrete gaussian ((ε, δ) via zCDP)",
    )
    p_query.add_argument(
        "--bins", type=int, help="histogram: number of bins; quantile: number of candidates"
    )
    p_query.add_argument("--quantile", type=float, help="quantile: the level in (0, 1)")
    p_query.add_argument(
        "--decimals", type=int, default=0, help="sum/mean: decimals kept before summing"
    )
    p_query.add_argument("--ledger", required=True, type=Path, help="the privacy ledger file")
    p_query.add_argument("--dataset", required=True, help="the data set id charged in the ledger")
    p_query.add_argument("--who", help="who asks (recorded in the ledger; default: login name)")
    p_query.add_argument("--json", action="store_true", help="print the answer as JSON")
    p_query.set_defaults(handler=cmd_query)

    p_budget = sub.add_parser("budget", help="show or set privacy budgets in a ledger")
    budget_sub = p_budget.add_subparsers(dest="budget_command", required=True, metavar="ACTION")
    p_show = budget_sub.add_parser("show", help="budgets and spending, or one data set's charges")
    p_show.add_argument("dataset", nargs="?", help="list this data set's charges")
    p_show.add_argument("--ledger", required=True, type=Path, help="the privacy ledger file")
    p_show.add_argument("--json", action="store_true", help="print as JSON")
    p_show.set_defaults(handler=cmd_budget_show)
    p_set = budget_sub.add_parser("set", help="create or change a data set's budget")
    p_set.add_argument("dataset", help="the data set id")
    p_set.add_argument("--epsilon", required=True, type=float, help="total ε allowed")
    p_set.add_argument("--delta", required=True, type=float, help="total δ allowed")
    p_set.add_argument("--ledger", required=True, type=Path, help="the privacy ledger file")
    p_set.set_defaults(handler=cmd_budget_set)


def cmd_query(args: argparse.Namespace) -> int:
    """Validate, read the column, charge the ledger, then compute and print the answer."""
    from veil.privacy.dp import queries

    spec = queries.QuerySpec(
        kind=args.kind,
        column=args.column,
        lower=args.lower,
        upper=args.upper,
        epsilon=args.epsilon,
        delta=args.delta,
        mechanism=args.mechanism,
        bins=args.bins,
        quantile=args.quantile,
        scale_decimals=args.decimals,
    )
    # Input errors surface before any charge: the spec, the column, the noise calibration.
    values = queries.read_column(args.csv, spec.column)
    queries.calibrate(spec)
    who = args.who or _login()
    with PrivacyLedger(args.ledger) as ledger:
        ledger.budget(args.dataset)  # unknown data set: a clear error before anything else
        with ledger.spend(
            args.dataset,
            epsilon=spec.epsilon,
            delta=spec.delta,
            who=who,
            what=f"{spec.kind}({spec.column}) of {args.csv.name}",
            mechanism=spec.mechanism,
            parameters={**spec.to_dict(), "csv": str(args.csv)},
        ) as charge:
            result = queries.answer(values, spec)
            remaining = ledger.budget(args.dataset)
            if args.json:
                payload = {
                    "answer": {
                        "kind": result.kind,
                        "value": result.value,
                        "epsilon": result.epsilon,
                        "delta": result.delta,
                        "mechanism": result.mechanism,
                        "noise_scale": result.noise_scale,
                        "details": result.details,
                    },
                    "charge_id": charge.id,
                    "budget": _budget_dict(remaining),
                }
                print(json.dumps(payload, indent=2))
            else:
                label = f"{spec.kind} of '{spec.column}'"
                if spec.kind == "quantile":
                    label = f"{spec.quantile} quantile of '{spec.column}'"
                print(f"{label}: {_format_value(result.value)}")
                print(
                    f"  {result.details['noise']} noise, scale {result.noise_scale:.6g}, "
                    f"ε={spec.epsilon:g}, δ={spec.delta:g} (charge {charge.id})"
                )
                print(
                    f"  budget of '{args.dataset}': ε {remaining.epsilon_remaining:.6g} of "
                    f"{remaining.epsilon_limit:g} left, δ {remaining.delta_remaining:.3g} of "
                    f"{remaining.delta_limit:g} left"
                )
    return 0


def cmd_budget_show(args: argparse.Namespace) -> int:
    """A table of budgets, or of one data set's charges."""
    with PrivacyLedger(args.ledger, create=False) as ledger:
        if args.dataset is None:
            budgets = ledger.budgets()
            if args.json:
                print(json.dumps([_budget_dict(b) for b in budgets], indent=2))
                return 0
            table = Table(title=f"Privacy budgets in {args.ledger}", title_justify="left")
            columns = ("data set", "ε limit", "ε spent", "ε left", "δ limit", "δ spent", "δ left")
            for column in columns:
                table.add_column(column, justify="left" if column == "data set" else "right")
            for b in budgets:
                table.add_row(
                    b.dataset_id,
                    f"{b.epsilon_limit:.6g}",
                    f"{b.epsilon_spent:.6g}",
                    f"{b.epsilon_remaining:.6g}",
                    f"{b.delta_limit:.3g}",
                    f"{b.delta_spent:.3g}",
                    f"{b.delta_remaining:.3g}",
                )
            _console().print(table)
            return 0
        budget = ledger.budget(args.dataset)
        charges = ledger.charges(args.dataset)
    if args.json:
        payload = {
            "budget": _budget_dict(budget),
            "charges": [c.__dict__ for c in charges],
        }
        print(json.dumps(payload, indent=2))
        return 0
    table = Table(
        title=f"Charges to '{budget.dataset_id}': ε {budget.epsilon_spent:.6g} of "
        f"{budget.epsilon_limit:g}, δ {budget.delta_spent:.3g} of {budget.delta_limit:g}",
        title_justify="left",
    )
    for column in ("id", "charged at", "who", "what", "mechanism", "ε", "δ", "released"):
        table.add_column(column, justify="right" if column in ("id", "ε", "δ") else "left")
    for c in charges:
        table.add_row(
            str(c.id),
            c.charged_at,
            c.who,
            c.what,
            c.mechanism,
            f"{c.epsilon:.6g}",
            f"{c.delta:.3g}",
            c.released_at or "no (counted)",
        )
    _console().print(table)
    return 0


def cmd_budget_set(args: argparse.Namespace) -> int:
    """Create or change a data set's budget; print the result."""
    with PrivacyLedger(args.ledger) as ledger:
        b = ledger.set_budget(args.dataset, epsilon=args.epsilon, delta=args.delta)
    print(
        f"budget of '{b.dataset_id}': ε {b.epsilon_limit:g} (spent {b.epsilon_spent:.6g}), "
        f"δ {b.delta_limit:g} (spent {b.delta_spent:.3g})"
    )
    return 0


def _budget_dict(b: Budget) -> dict[str, Any]:
    return {
        "dataset_id": b.dataset_id,
        "epsilon_limit": b.epsilon_limit,
        "epsilon_spent": b.epsilon_spent,
        "epsilon_remaining": b.epsilon_remaining,
        "delta_limit": b.delta_limit,
        "delta_spent": b.delta_spent,
        "delta_remaining": b.delta_remaining,
    }


def _format_value(value: float | list[int]) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    if isinstance(value, int):
        return str(value)
    return f"{value:.10g}"


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _console() -> Console:
    # Rich assumes 80 columns when stdout is not a terminal, which would truncate the tables.
    return Console(width=None if sys.stdout.isatty() else 120)
