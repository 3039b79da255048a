"""Trusted-execution commands.

    veil tee measure CONFIG                 the measurement for [tee] allowed_measurements
    veil sign RUN_DIR --identity-key KEY    write RUN_DIR/manifest.json and manifest.sig
    veil verify RUN_DIR [--public-key PUB]  check every artifact against the signed manifest

`veil verify` exits 2 with one line naming the first changed, missing or added file, or a bad
signature.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `tee`, `sign` and `verify` to the `veil` subcommands."""
    p_tee = sub.add_parser("tee", help="attested aggregation: print the aggregator measurement")
    tee_sub = p_tee.add_subparsers(dest="tee_command", required=True, metavar="ACTION")
    p_measure = tee_sub.add_parser(
        "measure", help="the measurement of this Veil installation with CONFIG's aggregation"
    )
    p_measure.add_argument("config", type=Path, help="the run's TOML config")
    p_measure.set_defaults(handler=_cmd_measure)

    p_sign = sub.add_parser("sign", help="sign a run folder's artifacts (SHA-256 manifest)")
    p_sign.add_argument("run_dir", type=Path)
    p_sign.add_argument(
        "--identity-key", type=Path, required=True, help="the node's Ed25519 identity key (PEM)"
    )
    p_sign.set_defaults(handler=_cmd_sign)

    p_verify = sub.add_parser("verify", help="check a run folder against its signed manifest")
    p_verify.add_argument("run_dir", type=Path)
    p_verify.add_argument(
        "--public-key",
        type=Path,
        help="the signer's identity public key (PEM); without it only integrity is checked",
    )
    p_verify.set_defaults(handler=_cmd_verify)


def _cmd_measure(args: argparse.Namespace) -> int:
    from veil.config import load_config
    from veil.privacy.tee.measurement import measure

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
