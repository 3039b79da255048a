"""Benchmark: secure aggregation against plain aggregation, and against Flower's SecAgg+.

For 10 clients holding SYNTHETIC float32 updates (uniform in [-1, 1], one vector of D
parameters each), one round of Veil's SecAgg runs in this process through the same code a
federation uses: `SecAggAggregator` on the server, a `SecAggParticipant` per client, every step
encoded to bytes and decoded again as a transport would (no network). Measured, in one run:

* plain: the server's weighted float32 sum of the 10 updates (`WeightedSum`);
* client: one client's work (key set-up, share encryption, encoding with stochastic rounding,
  masking, signing and checking the consistency round, answering the unmask request), median
  over clients;
* consistency: the consistency round of the malicious-server protocol (Bonawitz et al. 2017,
  §6): the wall time of the signing step plus the whole unmask step, which includes the
  signature checks (an upper bound on what the consistency round adds), as a share of the round;
* server: the server's work (planning, routing, summing masked vectors, unmasking, decoding),
  with no dropout and with 2 clients dropping out after the key exchange;
* round: clients and server together, all in one process: what Flower's number measures;
* upload: bytes of a masked vector relative to the float32 update;
* masking against its floor (issue 26), interleaved in the same run: one client's masking,
  `apply_masks` of its self mask and one pairwise mask per neighbour (degree + 1 AES-256-CTR
  keystreams) into its encoded vector of the round's length, on the default threads and on one
  thread, against the floor: `cryptography`'s AES-256-CTR encrypting zeros of the same total
  bytes on one thread (the faster of a chunked pass into a cache-sized buffer and one call per
  keystream into a full-size buffer). "mask step" adds the copy `ClientSession.mask` makes of
  its input.

With `--flower-python PATH` (a Python with `flwr` installed, see benchmarks/peers/README.md)
Flower's own SecAgg+ runs the same clients, size and neighbour degree in-process
(benchmarks/peers/flower_secaggplus.py) and the ratio of round times is reported.

Targets (issue 5), 10 clients x 10M: client <= 2 s, server <= 2 s without dropouts, upload
<= 1.25x float32; Veil at least 5x faster per round than Flower's SecAgg+. Issue 17: the
consistency round costs at most 10% of a 10 clients x 1M round. Issue 26: masking <= 1.3x the
AES-CTR floor at 1M and 10M.

    python benchmarks/secagg.py [--quick] [--sizes 1000000 10000000] [--degree 9]
        [--flower-python /path/to/flower-venv/bin/python]

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from veil.crypto.identity import IdentityKey
from veil.federation.messages import FitResult, ProtocolInstruction
from veil.federation.pipeline import RoundContext, WeightedSum
from veil.privacy.secagg.aggregator import SecAggAggregator
from veil.privacy.secagg.keystream import CHUNK_BYTES
from veil.privacy.secagg.layout import UpdateLayout
from veil.privacy.secagg.masking import apply_masks
from veil.privacy.secagg.participant import SecAggParticipant
from veil.privacy.secagg.roster import StaticRoster
from veil.privacy.secagg.settings import SecAggSettings
from veil.privacy.secagg.wire import SIGN, UNMASK

PEER = Path(__file__).resolve().parent / "peers" / "flower_secaggplus.py"
RUN = "bench"


class Clock:
    """Seconds spent per party."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, who: str, seconds: float) -> None:
        self.seconds[who] = self.seconds.get(who, 0.0) + seconds


