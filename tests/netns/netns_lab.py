"""A federation's network in Linux network namespaces: one for the coordinator, one per member.

Layout (`create(prefix, members)`)::

    PREFIX-hub   the coordinator's namespace: a bridge `br0` holding COORDINATOR (10.77.0.1/24),
                 and one switch port `m0`, `m1`, ... per member (the hub end of its veth pair)
    PREFIX-m0    member 0's namespace: `eth0` with 10.77.0.10/24, the other end of `m0`
    PREFIX-m1    member 1: 10.77.0.11/24 on `eth0`, ...

Nothing is created in the namespace the caller runs in, so no traffic leaves these namespaces
and several labs (pytest workers, a benchmark) can run side by side with the same addresses.
`member_link(lab, i, up=False)` unplugs member i (its switch port goes down, its `eth0` loses
carrier); `limit_bandwidth` puts a token bucket (`tc ... tbf`) on both ends of every member's
link. These kernels have tbf but no netem: latency and loss come from `netns_proxy.py`.

Needs root and iproute2; `unavailable()` says why a lab cannot be made here. Used by the tests
in this folder and by `benchmarks/transport.py --impaired`; `scripts/netns_federation.sh` does
the same by hand.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

#: The coordinator's address on the lab's bridge; member i is at 10.77.0.(10 + i).
COORDINATOR = "10.77.0.1"
SUBNET_BITS = 24
#: Names of the labs this module makes start with this, then the creating process's id.
NAME_ROOT = "veilnt"
IP_TIMEOUT_S = 20.0


class LabError(RuntimeError):
    """An `ip` or `tc` command failed while building, changing or removing a lab."""


@dataclass(frozen=True)
class Lab:
    """The namespaces of one lab (see the module docstring)."""

    prefix: str
    members: int

    @property
    def hub(self) -> str:
        """The coordinator's namespace."""
        return f"{self.prefix}-hub"

    def member(self, index: int) -> str:
        """Member `index`'s namespace."""
        return f"{self.prefix}-m{index}"

    def member_address(self, index: int) -> str:
        return f"10.77.0.{10 + index}"

    @property
    def namespaces(self) -> list[str]:
        return [self.hub, *(self.member(i) for i in range(self.members))]

    def exec_args(self, namespace: str) -> list[str]:
        """The command prefix that runs a program inside `namespace`."""
        return ["ip", "netns", "exec", namespace]


