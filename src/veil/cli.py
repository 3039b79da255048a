"""`veil`: the command line, a thin layer over the Python API.

Exit status: 0 on success, 2 on invalid input (one line on stderr saying what is wrong and what to
do; no traceback), 1 on an unexpected failure, 128 + the signal's number (130 SIGINT, 143
SIGTERM) when a signal stopped a run: `veil run` and `veil server` then print one line saying how
to continue it (`--resume`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from veil import __version__
from veil.commands import audit as audit_commands
from veil.commands import dashboard as dashboard_commands
from veil.commands import deploy as deploy_commands
from veil.commands import he as he_commands
from veil.commands import pki as pki_commands
from veil.commands import privacy as privacy_commands
from veil.commands import report as report_commands
from veil.commands import tee as tee_commands
from veil.commands import vertical as vertical_commands
from veil.config import RunConfig, load_config
from veil.errors import Aborted, DiskFullError, StoreError, UserError
from veil.lifecycle import exit_status, stop_on_signals
from veil.report import ProgressDisplay, print_result
from veil.report.html import REPORT_FILE
from veil.result import Result
from veil.run import CHECKPOINT_FILE, RESULT_FILE, run
from veil.store import RunStore, RunSummary, find_stores

EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `veil` command; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except BrokenPipeError:
        # The reader went away (e.g. `veil runs show ... | head`): not an error of ours.
        sys.stderr.close()
        return 0
    except UserError as exc:
        print(f"veil: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Aborted as exc:
        print(f"veil: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("veil: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="veil", description="Privacy-preserving machine learning across organisations."
    )
    parser.add_argument("--version", action="version", version=f"veil {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p_run = sub.add_parser("run", help="run one federation from a TOML config")
    p_run.add_argument("config", type=Path, help="the run config (TOML)")
    p_run.add_argument(
        "--out", type=Path, help="run folder for result.json and veil.db (default: runs/NAME)"
    )
    p_run.add_argument("--quiet", action="store_true", help="no progress bar and no tables")
    p_run.add_argument(
        "--mode",
        choices=["simulation", "deployment", "ray"],
        help="override the config's mode (same config, run another way)",
    )
    p_run.add_argument(
        "--resume",
        action="store_true",
        help="continue a run that stopped (Ctrl-C, SIGTERM, crash, kill) from --out's "
        "checkpoint, privacy account included",
    )
    p_run.set_defaults(handler=_cmd_run)

    p_runs = sub.add_parser("runs", help="list and show runs recorded in a run store")
    runs_sub = p_runs.add_subparsers(dest="runs_command", required=True, metavar="ACTION")
    p_list = runs_sub.add_parser("list", help="list runs, newest first")
    p_list.add_argument(
        "where",
        nargs="?",
        type=Path,
        default=Path("runs"),
        help="a run folder, a folder of run folders, or a veil.db file (default: runs)",
    )
    p_list.set_defaults(handler=_cmd_runs_list)
    p_show = runs_sub.add_parser("show", help="show one run's rounds and summary")
    p_show.add_argument("run_id", help="the run id, as `veil runs list` prints it")
    p_show.add_argument("--store", type=Path, default=Path("runs"), help="where to look")
    p_show.add_argument("--json", action="store_true", help="print the run as JSON")
    p_show.set_defaults(handler=_cmd_runs_show)
    privacy_commands.register(sub)
    deploy_commands.register(sub)
    pki_commands.register(sub)
    audit_commands.register(sub)
    he_commands.register(sub)
    tee_commands.register(sub)
    vertical_commands.register(sub)
    report_commands.register(sub)
    dashboard_commands.register(sub)
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.mode and args.mode != config.mode:
        config = RunConfig.from_dict(
            {**config.to_dict(), "mode": args.mode}, source=str(args.config)
        )
    out = args.out if args.out is not None else Path("runs") / config.name
    command = ["veil", "run", str(args.config), "--out", str(out)]
    command += ["--mode", args.mode] if args.mode else []
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
    if (out / CHECKPOINT_FILE).is_file():
        return f"the finished rounds are kept; continue with `{resume}`"
    return f"no round was finished; start it again with `{start}`"


def _stdout_console() -> Console:
    # Rich assumes 80 columns when stdout is not a terminal, which would truncate the tables.
    return Console(width=None if sys.stdout.isatty() else 120)


def _stores(where: Path) -> list[Path]:
    return find_stores(where)


def _cmd_runs_list(args: argparse.Namespace) -> int:
    summaries: list[RunSummary] = []
    for db in _stores(args.where):
        with RunStore.locate(db) as store:
            summaries += store.list_runs()
    summaries.sort(key=lambda s: (s.started_at, s.run_id), reverse=True)
    table = Table(title=f"Runs in {args.where}", title_justify="left")
    for column in ("run id", "name", "mode", "status", "rounds", "accuracy", "started"):
        table.add_column(column)
    for s in summaries:
        acc = (s.final or {}).get("accuracy")
        table.add_row(
            s.run_id,
            s.name,
            s.mode,
            s.status,
            str(s.rounds),
            f"{acc:.4f}" if acc is not None else "-",
            s.started_at,
        )
    _stdout_console().print(table)
    return 0


def _cmd_runs_show(args: argparse.Namespace) -> int:
    for db in _stores(args.store):
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


if __name__ == "__main__":
    raise SystemExit(main())
