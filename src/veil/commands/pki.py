"""`veil pki`: the federation CA, certificate requests, revocation.

    veil pki init CA_DIR
    veil pki request DIR NAME --role server|client|submitter [--host H ...]   (on its own machine)
    veil pki sign CA_DIR REQUEST.csr [--out CERT]                   (on the CA's machine)
    veil pki revoke CA_DIR NAME
    veil pki show CA_DIR
    veil pki issue CA_DIR NAME --role server|client|submitter       (single-operator test only)

Every command prints file paths and serial numbers, never key material. Errors (existing CA or
node, bad name, missing CA) are `UserError`s: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from veil.commands import help_of
from veil.crypto import pki
from veil.errors import UserError

_DEFAULT_HOSTS = ("localhost", "127.0.0.1")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `pki` (with `init`, `issue`, `revoke` and `show`) to the `veil` subcommands."""
    p_pki = sub.add_parser(
        "pki",
        help=help_of("pki"),
        description="Create the federation CA and issue each node a TLS certificate "
        "(mutual TLS) and an Ed25519 identity key.",
    )
    pki_sub = p_pki.add_subparsers(dest="pki_command", required=True, metavar="ACTION")

    p_init = pki_sub.add_parser("init", help="create DIR/ca.crt and DIR/ca.key")
    p_init.add_argument("dir", type=Path, help="the PKI folder")
    p_init.add_argument("--name", default="Veil federation CA", help="the CA's common name")
    p_init.add_argument("--days", type=int, default=3650, help="validity in days (default 3650)")
    p_init.set_defaults(handler=cmd_init)

    p_request = pki_sub.add_parser(
        "request",
        help="on a member's own machine: create its keys and a certificate request",
        description="Create this node's TLS, identity and encryption keys in DIR/nodes/NAME "
        "(mode 0600, they never leave it) and DIR/nodes/NAME/request.csr for the CA operator.",
    )
    p_request.add_argument("dir", type=Path, help="this organisation's own folder")
    _node_arguments(p_request)
    p_request.add_argument("--overwrite", action="store_true", help="make new keys")
    p_request.set_defaults(handler=cmd_request)

    p_sign = pki_sub.add_parser(
        "sign",
        help="on the CA's machine: check a certificate request and issue its certificate",
        description="Check a request made by `veil pki request` (its signatures, name, role "
        "and hosts) and issue the certificate. The CA never sees a private key.",
    )
    p_sign.add_argument("dir", type=Path, help="the CA folder (holding ca.crt and ca.key)")
    p_sign.add_argument("request", type=Path, help="the request.csr a member sent")
    p_sign.add_argument("--out", type=Path, help="where to write the certificate")
    p_sign.add_argument("--days", type=int, default=825, help="validity in days (default 825)")
    p_sign.set_defaults(handler=cmd_sign)

    p_issue = pki_sub.add_parser(
        "issue",
        help="single-operator test federations only: make a node's keys in the CA's folder",
        description="Create a node's keys AND its certificate in the CA's folder: whoever holds "
        "that folder holds every member's keys. For a test federation run by one operator; a "
        "real federation uses `request` on each member's machine and `sign` on the CA's.",
    )
    p_issue.add_argument("dir", type=Path, help="the PKI folder (holding ca.crt and ca.key)")
    _node_arguments(p_issue)
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


def _node_arguments(parser: argparse.ArgumentParser) -> None:
    """NAME, --role and --host, as `request` and `issue` take them."""
    parser.add_argument("name", help="the node name: 1-64 of letters, digits, '.', '_', '-'")
    parser.add_argument(
        "--role",
        required=True,
        choices=pki.ROLES,
        help="server (the coordinator), client (a member organisation) or submitter (may "
        "submit jobs to a coordinator, nothing else)",
    )
    parser.add_argument(
        "--host",
        action="append",
        dest="hosts",
        metavar="H",
        help="server only: a DNS name or IP address the server is reached at (repeatable; "
        f"default: {' '.join(_DEFAULT_HOSTS)})",
    )


def _hosts(args: argparse.Namespace) -> tuple[str, ...]:
    if args.hosts and args.role != "server":
        raise UserError("--host applies to server certificates only")
    return tuple(args.hosts) if args.hosts else _DEFAULT_HOSTS


def cmd_init(args: argparse.Namespace) -> int:
    """Create the CA and print the certificate path."""
    cert = pki.init_ca(args.dir, name=args.name, days=args.days)
    print(f"CA certificate: {cert}")
    print(f"CA private key: {args.dir / pki.CA_KEY} (mode 0600; keep it offline if you can)")
    return 0


def cmd_issue(args: argparse.Namespace) -> int:
    """Issue one node and print its file paths."""
    hosts = _hosts(args)
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


def cmd_request(args: argparse.Namespace) -> int:
    """Create this node's keys and request; print where they are and what to do next."""
    hosts = _hosts(args)
    path = pki.request(args.dir, args.name, role=args.role, hosts=hosts, overwrite=args.overwrite)
    print(f"keys of '{args.name}' created in {path.parent} (mode 0600; they stay here)")
    print(f"certificate request: {path}")
    print(
        "send the request to the CA operator; put the certificate and ca.crt it sends back at "
        f"{path.parent / pki.NODE_CERT} and {args.dir / pki.CA_CERT}"
    )
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    """Issue the certificate for one request; print its path and serial."""
    path = pki.sign_request(args.dir, args.request, days=args.days, out=args.out)
    cert = pki.load_certificate(path)
    print(f"issued {pki.certificate_role(cert)} '{pki.certificate_name(cert)}' "
          f"(serial {cert.serial_number}): {path}")  # fmt: skip
    print(f"send it back with {args.dir / pki.CA_CERT} and {args.dir / 'crl.pem'}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    """Revoke one node and print its serial."""
    serial = pki.revoke(args.dir, args.name)
    print(f"revoked '{args.name}' (serial {serial}); signed list: {args.dir / 'crl.pem'}")
    print("give the new crl.pem to the coordinator: it hands it to every member with every task")
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
