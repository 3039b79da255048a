"""`veil pki`: create the federation CA, issue and revoke node certificates, list them.

    veil pki init DIR
    veil pki issue DIR NAME --role server|client [--host H ...] [--overwrite]
    veil pki revoke DIR NAME
    veil pki show DIR

Every command prints file paths and serial numbers, never key material. Errors (existing CA or
node, bad name, missing CA) are `UserError`s: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from veil.crypto import pki
from veil.errors import UserError

_DEFAULT_HOSTS = ("localhost", "127.0.0.1")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `pki` (with `init`, `issue`, `revoke` and `show`) to the `veil` subcommands."""
    p_pki = sub.add_parser(
        "pki",
        help="the federation's certificate authority: init, issue, revoke, show",
        description="Create the federation CA and issue each node a TLS certificate "
        "(mutual TLS) and an Ed25519 identity key.",
    )
    pki_sub = p_pki.add_subparsers(dest="pki_command", required=True, metavar="ACTION")

    p_init = pki_sub.add_parser("init", help="create DIR/ca.crt and DIR/ca.key")
    p_init.add_argument("dir", type=Path, help="the PKI folder")
    p_init.add_argument("--name", default="Veil federation CA", help="the CA's common name")
    p_init.add_argument("--days", type=int, default=3650, help="validity in days (default 3650)")
    p_init.set_defaults(handler=cmd_init)

    p_issue = pki_sub.add_parser(
        "issue", help="issue a node's certificate, TLS key and identity key"
    )
    p_issue.add_argument("dir", type=Path, help="the PKI folder (holding ca.crt and ca.key)")
    p_issue.add_argument("name", help="the node name: 1-64 of letters, digits, '.', '_', '-'")
    p_issue.add_argument("--role", required=True, choices=pki.ROLES, help="server or client")
    p_issue.add_argument(
        "--host",
        action="append",
        dest="hosts",
        metavar="H",
        help="server only: a DNS name or IP address the server is reached at (repeatable; "
        f"default: {' '.join(_DEFAULT_HOSTS)})",
    )
    p_issue.add_argument("--days", type=int, default=825, help="validity in days (default 825)")
    p_issue.add_argument("--overwrite", action="store_true", help="replace an existing node")
    p_issue.set_defaults(handler=cmd_issue)

    p_revoke = pki_sub.add_parser("revoke", help="add a node's serial to DIR/revoked.txt")
    p_revoke.add_argument("dir", type=Path, help="the PKI folder")
    p_revoke.add_argument("name", help="the node name")
    p_revoke.set_defaults(handler=cmd_revoke)

    p_show = pki_sub.add_parser("show", help="list issued nodes")
    p_show.add_argument("dir", type=Path, help="the PKI folder")
    p_show.set_defaults(handler=cmd_show)


def cmd_init(args: argparse.Namespace) -> int:
    """Create the CA and print the certificate path."""
    cert = pki.init_ca(args.dir, name=args.name, days=args.days)
    print(f"CA certificate: {cert}")
    print(f"CA private key: {args.dir / pki.CA_KEY} (mode 0600; keep it offline if you can)")
    return 0


def cmd_issue(args: argparse.Namespace) -> int:
    """Issue one node and print its file paths."""
    if args.hosts and args.role != "server":
        raise UserError("--host applies to server certificates only")
    hosts = tuple(args.hosts) if args.hosts else _DEFAULT_HOSTS
    files = pki.issue(
        args.dir, args.name, role=args.role, days=args.days, hosts=hosts, overwrite=args.overwrite
    )
    cert = pki.load_certificate(files.cert)
    print(f"issued {files.role} '{files.name}' (serial {cert.serial_number})")
    print(f"  certificate:  {files.cert}")
    print(f"  TLS key:      {files.key} (mode 0600)")
    print(f"  identity key: {files.identity_key} (mode 0600)")
    print(f"  identity pub: {files.identity_pub}")
    print(f"  CA:           {files.ca_cert}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    """Revoke one node and print its serial."""
    serial = pki.revoke(args.dir, args.name)
    print(f"revoked '{args.name}' (serial {serial}) in {args.dir / pki.REVOKED}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """Print a table of issued nodes."""
    nodes = pki.issued_nodes(args.dir)
    table = Table(title=f"Nodes issued by {args.dir / pki.CA_CERT}", title_justify="left")
    for column in ("name", "role", "serial", "expires (UTC)", "revoked"):
        table.add_column(column, justify="right" if column == "serial" else "left")
    for n in nodes:
        table.add_row(
            n.name,
            n.role,
            str(n.serial),
            f"{n.not_after:%Y-%m-%d %H:%M}",
            "yes" if n.revoked else "no",
        )
    _console().print(table)
    return 0


def _console() -> Console:
    # Rich assumes 80 columns when stdout is not a terminal, which would truncate the tables.
    return Console(width=None if sys.stdout.isatty() else 140)
