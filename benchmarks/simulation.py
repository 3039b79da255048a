"""Benchmark: federated rounds per second in Veil's in-process simulation, and against Flower.

Setup (issue 2): N clients (10, 100, 1000), each holding 50 examples of SYNTHETIC two-class
tabular data with 20 features, a logistic regression trained for one local epoch (batch size 32,
SGD lr 0.1), FedAvg over all N clients every round, no evaluation inside the timed round. A round
is timed from client selection to the new global model. The target is a 1000-client round in
under 3 s on 2 cores.

Peer: with `--flower-python PATH` (the interpreter of a separate venv holding Flower, see
benchmarks/peers/README.md) the same setup runs on Flower's simulation engine in the same
benchmark run, with two Flower clients at each size: `flower_typical` (the client Flower's docs
show: DataLoader, torch.optim) and `flower_same_work` (exactly the per-client work of the
`numpy_loop` floor below, in numpy, on the same data). Each is reported with its ratio
Flower/Veil per round (Veil: the vectorised round's median of the same run).

Floors (issue 26): in the same run and on the same data, the same round (one epoch of the same
mini-batch SGD per client, then the FedAvg mean) as a plain per-client numpy loop and vectorised
across clients in numpy (stacked parameters, batched matmuls): the floor Veil's round is measured
against. Veil runs both ways: with its vectorised simulation (`veil.federation.vectorised`, what a
run of this workload uses) and with `--loop`-style per-client training (`veil_loop_*`).

Ray backend (issue 11): with `--ray`, the same rounds for 1000 and 10000 clients run on the
in-process `LocalTransport` and on `RayTransport` (a local Ray instance, a pool of `--ray-workers`
actors of one CPU each, `--ray-chunk` clients per call), each size and backend in a fresh
process, so that its peak memory is its own: the peak RSS (VmHWM) of the server process and, for
Ray, of each worker actor. The Ray instance's start and the workers' start are not timed.

    python benchmarks/simulation.py [--quick] [--flower-python /path/to/flower-venv/bin/python]
    python benchmarks/simulation.py --ray [--quick]

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from veil.data import ClientData, make_synthetic_logistic
from veil.federation import ClientRunner, FedAvg, FederatedServer, TrainingPlan, UpdatePipeline
from veil.federation.vectorised import VectorisedTrainer
from veil.models import LogisticRegression, get_parameters
from veil.transport import LocalTransport
from veil.transport.ray import RaySettings, RayTransport

EXAMPLES_PER_CLIENT = 50
FEATURES = 20
PLAN = TrainingPlan(epochs=1, batch_size=32, learning_rate=0.1)
PEER_SCRIPT = Path(__file__).resolve().parent / "peers" / "flower_simulation.py"
# Flower clients compared, by result label: the peer script's `--client` choice.
FLOWER_CLIENTS = {"flower_typical": "torch", "flower_same_work": "numpy"}
FLOWER_NOTES = {
    "flower_typical": "Flower's docs' client: nn.Linear, DataLoader, torch.optim.SGD, loss.item()",
    "flower_same_work": "the numpy_loop floor's per-client SGD in numpy, on the same data",
}


def veil_rounds(
    n_clients: int,
    rounds: int,
    seed: int = 0,
    ray: RaySettings | None = None,
    worker_peaks: list[int] | None = None,
    vectorised: bool = True,
) -> list[float]:
    """Seconds per round for `rounds` rounds of an `n_clients` federation (after one warm-up),
    in process (clients trained together unless not `vectorised`) or, with `ray`, on a local
    Ray instance (then `worker_peaks` receives each worker's peak RSS in bytes)."""
    data = make_synthetic_logistic(n_clients * EXAMPLES_PER_CLIENT, FEATURES, seed=seed)
    empty_x = np.zeros((0, FEATURES), np.float32)
    empty_y = np.zeros(0, np.int64)
    pipeline = UpdatePipeline()
    runners, clients = {}, {}
    for i in range(n_clients):
        rows = slice(i * EXAMPLES_PER_CLIENT, (i + 1) * EXAMPLES_PER_CLIENT)
        name = f"client-{i}"
        client = ClientData(name, data.features[rows], data.labels[rows], empty_x, empty_y)
        runners[name] = ClientRunner(name, client, n_classes=2, pipeline=pipeline, seed=seed + i)
        clients[name] = client
    transport: LocalTransport | RayTransport
    if ray is None:
        model = LogisticRegression(FEATURES, 2)
        batched = VectorisedTrainer(model, runners, clients) if vectorised else None
        transport = LocalTransport(runners, lambda: model, seed=seed, vectorised=batched)
    else:
        model = partial(LogisticRegression, FEATURES, 2)
        transport = RayTransport(runners, model, settings=ray, seed=seed)
        transport.start()  # not timed: the instance's and the workers' start
    torch.manual_seed(seed)
    server = FederatedServer(
        run_id="bench",
        clients=list(runners),
        parameters=get_parameters(LogisticRegression(FEATURES, 2)),
        strategy=FedAvg(fraction_fit=1.0, fraction_evaluate=0.0),
        gateway=transport,
        plan=PLAN,
        pipeline=pipeline,
        seed=seed,
    )
    server.run_round(0, evaluate=False)  # warm-up: first-call costs inside torch
    gc.collect()  # the set-up's garbage is not a round's cost (as timeit does for its loops)
    times = []
    for rnd in range(1, rounds + 1):
        start = time.perf_counter()
        server.run_round(rnd, evaluate=False)
        times.append(time.perf_counter() - start)
    if isinstance(transport, RayTransport):
        if worker_peaks is not None:
            worker_peaks[:] = transport.worker_peak_rss_bytes()
        transport.close()
    return times


def _client_arrays(n_clients: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The benchmark's data as (clients, examples, features) and (clients, examples)."""
    data = make_synthetic_logistic(n_clients * EXAMPLES_PER_CLIENT, FEATURES, seed=seed)
    x = np.asarray(data.features, np.float32).reshape(n_clients, EXAMPLES_PER_CLIENT, FEATURES)
    return x, np.asarray(data.labels, np.int64).reshape(n_clients, EXAMPLES_PER_CLIENT)


def numpy_loop_round(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One round as a plain per-client numpy loop: each client's shuffled mini-batch SGD on the
    cross-entropy from the global (zero) model, then the example-weighted mean of the models
    (weight and bias as one (classes, features + 1) array)."""
    total = np.zeros((2, FEATURES + 1), np.float32)
    for xc, yc in zip(x, y, strict=True):
        w = np.zeros((2, FEATURES), np.float32)
        b = np.zeros(2, np.float32)
        order = rng.permutation(len(yc))
        for start in range(0, len(yc), PLAN.batch_size):
            idx = order[start : start + PLAN.batch_size]
            xb, yb = xc[idx], yc[idx]
            z = xb @ w.T + b
            p = np.exp(z - z.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            p[np.arange(len(yb)), yb] -= 1
            p /= len(yb)
            w -= np.float32(PLAN.learning_rate) * (p.T @ xb)
            b -= np.float32(PLAN.learning_rate) * p.sum(axis=0)
        total[:, :FEATURES] += len(yc) * w
        total[:, FEATURES] += len(yc) * b
    return total / float(y.size)


def numpy_floor_round(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The same round vectorised across clients: one permutation draw for all, stacked
    parameters, batched matmuls, the weighted mean as one product."""
    clients, n = y.shape
    w = np.zeros((clients, 2, FEATURES), np.float32)
    b = np.zeros((clients, 2), np.float32)
    order = rng.random((clients, n)).argsort(axis=1)
    rows = np.arange(clients)[:, None]
    for start in range(0, n, PLAN.batch_size):
        idx = order[:, start : start + PLAN.batch_size]
        xb, yb = x[rows, idx], y[rows, idx]
        z = np.matmul(xb, w.transpose(0, 2, 1)) + b[:, None, :]
        p = np.exp(z - z.max(axis=2, keepdims=True))
        p /= p.sum(axis=2, keepdims=True)
        p[rows, np.arange(idx.shape[1])[None, :], yb] -= 1
        p /= idx.shape[1]
        w -= np.float32(PLAN.learning_rate) * np.matmul(p.transpose(0, 2, 1), xb)
        b -= np.float32(PLAN.learning_rate) * p.sum(axis=1)
    weights = np.full(clients, float(n), np.float32)
    mean = np.concatenate([w, b[:, :, None]], axis=2)
    return np.tensordot(weights, mean, axes=1) / weights.sum()


def numpy_rounds(n_clients: int, rounds: int, vectorised: bool) -> list[float]:
    """Seconds per round of `numpy_floor_round` (or `numpy_loop_round`), after one warm-up."""
    x, y = _client_arrays(n_clients)
    rng = np.random.default_rng(0)
    round_fn = numpy_floor_round if vectorised else numpy_loop_round
    round_fn(x, y, rng)
    gc.collect()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        round_fn(x, y, rng)
        times.append(time.perf_counter() - start)
    return times


def _peak_rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def one_backend(backend: str, n_clients: int, rounds: int, workers: int, chunk: int) -> None:
    """Child process: time one size on one backend; print its JSON row."""
    torch.set_num_threads(1)
    settings = None
    if backend == "ray":
        settings = RaySettings(workers=workers, clients_per_task=chunk, local_cpus=workers)
    peaks: list[int] = []
    times = veil_rounds(n_clients, rounds, ray=settings, worker_peaks=peaks)
    row: dict[str, object] = {
        "backend": backend,
        "clients": n_clients,
        "round_s_median": round(statistics.median(times), 4),
        "round_s": [round(t, 4) for t in times],
        "server_peak_rss_mb": round(_peak_rss_mb(), 1),
    }
    if backend == "ray":
        row["workers"] = workers
        row["clients_per_task"] = chunk
        row["worker_peak_rss_mb"] = [round(b / 2**20, 1) for b in peaks]
    print(json.dumps(row))


def backend_rows(
    sizes: list[int], rounds: int, workers: int, chunk: int
) -> list[dict[str, object]]:
    """Local and Ray rows for each size, each measured in a fresh process."""
    rows = []
    for n in sizes:
        pair = {}
        for backend in ("local", "ray"):
            cmd = [sys.executable, __file__, "--one", backend, str(n), str(rounds)]
            cmd += ["--ray-workers", str(workers), "--ray-chunk", str(chunk)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=True)
            pair[backend] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(json.dumps(pair[backend]), file=sys.stderr)
        local, ray = pair["local"], pair["ray"]
        rows.append(
            {
                "clients": n,
                "local": local,
                "ray": ray,
                "ray_over_local": round(
                    float(ray["round_s_median"]) / float(local["round_s_median"]),
                    2,  # type: ignore[arg-type]
                ),
            }
        )
    return rows


def compare_round(n: int, rounds: int) -> dict[str, object]:
    """Veil's round (vectorised and per-client) and the two numpy floors for `n` clients,
    interleaved: each kind's timed rounds are spread over `rounds` passes of all kinds (3 rounds
    a pass for Veil's vectorised round and the floors, 1 for the per-client loop), each pass
    after a warm-up round and a `gc.collect()`, so that no pass pays for another's garbage. The row
    keeps Veil's vectorised times under "veil_times" (the caller pops them)."""
    kinds = {
        "veil": lambda: veil_rounds(n, 3),
        "veil_loop": lambda: veil_rounds(n, 1, vectorised=False),
        "numpy_loop": lambda: numpy_rounds(n, 3, vectorised=False),
        "numpy_floor": lambda: numpy_rounds(n, 3, vectorised=True),
    }
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(rounds):
        for kind, measure in kinds.items():
            times[kind] += measure()
    median = {kind: statistics.median(t) for kind, t in times.items()}
    row: dict[str, object] = {"clients": n}
    for kind in kinds:
        row[f"{kind}_round_s_median"] = round(median[kind], 5)
    row["veil_round_s"] = [round(t, 4) for t in times["veil"]]
    row["veil_rounds_per_s"] = round(1 / median["veil"], 3)
    row["veil_over_numpy_floor"] = round(median["veil"] / median["numpy_floor"], 2)
    row["veil_loop_over_veil"] = round(median["veil_loop"] / median["veil"], 1)
    row["numpy_loop_over_numpy_floor"] = round(median["numpy_loop"] / median["numpy_floor"], 1)
    row["loadavg"] = _loadavg()
    row["veil_times"] = times["veil"]
    return row


def _loadavg() -> str:
    with open("/proc/loadavg", encoding="ascii") as f:
        return " ".join(f.read().split()[:3])


def flower_rounds(
    python: str, n_clients: int, rounds: int, client: str = "torch"
) -> dict[str, object]:
    """Run the Flower peer script in its own venv with its `client` ("torch": the typical
    Flower client, "numpy": the floor's same work); its last stdout line is JSON."""
    cmd = [python, str(PEER_SCRIPT), "--clients", str(n_clients), "--rounds", str(rounds)]
    proc = subprocess.run(
        [*cmd, "--client", client],
        capture_output=True,
        text=True,
        timeout=1800,
        check=True,
    )
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def flower_columns(python: str, n_clients: int, veil_median: float) -> dict[str, object]:
    """Both Flower clients for `n_clients` (3 rounds each): per label of `FLOWER_CLIENTS`, the
    median round `<label>_round_s_median` and `<label>_over_veil` (that median over
    `veil_median`), and the Flower version."""
    columns: dict[str, object] = {}
    for label, client in FLOWER_CLIENTS.items():
        peer = flower_rounds(python, n_clients, 3, client)
        median = float(peer["round_s_median"])  # type: ignore[arg-type]
        columns[f"{label}_round_s_median"] = median
        columns[f"{label}_over_veil"] = round(median / veil_median, 1)
        columns["flower_version"] = peer.get("flower_version")
    return columns


def format_table(rows: list[dict[str, object]]) -> str:
    """The rows as a plain-text table: seconds per round (medians) and the ratios; the Flower
    columns only where the rows have them."""
    kinds = ["veil", "veil_loop", "numpy_loop", "numpy_floor"]
    flower = [label for label in FLOWER_CLIENTS if f"{label}_round_s_median" in rows[0]]
    head = ["clients", *kinds, "veil/floor"]
    for label in flower:
        head += [label, f"{label}/veil"]
    lines = [" | ".join(head)]
    for row in rows:
        cells = [str(row["clients"])]
        cells += [f"{float(row[f'{kind}_round_s_median']):.4g} s" for kind in kinds]  # type: ignore[arg-type]
        cells.append(f"{row['veil_over_numpy_floor']}x")
        for label in flower:
            cells.append(f"{float(row[f'{label}_round_s_median']):.4g} s")  # type: ignore[arg-type]
            cells.append(f"{row[f'{label}_over_veil']}x")
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 and 100 clients, 3 rounds")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per size")
    parser.add_argument("--flower-python", help="python of a venv with flwr[simulation]==1.41")
    parser.add_argument(
        "--ray", action="store_true", help="local vs Ray for 1000 and 10000 clients (1000 quick)"
    )
    parser.add_argument("--ray-workers", type=int, default=2, help="Ray actors in the pool")
    parser.add_argument("--ray-chunk", type=int, default=250, help="clients per Ray call")
    parser.add_argument(
        "--one", nargs=3, metavar=("BACKEND", "CLIENTS", "ROUNDS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.one:
        one_backend(
            args.one[0], int(args.one[1]), int(args.one[2]), args.ray_workers, args.ray_chunk
        )
        return 0
    if args.ray:
        sizes = [1000] if args.quick else [1000, 10000]
        rounds = 2 if args.quick else 3
        summary: dict[str, object] = {
            "benchmark": "simulation-ray",
            "data": "synthetic logistic, 20 features, 50 examples per client",
            "model": "logistic regression, 1 local epoch, batch 32",
            "quick": args.quick,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "ray": _ray_version(),
            "results": backend_rows(sizes, rounds, args.ray_workers, args.ray_chunk),
        }
        print(json.dumps(summary))
        return 0

    torch.set_num_threads(1)
    sizes = [10, 100] if args.quick else [10, 100, 1000]
    rounds = 3 if args.quick else args.rounds
    rows = []
    for n in sizes:
        row = compare_round(n, rounds)
        times = row.pop("veil_times")
        if args.flower_python:
            row.update(flower_columns(args.flower_python, n, statistics.median(times)))  # type: ignore[arg-type]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    largest = rows[-1]
    summary = {
        "benchmark": "simulation",
        "data": "synthetic logistic, 20 features, 50 examples per client",
        "model": "logistic regression, 1 local epoch, batch 32",
        "quick": args.quick,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "results": rows,
        "target": "1000-client round under 3 s and at most 2x the vectorised numpy floor",
        "target_met": None
        if args.quick
        else bool(
            float(largest["veil_round_s_median"]) < 3.0  # type: ignore[arg-type]
            and float(largest["veil_over_numpy_floor"]) <= 2.0  # type: ignore[arg-type]
        ),
    }
    if args.flower_python:
        summary["flower_clients"] = FLOWER_NOTES
    print(format_table(rows))
    print(json.dumps(summary))
    return 0


def _ray_version() -> str:
    import ray

    return str(ray.__version__)


if __name__ == "__main__":
    raise SystemExit(main())