class Channel:
    """In-memory `ProtocolChannel`: hands each body to the client at once, timing the client;
    `drop` clients stop answering after the key exchange (they never send a masked vector)."""

    def __init__(self, participants: Mapping[str, SecAggParticipant], clock: Clock) -> None:
        self.participants = participants
        self.clock = clock
        self.drop: set[str] = set()
        self.round = 1
        #: Wall seconds of each step, from the server's call to the last answer.
        self.stages: dict[str, float] = {}

    def exchange(self, stage: str, bodies: Mapping[str, bytes]) -> dict[str, bytes]:
        replies = {}
        begin = time.perf_counter()
        for name, body in bodies.items():
            if stage in (SIGN, UNMASK) and name in self.drop:
                continue
            start = time.perf_counter()
            instruction = ProtocolInstruction(RUN, self.round, stage, bytes(body))
            replies[name] = bytes(self.participants[name].handle(instruction))
            self.clock.add(name, time.perf_counter() - start)
        self.stages[stage] = self.stages.get(stage, 0.0) + time.perf_counter() - begin
        return replies


def updates(n_clients: int, size: int) -> dict[str, dict[str, np.ndarray]]:
    """SYNTHETIC updates: uniform in [-1, 1], deterministic per client."""
    return {
        f"client-{i}": {"w": np.random.default_rng(i).uniform(-1, 1, size).astype(np.float32)}
        for i in range(n_clients)
    }


def plain_round(data: Mapping[str, dict[str, np.ndarray]]) -> float:
    reference = next(iter(data.values()))
    names = tuple(data)
    start = time.perf_counter()
    acc = WeightedSum().start(reference, RoundContext(RUN, 1, clients=names))
    for name, update in data.items():
        acc.add(FitResult(name, 1, update, weight=1000.0, num_examples=1000))
    acc.finish().mean()
    return time.perf_counter() - start


def secure_round(
    data: Mapping[str, dict[str, np.ndarray]],
    degree: int | None,
    dropouts: int,
    round_: int,
) -> dict[str, Any]:
    names = tuple(data)
    reference = next(iter(data.values()))
    settings = SecAggSettings(
        clip_range=1.0, max_weight=1000.0, neighbours=degree, round_size=len(names)
    )
    layout = UpdateLayout.of(reference, settings.sum_bounds)
    keys = {n: IdentityKey.generate() for n in names}
    roster = StaticRoster({n: k.public_key() for n, k in keys.items()})
    participants = {n: SecAggParticipant(n, keys[n], roster, settings, layout) for n in names}
    clock = Clock()
    channel = Channel(participants, clock)
    channel.round = round_
    dropped = set(names[:dropouts])
    channel.drop = dropped
    start = time.perf_counter()
    acc = SecAggAggregator(settings, layout).start(
        reference, RoundContext(RUN, round_, clients=names), channel
    )
    upload = 0
    for name in acc.participants:
        if name in dropped:
            continue
        t0 = time.perf_counter()
        result = FitResult(name, round_, data[name], weight=1000.0, num_examples=1000)
        sealed = participants[name].seal(result, RoundContext(RUN, round_))
        clock.add(name, time.perf_counter() - t0)
        upload = sum(a.nbytes for a in sealed.update.values())
        acc.add(sealed)
    aggregate = acc.finish()
    total = time.perf_counter() - start
    # The signing step and the whole unmask step (its signature checks with its share replies):
    # an upper bound on the consistency round's cost.
    consistency = channel.stages.get(SIGN, 0.0) + channel.stages.get(UNMASK, 0.0)
    client_total = sum(clock.seconds.values())
    mean = aggregate.total["w"] / aggregate.weight
    survivors = [n for n in names if n not in dropped]
    expected = np.mean([data[n]["w"] for n in survivors], axis=0)
    return {
        "round_s": total,
        "server_s": total - client_total,
        "client_s": statistics.median(clock.seconds[n] for n in survivors),
        "upload_bytes": upload,
        "consistency_s": consistency,
        "max_abs_error": float(np.max(np.abs(mean - expected))),
    }


