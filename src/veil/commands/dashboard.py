"""`veil dashboard RUN_DIR_OR_DB`: a read-only local web page of runs, live while they run."""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path

from veil.commands import help_of

#: `veil.report.dashboard.DEFAULT_HOST` and `DEFAULT_PORT` (a test keeps them equal), spelled
#: out so that `veil dashboard --help` does not import the report package (torch).
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `dashboard` to the `veil` subcommands."""
    p = sub.add_parser(
        "dashboard",
        help=help_of("dashboard"),
        description="Serve a read-only web page that lists the runs of a run store and follows "
        "a running federation round by round (round, organisations, metrics, ε, and the "
        "report's quality, loss and ε curves). WHERE may be empty or not exist yet: runs "
        "appear as they start. It shows no raw data, paths or keys. Bound to 127.0.0.1 "
        "unless --host says otherwise.",
    )
    p.add_argument(
        "where",
        nargs="?",
        type=Path,
        default=Path("runs"),
        help="a run folder, a folder of run folders, or a veil.db file, which may not exist "
        "yet (default: runs)",
    )
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST})")
    p.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any)"
    )
    p.set_defaults(handler=cmd_dashboard)


def cmd_dashboard(args: argparse.Namespace) -> int:
    from veil.report.dashboard import RunSource, make_server, url_of

    server = make_server(args.where, host=args.host, port=args.port)
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        print(
            f"veil: warning: the dashboard listens on {args.host}: anyone who can reach it can "
            "read the run list and metrics (there is no login)",
            file=sys.stderr,
        )
    print(f"dashboard: {url_of(server)} (read-only; Ctrl-C to stop)", flush=True)
    if not RunSource(args.where).stores():
        print(f"dashboard: no runs in '{args.where}' yet; the page lists them as they start")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
