"""`veil he keygen`, `veil serve` and `veil predict`: CKKS keys and encrypted inference.

    veil he keygen CONFIG --pki DIR [--client NAME ...] [--rotate]
    veil serve MODEL --pki DIR [--name server] [--address HOST:PORT] [--mutual-tls]
    veil predict URL FEATURES --pki DIR [--name CLIENT] [--out FILE]

Nothing prints key material. Errors are `UserError`s: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from veil.commands import help_of
from veil.errors import UserError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `he` (with `keygen`), `serve` and `predict` to the `veil` subcommands."""
    p_he = sub.add_parser("he", help=help_of("he"))
    he_sub = p_he.add_subparsers(dest="he_command", required=True, metavar="ACTION")
    p = he_sub.add_parser(
        "keygen",
        help="create a CKKS key for a run: public context for the server, the secret key "
        "sealed to each client (written to PKI/he/)",
    )
    p.add_argument("config", type=Path, help="the run config (its [ckks] parameters)")
    p.add_argument("--pki", type=Path, required=True, help="the federation's PKI folder")
    p.add_argument(
        "--client",
        action="append",
        dest="clients",
        metavar="NAME",
        help="a recipient (repeatable; default: every unrevoked client of the PKI)",
    )
    p.add_argument("--rotate", action="store_true", help="replace existing keys with new ones")
    p.set_defaults(handler=_cmd_keygen)

    p = sub.add_parser("serve", help=help_of("serve"))
    p.add_argument("model", type=Path, help="a run folder or checkpoint of a logistic model")
    p.add_argument("--pki", type=Path, required=True, help="PKI folder with the server's node")
    p.add_argument("--name", default="server", help="the server's node name (default: server)")
    p.add_argument("--address", default="127.0.0.1:8443", help="HOST:PORT (port 0: any free)")
    p.add_argument("--mutual-tls", action="store_true", help="require client certificates")
    p.add_argument("--port-file", type=Path, help="write the chosen port here once listening")
    p.add_argument("--checkpoint-key", type=Path, help="key file of a sealed checkpoint")
    p.set_defaults(handler=_cmd_serve)

    p = sub.add_parser("predict", help=help_of("predict"))
    p.add_argument("url", help="the inference server, https://HOST:PORT")
    p.add_argument("features", type=Path, help=".npz (array 'x') or .csv of numeric features")
    p.add_argument("--pki", type=Path, required=True, help="PKI folder holding ca.crt")
    p.add_argument("--name", help="present this client node's certificate (mutual TLS)")
    p.add_argument("--out", type=Path, help="write class probabilities as CSV (default: stdout)")
    p.set_defaults(handler=_cmd_predict)


def _cmd_keygen(args: argparse.Namespace) -> int:
    from veil.assembly.secure_aggregation.ckks import settings_from_config
    from veil.config import load_config
    from veil.privacy.he.keys import HE_DIR, KEYSET, ceremony

    config = load_config(args.config)
    params = settings_from_config(config.ckks).params
    public = ceremony(args.pki, params, clients=args.clients, rotate=args.rotate)
    out = args.pki / HE_DIR
    print(f"CKKS key {public.key_id}: public context {out / 'public.ctx'} (give it to the server)")
    print(f"  sealed secret keys: {out / 'sealed'} (give each client its own NAME.box)")
    print(f"  key set: {out / KEYSET}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from veil.crypto.envelope import load_key_file
    from veil.privacy.he.inference import LinearModel, serve_https

    key = load_key_file(args.checkpoint_key) if args.checkpoint_key else None
    model = LinearModel.load(args.model, key=key)
    server, port = serve_https(
        model,
        pki_dir=args.pki,
        name=args.name,
        address=args.address,
        mutual_tls=args.mutual_tls,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    if args.port_file:
        args.port_file.write_text(str(port))
    print(
        f"serving a linear model ({model.features} features, {model.classes} classes) for "
        f"encrypted inference on https://{args.address.rpartition(':')[0]}:{port}",
        file=sys.stderr,
        flush=True,
    )
    try:
        while True:
            time.sleep(3600)
    finally:
        server.shutdown()


def _cmd_predict(args: argparse.Namespace) -> int:
    from veil.privacy.he.inference import predict, softmax

    x = read_features(args.features)
    probabilities = softmax(predict(args.url, x, pki_dir=args.pki, name=args.name))
    handle = args.out.open("w", newline="") if args.out else sys.stdout
    try:
        writer = csv.writer(handle)
        writer.writerow([f"p{k}" for k in range(probabilities.shape[1])])
        writer.writerows([[f"{p:.6f}" for p in row] for row in probabilities])
    finally:
        if args.out:
            handle.close()
    return 0


def read_features(path: Path) -> npt.NDArray[np.float64]:
    """A feature matrix from .npz (array 'x') or a numeric .csv with a header row; features
    must be preprocessed (scaled, one-hot) as the model was trained on them."""
    import numpy as np

    if not path.is_file():
        raise UserError(f"no features file at '{path}'")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive.files:
                raise UserError(f"'{path}' has no array 'x' (it has {archive.files})")
            return np.asarray(archive["x"], np.float64)
    try:
        return np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2, dtype=np.float64)
    except ValueError as exc:
        raise UserError(f"'{path}' is not a numeric CSV with a header row: {exc}") from None
