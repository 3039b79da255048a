"""`veil`: the command line, a thin layer over the Python API.

Exit status: 0 on success, 2 on invalid input (one line on stderr saying what is wrong and what to
do; no traceback), 1 on an unexpected failure, 128 + the signal's number (130 SIGINT, 143
SIGTERM) when a signal stopped a run: `veil run` and `veil server` then print one line saying how
to continue it (`--resume`).

The parser lists every command of `veil.commands.COMMANDS` by name and help, and imports a
command's module (its parsers and handlers) only when that command is parsed: `veil --help`,
`veil --version` and `veil COMMAND --help` load neither torch nor scikit-learn nor TenSEAL.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from veil import __version__
from veil.commands import COMMANDS
from veil.errors import Aborted, UserError
from veil.lifecycle import die_with_parent

EXIT_USAGE = 2

if TYPE_CHECKING:
    _SubParsersAction = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    _SubParsersAction = argparse._SubParsersAction


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `veil` command; returns the exit status."""
    die_with_parent()
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
    sub = parser.add_subparsers(
        action=_LazyCommands, dest="command", required=True, metavar="COMMAND"
    )
    for name, command in COMMANDS.items():
        # A placeholder that lists the command; parsing it swaps in the module's real parser.
        sub.add_parser(name, help=command.help, add_help=False)
    return parser


class _LazyCommands(_SubParsersAction):
    """The `COMMAND` argument: imports the chosen command's module and lets its `register`
    build the real parsers (in place of the placeholders) before parsing the rest of argv."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        command = COMMANDS.get(values[0])
        if command is not None:
            module = importlib.import_module(command.module)
            # The module's parsers, built under a `veil` of their own so that their usage
            # lines read `veil NAME ...`; they replace the placeholders of this parser.
            scratch = argparse.ArgumentParser(prog=parser.prog)
            scratch_sub = scratch.add_subparsers()
            module.register(scratch_sub)
            self.choices.update(scratch_sub.choices)
        super().__call__(parser, namespace, values, option_string)


if __name__ == "__main__":
    raise SystemExit(main())
