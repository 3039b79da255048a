"""A loopback deployment as real processes that a test can act on while it runs (kill a member,
change a member's data before it starts): `veil server` and one `veil client` per organisation,
each given only its own folder, as `veil run` starts them (`veil.deployment.prepare_deployment`
plays the CA operator and every organisation)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from veil import deployment
from veil.deployment import DeploymentFiles

VEIL = [sys.executable, "-m", "veil.cli"]


@dataclass
class Deployment:
    files: DeploymentFiles
    server: subprocess.Popen[bytes]
    members: dict[str, subprocess.Popen[bytes]]

    def log(self, process: str = "server") -> str:
        path = self.files.logs / f"{process}.log"
        return path.read_text() if path.is_file() else ""

    def events(self, process: str = "server") -> list[dict[str, Any]]:
        """The JSON events in a process's log."""
        out = []
        for line in self.log(process).splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return out

    def wait_for(
        self, process: str, found: Callable[[dict[str, Any]], bool], timeout_s: float
    ) -> None:
        """Poll `process`'s log until an event satisfies `found` (the test fails after
        `timeout_s`, or if the server exits first)."""
        end = time.monotonic() + timeout_s
        while not any(found(e) for e in self.events(process)):
            assert self.server.poll() is None, "the server exited\n" + self.log()
            assert time.monotonic() < end, f"no such event in {process}'s log\n" + self.log(process)
            time.sleep(0.05)

    def result(self, timeout_s: float) -> dict[str, Any]:
        """The server's `result.json`, once it has exited with status 0."""
        code = self.server.wait(timeout=timeout_s)
        assert code == 0, self.log()
        return json.loads((self.files.run_dir / "result.json").read_text())  # type: ignore[no-any-return]


@contextmanager
def deployed(
    config_text: str, tmp: Path, *, prepare: Callable[[DeploymentFiles], None] | None = None
) -> Iterator[Deployment]:
    """Start the deployment of `config_text` (mode = "deployment") under `tmp`; `prepare` may
    change an organisation's files before the processes start. Every process is killed on exit."""
    config_path = tmp / "run.toml"
    config_path.write_text(config_text)
    config = deployment.load(config_path)
    files = deployment.prepare_deployment(config, tmp / "out", config_path=config_path)
    if prepare is not None:
        prepare(files)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        server = _spawn([*VEIL, *files.server_args()], files.logs / "server.log", env)
        procs.append(server)
        end = time.monotonic() + 120
        while not (files.port_file.is_file() and files.port_file.read_text().strip()):
            assert server.poll() is None, (files.logs / "server.log").read_text()
            assert time.monotonic() < end, "the server did not start listening"
            time.sleep(0.05)
        address = f"localhost:{files.port_file.read_text().strip()}"
        members = {}
        for name in files.clients:
            args = files.client_args(name, address)
            members[name] = _spawn([*VEIL, *args], files.logs / f"{name}.log", env)
            procs.append(members[name])
        yield Deployment(files, server, members)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def _spawn(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log, "ab") as handle:
        return subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=env)
