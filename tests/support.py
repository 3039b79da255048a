"""Helpers shared by the test folders: the examples, the `veil` command, a federation's PKI,
and processes that start up (a port file) or die on cue (SIGKILL at a chosen round).

Fixtures built on them are in `tests/conftest.py`; the plain functions are imported
(``from support import ...``), also where a module needs them at import time (parametrize).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from veil import cli
from veil.crypto import pki
from veil.transport.grpc.client import ClientCredentials

#: The repository's example configurations.
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def veil(*argv: str) -> int:
    """``veil ARGV`` in this process, through the real command-line parser; a UserError is
    raised (for `pytest.raises`), not turned into exit status 2 as `veil.cli.main` does."""
    args = cli._parser().parse_args(argv)
    return int(args.handler(args))


def issue_federation(
    directory: Path, clients: Iterable[str], *, server: str | None = "server"
) -> Path:
    """A federation's CA in `directory` with a server certificate (for localhost and
    127.0.0.1) and one client certificate per name; returns `directory`."""
    pki.init_ca(directory)
    if server is not None:
        pki.issue(directory, server, role="server")
    for name in clients:
        pki.issue(directory, name, role="client")
    return directory


def client_credentials(directory: Path, name: str) -> ClientCredentials:
    """Node `name`'s TLS certificate and key, and its CA's certificate (PEM bytes)."""
    f = pki.node_files(directory, name)
    return ClientCredentials(f.cert.read_bytes(), f.key.read_bytes(), f.ca_cert.read_bytes())


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Return once `predicate()` is true; AssertionError naming `what` after `timeout` s."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def wait_for_port(
    port_file: Path, process: subprocess.Popen[bytes] | subprocess.Popen[str], timeout: float
) -> int:
    """The port a server process wrote to `port_file` once it listens. AssertionError (with
    the process's exit status) if it exits first or `timeout` s pass; a half-written file
    does not count."""

    def written() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with status {process.returncode} first")
        return port_file.is_file() and port_file.read_text().strip().isdigit()

    wait_until(written, timeout, f"the port file {port_file}")
    return int(port_file.read_text().strip())


class ReservedPort:
    """A loopback TCP port held for a test's whole duration by a bound, not listening, socket
    with SO_REUSEADDR and SO_REUSEPORT: a server (gRPC sets both) can listen on it, and listen
    again after a SIGKILL, while no other process can take it (for an outgoing connection's
    ephemeral port either) in between. Use it where a server must come back at the same
    address; elsewhere let the server bind port 0."""

    def __init__(self) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port = int(self._socket.getsockname()[1])

    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self._socket.close()

    def __enter__(self) -> ReservedPort:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: ``python -c DYING_CLI HOOK N ARGV...``: `veil ARGV` that SIGKILLs itself at a chosen point,
#: deterministically (no test watching for a round and racing the process to it):
#: "checkpoint" right after writing round N's checkpoint (before the round's row reaches the
#: run store, the harshest point for a server); "fit" when handed round N's fit task, before
#: training (a member dying in the middle of round N).
DYING_CLI = textwrap.dedent(
    """
    import importlib, os, signal, sys

    hook, at = sys.argv.pop(1), int(sys.argv.pop(1))

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if hook == "checkpoint":
        run = importlib.import_module("veil.runtime")  # where the recorder saves checkpoints
        save = run.save_checkpoint

        def save_then_die(path, checkpoint, **kwargs):
            save(path, checkpoint, **kwargs)
            if checkpoint.round == at:
                die()

        run.save_checkpoint = save_then_die
    elif hook == "fit":
        from veil.federation.client import ClientRunner

        fit = ClientRunner.fit

        def fit_or_die(self, model, instruction):
            if instruction.round == at:
                die()
            return fit(self, model, instruction)

        ClientRunner.fit = fit_or_die
    else:
        raise SystemExit(f"unknown hook {hook!r}")
    from veil.cli import main

    sys.exit(main(sys.argv[1:]))
    """
)


def spawn_veil(
    argv: Sequence[str], log: Path, *, die: tuple[str, int] | None = None
) -> subprocess.Popen[bytes]:
    """``veil ARGV`` as a process, its output appended to `log`; with `die` = (hook, round) it
    SIGKILLs itself there (see `DYING_CLI`)."""
    command = [sys.executable, "-m", "veil.cli", *argv]
    if die is not None:
        command = [sys.executable, "-c", DYING_CLI, die[0], str(die[1]), *argv]
    with open(log, "ab") as handle:
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
