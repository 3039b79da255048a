"""`veil schema infer` and `veil schema check`: the federation's data contract.

    veil schema infer DATA.csv --target COL [--task T] --out schema.toml
    veil schema check schema.toml DATA.csv

`infer` proposes a schema from one organisation's CSV and says that its bounds and categories
come from that one file and must be reviewed. `check` lists every violation, one line each
(at most `MAX_LINES`, then how many more), and exits 2 when there is any; 0 when the file
agrees with the schema. See `veil.data.contract`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Final

from veil.commands import help_of

MAX_LINES: Final[int] = 50
"""`veil schema check` prints at most this many violations, then "... and N more"."""

EXIT_VIOLATIONS: Final[int] = 2


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `schema` (with `infer` and `check`) to the `veil` subcommands."""
    p_schema = sub.add_parser("schema", help=help_of("schema"))
    schema_sub = p_schema.add_subparsers(dest="schema_command", required=True, metavar="ACTION")
    p = schema_sub.add_parser(
        "infer",
        help="propose a schema from one organisation's CSV (review its bounds and categories)",
    )
    p.add_argument("data", type=Path, help="the CSV file")
    p.add_argument("--target", required=True, help="the label column")
    p.add_argument(
        "--task",
        choices=["binary", "multiclass", "regression"],
        help="the task (default: guessed from the target's values)",
    )
    p.add_argument("--out", type=Path, required=True, help="write the schema TOML here")
    p.set_defaults(handler=_cmd_infer)

    p = schema_sub.add_parser(
        "check", help="list every violation of a schema in a CSV (exit 2 if any)"
    )
    p.add_argument("schema", type=Path, help="the schema TOML file")
    p.add_argument("data", type=Path, help="the CSV file")
    p.set_defaults(handler=_cmd_check)


def _cmd_infer(args: argparse.Namespace) -> int:
    from veil.data.contract import (
        REVIEW_NOTICE,
        feature_names,
        infer_schema,
        save_schema,
        schema_hash,
    )

    schema = infer_schema(args.data, target=args.target, task=args.task)
    notice = REVIEW_NOTICE.format(source=args.data.name)
    save_schema(schema, args.out, comment=notice)
    print(f"REVIEW: {notice}")
    print(
        f"wrote {args.out}: target {schema.target!r} ({schema.task}"
        + (f", classes {', '.join(schema.classes)}" if schema.classes else "")
        + f"), {len(schema.columns)} columns ({len(feature_names(schema))} encoded), "
        f"{len(schema.identifiers)} identifiers dropped, hash {schema_hash(schema)[:16]}"
    )
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from veil.data.contract import check_frame, load_schema, read_table, schema_hash

    schema = load_schema(args.schema)
    frame = read_table(args.data)
    violations = check_frame(schema, frame)
    if not violations:
        print(
            f"{args.data}: {len(frame)} rows agree with {args.schema} "
            f"(hash {schema_hash(schema)[:16]})"
        )
        return 0
    for violation in violations[:MAX_LINES]:
        print(f"{args.data}: {violation}", file=sys.stderr)
    if len(violations) > MAX_LINES:
        print(f"... and {len(violations) - MAX_LINES} more", file=sys.stderr)
    print(
        f"{args.data}: {len(violations)} violations of {args.schema} "
        "(rows are data rows: row 1 is the line after the header)",
        file=sys.stderr,
    )
    return EXIT_VIOLATIONS
