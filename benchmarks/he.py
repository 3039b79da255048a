"""Benchmark: CKKS aggregation, Veil's packing against one ciphertext per layer (NVIDIA FLARE).

For 10 clients holding SYNTHETIC float32 updates (uniform in [-0.01, 0.01]) of a model with
D parameters in six layers (an MLP-like layout: 78.4%, 0.1%, 20%, 0.02%, 1.48%, 0.001% of D),
one round is run in this run three ways:

* veil: the code a federation uses. Each client's `CkksParticipant.seal` clips, weights and
  packs the flat update [w·Δ | w | clipped | capped | 1] into N-value ciphertexts (N = 8192,
  primes [60, 40], scale 2^40: one data prime, symmetric encryption, no Galois or
  relinearisation keys; complex packing, N/2 values in the real and N/2 in the imaginary parts
  of the N/2 slots; seeded, SEAL's `Serializable` ciphertext with c1 as a seed) in fixed-size
  frames; the server's `CkksAggregator` parses and keeps
  them; every member confirms the member set and one decryptor's `handle` verifies the
  signatures, adds the ciphertexts itself, decrypts, floods and rounds the sum.
* per_layer (the fair baseline, "FLARE's defaults"): what NVIDIA FLARE's HE filters do
  (`HEModelEncryptor`) with the context its provisioning `HEBuilder` makes: TenSEAL, N = 8192,
  primes [60, 40, 40], scale 2^40, SYMMETRIC encryption (`ts.ENCRYPTION_TYPE.SYMMETRIC`, the
  clients hold the secret key), relinearisation keys; one `ts.ckks_vector(context, layer)` per
  layer, serialised; the server deserialises and adds layer by layer; decryption layer by layer.
* per_layer_public_key: the same with TenSEAL's default public-key encryption (what earlier
  versions of this benchmark called FLARE's defaults); kept as a second, labelled line.

Encryption runs in two worker processes at once (both cores, as 10 clients on one 2-core
machine would), each worker encrypting half of the clients all three ways, interleaved client
by client (the order rotating) so that every method meets the same load; the blobs come back as
raw files. Reported: encryption throughput per client (parameters/s; the median client of each
repeat, median over repeats, both cores busy), the ratio to each baseline (median over repeats
of the per-repeat ratio), ciphertext bytes relative to float32, server addition time for the
10 clients, decryption time, the largest error of the decrypted sum, and the load average.

Targets (issue 26), 10 clients x 1M: upload <= 4.5x float32 bytes at the same precision (issue
6 asked for <= 8.5x), encryption throughput at least 1.5x the symmetric per-layer baseline's in
the same run.

    python benchmarks/he.py [--quick] [--params 1000000] [--clients 10] [--repeats 3]

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
from collections.abc import Callable, Iterator
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
# NVIDIA FLARE's HEBuilder defaults.
FLARE_DEGREE, FLARE_PRIMES, FLARE_SCALE_BITS = 8192, [60, 40, 40], 40
# The per-layer baselines: name -> TenSEAL encryption type. FLARE's HEBuilder is symmetric.
BASELINES = {
    "per_layer": ts.ENCRYPTION_TYPE.SYMMETRIC,
    "per_layer_public_key": ts.ENCRYPTION_TYPE.ASYMMETRIC,
}
METHODS = ("veil", *BASELINES)
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
    """Encrypt `clients`' updates every way, interleaved client by client (rotating which goes
    first), so that every method meets the same machine load."""
    meta = json.loads((folder / "veil.json").read_text())
    keys = SecretKeySet(meta["key_id"], CkksParams(), (folder / "veil.ctx").read_bytes(), bytes(32))
    layout = UpdateLayout.of(update(0, d))
    participant = CkksParticipant(
        "bench", keys, SETTINGS, layout, IdentityKey.generate(), StaticRoster({})
    )
    rounds = itertools.count(1)  # one upload per round: each sealing is its own round

    def veil(c: int) -> float:
        u = update(c, d)
        start = time.perf_counter()
        context = RoundContext("bench", next(rounds))
        sealed = participant.seal(FitResult(f"c{c}", context.round, u, WEIGHT, 1), context)
        seconds = time.perf_counter() - start
        sealed.update[ENCRYPTED].tofile(folder / f"veil-{c}.bin")
        return seconds

    def per_layer(name: str) -> Callable[[int], float]:
        context = ts.context_from((folder / f"{name}.ctx").read_bytes())

        def encrypt(c: int) -> float:
            u = update(c, d)
            start = time.perf_counter()
            with quiet_stdout():
                blobs = [
                    ts.ckks_vector(context, (WEIGHT * v.astype(np.float64)).ravel()).serialize()
                    for v in u.values()
                ]
            seconds = time.perf_counter() - start
            for i, b in enumerate(blobs):
                (folder / f"{name}-{c}-{i}.bin").write_bytes(b)
            return seconds

        return encrypt

    order = [("veil", veil), *((name, per_layer(name)) for name in BASELINES)]
    for _, fn in order:
        fn(clients[0])  # warm-up
    times: dict[str, dict[int, float]] = {name: {} for name in METHODS}
    for k, c in enumerate(clients):
        for name, fn in order[k % len(order) :] + order[: k % len(order)]:
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
    times: dict[str, dict[int, float]] = {name: {} for name in METHODS}
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
    context = RoundContext("bench", 1, clients=tuple(members))
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


def flare_round(n: int, d: int, folder: Path, name: str, secret_ctx: ts.Context) -> dict[str, Any]:
    """The server's side of a per-layer baseline: deserialise and add the blobs the workers
    wrote for baseline `name`, layer by layer, then decrypt with the secret context."""
    names = list(layers(d))
    # The server's context as FLARE's HEBuilder writes it: no secret key, no public key.
    server_ctx = ts.context_from(
        secret_ctx.serialize(save_public_key=False, save_secret_key=False, save_relin_keys=True)
    )
    blobs = [
        [(folder / f"{name}-{c}-{i}.bin").read_bytes() for i in range(len(names))] for c in range(n)
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


def baseline_context(encryption: ts.ENCRYPTION_TYPE) -> ts.Context:
    """The TenSEAL context NVIDIA FLARE's provisioning `HEBuilder` makes (its defaults), with
    the given encryption type; FLARE's own is symmetric."""
    context = ts.context(
        ts.SCHEME_TYPE.CKKS,
        FLARE_DEGREE,
        coeff_mod_bit_sizes=FLARE_PRIMES,
        encryption_type=encryption,
    )
    context.generate_relin_keys()
    context.global_scale = 2.0**FLARE_SCALE_BITS
    return context


