"""The impairments the federation tests rely on do what they claim: the proxy's latency, drops and
cuts (on 127.0.0.1, no root needed), and the lab's links, unplugging and token buckets (root)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import netns_lab
import pytest
from lab_federation import PROXY, wait_for
from netns_lab import COORDINATOR, Lab


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A TCP echo server on 127.0.0.1 (its port)."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    def echo(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()


def start_proxy(tmp_path: Path, target: int, *options: str) -> tuple[subprocess.Popen[str], int]:
    port_file = tmp_path / "proxy.port"
    proc = subprocess.Popen(
        [sys.executable, str(PROXY), "--listen", "127.0.0.1:0", "--target", f"127.0.0.1:{target}",
         "--port-file", str(port_file), "--stats-file", str(tmp_path / "proxy.json"), *options],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(port_file.is_file, 20, "the proxy to listen")
    except AssertionError:
        proc.kill()
        raise
    return proc, int(port_file.read_text())


def stop_proxy(proc: subprocess.Popen[str], tmp_path: Path) -> dict[str, int]:
    proc.terminate()
    _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0 and not stderr, stderr
    stats: dict[str, int] = json.loads((tmp_path / "proxy.json").read_text())
    return stats


def exchange(port: int, payload: bytes) -> bytes:
    """Send `payload` and read back as many bytes (fewer if the connection ends)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(payload)
        got = b""
        while len(got) < len(payload) and (data := conn.recv(65536)):
            got += data
        return got


def test_proxy_delays_drops_and_cuts(tmp_path: Path, echo_port: int) -> None:
    proc, port = start_proxy(
        tmp_path, echo_port, "--latency-ms", "50", "--drop-first", "1",
        "--cut-after", "3000", "--cut-direction", "down",
    )  # fmt: skip
    try:
        # The first connection from this host is reset before anything is forwarded.
        with pytest.raises(ConnectionResetError):
            exchange(port, b"lost")
        # Then every chunk waits 50 ms each way.
        started = time.monotonic()
        assert exchange(port, b"hello") == b"hello"
        assert time.monotonic() - started >= 0.1
        # 5000 bytes back from the target cross the 3000-byte mark: the connection is reset.
        with pytest.raises(ConnectionResetError):
            exchange(port, b"x" * 5000)
    finally:
        stats = stop_proxy(proc, tmp_path)
    assert (stats["connections"], stats["dropped"], stats["cut"]) == (3, 1, 1)


def test_proxy_cuts_a_large_upload_once(tmp_path: Path, echo_port: int) -> None:
    proc, port = start_proxy(tmp_path, echo_port, "--cut-upload-over", "16000", "--max-cuts", "1")
    try:
        assert exchange(port, b"small") == b"small"
        with pytest.raises(ConnectionResetError):
            exchange(port, b"u" * 40_000)
        assert exchange(port, b"u" * 40_000) == b"u" * 40_000  # --max-cuts reached
    finally:
        stats = stop_proxy(proc, tmp_path)
    assert stats["cut"] == 1


def reach(lab: Lab, member: int, port: int, timeout_s: float) -> bool:
    """Whether member `member` can open a TCP connection to COORDINATOR:`port`."""
    code = (
        "import socket, sys\n"
        "try:\n"
        f"    socket.create_connection(('{COORDINATOR}', {port}), timeout={timeout_s}).close()\n"
        "except OSError:\n"
        "    sys.exit(1)\n"
    )
    command = [*lab.exec_args(lab.member(member)), sys.executable, "-c", code]
    return subprocess.run(command, timeout=timeout_s + 20, check=False).returncode == 0


def test_lab_links_unplug_and_limits(clean_lab: Lab) -> None:
    """Members reach the coordinator on the bridge (and nothing of the lab is outside it); an
    unplugged member does not; a bandwidth limit puts token buckets on both ends."""
    listener = [
        *clean_lab.exec_args(clean_lab.hub), sys.executable, "-c",
        "import socket, sys\n"
        f"s = socket.create_server(('{COORDINATOR}', 0))\n"
        "print(s.getsockname()[1], flush=True)\n"
        "while True:\n"
        "    s.accept()[0].close()\n",
    ]  # fmt: skip
    server = subprocess.Popen(listener, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        assert reach(clean_lab, 0, port, 5.0)
        assert reach(clean_lab, 1, port, 5.0)
        netns_lab.member_link(clean_lab, 0, up=False)
        assert not reach(clean_lab, 0, port, 1.0)
        assert reach(clean_lab, 1, port, 5.0)
        netns_lab.member_link(clean_lab, 0, up=True)
        assert reach(clean_lab, 0, port, 5.0)
    finally:
        server.kill()
        server.wait(timeout=10)
    # Nothing of the lab is in this (the caller's) namespace: no address on its subnet.
    assert "10.77.0." not in netns_lab.run_ip("ip", "-o", "addr", "show")
    netns_lab.limit_bandwidth(clean_lab, "20mbit")
    assert len(netns_lab.qdisc_stats(clean_lab)) == 2 * clean_lab.members
    netns_lab.clear(clean_lab)
    assert netns_lab.qdisc_stats(clean_lab) == {}
