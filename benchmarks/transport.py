"""Benchmark: the per-round overhead of deployment (gRPC, mutual TLS) over in-process simulation.

Setup (issue: deployment transport): 5 clients, a "model" of N float32 parameters (N = 100k, 10M,
100M) held as 4 equal tensors of shape (N/4000, 1000). No real training: each client's trainer
adds a constant to every parameter in place, so a client does exactly what `ClientRunner.fit`
does around training (load the global parameters into its model, copy them out, subtract) and the
round measures transport + checks + aggregation. FedAvg over all 5 clients, no evaluation.

- Simulation: `FederatedServer` + `LocalTransport`, the 5 `ClientRunner`s in this process.
- Deployment: the same `FederatedServer` with a real `GrpcGateway` on 127.0.0.1 over mutual TLS
  (certificates from `veil.crypto.pki` in a temporary folder), and 5 clients as separate OS
  processes (this script with `--client`) running `veil.transport.grpc.client.run_client` with
  the same `ClientRunner` and trivial trainer: download over TLS, fit, sign, upload over TLS.

A round is `FederatedServer.run_round(r, evaluate=False)`, timed after one warm-up round per
mode; simulation and deployment rounds alternate. Reported: median seconds per round in each mode,
their ratio, and the model traffic per deployment round (5 downloads + 5 uploads) over its time.

Peak server memory: before each deployment round the process's peak RSS is reset (writing "5" to
/proc/self/clear_refs) and the current RSS read from /proc/self/status (VmRSS); after the round
VmHWM is read. Peak extra bytes = VmHWM - VmRSS at round start, reported in model copies. The
target: at most about two copies of the model per concurrent upload (here 5 concurrent uploads).

    python benchmarks/transport.py [--quick]

Impaired network (`--impaired`, root and iproute2 needed): the same deployment rounds (no
simulation) on loopback and over a misbehaving network, in the same run. The process re-runs
itself in the coordinator's network namespace of a lab from `tests/netns/netns_lab.py`; each of
the 5 client processes runs in its own member namespace, behind a token bucket of `--rate` on
both ends of its link (tc tbf), and reaches the server through `tests/netns/netns_proxy.py`,
which delays every chunk by `--latency-ms` each way. The loopback clients run in the
coordinator's namespace against 127.0.0.1. Sizes 100k and 1M parameters, one warm-up and
`--rounds` timed rounds each; reported: median round seconds on each network, their ratio, and
the bandwidth bound (each member's download and upload of the model at `--rate`).

    sudo python benchmarks/transport.py --impaired [--rate 20mbit] [--latency-ms 25]

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from torch import nn

from veil.crypto import pki
from veil.crypto.identity import IdentityKey, IdentityPublicKey
from veil.data import ClientData
from veil.federation import ClientRunner, FedAvg, FederatedServer, TrainingPlan, UpdatePipeline
from veil.federation.server import ClientGateway
from veil.federation.training import TrainStats
from veil.models import get_parameters
from veil.transport import LocalTransport
from veil.transport.grpc.client import ClientCredentials, open_channel, run_client
from veil.transport.grpc.server import GrpcGateway, ServerCredentials

N_CLIENTS = 5
PARTS = 4
COLUMNS = 1000
EXAMPLES = 10  # each client's (unused) data; the aggregation weight is 10, not 1
DELTA = 1e-3
PLAN = TrainingPlan(epochs=1, batch_size=EXAMPLES, learning_rate=0.1)
SERVER = "server"
DEADLINE_S = 300.0
#: Rough memory need of a deployment round, in model copies: each client process holds about
#: five (model, task, local copy, update, encoded upload), the server about ten at its peak.
COPIES_NEEDED = 5 * N_CLIENTS + 10

Row = dict[str, Any]


class Blob(nn.Module):
    """N float32 parameters as `PARTS` matrices of `COLUMNS` columns: w0, w1, ..."""

    def __init__(self, n_params: int) -> None:
        super().__init__()
        if n_params % (PARTS * COLUMNS):
            raise ValueError(f"the size must be a multiple of {PARTS * COLUMNS}, got {n_params}")
        rows = n_params // (PARTS * COLUMNS)
        for i in range(PARTS):
            self.register_parameter(f"w{i}", nn.Parameter(torch.zeros(rows, COLUMNS)))


class NudgeTrainer:
    """A stand-in for local training: adds `DELTA` to every parameter, in place."""

    name = "nudge"

    def train(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        plan: TrainingPlan,
        generator: torch.Generator,
    ) -> TrainStats:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(DELTA)
        return TrainStats(loss=None, steps=0)


def client_names() -> list[str]:
    return [f"client-{i}" for i in range(N_CLIENTS)]


def make_runner(name: str, index: int) -> ClientRunner:
    x = np.zeros((EXAMPLES, 1), np.float32)
    y = np.zeros(EXAMPLES, np.int64)
    data = ClientData(name, x, y, np.zeros((0, 1), np.float32), np.zeros(0, np.int64))
    return ClientRunner(
        name, data, n_classes=2, pipeline=UpdatePipeline(), seed=index, trainer=NudgeTrainer()
    )


def make_server(gateway: ClientGateway, n_params: int) -> FederatedServer:
    return FederatedServer(
        run_id="bench-transport",
        clients=client_names(),
        parameters=get_parameters(Blob(n_params)),
        strategy=FedAvg(fraction_fit=1.0, fraction_evaluate=0.0),
        gateway=gateway,
        plan=PLAN,
        pipeline=UpdatePipeline(),
        min_clients=N_CLIENTS,
    )


# -- memory ----------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def mem_available() -> int:
    match = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    return int(match.group(1)) * 1024 if match else 0


# -- deployment ------------------------------------------------------------------------------


@dataclass
class Clients:
    """The 5 client processes, started once and reused for every model size."""

    procs: list[subprocess.Popen[bytes]]
    logs: list[Path]

    def check(self) -> None:
        for proc, log in zip(self.procs, self.logs, strict=True):
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"a client exited with status {proc.returncode}:\n{tail}")

    def stop(self, timeout_s: float) -> None:
        for proc in self.procs:
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def make_pki(directory: Path, hosts: tuple[str, ...] = ("localhost", "127.0.0.1")) -> None:
    pki.init_ca(directory)
    pki.issue(directory, SERVER, role="server", hosts=hosts)
    for name in client_names():
        pki.issue(directory, name, role="client")


def port_file(work: Path, n_params: int) -> Path:
    """Where the server announces the port of the gateway for one size ("0": size skipped)."""
    return work / f"port-{n_params}"


def start_clients(
    pki_dir: Path,
    work: Path,
    sizes: list[int],
    *,
    host: str = "127.0.0.1",
    namespaces: list[str] | None = None,
) -> Clients:
    """Start the client processes; each serves the sizes in order, as their gateways open, at
    `host` and the port announced in `work`. With `namespaces`, client i runs in the i-th
    network namespace."""
    procs, logs = [], []
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    for i, name in enumerate(client_names()):
        log = work / f"{name}.log"
        args = ["--client", name, "--pki", str(pki_dir), "--work", str(work), "--host", host]
        args += ["--sizes", ",".join(map(str, sizes))]
        inside = ["ip", "netns", "exec", namespaces[i]] if namespaces else []
        with open(log, "wb") as handle:
            procs.append(
                subprocess.Popen(
                    [*inside, sys.executable, str(Path(__file__).resolve()), *args],
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            )
        logs.append(log)
    return Clients(procs, logs)


def start_gateway(
    pki_dir: Path, n_params: int, address: str = "127.0.0.1:0"
) -> tuple[GrpcGateway, int]:
    files = pki.node_files(pki_dir, SERVER)
    credentials = ServerCredentials(
        certificate=files.cert.read_bytes(),
        private_key=files.key.read_bytes(),
        ca_certificate=files.ca_cert.read_bytes(),
        revoked=pki.revoked_serials(pki_dir),
    )
    identities = {
        name: IdentityPublicKey.load(pki.node_files(pki_dir, name).identity_pub)
        for name in client_names()
    }
    gateway = GrpcGateway(
        run_id="bench-transport",
        identities=identities,
        reference=get_parameters(Blob(n_params)),
        deadline_s=DEADLINE_S,
    )
    return gateway, gateway.start(address, credentials)


def client_main(
    name: str, pki_dir: Path, work: Path, sizes: list[int], host: str = "127.0.0.1"
) -> int:
    """One client process: for each size, serve fit tasks until that gateway says done."""
    torch.set_num_threads(1)
    files = pki.node_files(pki_dir, name)
    credentials = ClientCredentials(
        certificate=files.cert.read_bytes(),
        private_key=files.key.read_bytes(),
        ca_certificate=files.ca_cert.read_bytes(),
    )
    identity = IdentityKey.load(files.identity_key)
    parent = os.getppid()
    for n_params in sizes:
        path = port_file(work, n_params)
        while not (path.is_file() and path.read_text().strip()):
            if os.getppid() != parent:
                return 1  # the benchmark died: do not wait forever
            time.sleep(0.02)
        port = int(path.read_text())
        if port == 0:
            continue
        channel: grpc.Channel = open_channel(f"{host}:{port}", credentials)
        try:
            run_client(
                channel,
                make_runner(name, client_names().index(name)),
                Blob(n_params),
                identity,
                poll_s=5.0,
                reconnect_timeout_s=60.0,
            )
        finally:
            channel.close()
    return 0


# -- one size ----------------------------------------------------------------------------------


def _timed(server: FederatedServer, rnd: int) -> float:
    start = time.perf_counter()
    record = server.run_round(rnd, evaluate=False)
    elapsed = time.perf_counter() - start
    if record.completed != N_CLIENTS or not record.applied:
        reasons = [f.reason for f in record.failures]
        raise RuntimeError(f"round {rnd}: {record.completed}/{N_CLIENTS} clients ({reasons})")
    return elapsed


def announce(work: Path, n_params: int, port: int) -> None:
    tmp = work / f".port-{n_params}.tmp"
    tmp.write_text(str(port))
    tmp.replace(port_file(work, n_params))


def measure(n_params: int, rounds: int, pki_dir: Path, work: Path, clients: Clients) -> Row:
    """Warm-up plus `rounds` alternating simulation/deployment rounds of one model size."""
    model_bytes = 4 * n_params
    runners = {name: make_runner(name, i) for i, name in enumerate(client_names())}
    simulation = make_server(LocalTransport(runners, lambda: Blob(n_params)), n_params)
    gateway, port = start_gateway(pki_dir, n_params)
    deployment = make_server(gateway, n_params)
    sim_times: list[float] = []
    dep_times: list[float] = []
    peaks: list[int] = []
    reset_ok = True
    try:
        announce(work, n_params, port)
        _timed(simulation, 0)
        started = time.perf_counter()
        _timed(deployment, 0)  # the first size's warm-up includes the clients' start
        warmup_s = time.perf_counter() - started
        for rnd in range(1, rounds + 1):
            sim_times.append(_timed(simulation, rnd))
            clients.check()
            gc.collect()
            reset_ok = reset_peak_rss() and reset_ok
            base = _status_kib("VmRSS") * 1024
            dep_times.append(_timed(deployment, rnd))
            peaks.append(_status_kib("VmHWM") * 1024 - base)
    finally:
        gateway.finish(linger_s=10.0)
        gateway.stop(grace_s=1.0)
    sim, dep = statistics.median(sim_times), statistics.median(dep_times)
    traffic = 2 * N_CLIENTS * model_bytes  # 5 downloads + 5 uploads of the model
    peak = max(peaks)
    copies = peak / model_bytes
    return {
        "parameters": n_params,
        "model_mb": round(model_bytes / 1e6, 2),
        "rounds": rounds,
        "simulation_round_s_median": round(sim, 4),
        "deployment_round_s_median": round(dep, 4),
        "deployment_over_simulation": round(dep / sim, 2),
        "overhead_s_per_round": round(dep - sim, 4),
        "deployment_traffic_mb_per_round": round(traffic / 1e6, 1),
        "deployment_mb_per_s": round(traffic / 1e6 / dep, 1),
        "simulation_round_s": [round(t, 4) for t in sim_times],
        "deployment_round_s": [round(t, 4) for t in dep_times],
        "deployment_warmup_s": round(warmup_s, 2),
        "server_peak_extra_mb": round(peak / 1e6, 1),
        "server_peak_extra_model_copies": round(copies, 2),
        "server_copies_per_concurrent_upload": round(copies / N_CLIENTS, 2),
        "peak_rss_reset": reset_ok,
    }


# -- impaired network (--impaired) ---------------------------------------------------------

IMPAIRED_SIZES = [(100_000, "100k"), (1_000_000, "1M")]


def _netns_module(name: str) -> Any:
    """A helper module of the network-namespace tests (`tests/netns/`), imported by path."""
    folder = str(Path(__file__).resolve().parents[1] / "tests" / "netns")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)


def impaired(rate: str, latency_ms: float, rounds: int) -> int:
    """Build a lab of N_CLIENTS members, limit its links to `rate`, and measure inside its
    coordinator's namespace (`impaired_inside`); the lab is removed whatever happens."""
    lab_module = _netns_module("netns_lab")
    reason = lab_module.unavailable()
    if reason is not None:
        print(f"--impaired needs network namespaces: {reason}", file=sys.stderr)
        return 2
    lab_module.remove_stale()
    lab = lab_module.create(f"{lab_module.NAME_ROOT}{os.getpid()}", N_CLIENTS)
    try:
        lab_module.limit_bandwidth(lab, rate)
        args = ["--impaired-inside", lab.prefix, "--rate", rate]
        args += ["--latency-ms", str(latency_ms), "--rounds", str(rounds)]
        command = [*lab.exec_args(lab.hub), sys.executable, str(Path(__file__).resolve()), *args]
        return subprocess.run(command, check=False).returncode
    finally:
        lab_module.destroy(lab)


