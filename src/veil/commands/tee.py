"""Trusted-execution commands.

    veil tee measure CONFIG                 the measurement for [tee] allowed_measurements
    veil sign RUN_DIR --identity-key KEY    write RUN_DIR/manifest.json and manifest.sig
    veil verify RUN_DIR [--public-key PUB]  check every artifact against the signed manifest
    veil model export RUN_DIR --out DIR --identity-key KEY
                                            the final model, result.json (run id, privacy record)
                                            and a signed manifest, in a folder of their own
    veil model verify DIR [--public-key PUB]
                                            check an exported model; fails on any changed byte

`veil verify` exits 2 with one line naming the first changed, missing or added file, or a bad
signature.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from veil.commands import help_of


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `tee`, `sign` and `verify` to the `veil` subcommands."""
    p_tee = sub.add_parser("tee", help=help_of("tee"))
    tee_sub = p_tee.add_subparsers(dest="tee_command", required=True, metavar="ACTION")
    p_measure = tee_sub.add_parser(
        "measure", help="the measurement of this Veil installation with CONFIG's aggregation"
    )
    p_measure.add_argument("config", type=Path, help="the run's TOML config")
    p_measure.set_defaults(handler=_cmd_measure)

    p_sign = sub.add_parser("sign", help=help_of("sign"))
    p_sign.add_argument("run_dir", type=Path)
    p_sign.add_argument(
        "--identity-key", type=Path, required=True, help="the node's Ed25519 identity key (PEM)"
    )
    p_sign.set_defaults(handler=_cmd_sign)

    p_verify = sub.add_parser("verify", help=help_of("verify"))
    p_verify.add_argument("run_dir", type=Path)
    p_verify.add_argument(
        "--public-key",
        type=Path,
        help="the signer's identity public key (PEM); without it only integrity is checked",
    )
    p_verify.set_defaults(handler=_cmd_verify)

    p_model = sub.add_parser("model", help=help_of("model"))
    model_sub = p_model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    p_export = model_sub.add_parser("export", help="copy a run's final model and sign it")
    p_export.add_argument("run_dir", type=Path)
    p_export.add_argument("--out", type=Path, required=True, help="a new folder for the model")
    p_export.add_argument(
        "--identity-key", type=Path, required=True, help="the server's Ed25519 identity key (PEM)"
    )
    p_export.set_defaults(handler=_cmd_export)
    p_model_verify = model_sub.add_parser("verify", help="check an exported model's manifest")
    p_model_verify.add_argument("model_dir", type=Path)
    p_model_verify.add_argument(
        "--public-key", type=Path, help="the signer's identity public key (PEM)"
    )
    p_model_verify.set_defaults(handler=_cmd_model_verify)


#: What `veil model export` copies: the final global model and the run's record.
_MODEL_FILES = ("checkpoint.safetensors", "result.json")


def _cmd_export(args: argparse.Namespace) -> int:
    from veil.atomic import atomic_write_bytes
    from veil.crypto.identity import IdentityKey
    from veil.crypto.manifest import sign_run
    from veil.errors import UserError

    missing = [f for f in _MODEL_FILES if not (args.run_dir / f).is_file()]
    if missing:
        raise UserError(
            f"'{args.run_dir}' has no {', '.join(missing)}: export a finished run folder "
            "(the one `veil run --out` wrote)"
        )
    if args.out.exists() and any(args.out.iterdir()):
        raise UserError(f"'{args.out}' is not empty: export into a new folder")
    key = IdentityKey.load(args.identity_key)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in _MODEL_FILES:
        atomic_write_bytes(args.out / name, (args.run_dir / name).read_bytes())
    sign_run(args.out, key)
    print(f"exported: {args.out} (model, result.json, signed manifest)")
    return 0


def _cmd_model_verify(args: argparse.Namespace) -> int:
    args.run_dir = args.model_dir
    return _cmd_verify(args)


def _cmd_measure(args: argparse.Namespace) -> int:
    from veil.assembly.secure_aggregation.tee import measure
    from veil.config import load_config

    print(measure(load_config(args.config)))
    return 0


def _cmd_sign(args: argparse.Namespace) -> int:
    from veil.crypto.identity import IdentityKey
    from veil.crypto.manifest import sign_run

    path = sign_run(args.run_dir, IdentityKey.load(args.identity_key))
    print(f"signed: {path}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from veil.crypto.identity import IdentityPublicKey
    from veil.crypto.manifest import verify_run

    key = IdentityPublicKey.load(args.public_key) if args.public_key else None
    checked = verify_run(args.run_dir, key)
    signer = "the given key" if key else f"{checked.signer.public_bytes().hex()} (unpinned)"
    print(f"verified: {len(checked.files)} files of run {checked.run_id}, signed by {signer}")
    return 0
