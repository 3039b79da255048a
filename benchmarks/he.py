"""Benchmark: CKKS aggregation, Veil's packing against one ciphertext per layer (NVIDIA FLARE).

For 10 clients holding SYNTHETIC float32 updates (uniform in [-0.01, 0.01]) of a model with
D parameters in six layers (an MLP-like layout: 78.4%, 0.1%, 20%, 0.02%, 1.48%, 0.001% of D),
one round is run in this run both ways:

* veil: the code a federation uses. Each client's `CkksParticipant.seal` clips, weights and
  packs the flat update [w·Δ | w | clipped | capped | 1] into N/2-value ciphertexts (N = 8192,
  primes [60, 40], scale 2^40: one data prime, symmetric encryption, no Galois or
  relinearisation keys) in fixed-size frames; the server's `CkksAggregator` parses and keeps
  them; every member confirms the member set and one decryptor's `handle` verifies the
  signatures, adds the ciphertexts itself, decrypts, floods and rounds the sum.
* per-layer baseline: what NVIDIA FLARE's HE filters do (`HEModelEncryptor`): a TenSEAL context
  with FLARE's default parameters (N = 8192, primes [60, 40, 40], scale 2^40, public-key
  encryption), one `ts.ckks_vector(context, layer)` per layer, serialised; the server
  deserialises and adds layer by layer; decryption layer by layer.

Encryption runs in two worker processes at once (both cores, as 10 clients on one 2-core
machine would), each worker encrypting half of the clients both ways, interleaved client by
client so that both methods meet the same load; the blobs come back as raw files.
Reported: encryption throughput per client (parameters/s, median client, both cores busy),
ciphertext bytes relative to float32, server addition time for the 10 clients, decryption time,
and the largest error of the decrypted sum.

Targets (issue 6), 10 clients x 1M: ciphertext <= 8.5x float32 bytes (the per-layer baseline
is about 15x), encryption throughput at least 1.5x the baseline's in the same run.

    python benchmarks/he.py [--quick] [--params 1000000] [--clients 10]

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tenseal as ts

from veil.crypto.identity import IdentityKey
from veil.federation.messages import FitResult, ProtocolInstruction
from veil.federation.pipeline import RoundContext
from veil.privacy.he import keys as he_keys
from veil.privacy.he.aggregator import ENCRYPTED, CkksAggregator
from veil.privacy.he.ckks import CkksParams
from veil.privacy.he.keys import SecretKeySet
from veil.privacy.he.participant import CkksParticipant
from veil.privacy.he.settings import CkksSettings
from veil.privacy.he.wire import DECRYPT
from veil.privacy.secagg.layout import UpdateLayout
from veil.privacy.secagg.roster import StaticRoster

FRACTIONS = (0.784, 0.001, 0.2, 0.0002, 0.0148, 0.00001)
FLARE = {"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [60, 40, 40], "scale_bits": 40}
SETTINGS = CkksSettings(clip_range=1.0, max_weight=100.0)
WEIGHT = 10.0


def layers(d: int) -> dict[str, tuple[int, ...]]:
    sizes = [max(1, round(f * d)) for f in FRACTIONS]
    sizes[0] += d - sum(sizes)
    return {f"layer{i}": (s,) for i, s in enumerate(sizes)}


def update(client: int, d: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 + client)
    return {n: rng.uniform(-0.01, 0.01, s).astype(np.float32) for n, s in layers(d).items()}


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """TenSEAL prints a warning on C++ stdout for every multi-ciphertext vector (the baseline's
    large layers); keep it out of the JSON output."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


# -- workers (separate processes; results as raw files and one JSON line) --------------------