def _rate_bytes_per_s(rate: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)bit", rate.lower())
    if match is None:
        raise ValueError(f"--rate must look like 20mbit, got {rate!r}")
    return float(match.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[match.group(2)] / 8


def _deployment_rounds(
    n_params: int, rounds: int, pki_dir: Path, work: Path, clients: Clients, address: str,
    proxy: Callable[[int], tuple[subprocess.Popen[bytes], int]] | None,
) -> list[float]:  # fmt: skip
    """One warm-up and `rounds` timed deployment rounds of one size; the clients reach the
    gateway directly, or through the proxy `proxy(gateway_port)` starts."""
    gateway, port = start_gateway(pki_dir, n_params, address)
    server = make_server(gateway, n_params)
    proxy_proc = None
    try:
        if proxy is not None:
            proxy_proc, port = proxy(port)
        announce(work, n_params, port)
        _timed(server, 0)
        times = []
        for rnd in range(1, rounds + 1):
            clients.check()
            times.append(_timed(server, rnd))
        return times
    finally:
        gateway.finish(linger_s=10.0)
        gateway.stop(grace_s=1.0)
        if proxy_proc is not None:
            proxy_proc.terminate()
            proxy_proc.wait(timeout=10)


def impaired_inside(prefix: str, rate: str, latency_ms: float, rounds: int) -> int:
    """Run in the lab's coordinator namespace: every size on loopback, then every size over
    the impaired network; prints the summary."""
    lab_module = _netns_module("netns_lab")
    lab = lab_module.Lab(prefix, N_CLIENTS)
    coordinator = lab_module.COORDINATOR
    proxy_script = Path(__file__).resolve().parents[1] / "tests" / "netns" / "netns_proxy.py"
    torch.set_num_threads(1)
    sizes = [n for n, _ in IMPAIRED_SIZES]
    times: dict[str, dict[int, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="veil-bench-impaired-") as tmp:
        work = Path(tmp)
        make_pki(work / "pki", hosts=("localhost", "127.0.0.1", coordinator))

        def start_proxy(target_port: int) -> tuple[subprocess.Popen[bytes], int]:
            port_file = work / f"proxy-{target_port}.port"
            proc = subprocess.Popen(
                [
                    sys.executable,
                    str(proxy_script),
                    "--listen",
                    f"{coordinator}:0",
                    "--target",
                    f"{coordinator}:{target_port}",
                    "--latency-ms",
                    str(latency_ms),
                    "--port-file",
                    str(port_file),
                ]
            )
            end = time.monotonic() + 30
            while not port_file.is_file():
                if proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError("the proxy did not start")
                time.sleep(0.02)
            return proc, int(port_file.read_text())

        for network in ("loopback", "impaired"):
            folder = work / network
            folder.mkdir()
            remote = network == "impaired"
            clients = start_clients(
                work / "pki",
                folder,
                sizes,
                host=coordinator if remote else "127.0.0.1",
                namespaces=[lab.member(i) for i in range(N_CLIENTS)] if remote else None,
            )
            try:
                times[network] = {
                    n: _deployment_rounds(
                        n,
                        rounds,
                        work / "pki",
                        folder,
                        clients,
                        f"{coordinator}:0" if remote else "127.0.0.1:0",
                        start_proxy if remote else None,
                    )
                    for n in sizes
                }
            finally:
                clients.stop(timeout_s=30.0)
    bytes_per_s = _rate_bytes_per_s(rate)
    rows = []
    for n_params, label in IMPAIRED_SIZES:
        loop = statistics.median(times["loopback"][n_params])
        imp = statistics.median(times["impaired"][n_params])
        rows.append(
            {
                "parameters": n_params,
                "label": label,
                "model_mb": round(4 * n_params / 1e6, 2),
                "rounds": rounds,
                "loopback_round_s_median": round(loop, 4),
                "impaired_round_s_median": round(imp, 4),
                "impaired_over_loopback": round(imp / loop, 1),
                "bandwidth_bound_s": round(2 * 4 * n_params / bytes_per_s, 3),
                "loopback_round_s": [round(t, 4) for t in times["loopback"][n_params]],
                "impaired_round_s": [round(t, 4) for t in times["impaired"][n_params]],
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr)
    summary = {
        "benchmark": "transport-impaired",
        "clients": N_CLIENTS,
        "network": {
            "rate_per_member_link": rate,
            "latency_ms_each_way": latency_ms,
            "how": "tc tbf on both ends of each member's veth; user-space proxy for latency",
        },
        "transport": "gRPC, mutual TLS; client processes in their own network namespaces",
        "python": platform.python_version(),
        "grpc": grpc.__version__,
        "cores": os.cpu_count(),
        "results": rows,
    }
    print(json.dumps(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100k and 10M parameters only")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds below 100M")
    parser.add_argument("--big-rounds", type=int, default=3, help="timed rounds at 100M")
    parser.add_argument(
        "--impaired",
        action="store_true",
        help="deployment rounds on loopback vs a bandwidth-limited, high-latency network (root)",
    )
    parser.add_argument("--rate", default="20mbit", help="--impaired: each member link's rate")
    parser.add_argument(
        "--latency-ms", type=float, default=25.0, help="--impaired: added latency each way"
    )
    parser.add_argument("--impaired-inside", help=argparse.SUPPRESS)
    parser.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--pki", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        sizes = [int(n) for n in args.sizes.split(",")]
        return client_main(args.client, Path(args.pki), Path(args.work), sizes, args.host)
    if args.impaired_inside:
        return impaired_inside(args.impaired_inside, args.rate, args.latency_ms, args.rounds)
    if args.impaired:
        return impaired(args.rate, args.latency_ms, args.rounds)

    torch.set_num_threads(1)
    plan = [(100_000, 3), (10_000_000, 3)]
    if not args.quick:
        plan = [(100_000, args.rounds), (10_000_000, args.rounds), (100_000_000, args.big_rounds)]
    rows: list[Row] = []
    skipped: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="veil-bench-transport-") as tmp:
        work = Path(tmp)
        make_pki(work / "pki")
        clients = start_clients(work / "pki", work, [n for n, _ in plan])
        try:
            for n_params, rounds in plan:
                need = COPIES_NEEDED * 4 * n_params
                if mem_available() < need:
                    free = mem_available() / 1e9
                    reason = f"needs about {need / 1e9:.1f} GB of memory, {free:.1f} GB free"
                    skipped.append({"parameters": n_params, "reason": reason})
                    print(json.dumps(skipped[-1]), file=sys.stderr)
                    announce(work, n_params, 0)
                    continue
                rows.append(measure(n_params, rounds, work / "pki", work, clients))
                print(json.dumps(rows[-1]), file=sys.stderr)
        finally:
            clients.stop(timeout_s=30.0)
    largest = rows[-1] if rows else None
    summary = {
        "benchmark": "transport",
        "clients": N_CLIENTS,
        "model": f"{PARTS} float32 tensors of {COLUMNS} columns, trivial client update",
        "transport": "gRPC, mutual TLS on 127.0.0.1, client processes; vs LocalTransport",
        "memory_method": "VmHWM - VmRSS at round start, after resetting VmHWM via clear_refs",
        "quick": args.quick,
        "python": platform.python_version(),
        "grpc": grpc.__version__,
        "cores": os.cpu_count(),
        "results": rows,
        "skipped": skipped,
        "target": "server holds at most ~2 model copies per concurrent upload",
        "target_checked_at": largest["parameters"] if largest else None,
        "target_met": (
            None if largest is None else largest["server_copies_per_concurrent_upload"] <= 2.0
        ),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