def load_average() -> float:
    """The 1-minute load average (0.0 where /proc/loadavg does not exist)."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return 0.0


def keystream_floor(seeds: list[bytes], nbytes: int, full: np.ndarray) -> tuple[float, float]:
    """Seconds for one thread to produce every seed's `nbytes` of AES-256-CTR keystream:
    (chunked into a cache-sized buffer, one call per seed into the full-size `full`)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    zeros = memoryview(bytes(CHUNK_BYTES))
    scratch = np.empty(CHUNK_BYTES, dtype=np.uint8).data
    start = time.perf_counter()
    for seed in seeds:
        encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
        for offset in range(0, nbytes, CHUNK_BYTES):
            size = min(CHUNK_BYTES, nbytes - offset)
            encryptor.update_into(zeros[:size], scratch[:size])
    chunked = time.perf_counter() - start
    plain = np.zeros(nbytes, dtype=np.uint8)
    out = full.data
    start = time.perf_counter()
    for seed in seeds:
        Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update_into(plain, out)
    return chunked, time.perf_counter() - start


def masking_vs_floor(length: int, n_masks: int, repeats: int) -> dict[str, float]:
    """One client's masking of a uint32 vector of `length` with `n_masks` keystreams (its self
    mask and one per neighbour, signs as for a client in the middle of the order) against the
    AES-CTR floor for the same bytes, interleaved `repeats` times; medians."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2**32, size=length, dtype=np.uint32)
    masks = [(os.urandom(32), 1 if k == 0 or k % 2 else -1) for k in range(n_masks)]
    seeds = [seed for seed, _ in masks]
    y = np.empty_like(x)
    full = np.empty(x.nbytes, dtype=np.uint8)
    times: dict[str, list[float]] = {k: [] for k in ("chunked", "oneshot", "mask", "one", "step")}
    apply_masks(x.copy(), masks)  # warm-up: the thread pool
    for _ in range(repeats):
        chunked, oneshot = keystream_floor(seeds, x.nbytes, full)
        times["chunked"].append(chunked)
        times["oneshot"].append(oneshot)
        for key, threads in (("mask", None), ("one", 1)):
            np.copyto(y, x)
            start = time.perf_counter()
            apply_masks(y, masks, threads=threads)
            times[key].append(time.perf_counter() - start)
        start = time.perf_counter()
        apply_masks(np.array(x, copy=True), masks)  # as ClientSession.mask: copy, then mask
        times["step"].append(time.perf_counter() - start)
    med = {k: float(statistics.median(v)) for k, v in times.items()}
    floor = min(med["chunked"], med["oneshot"])
    return {
        "mask_keystreams": n_masks,
        "mask_bytes": n_masks * x.nbytes,
        "aes_floor_s": floor,
        "aes_floor_chunked_s": med["chunked"],
        "aes_floor_oneshot_s": med["oneshot"],
        "masking_s": med["mask"],
        "masking_1_thread_s": med["one"],
        "mask_step_s": med["step"],
        "masking_vs_floor": med["mask"] / floor,
        "masking_1_thread_vs_floor": med["one"] / floor,
        "mask_step_vs_floor": med["step"] / floor,
    }


def flower(python: str, n_clients: int, size: int, degree: int, dropouts: int) -> dict[str, Any]:
    cmd = [
        python, str(PEER), "--clients", str(n_clients), "--sizes", str(size),
        "--degree", str(degree), "--dropouts", str(dropouts), "--rounds", "2",
    ]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    report = json.loads(out.strip().splitlines()[-1])
    entries = report["results"] if isinstance(report, dict) and "results" in report else report
    return dict(entries[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one size: 100k parameters")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--degree", type=int, default=None, help="SecAgg+ degree (default: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--flower-python", default=None)
    args = parser.parse_args()
    sizes = [100_000] if args.quick else args.sizes
    degree = args.degree
    # Two dropouts, or as many as every neighbourhood tolerates (a sparse graph with Veil's
    # threshold above two thirds of a neighbourhood tolerates fewer).
    holders = args.clients if degree is None else degree + 1
    settings = SecAggSettings(neighbours=degree, round_size=args.clients)
    drops = min(2, holders - settings.round_threshold)
    results = []
    load_start = load_average()
    print(f"load average at the start: {load_start:.2f}", file=sys.stderr)
    for size in sizes:
        data = updates(args.clients, size)
        secure_round(updates(args.clients, 1000), degree, 0, 0)  # warm-up
        length = UpdateLayout.of(next(iter(data.values())), settings.sum_bounds).length
        floor = masking_vs_floor(length, (degree or args.clients - 1) + 1, 3 * args.repeats)
        plain = [plain_round(data) for _ in range(args.repeats)]
        runs: dict[int, list[dict[str, Any]]] = {
            d: [secure_round(data, degree, d, r + 1) for r in range(args.repeats)]
            for d in (0, drops)
        }
        fl: dict[str, Any] | None = None
        if args.flower_python:
            # Flower between two sets of Veil rounds, so that a change in the machine's load
            # during the run hits both sides of the ratio alike.
            fl = flower(args.flower_python, args.clients, size, degree or args.clients - 1, 0)
            runs[0] += [secure_round(data, degree, 0, r + 100) for r in range(args.repeats)]

        def median(key: str, dropouts: int, runs: dict[int, list[dict[str, Any]]] = runs) -> float:
            return float(statistics.median(r[key] for r in runs[dropouts]))

        entry: dict[str, Any] = {
            "clients": args.clients,
            "params": size,
            "degree": degree if degree is not None else args.clients - 1,
            "plain_server_s": statistics.median(plain),
            "client_s": median("client_s", 0),
            "server_s": median("server_s", 0),
            "dropouts": drops,
            "server_2_dropouts_s": median("server_s", drops),
            "round_s": median("round_s", 0),
            "round_2_dropouts_s": median("round_s", drops),
            "consistency_s": median("consistency_s", 0),
            "upload_vs_float32": runs[0][0]["upload_bytes"] / (4 * size),
            "max_abs_error": max(r["max_abs_error"] for rs in runs.values() for r in rs),
        }
        entry.update(floor)
        entry["server_vs_plain"] = entry["server_s"] / entry["plain_server_s"]
        entry["consistency_share_of_round"] = entry["consistency_s"] / entry["round_s"]
        if fl is not None:
            entry["flower_round_s"] = fl["secagg_round_s"]
            entry["flower_plain_s"] = fl.get("plain_round_s")
            entry["flower_over_veil"] = fl["secagg_round_s"] / entry["round_s"]
        results.append(entry)
        print(
            f"{size:>10,} params: client {entry['client_s']:.3f} s, server "
            f"{entry['server_s']:.3f} s ({entry['server_2_dropouts_s']:.3f} s with {drops} "
            "dropouts), "
            f"round {entry['round_s']:.3f} s (consistency and unmask steps "
            f"{100 * entry['consistency_share_of_round']:.1f}%), plain "
            f"{entry['plain_server_s']:.3f} s, upload "
            f"{entry['upload_vs_float32']:.3f}x"
            + (
                f", Flower SecAgg+ {entry['flower_round_s']:.3f} s "
                f"({entry['flower_over_veil']:.1f}x Veil)"
                if "flower_round_s" in entry
                else ""
            ),
            file=sys.stderr,
        )
        print(
            f"{size:>10,} params: masking ({floor['mask_keystreams']} keystreams, "
            f"{floor['mask_bytes'] / 1e6:.0f} MB) {1e3 * floor['masking_s']:.2f} ms "
            f"({1e3 * floor['masking_1_thread_s']:.2f} ms on 1 thread), AES-CTR floor "
            f"{1e3 * floor['aes_floor_s']:.2f} ms: {floor['masking_vs_floor']:.2f}x the floor "
            f"({floor['masking_1_thread_vs_floor']:.2f}x on 1 thread; mask step with its copy "
            f"{floor['mask_step_vs_floor']:.2f}x), load {load_average():.2f}",
            file=sys.stderr,
        )
    load_end = load_average()
    print(f"load average at the end: {load_end:.2f}", file=sys.stderr)
    report = {"benchmark": "secagg", "load_start": load_start, "load_end": load_end}
    print(json.dumps({**report, "results": results}))


if __name__ == "__main__":
    main()