def worker(clients: list[int], d: int, folder: Path) -> None:
    """Encrypt `clients`' updates both ways, interleaved client by client (alternating which
    goes first), so that both methods meet the same machine load."""
    meta = json.loads((folder / "veil.json").read_text())
    keys = SecretKeySet(meta["key_id"], CkksParams(), (folder / "veil.ctx").read_bytes(), bytes(32))
    layout = UpdateLayout.of(update(0, d))
    participant = CkksParticipant(
        "bench", keys, SETTINGS, layout, IdentityKey.generate(), StaticRoster({})
    )
    rounds = itertools.count(1)  # one upload per round: each sealing is its own round
    flare = ts.context_from((folder / "flare.ctx").read_bytes())

    def veil(c: int) -> float:
        u = update(c, d)
        start = time.perf_counter()
        context = RoundContext("bench", next(rounds))
        sealed = participant.seal(FitResult(f"c{c}", context.round, u, WEIGHT, 1), context)
        seconds = time.perf_counter() - start
        sealed.update[ENCRYPTED].tofile(folder / f"veil-{c}.bin")
        return seconds

    def per_layer(c: int) -> float:
        u = update(c, d)
        start = time.perf_counter()
        with quiet_stdout():
            blobs = [
                ts.ckks_vector(flare, (WEIGHT * v.astype(np.float64)).ravel()).serialize()
                for v in u.values()
            ]
        seconds = time.perf_counter() - start
        for i, b in enumerate(blobs):
            (folder / f"flare-{c}-{i}.bin").write_bytes(b)
        return seconds

    veil(clients[0]), per_layer(clients[0])  # warm-up
    times: dict[str, dict[int, float]] = {"veil": {}, "flare": {}}
    for k, c in enumerate(clients):
        order = [("veil", veil), ("flare", per_layer)]
        for name, fn in order if k % 2 == 0 else order[::-1]:
            times[name][c] = fn(c)
    print(json.dumps(times))


def encrypt_all(n: int, d: int, folder: Path) -> dict[str, dict[int, float]]:
    """Both cores: two worker processes, each encrypting half of the clients."""
    halves = [list(range(0, n, 2)), list(range(1, n, 2))]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--worker",
                "--folder",
                str(folder),
                "--params",
                str(d),
                "--only",
                ",".join(map(str, h)),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for h in halves
    ]
    times: dict[str, dict[int, float]] = {"veil": {}, "flare": {}}
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"worker failed: {out}")
        for name, values in json.loads(out.strip().splitlines()[-1]).items():
            times[name].update({int(k): v for k, v in values.items()})
    return times


# -- the server's side, in this process -------------------------------------------------------


class Members:
    """The round's channel to its members: every member confirms; one decrypts (timed)."""

    def __init__(self, members: dict[str, CkksParticipant]) -> None:
        self.members = members
        self.seconds = 0.0

    def exchange(self, stage: str, bodies: dict[str, bytes]) -> dict[str, bytes]:
        replies = {}
        for name, body in bodies.items():
            start = time.perf_counter()
            replies[name] = self.members[name].handle(ProtocolInstruction("bench", 1, stage, body))
            if stage == DECRYPT:
                self.seconds = time.perf_counter() - start
        return replies


def veil_round(n: int, d: int, folder: Path, secret: SecretKeySet, public: Any) -> dict[str, Any]:
    """One round as a federation runs it. The members seal their updates again in this process
    (untimed; encryption is timed in the workers): a decryptor confirms and decrypts only sums
    that hold its own upload."""
    layout = UpdateLayout.of(update(0, d))
    settings = CkksSettings(**{**SETTINGS.__dict__, "decryptors": 1})
    aggregator = CkksAggregator(settings, layout, public)
    identities = {f"c{c}": IdentityKey.generate() for c in range(n)}
    roster = StaticRoster({name: k.public_key() for name, k in identities.items()})
    members = {
        name: CkksParticipant(name, secret, settings, layout, key, roster)
        for name, key in identities.items()
    }
    channel = Members(members)
    context = RoundContext("bench", 1, tuple(members))
    acc = aggregator.start(layout.reference_view(), context, channel)  # type: ignore[arg-type]
    sealed = [
        members[f"c{c}"].seal(FitResult(f"c{c}", 1, update(c, d), WEIGHT, 1), context)
        for c in range(n)
    ]
    start = time.perf_counter()
    for result in sealed:
        acc.add(result)
    add_s = time.perf_counter() - start
    start = time.perf_counter()
    aggregate = acc.finish()
    finish_s = time.perf_counter() - start
    plain = sum(
        WEIGHT * np.concatenate([v.astype(np.float64) for v in update(c, d).values()])
        for c in range(n)
    )
    got = np.concatenate([aggregate.total[k].ravel().astype(np.float64) for k in layout.names])
    return {
        "ciphertext_bytes": int(sealed[0].update[ENCRYPTED].nbytes),
        "add_s": add_s,
        "decrypt_s": channel.seconds,
        "finish_s": finish_s,
        "max_error": float(np.max(np.abs(got - plain))),
    }


