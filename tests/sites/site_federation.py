"""Long-lived sites as real processes: a CA, a coordinator, sites and a submitter, each with its
own folder, as four organisations on four machines would hold them (docs/sites.md).

`SiteFederation` enrols everyone (each node makes its keys in its own folder; the CA signs the
requests), gives each site its data file and policy, and starts and stops `veil coordinator
start` and `veil site start` processes; `job(...)` runs `veil job ...` through the real
command line as the submitter.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support import ReservedPort, wait_for_port, wait_until
from veil.crypto import pki
from veil.crypto.revocation import CRL_FILE

SUBMITTER = "risk-team"


@dataclass
class SiteFederation:
    """The folders of a federation of long-lived sites under `root`."""

    root: Path
    sites: list[str]
    coordinator_port: ReservedPort
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    #: Nodes that serve Prometheus metrics, and on which port.
    metrics_ports: dict[str, int] = field(default_factory=dict)

    @property
    def ca(self) -> Path:
        return self.root / "ca"

    def own(self, name: str) -> Path:
        """Node `name`'s own PKI folder (the coordinator's is "server")."""
        return self.root / "orgs" / name / "pki"

    def home(self, name: str) -> Path:
        return self.root / "orgs" / name / "home"

    def data_dir(self, name: str) -> Path:
        return self.root / "orgs" / name / "data"

    def policy(self, name: str) -> Path:
        return self.root / "orgs" / name / "policy.toml"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.coordinator_port.port}"

    def enrol(self) -> None:
        """Every node requests its certificate from its own folder; the CA signs; only public
        files travel (certificates, ca.crt, crl.pem)."""
        pki.init_ca(self.ca)
        nodes = [("server", "server"), (SUBMITTER, "submitter")]
        for name, role in [*nodes, *((s, "client") for s in self.sites)]:
            own = self.own(name)
            own.mkdir(parents=True, exist_ok=True)
            request = pki.request(own, name, role=role)  # type: ignore[arg-type]
            pki.sign_request(self.ca, request)
            for public in (pki.CA_CERT, CRL_FILE):
                (own / public).write_bytes((self.ca / public).read_bytes())
        for site in self.sites:  # the coordinator files each site's certificate (public)
            cert = self.own(site) / pki.NODES / site / pki.NODE_CERT
            target = self.own("server") / pki.NODES / site / pki.NODE_CERT
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(cert.read_bytes())

    def give_data(self, site: str, source: Path) -> None:
        self.data_dir(site).mkdir(parents=True, exist_ok=True)
        (self.data_dir(site) / source.name).write_bytes(source.read_bytes())

    def set_policy(self, site: str, text: str) -> None:
        self.policy(site).write_text(text)

    def set_budget(self, site: str, dataset: str, epsilon: float, delta: float) -> None:
        from veil.privacy.dp.ledger import PrivacyLedger

        self.home(site).mkdir(parents=True, exist_ok=True)
        with PrivacyLedger(self.home(site) / "ledger.db") as ledger:
            ledger.set_budget(dataset, epsilon=epsilon, delta=delta)

    # -- processes -----------------------------------------------------------------------

    def start_coordinator(self) -> None:
        home = self.home("server")
        port_file = home.parent / "coordinator.port"
        port_file.unlink(missing_ok=True)
        self.processes["server"] = _spawn(
            ["coordinator", "start", "--home", str(home), "--pki", str(self.own("server")),
             "--address", self.address, "--port-file", str(port_file),
             "--offer-timeout-s", "120", *self._metrics("server")],
            home.parent / "coordinator.log",
        )  # fmt: skip
        wait_for_port(port_file, self.processes["server"], 60)

    def start_site(self, site: str) -> None:
        self.processes[site] = _spawn(
            ["site", "start", "--pki", str(self.own(site)), "--data-dir", str(self.data_dir(site)),
             "--policy", str(self.policy(site)), "--coordinator", self.address,
             "--home", str(self.home(site)), "--poll-s", "0.3", *self._metrics(site)],
            self.home(site).parent / "site.log",
        )  # fmt: skip

    def _metrics(self, name: str) -> list[str]:
        port = self.metrics_ports.get(name)
        return [] if port is None else ["--metrics", f"127.0.0.1:{port}"]

    def metrics(self, name: str) -> str:
        """Node `name`'s Prometheus exposition, fetched over HTTP."""
        url = f"http://127.0.0.1:{self.metrics_ports[name]}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            return str(reply.read().decode())

    def kill(self, name: str) -> None:
        """SIGKILL node `name`'s process group (its job processes die with it)."""
        proc = self.processes.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop_all(self) -> None:
        for name in list(self.processes):
            proc = self.processes.pop(name)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()

    # -- the submitter -------------------------------------------------------------------

    def job(self, *argv: str) -> tuple[int, str]:
        """``veil job ARGV`` as the submitter: (exit status, output)."""
        env = {**os.environ, "VEIL_COORDINATOR": self.address, "VEIL_PKI": str(self.own(SUBMITTER))}
        done = subprocess.run(
            [sys.executable, "-m", "veil.cli", "job", *argv],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        return done.returncode, done.stdout + done.stderr

    def status(self, job_id: str) -> dict[str, Any]:
        """`veil job status ID --json`'s reply, asked in this process (polled often)."""
        from veil.sites.control import ControlClient, ControlError

        with ControlClient(self.address, self.own(SUBMITTER), SUBMITTER, timeout_s=5) as client:
            try:
                return client.call("Status", {"job_id": job_id})
            except ControlError as exc:  # the coordinator is restarting
                return {"state": "unreachable", "reason": str(exc), "rounds_done": -1}

    def submit(self, config: Path, *extra: str) -> str:
        code, out = self.job("submit", str(config), "--json", *extra)
        assert code == 0, out
        return str(json.loads(out[out.index("{") :])["job_id"])

    def wait_state(self, job_id: str, states: tuple[str, ...], timeout: float) -> dict[str, Any]:
        seen: dict[str, Any] = {}

        def reached() -> bool:
            seen.update(self.status(job_id))
            return seen["state"] in states

        try:
            wait_until(reached, timeout, f"job {job_id} to be {'/'.join(states)}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last status {seen}; logs: {self.logs_text()}") from None
        return seen

    def logs_text(self) -> str:
        out = []
        for log in sorted(self.root.rglob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-15:]
            out.append(f"--- {log.relative_to(self.root)}\n" + "\n".join(lines))
        return "\n".join(out)

    def site_journal(self, site: str) -> list[dict[str, Any]]:
        from veil.sites.journal import Journal

        journal = Journal(self.home(site) / "journal.db")
        try:
            return [e.to_json() for e in journal.entries()]
        finally:
            journal.close()


def _spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "veil.cli", *argv],
            stdout=handle,
            stderr=subprocess.STDOUT,
            process_group=0,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


@contextmanager
def site_federation(root: Path, sites: list[str]) -> Iterator[SiteFederation]:
    """A federation whose processes are all stopped on exit."""
    with ReservedPort() as port:
        federation = SiteFederation(root, sites, port)
        federation.enrol()
        try:
            yield federation
        finally:
            federation.stop_all()


def policy_text(datasets: list[str], **rules: Any) -> str:
    """A policy.toml with `datasets` and `rules` (TOML values from Python's)."""
    lines = [f"datasets = {json.dumps(datasets)}"]
    for key, value in rules.items():
        lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def wait(seconds: float) -> None:
    time.sleep(seconds)


def read_result(federation: SiteFederation, job_id: str) -> Mapping[str, Any]:
    path = federation.home("server") / "jobs" / job_id / "run" / "result.json"
    return dict(json.loads(path.read_text()))


def free_port() -> int:
    """A loopback port free at this moment."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
