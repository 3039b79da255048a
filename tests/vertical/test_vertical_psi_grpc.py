"""`veil psi serve` and `veil psi join` as two real processes over mutual TLS (Veil's PKI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from support import issue_federation, wait_for_port

VEIL = [sys.executable, "-m", "veil.cli"]


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return issue_federation(tmp_path_factory.mktemp("pki"), ["bank", "intruder"], server="payment")


def _ids(path: Path, ids: list[str]) -> Path:
    path.write_text("\n".join(ids) + "\n")
    return path


def _serve(
    pki_dir: Path, tmp: Path, ids: list[str], *extra: str
) -> tuple[subprocess.Popen[str], str]:
    port_file = tmp / "port"
    server = subprocess.Popen(
        [*VEIL, "psi", "serve", "--pki", str(pki_dir), "--name", "payment",
         "--ids", str(_ids(tmp / "payment.txt", ids)), "--port-file", str(port_file),
         "--timeout", "60", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        port = wait_for_port(port_file, server, 30)
    except AssertionError as exc:
        server.kill()
        pytest.fail(f"psi serve did not start ({exc}): {server.communicate()[1]}")
    return server, f"127.0.0.1:{port}"


def _join(
    pki_dir: Path, tmp: Path, name: str, address: str, ids: list[str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*VEIL, "psi", "join", "--pki", str(pki_dir), "--name", name,
         "--ids", str(_ids(tmp / "bank.txt", ids)), "--server", address,
         "--out", str(tmp / "common.txt"), "--timeout", "60"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip


def test_two_processes_over_mutual_tls(pki_dir: Path, tmp_path: Path) -> None:
    bank = [f"cust-{i}" for i in range(0, 300)] + ["cust-5"]  # a duplicate
    payment = [f"cust-{i}" for i in range(200, 500)]
    server, address = _serve(pki_dir, tmp_path, payment, "--peer", "bank")
    joined = _join(pki_dir, tmp_path, "bank", address, bank)
    out, err = server.communicate(timeout=90)
    assert joined.returncode == 0, joined.stderr
    assert server.returncode == 0, err
    common = (tmp_path / "common.txt").read_text().split()
    assert common == [f"cust-{i}" for i in range(200, 300)]
    receiver = json.loads(joined.stdout.strip().splitlines()[-1])
    assert receiver == {
        "role": "receiver",
        "intersection_size": 100,
        "own_size": 300,
        "peer_size": 300,
    }
    sender = json.loads(out.strip().splitlines()[-1])
    assert sender == {"role": "sender", "peer": "bank", "peer_size": 300}  # sizes only


@pytest.mark.slow
def test_unexpected_peer_is_refused(pki_dir: Path, tmp_path: Path) -> None:
    server, address = _serve(pki_dir, tmp_path, ["a", "b"], "--peer", "bank")
    joined = _join(pki_dir, tmp_path, "intruder", address, ["a"])
    server.communicate(timeout=90)
    assert joined.returncode == 2
    assert "not the expected 'bank'" in joined.stderr
    assert server.returncode == 2
    assert not (tmp_path / "common.txt").exists()