def flare_round(n: int, d: int, folder: Path, secret_ctx: ts.Context) -> dict[str, Any]:
    names = list(layers(d))
    server_ctx = secret_ctx.copy()
    server_ctx.make_context_public()
    blobs = [
        [(folder / f"flare-{c}-{i}.bin").read_bytes() for i in range(len(names))] for c in range(n)
    ]
    with quiet_stdout():
        start = time.perf_counter()
        totals: list[Any] = []
        for c in range(n):
            for i, b in enumerate(blobs[c]):
                v = ts.ckks_vector_from(server_ctx, b)
                if c == 0:
                    totals.append(v)
                else:
                    totals[i] += v
        add_s = time.perf_counter() - start
        sums = [t.serialize() for t in totals]
        start = time.perf_counter()
        decrypted = [np.asarray(ts.ckks_vector_from(secret_ctx, s).decrypt()) for s in sums]
        decrypt_s = time.perf_counter() - start
    plain = sum(
        WEIGHT * np.concatenate([v.astype(np.float64) for v in update(c, d).values()])
        for c in range(n)
    )
    return {
        "ciphertext_bytes": sum(len(b) for b in blobs[0]),
        "add_s": add_s,
        "decrypt_s": decrypt_s,
        "max_error": float(np.max(np.abs(np.concatenate(decrypted) - plain))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100k parameters, one repeat")
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--only", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker([int(c) for c in args.only.split(",") if c], args.params, args.folder)
        return
    d = 100_000 if args.quick else args.params
    repeats = 1 if args.quick else args.repeats
    n = args.clients
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        secret, public = he_keys.generate(CkksParams())
        (folder / "veil.ctx").write_bytes(secret.context)
        (folder / "veil.json").write_text(json.dumps({"key_id": secret.key_id}))
        flare_ctx = ts.context(
            ts.SCHEME_TYPE.CKKS,
            FLARE["poly_modulus_degree"],
            coeff_mod_bit_sizes=FLARE["coeff_mod_bit_sizes"],
        )
        flare_ctx.global_scale = 2.0 ** FLARE["scale_bits"]
        (folder / "flare.ctx").write_bytes(flare_ctx.serialize(save_secret_key=True))
        enc: dict[str, list[float]] = {"veil": [], "flare": []}
        for _ in range(repeats):  # the median client of each repeat, best repeat
            times = encrypt_all(n, d, folder)
            for method in enc:
                enc[method].append(statistics.median(times[method].values()))
        veil = veil_round(n, d, folder, secret, public)
        flare = flare_round(n, d, folder, flare_ctx)
    float32 = 4 * d
    result: dict[str, Any] = {"clients": n, "params": d, "cores": 2, "machine_cpus": os.cpu_count()}
    for name, r, times in (("veil", veil, enc["veil"]), ("per_layer", flare, enc["flare"])):
        result[name] = {
            "encrypt_params_per_s": d / min(times),
            "encrypt_s_per_client": min(times),
            "ciphertext_x_float32": r["ciphertext_bytes"] / float32,
            "server_add_s": r["add_s"],
            "decrypt_s": r["decrypt_s"],
            "max_error": r["max_error"],
        }
    result["veil"]["round_finish_s"] = veil["finish_s"]
    result["encrypt_throughput_ratio"] = (
        result["veil"]["encrypt_params_per_s"] / result["per_layer"]["encrypt_params_per_s"]
    )
    result["bytes_ratio"] = (
        result["per_layer"]["ciphertext_x_float32"] / result["veil"]["ciphertext_x_float32"]
    )
    result["targets_met"] = {
        "ciphertext_le_8.5x": result["veil"]["ciphertext_x_float32"] <= 8.5,
        "encrypt_ge_1.5x_baseline": result["encrypt_throughput_ratio"] >= 1.5,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
