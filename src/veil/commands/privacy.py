"""`veil query` and `veil budget`: differentially private statistics against a privacy ledger;
`veil privacy verify`: recompute a run's ε from its `result.json`.

`veil query` validates the query, reads the column and calibrates the noise first (no release
yet), then charges the ledger (committed to disk) and only then computes and prints the answer,
inside `PrivacyLedger.spend`. A query over budget stops at the charge with `BudgetExceeded`,
before any answer exists; the main CLI prints it on one line and exits with status 2.

`veil privacy verify RESULT_JSON` reads the privacy record's composed mechanisms (dp-accounting
`DpEvent`s per organisation, one per round; with distributed DP every round's γ, d, t, n, σ_c
and τ), composes them again with an accountant other than the run's (`independent_epsilon`:
prv-accountant, or dp-accounting's RDP accountant where it cannot be used) for the neighbouring
relation the record states, and compares: exit 0 when every recorded ε (the run's, each
organisation's, the last round's) is at least the recomputed one minus the tolerance, 1 with one
line on stderr when one is below (the run under-reported), 2 when the file cannot be read or
holds no recomputable record.
"""

from __future__ import annotations

import argparse
import getpass
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from veil.commands import help_of
from veil.errors import UserError
from veil.privacy.dp.ledger import Budget, PrivacyLedger

if TYPE_CHECKING:
    from veil.privacy.dp.accountant import Composition, Neighbouring

# The constants below are those of `veil.privacy.dp.queries` and `veil.privacy.dp.accountant`
# (a test keeps them equal), spelled out so that `veil query --help` and `veil privacy verify
# --help` import neither OpenDP nor dp-accounting.

