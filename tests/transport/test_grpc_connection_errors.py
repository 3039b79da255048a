"""A member that cannot connect says why in one line, fast: an unreachable coordinator is
retried with one line per attempt until `reconnect_timeout_s`; a certificate problem (whose
certificate, and what is wrong with it) is not retried. Real gRPC servers with mutual TLS, real
certificates, and the real `veil client` process (whose stderr holds no gRPC C-core lines)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from veil import deployment
from veil.config import ModelConfig
from veil.crypto import pki
from veil.crypto.identity import IdentityKey, IdentityPublicKey
from veil.data import ClientData
from veil.federation.client import ClientRunner
from veil.federation.pipeline import UpdatePipeline
from veil.models import build_model
from veil.transport.grpc.client import (
    ClientCredentials,
    ConnectionFailed,
    open_channel,
    run_client,
)
from veil.transport.grpc.diagnose import Endpoint, MemberTls
from veil.transport.grpc.server import GrpcGateway, ServerCredentials

CONFIG = """
mode = "deployment"
seed = 3
[data]
dataset = "breast_cancer"
[model]
name = "logistic"
[federation]
clients = 2
rounds = 1
[deployment]
reconnect_timeout_s = {timeout}
"""

RETRY = re.compile(
    r"cannot reach the coordinator at (?P<address>\S+) \((?P<why>[^)]*)\); "
    r"retry (?P<n>\d+) in (?P<wait>\d+\.\d) s, giving up in (?P<left>\d+) s$"
)
# A gRPC C-core log line: "E0101 12:00:00.000000  123 ssl_transport_security.cc:1654] ..."
C_CORE = re.compile(r"^[DIWEF]\d{4} \d\d:\d\d:\d\d|\.cc:\d+\]")


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A loopback deployment's folders (`prepare_deployment`: CA, coordinator, members, data)
    and a second, unrelated CA."""
    root = tmp_path_factory.mktemp("deployment")
    config = root / "run.toml"
    config.write_text(CONFIG.format(timeout=3))
    files = deployment.prepare_deployment(deployment.load(config), root / "run", config_path=config)
    other = root / "other-ca"
    pki.init_ca(other)
    member = files.clients[0]
    return SimpleNamespace(files=files, member=member, ca=files.ca_dir, other=other)


@dataclass(frozen=True)
class Side:
    """One side's certificate, key and trusted CA certificate (PEM)."""

    cert: bytes
    key: bytes
    ca: bytes


def issued(
    ca_dir: Path,
    name: str,
    role: pki.Role,
    *,
    hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
    valid: tuple[float, float] = (-1.0, 30.0),
) -> tuple[bytes, bytes]:
    """A certificate shaped like `pki`'s (role in OU and extended key usage, host names), signed
    by the CA in `ca_dir`, valid from/to the given days from now (in the past if need be,
    which `pki.issue` refuses)."""
    ca = pki.load_certificate(ca_dir / pki.CA_CERT)
    ca_key = serialization.load_pem_private_key((ca_dir / pki.CA_KEY).read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    san: list[x509.GeneralName] = [x509.DNSName(name)] if role == "client" else []
    for host in hosts if role == "server" else ():
        try:
            san.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            san.append(x509.DNSName(host))
    usage = ExtendedKeyUsageOID.SERVER_AUTH if role == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, name),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                ]
            )
        )
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + dt.timedelta(days=valid[0]))
        .not_valid_after(now + dt.timedelta(days=valid[1]))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), pem


def scenario(fed: SimpleNamespace, case: str) -> tuple[Side, Side, frozenset[int]]:
    """(coordinator, member, revoked serials) for one broken set-up; the rest as issued."""
    own = pki.node_files(fed.files.org_dir(deployment.SERVER_NAME), deployment.SERVER_NAME)
    mine = pki.node_files(fed.files.org_dir(fed.member), fed.member)
    ca = (fed.ca / pki.CA_CERT).read_bytes()
    other_ca = (fed.other / pki.CA_CERT).read_bytes()
    server = Side(own.cert.read_bytes(), own.key.read_bytes(), ca)
    member = Side(mine.cert.read_bytes(), mine.key.read_bytes(), ca)
    revoked: frozenset[int] = frozenset()
    if case == "as issued":
        pass
    elif case == "member certificate from another CA":
        member = Side(*issued(fed.other, fed.member, "client"), ca)
    elif case == "coordinator trusts another CA":
        server = Side(server.cert, server.key, other_ca)
    elif case == "coordinator certificate from another CA":
        server = Side(*issued(fed.other, "server", "server"), ca)
    elif case == "member certificate of a server":
        member = Side(*issued(fed.ca, fed.member, "server"), ca)
    elif case == "member certificate expired":
        member = Side(*issued(fed.ca, fed.member, "client", valid=(-30, -1)), ca)
    elif case == "coordinator certificate expired":
        server = Side(*issued(fed.ca, "server", "server", valid=(-30, -1)), ca)
    elif case == "name mismatch":
        server = Side(*issued(fed.ca, "server", "server", hosts=("coordinator.example",)), ca)
    elif case == "client certificate as coordinator":
        server = Side(*issued(fed.ca, "impostor", "client"), ca)
    elif case == "member certificate revoked":
        revoked = frozenset({pki.load_certificate(mine.cert).serial_number})
    else:
        raise AssertionError(case)
    return server, member, revoked


