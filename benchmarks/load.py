"""Benchmark: 100 members with SecAgg+ in deployment (mutual TLS on loopback), against plain.

Setup (issue 20): one federation of N members (default 100) run twice in the same benchmark, the
config identical apart from `secure_aggregation`: first SecAgg+ (`secure_aggregation = "secagg"`,
`[secagg] neighbours = "auto"`: at 100 members the default rates of 10% dropouts and 5%
corruption give degree 34 and threshold 24), then plain aggregation. Model: logistic regression
(`[model] name = "logistic"`, 650 parameters) on scikit-learn's 8x8 handwritten digits (real data
that scikit-learn ships, 1,797 images), split IID N ways (about 11 training images per member at
N = 100), one local epoch per round, no federated evaluation (`fraction_evaluate = 0`).

What is real: `veil.deployment.prepare_deployment` plays the CA operator and every organisation
in its own folder (each member's TLS key, certificate and Ed25519 identity key, the CA's
revocation list, each member's data file); the coordinator is `veil server` (this script with
`--server`, which runs the CLI's own entry point and then records its peak memory), a process
of its own on 127.0.0.1 with a free port; every member is `veil.deployment.serve_client`, what
`veil client` runs: its own mutual-TLS channel and certificate, a real `ClientRunner` that
trains, and a real `SecAggParticipant` that checks its peers' certificates, all driven by
`run_client`.

What is not: a `veil client` process per member would import torch 100 times, too much memory
for a small machine, so the members are threads, `--workers` processes (this script with
`--worker i:j`) each running members i..j-1. Members of one worker share its interpreter (and
its GIL) but nothing of Veil's: each has its own folder, keys, trust state, channel, runner and
participant.

Measured, for each aggregation:

- round time: `result.json`'s `rounds[].duration_s` (the coordinator's `run_round`: every
  SecAgg step, training on every member, masking, unmasking, the model update; the held-out
  evaluation in the last round only), median over the rounds after the first (warm-up) round;
- the coordinator's memory: its VmRSS and VmHWM (from /proc/PID/status) once every member has
  connected (`Status` RPC) and before the first round starts, and its VmHWM (peak resident
  memory) at exit, read by the process itself;
- the member workers' peak memory (VmHWM of each worker, summed);
- bytes per member and round, up (`result.json`) and down (median over the timed rounds),
  protocol messages included;
- CPU seconds (user + system, /proc/PID/stat) of the coordinator and of the member workers from
  the moment every member has connected to the end of the run: on 2 cores, which side a round
  waits for;
- `--profile DIR`: cProfiles in CPU time (`time.thread_time`) of the coordinator's federation
  loop (its main thread; not the gRPC handler threads) and of every member thread, summed per
  worker, under DIR/secagg and DIR/plain (read them with `pstats`).

Reported: both rows, and secure over plain for the median round time and the coordinator's
peak memory.

    python benchmarks/load.py [--members 100] [--rounds 4] [--workers 4] [--profile DIR]

`--quick`: 20 members, 1 timed round (plus the warm-up round). The last stdout line is one JSON
object.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Row = dict[str, Any]

SCRIPT = Path(__file__).resolve()
#: Seconds to wait for the coordinator to listen, and for every member to connect.
START_TIMEOUT_S = 300.0
#: How often the benchmark checks on its processes while the rounds run.
POLL_S = 0.1
MEMBERS_FILE = "members.json"


def config_text(members: int, rounds: int, secure: bool, neighbours: str) -> str:
    """The run config: everything equal between the two runs but `secure_aggregation`."""
    k = neighbours if neighbours.isdigit() else f'"{neighbours}"'
    secagg = f"\n[secagg]\nneighbours = {k}\n" if secure else ""
    return f"""\
name = "load-{"secagg" if secure else "plain"}"
mode = "deployment"
secure_aggregation = "{"secagg" if secure else "plain"}"
seed = 20

[data]
dataset = "digits"
scaling = "bounds"

[model]
name = "logistic"

[federation]
clients = {members}
rounds = {rounds}
local_epochs = 1
batch_size = 16
learning_rate = 0.1
fraction_fit = 1.0
fraction_evaluate = 0.0
evaluate_every = {rounds}
torch_threads = 1