#: `veil.privacy.dp.queries.QUERY_KINDS`: the statistics `veil query` answers.
QUERY_KINDS: tuple[str, ...] = ("count", "sum", "mean", "histogram", "quantile")
#: `veil.privacy.dp.queries.MECHANISMS`: the noise `veil query` adds.
MECHANISMS: tuple[str, ...] = ("laplace", "gaussian")
#: `veil.privacy.dp.accountant.VERIFY_TOLERANCE`: the PRV accountant's error bound.
VERIFY_TOLERANCE = 0.01


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `query`, `budget` (with `show` and `set`) and `privacy` (with `verify`) to the
    `veil` subcommands."""
    p_query = sub.add_parser(
        "query",
        help=help_of("query"),
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

    p_budget = sub.add_parser("budget", help=help_of("budget"))
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

    p_privacy = sub.add_parser("privacy", help=help_of("privacy"))
    privacy_sub = p_privacy.add_subparsers(dest="privacy_command", required=True, metavar="ACTION")
    p_verify = privacy_sub.add_parser(
        "verify",
        help="recompute ε from a result.json's privacy record with an independent accountant",
        description="Compose the privacy record's mechanisms again with prv-accountant (Gopi et "
        "al. 2021; dp-accounting's RDP accountant where it cannot be used) for the stated "
        "neighbouring relation. Exit 0 when every recorded ε is at least the recomputed one "
        "minus the tolerance, 1 when the run under-reported, 2 for unreadable input.",
    )
    p_verify.add_argument("result", type=Path, help="a run's result.json, or its run folder")
    p_verify.add_argument(
        "--tolerance",
        type=float,
        default=VERIFY_TOLERANCE,
        help=f"how far a recorded ε may lie below the recomputed one (default {VERIFY_TOLERANCE}:"
        " the PRV accountant's error bound)",
    )
    p_verify.add_argument("--json", action="store_true", help="print the verdict as JSON")
    p_verify.set_defaults(handler=cmd_privacy_verify)


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


class UnverifiableRecord(UserError):
    """A result file that cannot be read, or whose privacy record cannot be recomputed."""


@dataclass(frozen=True)
class Check:
    """One recorded ε against the ε recomputed from the record."""

    who: str
    recorded: float
    recomputed: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.recorded >= self.recomputed - self.tolerance


@dataclass
class Verification:
    """The verdict of `verify_record`."""

    claims: bool
    delta: float | None = None
    unit: str | None = None
    neighbouring: str | None = None
    accountant: str | None = None
    tolerance: float = VERIFY_TOLERANCE
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        for check, row in zip(self.checks, data["checks"], strict=True):
            row["ok"] = check.ok
        return data


#: The relation the accountant composes for each relation a record may state: zero-out
#: neighbours have exactly the add-or-remove figures (sizes held fixed).
_ACCOUNTED_AS: dict[str, Neighbouring] = {
    "zero_out": "add_or_remove",
    "add_or_remove": "add_or_remove",
    "replace": "replace",
}


def cmd_privacy_verify(args: argparse.Namespace) -> int:
    """Recompute ε from a result.json; 0 verified, 1 under-reported, 2 unreadable."""
    path: Path = args.result
    if path.is_dir():
        path = path / "result.json"
    if not (math.isfinite(args.tolerance) and args.tolerance >= 0):
        raise UnverifiableRecord(f"--tolerance must be a finite number >= 0, got {args.tolerance}")
    try:
        result = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UnverifiableRecord(f"cannot read '{path}': {exc}") from None
    verdict = verify_record(result, tolerance=args.tolerance, where=str(path))
    if args.json:
        print(json.dumps(verdict.to_dict(), indent=2))
    if not verdict.claims:
        if not args.json:
            print(f"nothing to verify: '{path}' states no differential privacy (ε = null)")
        return 0
    if not verdict.ok:
        print(f"veil: {_under_reported(verdict, str(path))}", file=sys.stderr)
        return 1
    if not args.json:
        _print_verdict(verdict, str(path))
    return 0


def verify_record(
    result: Any, *, tolerance: float = VERIFY_TOLERANCE, where: str = "the result"
) -> Verification:
    """Recompute the ε of a result.json's privacy record (see the module docstring).

    Raises `UnverifiableRecord` for a record that lacks what the recomputation needs."""
    from veil.privacy.dp.accountant import Accountant, independent_epsilon

    if not isinstance(result, Mapping) or not isinstance(result.get("privacy"), Mapping):
        raise UnverifiableRecord(f"'{where}' is not a Veil result: it has no privacy record")
    privacy: Mapping[str, Any] = result["privacy"]
    if privacy.get("epsilon") is None:
        return Verification(claims=False, tolerance=tolerance)
    epsilon = _number(privacy, "epsilon", where)
    delta = _number(privacy, "delta", where)
    if not 0 < delta < 1:
        raise UnverifiableRecord(f"{where}: privacy.delta = {delta!r} is not in (0, 1)")
    stated = privacy.get("neighbouring", "add_or_remove")
    if not isinstance(stated, str) or stated not in _ACCOUNTED_AS:
        raise UnverifiableRecord(
            f"{where}: privacy.neighbouring = {stated!r}; this version recomputes "
            f"{sorted(_ACCOUNTED_AS)}"
        )
    relation = _ACCOUNTED_AS[stated]
    unit = privacy.get("unit")
    verdict = Verification(
        claims=True, delta=delta, unit=str(unit), neighbouring=stated, tolerance=tolerance
    )
    labels: set[str] = set()

    def recompute(compositions: Sequence[Composition]) -> float:
        eps, label = independent_epsilon(
            compositions, delta, neighbouring=relation, tolerance=tolerance
        )
        labels.add(label)
        return eps

    if unit == "record":
        organisations = privacy.get("per_organisation")
        if not isinstance(organisations, list) or not organisations:
            raise UnverifiableRecord(f"{where}: privacy.per_organisation is missing or empty")
        worst = 0.0
        for index, org in enumerate(organisations):
            if not isinstance(org, Mapping):
                raise UnverifiableRecord(
                    f"{where}: privacy.per_organisation[{index}] is not an object"
                )
            name = str(org.get("name", f"organisation {index}"))
            eps = recompute(_compositions(org.get("accounting"), f"{where}: {name}"))
            verdict.checks.append(Check(name, _number(org, "epsilon", where), eps, tolerance))
            worst = max(worst, eps)
    elif unit == "client":
        compositions = _compositions(privacy.get("accounting"), where)
        distributed = privacy.get("distributed_dp")
        if distributed is not None:
            compositions = _distributed(compositions, distributed, where, verdict.notes)
            strict = Accountant("rdp", neighbouring=relation)
            for c in compositions:
                strict.compose_subsampled_gaussian(c.noise_multiplier, c.sampling_rate, c.count)
            verdict.notes.append(
                "the same rounds by Rényi DP, the form Theorem 1 is stated in (dp-accounting "
                f"RDP; looser): ε = {strict.epsilon(delta):.6g}"
            )
        worst = recompute(compositions)
    else:
        raise UnverifiableRecord(f"{where}: privacy.unit = {unit!r}, expected 'record' or 'client'")
    verdict.checks.append(Check("the run (privacy.epsilon)", epsilon, worst, tolerance))
    rounds = result.get("rounds")
    if isinstance(rounds, list) and rounds and isinstance(rounds[-1], Mapping):
        last = rounds[-1].get("epsilon")
        if isinstance(last, int | float) and not isinstance(last, bool):
            who = f"round {rounds[-1].get('round', len(rounds))} (rounds[].epsilon)"
            verdict.checks.append(Check(who, float(last), worst, tolerance))
    verdict.accountant = "; ".join(sorted(labels))
    return verdict


def _number(data: Mapping[str, Any], key: str, where: str) -> float:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise UnverifiableRecord(f"{where}: {key} = {value!r} is not a number")
    return float(value)


def _count(data: Mapping[str, Any], key: str, where: str) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UnverifiableRecord(f"{where}: {key} = {value!r} is not a count")
    return value


def _compositions(state: Any, where: str) -> list[Composition]:
    from veil.privacy.dp.accountant import state_compositions

    if state is None:
        raise UnverifiableRecord(
            f"{where}: the privacy record holds no accounting (its composed DpEvents); it was "
            "written by an older Veil and cannot be recomputed"
        )
    try:
        return state_compositions(state)
    except ValueError as exc:
        raise UnverifiableRecord(f"{where}: {exc}") from None


def _distributed(
    compositions: list[Composition], record: Any, where: str, notes: list[str]
) -> list[Composition]:
    """Each round's composition with the noise multiplier Kairouz et al.'s Theorem 1 certifies
    for what the clients added (σ_c each, at least t of them in any sum the server can unmask;
    τ for the clients selected), instead of the z the run accounted. A round whose sum was
    never unmasked released nothing and is left out."""
    from veil.privacy.dp.accountant import Composition, distributed_noise_multiplier
    from veil.privacy.secagg.distributed_dp import tau

    where = f"{where}: privacy.distributed_dp"
    if not isinstance(record, Mapping) or not isinstance(record.get("rounds"), list):
        raise UnverifiableRecord(f"{where} has no list of rounds")
    rounds: list[Any] = record["rounds"]
    if len(rounds) != len(compositions):
        raise UnverifiableRecord(
            f"{where} lists {len(rounds)} rounds, but the accounting composed {len(compositions)}"
        )
    clip = _number(record, "clip_norm", where)
    dimension = _count(record, "dimension", where)
    out: list[Composition] = []
    multipliers: list[float] = []
    for composed, row in zip(compositions, rounds, strict=True):
        if not isinstance(row, Mapping):
            raise UnverifiableRecord(f"{where}: a round is not an object")
        label = f"{where} round {row.get('round')!r}"
        survivors = _count(row, "survivors", label)
        if survivors == 0:
            continue  # the sum was not unmasked: nothing released
        step = _number(row, "step", label)
        if not (math.isfinite(step) and step > 0 and clip > 0):
            raise UnverifiableRecord(f"{label}: step γ = {step!r} with clip_norm {clip!r}")
        sigma_c = _number(row, "client_stddev", label)
        threshold = _count(row, "threshold", label)
        clients = _count(row, "clients", label)
        shares = max(1, min(threshold, survivors))
        try:
            z = distributed_noise_multiplier(
                sensitivity=clip / step + math.sqrt(dimension),
                client_stddev=sigma_c,
                shares=shares,
                tau=max(_number(row, "tau", label), tau(max(clients, survivors), sigma_c)),
                dimension=dimension,
            )
        except ValueError as exc:
            raise UnverifiableRecord(f"{label}: {exc}") from None
        multipliers.append(z)
        out.append(Composition(z, composed.sampling_rate, composed.count))
    accounted = [c.noise_multiplier for c in compositions]
    if multipliers:
        notes.append(
            f"distributed DP: {len(multipliers)} of {len(rounds)} rounds released a sum; "
            f"d = {dimension}; Kairouz et al.'s Theorem 1 gives noise multiplier "
            f"{min(multipliers):.6g} at the least (the run accounted {min(accounted):.6g})"
        )
    return out


def _under_reported(verdict: Verification, where: str) -> str:
    low = "; ".join(
        f"{c.who} states ε = {c.recorded:.6g} < {c.recomputed:.6g}"
        for c in verdict.checks
        if not c.ok
    )
    hint = ""
    if (verdict.accountant or "").startswith("dp-accounting RDP"):
        hint = (
            " (RDP is looser than the run's PLD, so this may be the fallback's slack: install "
            "prv-accountant for a tight check)"
        )
    return (
        f"under-reported: {where}: recomputed from its record by {verdict.accountant} at "
        f"δ = {verdict.delta:g} for {verdict.neighbouring} neighbours, tolerance "
        f"{verdict.tolerance:g}: {low}{hint}"
    )


def _print_verdict(verdict: Verification, where: str) -> None:
    run = next(c for c in verdict.checks if c.who.startswith("the run"))
    print(
        f"verified: {where} states ε = {run.recorded:.6g} at δ = {verdict.delta:g} for "
        f"{verdict.neighbouring} neighbours (unit {verdict.unit}); recomputed "
        f"{run.recomputed:.6g} from its record (tolerance {verdict.tolerance:g})"
    )
    print(f"  accountant  {verdict.accountant}")
    for note in verdict.notes:
        print(f"  {note}")
    width = max(len(c.who) for c in verdict.checks)
    for c in verdict.checks:
        print(
            f"  {c.who:<{width}}  recorded {c.recorded:.6f}  recomputed {c.recomputed:.6f}  "
            + ("ok" if c.ok else "UNDER-REPORTED")
        )


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