# What each broken set-up must be reported as (one line, at once, not retried).
REASONS = {
    "member certificate from another CA": (
        r"^this member's certificate '\S+node\.crt' cannot connect: it is not issued by the CA "
        r"in '\S+ca\.crt', so the coordinator refuses it"
    ),
    "coordinator trusts another CA": (
        r"^the coordinator at localhost:\d+ refuses this member's certificate '\S+node\.crt' "
        r"\(.+\): it does not trust the CA that issued it"
    ),
    "coordinator certificate from another CA": (
        r"^the coordinator's certificate at localhost:\d+ \('server'\) is not issued by this "
        r"member's CA \('\S+ca\.crt'\)"
    ),
    "member certificate of a server": (
        r"^this member's certificate '\S+node\.crt' cannot connect: it is a server certificate, "
        r"a client certificate is required; ask the CA operator to sign a new one"
    ),
    "member certificate expired": (
        r"^this member's certificate '\S+node\.crt' cannot connect: it expired on "
        r"\d{4}-\d\d-\d\d \d\d:\d\d UTC; ask the CA operator to sign a new one"
    ),
    "coordinator certificate expired": (
        r"^the coordinator's certificate at localhost:\d+ \('server'\) expired on "
        r"\d{4}-\d\d-\d\d \d\d:\d\d UTC"
    ),
    "name mismatch": (
        r"^the coordinator's certificate at localhost:\d+ \('server'\) is not valid for the "
        r"host name 'localhost' \(it names coordinator\.example\)"
    ),
    "client certificate as coordinator": (
        r"^the coordinator's certificate at localhost:\d+ \('impostor'\) is a client "
        r"certificate; the coordinator must serve a server certificate"
    ),
    "member certificate revoked": (
        r"^the coordinator at localhost:\d+ refuses this member's certificate: it is revoked; "
        r"ask the CA operator for a new one"
    ),
}


@contextmanager
def coordinator(
    fed: SimpleNamespace, server: Side, revoked: frozenset[int] = frozenset(), port: int = 0
) -> Iterator[tuple[GrpcGateway, str]]:
    """A real gateway (mutual TLS) serving `server`'s certificate, expecting the member."""
    member = pki.node_files(fed.files.org_dir(fed.member), fed.member)
    gw = GrpcGateway(
        run_id="run-1",
        identities={fed.member: IdentityPublicKey.load(member.identity_pub)},
        reference={"w": np.zeros((30, 2), np.float32), "b": np.zeros(2, np.float32)},
        deadline_s=5.0,
    )
    bound = gw.start(
        f"127.0.0.1:{port}", ServerCredentials(server.cert, server.key, server.ca, revoked)
    )
    try:
        yield gw, f"localhost:{bound}"
    finally:
        gw.stop(0)


def member_folder(fed: SimpleNamespace, member: Side, into: Path) -> Path:
    """The member's own folder (as `prepare_deployment` made it) with `member`'s files."""
    folder = into / "member"
    shutil.copytree(fed.files.org_dir(fed.member), folder)
    node = folder / pki.NODES / fed.member
    (node / pki.NODE_CERT).write_bytes(member.cert)
    (node / pki.NODE_KEY).write_bytes(member.key)
    (folder / pki.CA_CERT).write_bytes(member.ca)
    return folder


def connect(fed: SimpleNamespace, folder: Path, address: str, *, reconnect_timeout_s: float) -> int:
    """`run_client` as `serve_client` calls it, with the member's files in `folder`."""
    files = pki.node_files(folder, fed.member)
    rng = np.random.default_rng(0)
    data = ClientData(
        fed.member,
        rng.normal(size=(8, 30)).astype(np.float32),
        rng.integers(0, 2, 8).astype(np.int64),
        np.zeros((0, 30), np.float32),
        np.zeros(0, np.int64),
    )
    runner = ClientRunner(fed.member, data, n_classes=2, pipeline=UpdatePipeline(), seed=1)
    model = build_model(ModelConfig(name="logistic"), n_features=30, n_classes=2)
    credentials = ClientCredentials(
        files.cert.read_bytes(), files.key.read_bytes(), files.ca_cert.read_bytes()
    )
    endpoint = Endpoint(address, MemberTls(files.cert, files.key, files.ca_cert))
    with open_channel(address, credentials) as channel:
        return run_client(
            channel,
            runner,
            model,
            IdentityKey.load(files.identity_key),
            poll_s=1,
            reconnect_timeout_s=reconnect_timeout_s,
            endpoint=endpoint,
        )


