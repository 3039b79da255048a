"""One Veil deployment in a `netns_lab.Lab`: the coordinator (`veil server`) in the hub namespace,
each organisation (`veil client`) in its member's namespace, the files from
`veil.deployment.prepare_deployment`, the processes started with the CLI as an operator would.

The coordinator's certificate names COORDINATOR besides localhost: the CA operator's part is
played before `prepare_deployment`, which keeps an existing certificate.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pytest
from netns_lab import COORDINATOR, Lab

from veil.config import RunConfig, load_config
from veil.crypto import pki
from veil.crypto.envelope import load_key_file
from veil.deployment import SERVER_NAME, DeploymentFiles, prepare_deployment
from veil.store import load_checkpoint

#: A small SecAgg federation: three hospitals, an MLP of 8,450 parameters (a member's masked
#: update is 34 KB, larger than anything else it sends), three rounds, deadlines tuned down.
CONFIG = """
name = "netns"
mode = "deployment"
secure_aggregation = "secagg"
seed = 11
[data]
dataset = "breast_cancer"
scaling = "local"
[data.partition]
kind = "dirichlet"
alpha = 2.0
[model]
name = "mlp"
hidden = [256]
[federation]
clients = 3
rounds = 3
learning_rate = 0.05
batch_size = 16
[secagg]
clip_range = 4.0
max_weight = 1000
[deployment]
round_deadline_s = 30
connect_timeout_s = 30
reconnect_timeout_s = 60
timeout_s = 300
"""
ROUNDS = 3
MEMBERS = 3
#: SecAgg rounds stochastically (OS randomness), so two runs of one config differ by about
#: 1e-8 per parameter; a member or a round lost moves them by orders of magnitude more.
PARAMETER_TOLERANCE = 1e-5


@dataclass(frozen=True)
class Reference:
    """The config's result and final model as `veil run` makes them on loopback."""

    result: dict[str, Any]
    parameters: dict[str, np.ndarray]


PROXY = Path(__file__).resolve().with_name("netns_proxy.py")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `predicate` every 20 ms until it holds; AssertionError naming `what` after
    `timeout_s`."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


def enrol_coordinator(out: Path, hosts: tuple[str, ...]) -> None:
    """The CA operator's and the coordinator's part of `prepare_deployment`, with the
    coordinator's certificate naming `hosts` (its address on the lab's bridge among them)."""
    ca_dir, own = out / "ca", out / "orgs" / SERVER_NAME
    for folder in (out, ca_dir, out / "orgs", own):
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    pki.init_ca(ca_dir)
    csr = pki.request(own, SERVER_NAME, role="server", hosts=hosts, overwrite=True)
    pki.sign_request(ca_dir, csr)
    (own / pki.CA_CERT).write_bytes((ca_dir / pki.CA_CERT).read_bytes())


def rounds_recorded(db: Path) -> list[int]:
    """The rounds the coordinator has recorded in `veil.db` so far."""
    if not db.is_file():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0) as conn:
            return [r[0] for r in conn.execute("SELECT round FROM rounds ORDER BY round")]
    except sqlite3.OperationalError:  # not created yet, or busy
        return []


def final_parameters(out: Path, key_file: Path) -> dict[str, np.ndarray]:
    """The final model from the run's sealed checkpoint."""
    checkpoint = load_checkpoint(out / "checkpoint.safetensors", key=load_key_file(key_file))
    return {name: np.asarray(value) for name, value in checkpoint.parameters.items()}


