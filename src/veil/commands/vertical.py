"""`veil psi` and `veil vertical`: private set intersection between two processes over mutual
TLS, and vertical training runs.

    veil psi serve --pki DIR --name NAME --ids FILE [--listen HOST:PORT] [--peer NAME]
                   [--reveal intersection|size] [--port-file FILE]
    veil psi join  --pki DIR --name NAME --ids FILE --server HOST:PORT [--reveal ...] [--out FILE]
    veil vertical ids --party bank|payment --out FILE [--seed N]
    veil vertical train CONFIG [--out DIR]

An ids file holds one customer id per line. Errors are `UserError`s: one line, exit status 2.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from veil.commands import help_of
from veil.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `psi` (serve, join) and `vertical` (ids, train) to the `veil` subcommands."""
    p_psi = sub.add_parser("psi", help=help_of("psi"))
    psi_sub = p_psi.add_subparsers(dest="psi_command", required=True, metavar="ACTION")
    for action, text in (
        ("serve", "the sending party: wait for one PSI request, learn only its size"),
        ("join", "the designated party: learn the intersection (or only its size)"),
    ):
        p = psi_sub.add_parser(action, help=text)
        p.add_argument("--pki", type=Path, required=True, help="the federation's PKI folder")
        p.add_argument("--name", required=True, help="this party's node name in the PKI")
        p.add_argument("--ids", type=Path, required=True, help="file with one id per line")
        p.add_argument("--reveal", choices=["intersection", "size"], default="intersection")
        p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait")
        if action == "serve":
            p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (0: any free)")
            p.add_argument("--peer", help="accept only this client node name")
            p.add_argument("--port-file", type=Path, help="write the bound port here")
            p.set_defaults(handler=_cmd_psi_serve)
        else:
            p.add_argument("--server", required=True, help="the sender's HOST:PORT")
            p.add_argument("--out", type=Path, help="write the intersection here, one id a line")
            p.set_defaults(handler=_cmd_psi_join)

    p_v = sub.add_parser("vertical", help=help_of("vertical"))
    v_sub = p_v.add_subparsers(dest="vertical_command", required=True, metavar="ACTION")
    p_ids = v_sub.add_parser("ids", help="write one party's German credit customer ids")
    p_ids.add_argument("--party", choices=["bank", "payment"], required=True)
    p_ids.add_argument("--out", type=Path, required=True)
    p_ids.add_argument("--seed", type=int, default=0)
    p_ids.set_defaults(handler=_cmd_ids)
    p_train = v_sub.add_parser("train", help="PSI, then train one model (vertical TOML config)")
    p_train.add_argument("config", type=Path)
    p_train.add_argument("--out", type=Path, help="run folder for result.json")
    p_train.set_defaults(handler=_cmd_train)


def _read_ids(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read ids file '{path}': {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"'{path}' is not UTF-8 text; put one id per line") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _print(payload: dict[str, Any]) -> None:
    print(json.dumps(payload), flush=True)


def _cmd_psi_serve(args: argparse.Namespace) -> int:
    from veil.vertical.channel import serve_psi

    def bound(port: int) -> None:
        if args.port_file is not None:
            tmp = args.port_file.with_suffix(".tmp")
            tmp.write_text(str(port))
            tmp.replace(args.port_file)
        _print({"listening": port})

    served = serve_psi(
        _read_ids(args.ids),
        pki_dir=args.pki,
        name=args.name,
        listen=args.listen,
        reveal=args.reveal,
        peer=args.peer,
        timeout_s=args.timeout,
        on_listening=bound,
    )
    _print({"role": "sender", "peer": served.peer, "peer_size": served.peer_size})
    return 0


def _cmd_psi_join(args: argparse.Namespace) -> int:
    from veil.vertical.channel import join_psi

    result = join_psi(
        _read_ids(args.ids),
        pki_dir=args.pki,
        name=args.name,
        server=args.server,
        reveal=args.reveal,
        timeout_s=args.timeout,
    )
    if args.out is not None and result.intersection is not None:
        args.out.write_text("".join(f"{i}\n" for i in result.intersection), encoding="utf-8")
    _print(
        {
            "role": "receiver",
            "intersection_size": result.size,
            "own_size": result.own_size,
            "peer_size": result.peer_size,
        }
    )
    return 0


def _cmd_ids(args: argparse.Namespace) -> int:
    from veil.vertical.data import german_credit_parties

    bank, payment = german_credit_parties(seed=args.seed)
    party = bank if args.party == "bank" else payment
    args.out.write_text("".join(f"{i}\n" for i in party.ids), encoding="utf-8")
    _print({"party": args.party, "ids": len(party.ids), "out": str(args.out)})
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from veil.vertical.config import load_vertical_config
    from veil.vertical.runner import RESULT_FILE, run_vertical

    config = load_vertical_config(args.config)
    out = args.out if args.out is not None else Path("runs") / config.name
    result = run_vertical(config, out)
    _print(
        {
            "intersection_size": result["psi"]["intersection_size"],
            "final": result["final"],
            "centralized_baseline": result["centralized_baseline"],
            "result": str(out / RESULT_FILE),
        }
    )
    return 0
