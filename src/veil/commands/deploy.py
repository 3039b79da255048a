"""`veil server`, `veil client` and `veil status`: the processes of a real deployment."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from veil.commands import help_of
from veil.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `server`, `client`, `keygen` and `status` to the `veil` subcommands."""
    p = sub.add_parser("server", help=help_of("server"))
    p.add_argument("config", type=Path)
    p.add_argument("--run-dir", type=Path, required=True, help="where result.json and veil.db go")
    p.add_argument(
        "--pki",
        type=Path,
        required=True,
        help="the coordinator's own folder: ca.crt, crl.pem, nodes/server/ (its keys) and each "
        "member's public certificate nodes/NAME/node.crt; never the CA's key",
    )
    p.add_argument(
        "--test-data",
        type=Path,
        help="an optional held-out evaluation file (CSV or Parquet, checked against [data] "
        "schema_file; default [data] test_file); without a data contract, the prepared .npz",
    )
    p.add_argument("--address", help="host:port to listen on (default from [deployment])")
    p.add_argument("--port-file", type=Path, help="write the chosen port here once listening")
    p.add_argument("--insecure-dev", action="store_true", help="plaintext: development only")
    p.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")
    p.add_argument("--checkpoint-key", type=Path, help="key file sealing checkpoints at rest")
    _aggregation_option(p)
    p.set_defaults(handler=_cmd_server)

    p = sub.add_parser("client", help=help_of("client"))
    p.add_argument("config", type=Path)
    p.add_argument("--name", required=True, help="this node's name, as in its certificate")
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        help="this organisation's own data file (CSV or Parquet), checked against [data] "
        "schema_file before anything is sent: each violation is listed and nothing is trained",
    )
    p.add_argument(
        "--pki",
        type=Path,
        required=True,
        help="this organisation's own folder: ca.crt, crl.pem and nodes/NAME/ (its keys)",
    )
    p.add_argument("--server", required=True, help="the server's host:port")
    p.add_argument(
        "--policy",
        type=Path,
        metavar="FILE",
        help="the site's policy.toml: every task is checked against it; a task it forbids is "
        "refused with the reason",
    )
    p.add_argument("--insecure-dev", action="store_true", help="plaintext: development only")
    _aggregation_option(p)
    p.set_defaults(handler=_cmd_client)

    p = sub.add_parser("keygen", help=help_of("keygen"))
    p.add_argument("path", type=Path, help="where to write the key (mode 0600; never overwritten)")
    p.set_defaults(handler=_cmd_keygen)

    p = sub.add_parser("status", help=help_of("status"))
    p.add_argument("--server", required=True, help="host:port")
    p.add_argument("--pki", type=Path, required=True, help="PKI folder")
    p.add_argument("--name", required=True, help="a member whose certificate to present")
    p.set_defaults(handler=_cmd_status)


def _aggregation_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--secure-aggregation",
        metavar="NAME",
        help="override the config's secure_aggregation (every process of the run must agree: "
        "the coordinator refuses a member whose config differs at join)",
    )


def _warn_insecure() -> None:
    print(
        "veil: WARNING: --insecure-dev: plaintext channel without mutual TLS; anyone on the "
        "network can read and forge this traffic. Never use it with real data.",
        file=sys.stderr,
    )


def _cmd_server(args: argparse.Namespace) -> int:
    """Serve one run. SIGINT/SIGTERM stop it at the next round boundary (the clients are told
    the run is over; status "interrupted", exit 130/143, one line on how to continue); a
    second one, or SIGHUP (sent when a parent `veil run` dies), aborts at once."""
    from veil.deployment import configure_logging, load, serve
    from veil.lifecycle import exit_status, stop_on_signals

    if args.insecure_dev:
        _warn_insecure()
    configure_logging()
    with stop_on_signals(abort_on=(signal.SIGHUP,)) as stop:
        result = serve(
            load(args.config, secure_aggregation=args.secure_aggregation),
            run_dir=args.run_dir,
            pki_dir=args.pki,
            test_data=args.test_data,
            address=args.address,
            insecure=args.insecure_dev,
            port_file=args.port_file,
            resume=args.resume,
            checkpoint_key=args.checkpoint_key,
            stop=stop,
        )
    if result.status == "interrupted":
        last = max((r.round for r in result.rounds), default=0)
        print(
            f"veil: interrupted by {result.interrupted_by} after round {last} of "
            f"{result.rounds_planned}; continue with the same `veil server` command and --resume",
            file=sys.stderr,
        )
        return exit_status(result.interrupted_by)
    return 0


def _cmd_client(args: argparse.Namespace) -> int:
    from veil.deployment import configure_logging, load, serve_client

    # isort: split
    import grpc  # after Veil's transport, which silences gRPC's C-core log before it loads

    if args.insecure_dev:
        _warn_insecure()
    configure_logging()
    try:
        serve_client(
            load(args.config, secure_aggregation=args.secure_aggregation),
            name=args.name,
            data=args.data,
            pki_dir=args.pki,
            server=args.server,
            insecure=args.insecure_dev,
            policy=args.policy,
        )
    except grpc.RpcError as exc:
        raise UserError(f"the server refused or cannot be reached: {exc.details()}") from None
    return 0


def _cmd_keygen(args: argparse.Namespace) -> int:
    from veil.crypto.envelope import generate_key_file

    generate_key_file(args.path)
    print(f"key file: {args.path} (keep it apart from the checkpoints it protects)")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from veil.crypto import pki
    from veil.crypto.keyfile import read_private
    from veil.transport.grpc import veil_pb2 as pb
    from veil.transport.grpc import veil_pb2_grpc as pb_grpc
    from veil.transport.grpc.client import ClientCredentials, open_channel

    # isort: split
    import grpc  # after Veil's transport, which silences gRPC's C-core log before it loads

    files = pki.node_files(args.pki, args.name)
    creds = ClientCredentials(
        files.cert.read_bytes(), read_private(files.key, "TLS key"), files.ca_cert.read_bytes()
    )
    with open_channel(args.server, creds) as channel:
        try:
            stub = pb_grpc.FederationStub(channel)  # type: ignore[no-untyped-call]
            reply = stub.Status(pb.StatusRequest(), timeout=10)
        except grpc.RpcError as exc:
            raise UserError(f"cannot reach the server at {args.server}: {exc.details()}") from None
    print(json.dumps(json.loads(reply.json), indent=2))
    return 0
