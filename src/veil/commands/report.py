"""`veil report RUN_DIR`: write the run's self-contained `report.html` and print its path."""

from __future__ import annotations

import argparse
from pathlib import Path

from veil.commands import help_of


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `report` to the `veil` subcommands."""
    p = sub.add_parser(
        "report",
        help=help_of("report"),
        description="Write a self-contained HTML report of a finished run (charts inline, "
        "nothing loaded from the network). `veil run` writes it by itself at the end.",
    )
    p.add_argument("run_dir", type=Path, help="the run folder (holds result.json and veil.db)")
    p.set_defaults(handler=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from veil.report.html import write_report

    print(f"report: {write_report(args.run_dir)}")
    return 0