def run_ip(*args: str) -> str:
    """Run one `ip`/`tc` command (args[0] is the program); its stdout. LabError on failure."""
    try:
        proc = subprocess.run(
            list(args), capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"`{' '.join(args)}` could not run: {exc}") from None
    if proc.returncode != 0:
        raise LabError(f"`{' '.join(args)}` failed: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def unavailable() -> str | None:
    """Why no lab can be made here (not root, no `ip`/`tc`, `ip netns add` refused), or None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root (ip netns add); run the tests as root"
    for program in ("ip", "tc"):
        if shutil.which(program) is None:
            return f"'{program}' (iproute2) is not installed"
    probe = f"{NAME_ROOT}{os.getpid()}-probe"
    try:
        run_ip("ip", "netns", "add", probe)
    except LabError as exc:
        return f"cannot create a network namespace here: {exc}"
    with contextlib.suppress(LabError):
        run_ip("ip", "netns", "del", probe)
    return None


def create(prefix: str, members: int) -> Lab:
    """Build a lab (see the module docstring); on any failure, remove what was made and raise
    LabError. `prefix` must start with NAME_ROOT and the caller's process id, so that
    `remove_stale` can recognise a lab whose creator died."""
    lab = Lab(prefix, members)
    try:
        for namespace in lab.namespaces:
            run_ip("ip", "netns", "add", namespace)
            run_ip("ip", "-n", namespace, "link", "set", "lo", "up")
        hub = lab.hub
        run_ip("ip", "-n", hub, "link", "add", "br0", "type", "bridge")
        run_ip("ip", "-n", hub, "addr", "add", f"{COORDINATOR}/{SUBNET_BITS}", "dev", "br0")
        run_ip("ip", "-n", hub, "link", "set", "br0", "up")
        for i in range(members):
            port, member = f"m{i}", lab.member(i)
            run_ip("ip", "-n", hub, "link", "add", port, "type", "veth",
                   "peer", "name", "eth0", "netns", member)  # fmt: skip
            run_ip("ip", "-n", hub, "link", "set", port, "master", "br0")
            run_ip("ip", "-n", hub, "link", "set", port, "up")
            address = f"{lab.member_address(i)}/{SUBNET_BITS}"
            run_ip("ip", "-n", member, "addr", "add", address, "dev", "eth0")
            run_ip("ip", "-n", member, "link", "set", "eth0", "up")
    except LabError:
        destroy(lab)
        raise
    return lab


def destroy(lab: Lab) -> None:
    """Remove every namespace of `lab` (their links go with them); what is already gone is
    skipped. Processes still inside a namespace keep it alive until they exit: kill them
    first."""
    existing = set(list_namespaces())
    for namespace in lab.namespaces:
        if namespace in existing:
            with contextlib.suppress(LabError):
                run_ip("ip", "netns", "del", namespace)


def list_namespaces() -> list[str]:
    """The names of the named network namespaces (`ip netns list`)."""
    return [line.split()[0] for line in run_ip("ip", "netns", "list").splitlines() if line]


def remove_stale() -> list[str]:
    """Remove the namespaces of labs whose creating process no longer exists (left behind by
    a killed test run); returns their names. Other labs, and other namespaces, are left."""
    removed = []
    for namespace in list_namespaces():
        match = re.fullmatch(rf"{NAME_ROOT}(\d+)-.*", namespace)
        if match is None or _alive(int(match.group(1))):
            continue
        try:
            run_ip("ip", "netns", "del", namespace)
            removed.append(namespace)
        except LabError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def member_link(lab: Lab, index: int, *, up: bool) -> None:
    """Plug member `index` in (`up`) or unplug it: its switch port in the hub goes up or down."""
    run_ip("ip", "-n", lab.hub, "link", "set", f"m{index}", "up" if up else "down")


def limit_bandwidth(lab: Lab, rate: str = "20mbit") -> None:
    """A token bucket of `rate` on every member's link, both ways: the hub's port (traffic to
    the member) and the member's `eth0` (traffic from it)."""
    for i in range(lab.members):
        for namespace, device in ((lab.hub, f"m{i}"), (lab.member(i), "eth0")):
            run_ip("tc", "-n", namespace, "qdisc", "replace", "dev", device, "root",
                   "tbf", "rate", rate, "burst", "32kbit", "latency", "400ms")  # fmt: skip


def clear(lab: Lab) -> None:
    """Undo `limit_bandwidth` and `member_link(up=False)`: every link up, no token buckets."""
    for i in range(lab.members):
        member_link(lab, i, up=True)
        for namespace, device in ((lab.hub, f"m{i}"), (lab.member(i), "eth0")):
            qdiscs = run_ip("tc", "-n", namespace, "qdisc", "show", "dev", device)
            if "tbf" in qdiscs:
                run_ip("tc", "-n", namespace, "qdisc", "del", "dev", device, "root")


def qdisc_stats(lab: Lab) -> dict[str, dict[str, int]]:
    """What each member link's token bucket did: ``{"NAMESPACE/DEVICE": {"sent": bytes,
    "overlimits": times a packet had to wait for tokens}}`` (`tc -s qdisc show`)."""
    stats = {}
    for i in range(lab.members):
        for namespace, device in ((lab.hub, f"m{i}"), (lab.member(i), "eth0")):
            text = run_ip("tc", "-s", "-n", namespace, "qdisc", "show", "dev", device)
            sent = re.search(r"Sent (\d+) bytes", text)
            over = re.search(r"overlimits (\d+)", text)
            if "tbf" in text and sent and over:
                stats[f"{namespace}/{device}"] = {
                    "sent": int(sent.group(1)),
                    "overlimits": int(over.group(1)),
                }
    return stats