def closed_port() -> int:
    """A loopback port nobody listens on (bound by the OS, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def veil_client(
    fed: SimpleNamespace, folder: Path, server: str, tmp_path: Path, *, timeout: int
) -> tuple[subprocess.CompletedProcess[str], float]:
    """`veil client` as a member runs it, with `[deployment] reconnect_timeout_s = timeout`."""
    config = tmp_path / "member.toml"
    config.write_text(CONFIG.format(timeout=timeout))
    data = fed.files.org_dir(fed.member) / deployment.DATA_FILE
    args = ["client", str(config), "--name", fed.member, "--data", str(data)]
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "veil.cli", *args, "--pki", str(folder), "--server", server],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc, time.monotonic() - start


def veils_lines(stderr: str) -> list[str]:
    """stderr's lines, after checking that each is Veil's own (no gRPC C-core log)."""
    lines = stderr.splitlines()
    assert not [line for line in lines if C_CORE.search(line)], stderr
    return lines


# -- unreachable --------------------------------------------------------------------------


def test_an_unreachable_coordinator_is_reported_at_once_and_retried_until_the_timeout(
    fed: SimpleNamespace, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = fed.files.org_dir(fed.member)
    address = f"127.0.0.1:{closed_port()}"
    caplog.set_level(logging.WARNING, logger="veil.client")
    wall, start = time.time(), time.monotonic()
    with pytest.raises(ConnectionFailed) as info:
        connect(fed, folder, address, reconnect_timeout_s=4)
    elapsed = time.monotonic() - start
    records = [r for r in caplog.records if r.name == "veil.client"]
    found = [RETRY.match(r.getMessage()) for r in records]
    attempts = [m for m in found if m is not None]
    assert records and len(attempts) == len(records), [r.getMessage() for r in records]
    assert records[0].created - wall < 10.0  # said at once, not after gRPC's own timeouts
    assert [int(m["n"]) for m in attempts] == list(range(1, len(attempts) + 1))
    assert {(m["address"], m["why"]) for m in attempts} == {(address, "connection refused")}
    # Waits double from 1 s, each drawn from its upper half (jitter), capped at 5 s.
    waits = [float(m["wait"]) for m in attempts]
    assert len(waits) >= 2 and 0.5 <= waits[0] <= 1.0 and 1.0 <= waits[1] <= 2.0, waits
    assert all(w <= 5.0 for w in waits)
    lefts = [int(m["left"]) for m in attempts]
    assert lefts[0] in (3, 4) and lefts == sorted(lefts, reverse=True)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"cannot reach the coordinator at {address} (connection refused)")
    assert "gave up after 4 s" in message and "reconnect_timeout_s" in message
    assert 4.0 <= elapsed < 4.0 + 5.0  # gave up at the timeout, within one attempt


def test_veil_client_prints_one_line_per_attempt_and_gives_up_with_one_error(
    fed: SimpleNamespace, tmp_path: Path
) -> None:
    address = f"127.0.0.1:{closed_port()}"
    folder = fed.files.org_dir(fed.member)
    proc, _ = veil_client(fed, folder, address, tmp_path, timeout=3)
    assert proc.returncode == 2, proc.stderr
    lines = veils_lines(proc.stderr)
    *attempts, error = lines
    assert attempts and all(RETRY.match(line) for line in attempts), proc.stderr
    assert error.startswith(f"veil: error: cannot reach the coordinator at {address}")
    assert "gave up after 3 s" in error


@pytest.mark.slow
def test_a_coordinator_that_never_answers_is_reported_within_ten_seconds(
    fed: SimpleNamespace, tmp_path: Path
) -> None:
    """A listener whose backlog is full drops new connections' SYNs: like a firewall that
    drops packets, the connection neither succeeds nor fails. gRPC alone waits 20 s."""
    folder = fed.files.org_dir(fed.member)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                pytest.skip("this kernel accepts beyond the backlog; no black hole to test")
        except TimeoutError:
            pass
        start = time.monotonic()
        with pytest.raises(ConnectionFailed) as info:
            connect(fed, folder, f"127.0.0.1:{port}", reconnect_timeout_s=1)
        elapsed = time.monotonic() - start
        for filler in fillers:
            filler.close()
    assert elapsed < 10.0
    assert str(info.value).startswith(
        f"cannot reach the coordinator at 127.0.0.1:{port} (no answer within"
    )


def test_a_member_joins_once_the_coordinator_is_up(
    fed: SimpleNamespace, caplog: pytest.LogCaptureFixture
) -> None:
    """Retrying is for this: the member started first and joins within seconds of the
    coordinator (gRPC's own reconnection backoff, 120 s by default, is capped too)."""
    server, _, _ = scenario(fed, "as issued")
    port = closed_port()
    folder = fed.files.org_dir(fed.member)
    caplog.set_level(logging.WARNING, logger="veil.client")
    outcome: dict[str, Any] = {}

    def member() -> None:
        try:
            outcome["done"] = connect(fed, folder, f"localhost:{port}", reconnect_timeout_s=60)
        except Exception as exc:  # reported by the assertions below
            outcome["error"] = exc

    thread = threading.Thread(target=member, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not any(r.name == "veil.client" for r in caplog.records):
        assert time.monotonic() < deadline, "no retry line within 10 s"
        time.sleep(0.05)
    # Two failed attempts, so gRPC's channel is in its reconnection backoff too.
    while sum(r.name == "veil.client" for r in caplog.records) < 2:
        assert time.monotonic() < deadline + 10
        time.sleep(0.05)
    with coordinator(fed, server, port=port) as (gw, _):
        up = time.monotonic()
        assert gw.wait_for_clients(15) == []
        joined = time.monotonic() - up
        gw.finish(linger_s=5)
        thread.join(timeout=10)
    assert outcome == {"done": 0}
    assert joined < 12.0


# -- certificate problems -------------------------------------------------------------------


@pytest.mark.parametrize("case", list(REASONS))
def test_a_certificate_problem_is_named_in_one_line_at_once(
    fed: SimpleNamespace, tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    server, member, revoked = scenario(fed, case)
    folder = member_folder(fed, member, tmp_path)
    caplog.set_level(logging.WARNING, logger="veil.client")
    with coordinator(fed, server, revoked) as (_, address):
        start = time.monotonic()
        with pytest.raises(ConnectionFailed) as info:
            connect(fed, folder, address, reconnect_timeout_s=30)
        elapsed = time.monotonic() - start
    message = str(info.value)
    assert "\n" not in message
    assert re.match(REASONS[case], message), message
    assert elapsed < 15.0
    assert not [r for r in caplog.records if r.name == "veil.client"]  # not retried


def test_the_same_files_connect_when_nothing_is_wrong(fed: SimpleNamespace, tmp_path: Path) -> None:
    """The control for the cases above: only the broken file differs."""
    server, member, _ = scenario(fed, "as issued")
    folder = member_folder(fed, member, tmp_path)
    with coordinator(fed, server) as (gw, address):
        outcome: dict[str, int] = {}
        thread = threading.Thread(
            target=lambda: outcome.setdefault(
                "done", connect(fed, folder, address, reconnect_timeout_s=10)
            ),
            daemon=True,
        )
        thread.start()
        assert gw.wait_for_clients(15) == []
        gw.finish(linger_s=5)
        thread.join(timeout=10)
    assert outcome == {"done": 0}


@pytest.mark.parametrize(
    "case",
    [
        "coordinator certificate from another CA",
        *(
            pytest.param(case, marks=pytest.mark.slow)
            for case in REASONS
            if case != "coordinator certificate from another CA"
        ),
    ],
)
def test_veil_client_prints_the_reason_only(
    fed: SimpleNamespace, tmp_path: Path, case: str
) -> None:
    """The real process: exit status 2 and one line on stderr, no gRPC C-core log, no retry
    (the reconnect timeout is 60 s)."""
    server, member, revoked = scenario(fed, case)
    folder = member_folder(fed, member, tmp_path)
    with coordinator(fed, server, revoked) as (_, address):
        proc, elapsed = veil_client(fed, folder, address, tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = veils_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert re.match(REASONS[case], lines[0].removeprefix("veil: error: ")), lines[0]
    assert elapsed < 45.0  # start-up included; a retry loop would take 60 s


def test_every_module_that_imports_grpc_comes_after_its_log_is_silenced() -> None:
    """C-core reads GRPC_VERBOSITY once, when `grpc` is first imported: whichever Veil module
    imports it first (here vertical learning's channel, outside the transport package), the
    variable is already set, and a user's own setting is kept."""
    probe = "import os, veil.vertical.channel; print(os.environ['GRPC_VERBOSITY'])"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_")}
    quiet = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60
    )
    assert quiet.stdout.strip() == "NONE", quiet.stderr
    loud = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True, text=True, env={**env, "GRPC_VERBOSITY": "DEBUG"}, timeout=60,
    )  # fmt: skip
    assert loud.stdout.strip() == "DEBUG", loud.stderr