[deployment]
round_deadline_s = 600
connect_timeout_s = {START_TIMEOUT_S:g}
reconnect_timeout_s = 120
{secagg}"""


# -- memory ------------------------------------------------------------------------------------


def proc_status(pid: int | str = "self") -> dict[str, float]:
    """VmRSS and VmHWM of a process in bytes, and its CPU seconds (user + system) as "cpu_s";
    empty once it has exited."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for field in ("VmRSS", "VmHWM"):
        match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
        if match:
            out[field] = int(match.group(1)) * 1024
    # Fields 14 and 15 (utime, stime), counted after the command name's closing parenthesis.
    ticks = stat.rsplit(")", 1)[1].split()
    out["cpu_s"] = (int(ticks[11]) + int(ticks[12])) / os.sysconf("SC_CLK_TCK")
    return out


def write_memory(path: Path) -> None:
    """This process's `proc_status`, written to `path` as JSON (read by the benchmark)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(proc_status()))
    tmp.replace(path)


# -- the coordinator and the member workers (child processes) ------------------------------------


def server_main(memory_file: Path, cli_args: list[str], profile: Path | None) -> int:
    """`veil CLI_ARGS` (`server ...`), through the CLI's entry point; then this process's
    memory. With `profile`: a cProfile of the main thread (the federation loop; not the gRPC
    handler threads) written there."""
    from veil.cli import main as veil_main

    profiler = cProfile.Profile(time.thread_time) if profile else None
    if profiler is not None:
        profiler.enable()
    code = veil_main(cli_args)
    if profiler is not None and profile is not None:
        profiler.disable()
        profiler.dump_stats(profile)
    write_memory(memory_file)
    return code


def worker_main(
    run_dir: Path, config_path: Path, span: str, server: str, memory: Path, profile: Path | None
) -> int:
    """Members `span` ("i:j") of the run prepared in `run_dir`, one thread each, each one
    `serve_client` (what `veil client` runs) in its own folder; returns 1 if any failed. With
    `profile`: the members' cProfiles, summed, written there."""
    import logging

    import torch

    from veil.deployment import DATA_FILE, load, serve_client

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    names = json.loads((run_dir / MEMBERS_FILE).read_text())
    start, stop = (int(part) for part in span.split(":"))
    config = load(config_path)
    failures: list[str] = []
    profiles: list[cProfile.Profile] = []

    def member(name: str) -> None:
        own = run_dir / "orgs" / name
        profiler = cProfile.Profile(time.thread_time)
        if profile:
            profiles.append(profiler)
            profiler.enable()  # this thread only
        try:
            serve_client(config, name=name, data=own / DATA_FILE, pki_dir=own, server=server)
        except Exception as exc:  # reported by the benchmark, which then fails
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
        finally:
            profiler.disable()

    threads = [
        threading.Thread(target=member, args=(name,), name=name, daemon=True)
        for name in names[start:stop]
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if profile and profiles:
        pstats.Stats(*profiles).dump_stats(profile)
    write_memory(memory)
    for failure in failures:
        print(failure, file=sys.stderr)
    return 1 if failures else 0


# -- one run ---------------------------------------------------------------------------------------


@dataclass
class Processes:
    """One run's coordinator and member worker processes, and the folder of their logs."""

    server: subprocess.Popen[bytes]
    workers: list[subprocess.Popen[bytes]]
    logs: Path

    def check(self) -> None:
        """Raise if a process has failed (the coordinator before its end, any worker)."""
        for i, proc in enumerate(self.workers):
            if proc.poll() not in (None, 0):
                log = _tail(self.logs / f"worker-{i}.log")
                raise RuntimeError(f"member worker {i} exited with {proc.returncode}:\n{log}")
        if self.server.poll() not in (None, 0):
            log = _tail(self.logs / "server.log")
            raise RuntimeError(f"the coordinator exited with {self.server.returncode}:\n{log}")

    def kill(self) -> None:
        for proc in [self.server, *self.workers]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else ""


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as handle:
        return subprocess.Popen(
            [sys.executable, str(SCRIPT), *args], stdout=handle, stderr=subprocess.STDOUT, env=env
        )


def _wait_for_port(port_file: Path, procs: Processes) -> int:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if port_file.is_file() and port_file.read_text().strip():
            return int(port_file.read_text())
        procs.check()
        time.sleep(0.05)
    raise RuntimeError(
        "the coordinator did not listen in time:\n" + _tail(procs.logs / "server.log")
    )


def _all_connected(address: str, pki_dir: Path, name: str, procs: Processes) -> float:
    """Poll the coordinator's `Status` RPC (as member `name`) until every member has connected
    (and joined, where the coordinator reports it); returns the seconds that took."""
    import grpc

    from veil.crypto import pki
    from veil.crypto.keyfile import read_private
    from veil.transport.grpc import veil_pb2 as pb
    from veil.transport.grpc import veil_pb2_grpc as pb_grpc
    from veil.transport.grpc.client import ClientCredentials, open_channel

    files = pki.node_files(pki_dir, name)
    credentials = ClientCredentials(
        files.cert.read_bytes(), read_private(files.key, "TLS key"), files.ca_cert.read_bytes()
    )
    started = time.monotonic()
    deadline = started + START_TIMEOUT_S
    with open_channel(address, credentials) as channel:
        stub = pb_grpc.FederationStub(channel)  # type: ignore[no-untyped-call]
        while time.monotonic() < deadline:
            procs.check()
            try:
                status = json.loads(stub.Status(pb.StatusRequest(), timeout=10).json)
            except grpc.RpcError:
                time.sleep(0.2)
                continue
            clients = status["clients"].values()
            if all(c.get("joined", True) and c.get("last_seen_s_ago") is not None for c in clients):
                return time.monotonic() - started
            time.sleep(0.2)
    raise RuntimeError("not every member connected in time:\n" + _tail(procs.logs / "server.log"))


@dataclass(frozen=True)
class Plan:
    """What to run: members, timed rounds (after one warm-up round), member processes, the
    SecAgg+ degree, and where to write profiles (None: no profiling)."""

    members: int
    rounds: int
    workers: int
    neighbours: str
    profile: Path | None = None


def run_once(work: Path, plan: Plan, *, secure: bool) -> Row:
    """Prepare, run and measure one deployment; returns its row."""
    from veil.deployment import load, prepare_deployment

    label = "secagg" if secure else "plain"
    out = work / label
    out.mkdir(parents=True)
    config_path = work / f"{label}.toml"
    config_path.write_text(config_text(plan.members, plan.rounds + 1, secure, plan.neighbours))
    profile = None if plan.profile is None else plan.profile / label
    if profile is not None:
        profile.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    files = prepare_deployment(load(config_path), out, config_path=config_path)
    prepare_s = time.perf_counter() - started
    (out / MEMBERS_FILE).write_text(json.dumps(files.clients))
    logs = files.logs
    server_memory = out / "server-memory.json"
    options = ["--memory-file", str(server_memory)]
    if profile is not None:
        options += ["--profile", str(profile / "coordinator.prof")]
    server = _spawn(["--server", *options, "--", *files.server_args()], logs / "server.log")
    procs = Processes(server, [], logs)
    try:
        port = _wait_for_port(files.port_file, procs)
        listening = proc_status(server.pid)
        address = f"localhost:{port}"
        bounds = [round(i * plan.members / plan.workers) for i in range(plan.workers + 1)]
        for i in range(plan.workers):
            span = f"{bounds[i]}:{bounds[i + 1]}"
            args = ["--worker", span, "--run", str(out), "--config", str(config_path)]
            args += ["--address", address, "--memory-file", str(out / f"worker-{i}-memory.json")]
            if profile is not None:
                args += ["--profile", str(profile / f"members-{i}.prof")]
            procs.workers.append(_spawn(args, logs / f"worker-{i}.log"))
        first = files.clients[0]
        connect_s = _all_connected(address, files.org_dir(first), first, procs)
        before = proc_status(server.pid)
        workers_before = [proc_status(p.pid).get("cpu_s", 0.0) for p in procs.workers]
        first_round = time.perf_counter()
        while server.poll() is None:
            procs.check()
            time.sleep(POLL_S)
        procs.check()
        run_s = time.perf_counter() - first_round
        for i, proc in enumerate(procs.workers):
            if proc.wait(timeout=60) != 0:
                raise RuntimeError(f"member worker {i} failed:\n" + _tail(logs / f"worker-{i}.log"))
    finally:
        procs.kill()
    at_exit = json.loads(server_memory.read_text())
    worker_ends = [
        json.loads((out / f"worker-{i}-memory.json").read_text()) for i in range(plan.workers)
    ]
    server_cpu = at_exit["cpu_s"] - before["cpu_s"]
    member_cpu = sum(end["cpu_s"] for end in worker_ends) - sum(workers_before)
    result = json.loads((out / "result.json").read_text())
    records = result["rounds"]
    times = [float(r["duration_s"]) for r in records]
    timed = times[1:]
    aggregation = records[-1].get("aggregation", {})
    return {
        "aggregation": label,
        "members": plan.members,
        "rounds_timed": len(timed),
        "round_s_median": round(statistics.median(timed), 3),
        "round_s": [round(t, 3) for t in times],
        "warmup_round_s": round(times[0], 3),
        "dropped_per_round": [int(r["dropped"]) for r in records],
        "applied": all(bool(r["applied"]) for r in records),
        "failure_counts": [r.get("failure_counts", {}) for r in records],
        "neighbours": aggregation.get("neighbours"),
        "threshold": aggregation.get("threshold"),
        "accuracy": result["final"].get("accuracy"),
        "bytes_up_per_member_round": result["communication"].get("bytes_up_per_client_round"),
        "bytes_down_per_member_round": round(
            statistics.median(int(r["bytes_down"]) for r in records[1:]) / plan.members
        ),
        "prepare_s": round(prepare_s, 2),
        "connect_s": round(connect_s, 2),
        "rounds_to_exit_wall_s": round(run_s, 2),
        "coordinator_cpu_s": round(server_cpu, 2),
        "member_workers_cpu_s": round(member_cpu, 2),
        "coordinator_listening_rss_mb": _mb(listening.get("VmRSS")),
        "coordinator_before_round_1_rss_mb": _mb(before.get("VmRSS")),
        "coordinator_before_round_1_hwm_mb": _mb(before.get("VmHWM")),
        "coordinator_peak_mb": _mb(at_exit.get("VmHWM")),
        "member_workers_peak_mb_total": _mb(sum(end["VmHWM"] for end in worker_ends)),
    }


def _mb(value: float | None) -> float | None:
    return None if value is None else round(value / 1e6, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--members", type=int, default=100, help="members (default 100)")
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds after the warm-up")
    parser.add_argument("--workers", type=int, default=4, help="member processes (threads each)")
    parser.add_argument("--neighbours", default="auto", help='SecAgg+ degree, or "auto"')
    parser.add_argument("--quick", action="store_true", help="20 members, 1 timed round")
    parser.add_argument(
        "--profile",
        type=Path,
        help="write cProfiles here: the coordinator's federation loop and each member worker's",
    )
    parser.add_argument("--server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--memory-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("cli_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.server:
        return server_main(args.memory_file, args.cli_args, args.profile)
    if args.worker:
        return worker_main(
            args.run, args.config, args.worker, args.address, args.memory_file, args.profile
        )

    members, rounds = (20, 1) if args.quick else (args.members, args.rounds)
    if members < 3 or rounds < 1 or not 1 <= args.workers <= members:
        parser.error("need at least 3 members, 1 timed round and 1 to MEMBERS workers")
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="veil-bench-load-") as tmp:
        plan = Plan(members, rounds, args.workers, args.neighbours, args.profile)
        for secure in (True, False):
            rows.append(run_once(Path(tmp), plan, secure=secure))
            print(json.dumps(rows[-1]), file=sys.stderr)
    secagg, plain = rows
    import grpc

    summary = {
        "benchmark": "load",
        "members": members,
        "member_processes": args.workers,
        "members_as": "threads running veil.deployment.serve_client, one per member",
        "transport": "gRPC, mutual TLS on 127.0.0.1; coordinator: veil server in its own process",
        "model": "logistic regression, 650 parameters, sklearn digits split IID",
        "rounds_timed": rounds,
        "secagg_over_plain_round_time": round(
            secagg["round_s_median"] / plain["round_s_median"], 2
        ),
        "secagg_over_plain_coordinator_peak": round(
            secagg["coordinator_peak_mb"] / plain["coordinator_peak_mb"], 2
        ),
        "results": rows,
        "quick": args.quick,
        "load_average_before": round(load_before, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
        "wall_s": round(time.perf_counter() - started, 1),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "grpc": grpc.__version__,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
