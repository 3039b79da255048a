"""`veil run CONFIG` and `veil runs list|show`: run one federation, list and show recorded runs.

`--mode` and `--secure-aggregation` override the config's `mode` and `secure_aggregation` (the
same config, run another way); the overridden config is validated again as a whole, so a
combination the config file would refuse is refused here with the same one-line message.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from veil.commands import help_of

if TYPE_CHECKING:
    from rich.console import Console

    from veil.config import RunConfig
    from veil.result import Result

#: The values of the config's `mode` and `secure_aggregation` (`veil.config.Mode`,
#: `veil.config.Aggregation`; a test keeps them equal), spelled out so that `veil run --help`
#: does not import the config module.
MODES: tuple[str, ...] = ("simulation", "deployment", "ray")
AGGREGATIONS: tuple[str, ...] = ("plain", "secagg", "ckks", "tee")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `run` and `runs` (with `list` and `show`) to the `veil` subcommands."""
    p_run = sub.add_parser("run", help=help_of("run"))
    p_run.add_argument("config", type=Path, help="the run config (TOML)")
    p_run.add_argument(
        "--out", type=Path, help="run folder for result.json and veil.db (default: runs/NAME)"
    )
    p_run.add_argument("--quiet", action="store_true", help="no progress bar and no tables")
    p_run.add_argument(
        "--mode",
        choices=list(MODES),
        help="override the config's mode (same config, run another way)",
    )
    p_run.add_argument(
        "--secure-aggregation",
        choices=list(AGGREGATIONS),
        help="override the config's secure_aggregation (same config, summed another way)",
    )
    p_run.add_argument(
        "--resume",
        action="store_true",
        help="continue a run that stopped (Ctrl-C, SIGTERM, crash, kill) from --out's "
        "checkpoint, privacy account included",
    )
    p_run.set_defaults(handler=cmd_run)

    p_runs = sub.add_parser("runs", help=help_of("runs"))
    runs_sub = p_runs.add_subparsers(dest="runs_command", required=True, metavar="ACTION")
    p_list = runs_sub.add_parser("list", help="list runs, newest first")
    p_list.add_argument(
        "where",
        nargs="?",
        type=Path,
        default=Path("runs"),
        help="a run folder, a folder of run folders, or a veil.db file (default: runs)",
    )
    p_list.set_defaults(handler=cmd_runs_list)
    p_show = runs_sub.add_parser("show", help="show one run's rounds and summary")
    p_show.add_argument("run_id", help="the run id, as `veil runs list` prints it")
    p_show.add_argument("--store", type=Path, default=Path("runs"), help="where to look")
    p_show.add_argument("--json", action="store_true", help="print the run as JSON")
    p_show.set_defaults(handler=cmd_runs_show)


def run_config(args: argparse.Namespace) -> RunConfig:
    """The config `veil run` runs: the file's, with `--mode` and `--secure-aggregation` applied.

    Raises `ConfigError` when the overridden config is invalid. A deployment's server and
    client processes get the override on their command lines (`DeploymentFiles`).
    """
    from veil.config import RunConfig, load_config

    config = load_config(args.config)
    overrides: dict[str, Any] = {}
    if args.mode and args.mode != config.mode:
        overrides["mode"] = args.mode
    aggregation = args.secure_aggregation
    if aggregation and aggregation != config.secure_aggregation:
        # A deployment passes it on to the server and client processes it starts.
        overrides["secure_aggregation"] = aggregation
    if overrides:
        config = RunConfig.from_dict({**config.to_dict(), **overrides}, source=str(args.config))
    return config


