"""`veil audit RUN_DIR`: measure what a finished run leaks, next to what it promises.

Runs membership inference, gradient inversion and the one-run canary audit against the run in
RUN_DIR (see `veil.privacy.audit.runner`), adds an `audit` section to its result.json and prints
a table. Exit status 3 when the measured ε lower bound exceeds the accountant's ε (the run does
not deliver its claimed guarantee), so that scripts can stop on it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from veil.commands import help_of

#: Exit status when the audit's lower bound exceeds the claimed ε.
EXIT_VIOLATION = 3

#: The attacks of `veil.privacy.audit.runner.ATTACKS` (a test keeps them equal), spelled out so
#: that `veil audit --help` does not import the runner (torch, scikit-learn).
ATTACKS: tuple[str, ...] = ("membership", "inversion", "canaries")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `audit` to the `veil` subcommands."""
    p = sub.add_parser(
        "audit",
        help=help_of("audit"),
        description="Run privacy attacks against a finished run and add an `audit` section to "
        "its result.json: an empirical ε lower bound (canaries) next to the accountant's ε, "
        "membership-inference and gradient-inversion metrics. Exit status 3 if the lower bound "
        "exceeds the accountant's ε.",
    )
    p.add_argument("run_dir", type=Path, help="the run folder (holds result.json and veil.db)")
    p.add_argument("--quick", action="store_true", help="fewer shadows, canaries and steps")
    p.add_argument(
        "--attacks",
        default=",".join(ATTACKS),
        help=f"comma-separated subset of {','.join(ATTACKS)} (default: all)",
    )
    p.add_argument("--shadows", type=int, help="LiRA shadow models (even; default 8 quick, 32)")
    p.add_argument("--canaries", type=int, help="gradient canaries (default 500 quick, 1000)")
    p.add_argument(
        "--input-canaries", type=int, help="input-space canaries (default 50 quick, 200)"
    )
    p.add_argument("--confidence", type=float, default=0.95, help="of the ε lower bound")
    p.add_argument("--seed", type=int, help="seed of the canaries and attacks (default: random)")
    p.add_argument("--key-file", type=Path, help="key file of a sealed checkpoint")
    p.add_argument("--json", action="store_true", help="print the audit section as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=cmd_audit)


class _RichProgress:
    """An `AuditProgress` that shows one rich progress bar per attack."""

    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> _RichProgress:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def start(self, task: str, total: int) -> None:
        self._tasks[task] = self._progress.add_task(task, total=total)

    def advance(self, task: str) -> None:
        self._progress.advance(self._tasks[task])


def cmd_audit(args: argparse.Namespace) -> int:
    """Audit the run, print the findings, exit 3 on a violated claim."""
    from veil.privacy.audit.runner import AuditSettings, audit_run
    from veil.report.audit import audit_table

    settings = AuditSettings(
        attacks=tuple(a.strip() for a in args.attacks.split(",") if a.strip()),
        quick=args.quick,
        shadows=args.shadows,
        gradient_canaries=args.canaries,
        input_canaries=args.input_canaries,
        confidence=args.confidence,
        seed=args.seed,
        key_file=args.key_file,
    )
    if args.quiet or args.json:
        section = audit_run(args.run_dir, settings)
    else:
        with _RichProgress(Console(stderr=True)) as progress:
            section = audit_run(args.run_dir, settings, progress=progress)
    if args.json:
        print(json.dumps(section, indent=2))
    else:
        Console(width=None if sys.stdout.isatty() else 120).print(audit_table(section))
        print(f"audit recorded in {args.run_dir / 'result.json'}")
    return EXIT_VIOLATION if section.get("exceeds_epsilon") else 0