class Federation:
    """The files and processes of one run in `lab`; a context manager that kills every process
    it started on exit, whatever happened."""

    def __init__(self, lab: Lab, work: Path, config_text: str) -> None:
        self.lab = lab
        self.work = work
        self.config_path = work / "run.toml"
        self.config_path.write_text(config_text)
        self.config: RunConfig = load_config(self.config_path)
        out = work / "out"
        enrol_coordinator(out, ("localhost", "127.0.0.1", COORDINATOR))
        self.files: DeploymentFiles = prepare_deployment(
            self.config, out, config_path=self.config_path
        )
        if len(self.files.clients) != lab.members:
            raise ValueError(
                f"the config has {len(self.files.clients)} members, the lab {lab.members}"
            )
        self.server: subprocess.Popen[bytes] | None = None
        self.members: list[subprocess.Popen[bytes]] = []
        self.proxy: subprocess.Popen[bytes] | None = None
        self._procs: list[subprocess.Popen[bytes]] = []
        self.port = 0

    def __enter__(self) -> Federation:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill_all()

    # -- processes ---------------------------------------------------------------------------

    def _spawn(self, namespace: str, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as handle:
            proc = subprocess.Popen(
                [*self.lab.exec_args(namespace), *args],
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=ENV,
            )
        self._procs.append(proc)
        return proc

    def start_server(self, *, port: int = 0, resume: bool = False) -> int:
        """`veil server` in the hub namespace on COORDINATOR:`port` (0: any free port); returns
        the port once it listens."""
        self.files.port_file.unlink(missing_ok=True)
        args = [sys.executable, "-m", "veil.cli",
                *self.files.server_args(f"{COORDINATOR}:{port}"),
                *(["--resume"] if resume else [])]  # fmt: skip
        server = self.server = self._spawn(self.lab.hub, args, self.files.logs / "server.log")
        port_file = self.files.port_file

        def listening() -> bool:
            if server.poll() is not None:
                raise AssertionError(f"the server exited at start:\n{self.log()[-3000:]}")
            return port_file.is_file() and bool(port_file.read_text().strip())

        wait_for(listening, 60, "the server to listen")
        self.port = int(port_file.read_text())
        return self.port

    def start_members(self, server: str) -> None:
        """`veil client` for every organisation, each in its own namespace, reaching `server`."""
        for i, name in enumerate(self.files.clients):
            args = [sys.executable, "-m", "veil.cli", *self.files.client_args(name, server)]
            log = self.files.logs / f"{name}.log"
            self.members.append(self._spawn(self.lab.member(i), args, log))

    def start_proxy(self, **rules: object) -> str:
        """`netns_proxy.py` in the hub namespace, forwarding to the server with `rules` (its
        options: ``latency_ms=25`` is ``--latency-ms 25``); returns the address members use."""
        port_file, stats = self.work / "proxy.port", self.work / "proxy.json"
        args = [sys.executable, str(PROXY), "--listen", f"{COORDINATOR}:0",
                "--target", f"{COORDINATOR}:{self.port}",
                "--port-file", str(port_file), "--stats-file", str(stats)]  # fmt: skip
        for option, value in rules.items():
            args += [f"--{option.replace('_', '-')}", str(value)]
        proxy = self.proxy = self._spawn(self.lab.hub, args, self.work / "proxy.log")

        def listening() -> bool:
            if proxy.poll() is not None:
                log = (self.work / "proxy.log").read_text()
                raise AssertionError(f"the proxy exited at start:\n{log}")
            return port_file.is_file()

        wait_for(listening, 30, "the proxy to listen")
        return f"{COORDINATOR}:{port_file.read_text()}"

    def proxy_stats(self) -> dict[str, int]:
        stats: dict[str, int] = json.loads((self.work / "proxy.json").read_text())
        return stats

    def kill_server(self) -> None:
        """SIGKILL the coordinator, as a crash would."""
        assert self.server is not None
        self.server.send_signal(signal.SIGKILL)
        self.server.wait(timeout=30)

    def wait(self, timeout_s: float) -> None:
        """Wait for the server and every member to exit; AssertionError with the log of the
        first that fails (at once) or of the first still running after `timeout_s`."""
        assert self.server is not None
        named = [(SERVER_NAME, self.server), *zip(self.files.clients, self.members, strict=True)]
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            for name, proc in named:
                code = proc.poll()
                assert code in (None, 0), f"{name} exited with {code}:\n{self.log(name)[-4000:]}"
            if all(proc.poll() == 0 for _, proc in named):
                return
            time.sleep(0.1)
        name = next(name for name, proc in named if proc.poll() is None)
        raise AssertionError(f"{name} still runs after {timeout_s:g} s:\n{self.log(name)[-4000:]}")

    def kill_all(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)

    # -- what the run left -------------------------------------------------------------------

    def log(self, process: str = SERVER_NAME) -> str:
        path = self.files.logs / f"{process}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def rounds_recorded(self) -> list[int]:
        return rounds_recorded(self.files.run_dir / "veil.db")

    def result(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads((self.files.run_dir / "result.json").read_text())
        return result

    def final_parameters(self) -> dict[str, np.ndarray]:
        return final_parameters(self.files.run_dir, self.files.key_file)


def assert_same_result(
    result: dict[str, Any],
    parameters: dict[str, np.ndarray],
    reference: Reference,
    *,
    restored: Collection[int] = (),
) -> None:
    """Every round ran under SecAgg with every member, and the final metrics and model are the
    loopback run's. The `restored` rounds (recorded before a coordinator's restart) are not
    checked for SecAgg's survivors: a resumed run does not keep that record of them."""
    assert result["privacy"]["aggregation"] == "secagg"
    assert [r["round"] for r in result["rounds"]] == list(range(1, ROUNDS + 1))
    for r in result["rounds"]:
        assert r["applied"], r
        assert (r["clients"], r["dropped"]) == (MEMBERS, 0), r
        if r["round"] not in restored:
            assert r["aggregation"]["survivors"] == MEMBERS, r
    assert set(result["final"]) == set(reference.result["final"])
    for metric, value in reference.result["final"].items():
        assert result["final"][metric] == pytest.approx(value, abs=1e-6), metric
    assert parameters.keys() == reference.parameters.keys()
    for name, value in reference.parameters.items():
        assert parameters[name].shape == value.shape
        gap = float(np.max(np.abs(parameters[name] - value)))
        assert gap <= PARAMETER_TOLERANCE, f"{name} differs from loopback by {gap:.3g}"


def accepted(log: str, client: str, round_: int) -> bool:
    """Whether the coordinator's log shows an accepted answer of `client` in `round_`."""
    for line in log.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if (
            isinstance(event, dict)
            and event.get("event") == "accepted"
            and event.get("client") == client
            and event.get("round") == round_
        ):
            return True
    return False


def durations(result: dict[str, Any]) -> list[float]:
    return [float(r["duration_s"]) for r in result["rounds"]]