def cmd_run(args: argparse.Namespace) -> int:
    """Run the federation, print its result; 128 + the signal's number when one stopped it."""
    config = run_config(args)  # before the heavy imports: a config error is reported at once
    for line in config.unused_sections():  # kept for a one-line switch back; said once
        print(f"veil: warning: {line}", file=sys.stderr)

    from rich.console import Console

    from veil.errors import Aborted, DiskFullError
    from veil.lifecycle import exit_status, stop_on_signals
    from veil.report import ProgressDisplay, print_result
    from veil.report.html import REPORT_FILE
    from veil.run import RESULT_FILE, run

    out = args.out if args.out is not None else Path("runs") / config.name
    command = ["veil", "run", str(args.config), "--out", str(out)]
    command += ["--mode", args.mode] if args.mode else []
    command += ["--secure-aggregation", args.secure_aggregation] if args.secure_aggregation else []
    resume = shlex.join([*command, "--resume"])
    try:
        # SIGINT/SIGTERM: stop at the next round boundary; a second one aborts (veil.lifecycle).
        with stop_on_signals() as stop:
            if config.mode == "deployment":
                from veil.deployment import run_deployment

                result = run_deployment(
                    config, out, config_path=args.config, resume=args.resume, stop=stop
                )
                if not args.quiet:
                    print_result(result, _stdout_console())
            elif args.quiet:
                result = run(config, out, resume=args.resume, stop=stop)
            else:
                console = Console(stderr=True)
                with ProgressDisplay(config.federation.rounds, console=console) as display:
                    result = run(config, out, observers=[display], resume=args.resume, stop=stop)
                print_result(result, _stdout_console())
    except DiskFullError as exc:
        raise DiskFullError(exc.path, resume=resume) from None
    except Aborted as exc:
        print(f"veil: {exc}; {_how_to_continue(out, resume, shlex.join(command))}", file=sys.stderr)
        return exc.exit_status
    path = out / RESULT_FILE
    if not args.quiet:
        print(f"result: {path}")
        if (out / REPORT_FILE).is_file():
            print(f"report: {out / REPORT_FILE}")
    if result.status == "interrupted":
        print(
            f"veil: {_interrupted(result)}; {_how_to_continue(out, resume, shlex.join(command))}",
            file=sys.stderr,
        )
        return exit_status(result.interrupted_by)
    return 0


def _interrupted(result: Result) -> str:
    """What an interrupted result says: by which signal, after which round."""
    last = max((r.round for r in result.rounds), default=0)
    planned = f" of {result.rounds_planned}" if result.rounds_planned else ""
    return f"interrupted by {result.interrupted_by or 'a signal'} after round {last}{planned}"


def _how_to_continue(out: Path, resume: str, start: str) -> str:
    """The command that continues a stopped run: `--resume` from its checkpoint, or, when it
    stopped before its first round was checkpointed, the run started again."""
    from veil.run import CHECKPOINT_FILE

    if (out / CHECKPOINT_FILE).is_file():
        return f"the finished rounds are kept; continue with `{resume}`"
    return f"no round was finished; start it again with `{start}`"


def _stdout_console() -> Console:
    from rich.console import Console

    # Rich assumes 80 columns when stdout is not a terminal, which would truncate the tables.
    return Console(width=None if sys.stdout.isatty() else 120)


def cmd_runs_list(args: argparse.Namespace) -> int:
    """A table of the runs under `where`, newest first."""
    from rich.table import Table

    from veil.store import RunStore, RunSummary, find_stores

    summaries: list[RunSummary] = []
    for db in find_stores(args.where):
        with RunStore.locate(db) as store:
            summaries += store.list_runs()
    summaries.sort(key=lambda s: (s.started_at, s.run_id), reverse=True)
    table = Table(title=f"Runs in {args.where}", title_justify="left")
    for column in ("run id", "name", "mode", "status", "rounds", "accuracy / R²", "started"):
        table.add_column(column)
    for s in summaries:
        table.add_row(
            s.run_id, s.name, s.mode, s.status, str(s.rounds), _score(s.final), s.started_at
        )
    _stdout_console().print(table)
    return 0


def _score(final: dict[str, Any] | None) -> str:
    """A run's headline metric for `veil runs list`: the final accuracy of a classifier, the
    final R² of a regression ("R² 0.4812"), else "-"."""
    final = final or {}
    if "accuracy" in final:
        return f"{final['accuracy']:.4f}"
    if "r2" in final:
        return f"R² {final['r2']:.4f}"
    return "-"


def cmd_runs_show(args: argparse.Namespace) -> int:
    """One run's rounds and summary, as a table or JSON."""
    from rich.table import Table

    from veil.errors import StoreError
    from veil.store import RunStore, find_stores

    for db in find_stores(args.store):
        with RunStore.locate(db) as store:
            try:
                summary, config, rounds = store.get_run(args.run_id)
            except StoreError:
                continue
        if args.json:
            payload = {"summary": summary.__dict__, "config": config, "rounds": rounds}
            print(json.dumps(payload, indent=2))
            return 0
        console = _stdout_console()
        table = Table(title=f"Run {summary.run_id} ({summary.name}, {summary.status})")
        keys = sorted({k for r in rounds for k in r["metrics"]})
        for column in ("round", "clients", "dropped", *keys):
            table.add_column(column, justify="right")
        for r in rounds:
            table.add_row(
                str(r["round"]),
                str(r["clients"]),
                str(r["dropped"]),
                *(f"{r['metrics'][k]:.4f}" if k in r["metrics"] else "" for k in keys),
            )
        console.print(table)
        console.print(f"final: {summary.final}")
        return 0
    raise StoreError(f"no run '{args.run_id}' under '{args.store}'; see `veil runs list`")
