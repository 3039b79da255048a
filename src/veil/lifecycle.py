"""Stopping a run cleanly on SIGINT (Ctrl-C) or SIGTERM (what systemd, Kubernetes and `kill`
send).

`stop_on_signals()` installs handlers for both and yields a `StopRequest`. The first signal
only sets it: the federation loop checks it before every round (`FederatedServer.run`), so the
run ends at the next round boundary, with every finished round in the run store and the
checkpoint, result.json (status "interrupted") and the report written; `veil run --resume`
continues it. A second signal raises `Aborted` at once, wherever the main thread is. Listeners
(`StopRequest.add_listener`) hear every signal: `veil run` in deployment mode forwards them to
its server process.

Only the command line installs the handlers; the Python API takes a `StopRequest` (or none) and
leaves the process's signal handling alone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from types import FrameType

from veil.errors import Aborted

__all__ = [
    "PARENT_ENV",
    "SIGNALS",
    "StopRequest",
    "die_with_parent",
    "exit_status",
    "stop_on_signals",
]

#: The signals that stop a run.
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Whether a signal asked the run to stop. Calling it answers that (the predicate
    `FederatedServer.run` takes)."""

    def __init__(self) -> None:
        #: The first signal received, None until then.
        self.signum: int | None = None
        self._listeners: list[Callable[[int], None]] = []

    def __call__(self) -> bool:
        return self.signum is not None

    @property
    def signal_name(self) -> str | None:
        """The first signal's name ("SIGINT", "SIGTERM"); None before one."""
        return signal.Signals(self.signum).name if self.signum is not None else None

    def request(self, signum: int) -> None:
        """Ask the run to stop at the next round boundary (the first signal counts)."""
        if self.signum is None:
            self.signum = signum
        self._notify(signum)

    def add_listener(self, listener: Callable[[int], None]) -> None:
        """Call `listener(signum)` for every later signal, and at once for one already
        received."""
        self._listeners.append(listener)
        if self.signum is not None:
            listener(self.signum)

    def _notify(self, signum: int) -> None:
        for listener in self._listeners:
            with contextlib.suppress(OSError):  # e.g. a child that has already exited
                listener(signum)


def exit_status(signal_name: str | None) -> int:
    """The conventional exit status of a process stopped by `signal_name`: 128 + its number
    (130 for SIGINT, 143 for SIGTERM); 130 when unknown."""
    try:
        return 128 + signal.Signals[signal_name or "SIGINT"].value
    except KeyError:
        return 128 + signal.SIGINT


@contextlib.contextmanager
def stop_on_signals(
    *, what: str = "the current round", abort_on: tuple[int, ...] = ()
) -> Iterator[StopRequest]:
    """Handle SIGINT and SIGTERM for the block (main thread only): the first sets the yielded
    `StopRequest` and says on stderr that the run stops after `what`; the second raises
    `Aborted`. A signal in `abort_on` (`veil server`: SIGHUP, its parent-death signal under
    `veil run`) raises `Aborted` the first time. The previous handlers are restored afterwards.
    """
    stop = StopRequest()

    def handle(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if signum in abort_on:
            stop.request(signum)
            raise Aborted(f"aborted by {name}", signum=signum)
        if stop.signum is None:
            stop.request(signum)
            # os.write, not print: the handler may run while the main thread is printing.
            os.write(2, f"veil: {name}: stopping after {what}; again to abort at once\n".encode())
            return
        stop.request(signum)
        raise Aborted(f"aborted by a second signal ({name})", signum=signum)

    previous = {s: signal.signal(s, handle) for s in {*SIGNALS, *abort_on}}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


#: Set by `veil.deployment.spawn_child` to "PID:SIGNAL": the child asks Linux for SIGNAL when
#: process PID (its parent) dies (`die_with_parent`).
PARENT_ENV = "VEIL_DIE_WITH_PARENT"
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """When a Veil process started this one and asked for it (`PARENT_ENV`), ask Linux
    (`prctl(PR_SET_PDEATHSIG)`) to send the named signal when that parent dies, even by
    kill -9; exit at once if it died already. The variable is removed, so this process's own
    children do not inherit it.

    Why in the child and not in a `preexec_fn`: a parent with gRPC threads (a site, the
    coordinator) cannot safely run Python between fork and exec; gRPC's fork handlers abort.
    """
    value = os.environ.pop(PARENT_ENV, None)
    if value is None or not sys.platform.startswith("linux"):
        return
    try:
        parent, signum = (int(part) for part in value.split(":"))
    except ValueError:
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the call: nobody will signal
        os.kill(os.getpid(), signal.SIGKILL)