def load_average() -> float:
    """The 1-minute load average, or -1 where /proc/loadavg is missing."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return -1.0


def summarise(
    d: int, rounds: dict[str, dict[str, Any]], enc: dict[str, list[float]]
) -> dict[str, Any]:
    """One JSON-ready row per method, and the same-run ratios against each baseline."""
    float32 = 4 * d
    result: dict[str, Any] = {}
    for name in METHODS:
        seconds = statistics.median(enc[name])
        r = rounds[name]
        result[name] = {
            "encrypt_params_per_s": d / seconds,
            "encrypt_s_per_client": seconds,
            "encrypt_s_per_repeat": enc[name],
            "ciphertext_x_float32": r["ciphertext_bytes"] / float32,
            "server_add_s": r["add_s"],
            "decrypt_s": r["decrypt_s"],
            "max_error": r["max_error"],
        }
    result["veil"]["round_finish_s"] = rounds["veil"]["finish_s"]
    for name in BASELINES:
        suffix = "" if name == "per_layer" else "_public_key"
        result[f"encrypt_throughput_ratio{suffix}"] = statistics.median(
            b / v for b, v in zip(enc[name], enc["veil"], strict=True)
        )
        result[f"bytes_ratio{suffix}"] = (
            result[name]["ciphertext_x_float32"] / result["veil"]["ciphertext_x_float32"]
        )
    result["targets_met"] = {
        "ciphertext_le_4.5x": result["veil"]["ciphertext_x_float32"] <= 4.5,
        "ciphertext_le_8.5x": result["veil"]["ciphertext_x_float32"] <= 8.5,
        "encrypt_ge_1.5x_symmetric_baseline": result["encrypt_throughput_ratio"] >= 1.5,
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100k parameters, one repeat")
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
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
    load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        secret, public = he_keys.generate(CkksParams())
        (folder / "veil.ctx").write_bytes(secret.context)
        (folder / "veil.json").write_text(json.dumps({"key_id": secret.key_id}))
        contexts = {name: baseline_context(kind) for name, kind in BASELINES.items()}
        for name, context in contexts.items():
            (folder / f"{name}.ctx").write_bytes(context.serialize(save_secret_key=True))
        enc: dict[str, list[float]] = {name: [] for name in METHODS}
        for _ in range(repeats):  # the median client of each repeat
            times = encrypt_all(n, d, folder)
            for method in enc:
                enc[method].append(statistics.median(times[method].values()))
        rounds = {"veil": veil_round(n, d, folder, secret, public)}
        for name, context in contexts.items():
            rounds[name] = flare_round(n, d, folder, name, context)
    result: dict[str, Any] = {
        "clients": n,
        "params": d,
        "repeats": repeats,
        "cores": 2,
        "machine_cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        **summarise(d, rounds, enc),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
