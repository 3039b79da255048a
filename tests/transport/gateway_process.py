"""A `GrpcGateway` in a process of its own, for tests that measure it from outside: its memory
(VmHWM / VmRSS from /proc) and the time its rounds take while members act against it.

    python gateway_process.py PKI_DIR PORT_FILE --members alice,bob,mallory --train alice,bob \
        --rows 2048 --cols 4096 --rounds 3 --idle 2

The PKI folder holds the CA and the server's and members' certificates (`veil.crypto.pki`). The
gateway listens on a free port on 127.0.0.1 (mutual TLS), writes the port to PORT_FILE, waits
for every member to call once and for a line on stdin (the test's attack is in place), then runs
the rounds: a fit of the float32 reference ``w`` (ROWS x COLS) with the members of --train. It
prints one JSON line per round ({"round", "seconds", "accepted", "failures"}) and, last, the
process's memory ({"VmHWM_kB", "VmRSS_kB"}).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from veil.crypto import pki
from veil.crypto.identity import IdentityPublicKey
from veil.federation import ClientFailure, FitInstruction, FitResult, TrainingPlan
from veil.transport.grpc.server import GrpcGateway, ServerCredentials


def memory() -> dict[str, int]:
    """This process's peak and current resident memory, in kB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[f"{key}_kB"] = int(value.split()[0])
    return fields


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("pki", type=Path)
    parser.add_argument("port_file", type=Path)
    parser.add_argument("--members", required=True)
    parser.add_argument("--train", required=True)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle", type=float, default=2.0)
    parser.add_argument("--deadline", type=float, default=30.0)
    args = parser.parse_args()
    members = args.members.split(",")
    reference = {"w": np.zeros((args.rows, args.cols), np.float32)}
    server = pki.node_files(args.pki, "server")
    gateway = GrpcGateway(
        run_id="run-1",
        identities={
            n: IdentityPublicKey.load(pki.node_files(args.pki, n).identity_pub) for n in members
        },
        reference=reference,
        deadline_s=args.deadline,
        upload_idle_s=args.idle,
        upload_timeout_s=max(args.idle, 60.0),
    )
    port = gateway.start(
        "127.0.0.1:0",
        ServerCredentials(
            server.cert.read_bytes(), server.key.read_bytes(), server.ca_cert.read_bytes()
        ),
    )
    args.port_file.write_text(str(port))
    missing = gateway.wait_for_clients(60.0)
    if missing:
        print(json.dumps({"error": f"members never called: {missing}"}), flush=True)
        return 1
    sys.stdin.readline()  # the test's attack is in place
    plan = TrainingPlan(epochs=1, batch_size=4, learning_rate=0.1)
    for rnd in range(1, args.rounds + 1):
        started = time.monotonic()
        replies = list(
            gateway.fit(args.train.split(","), FitInstruction("run-1", rnd, reference, plan))
        )
        record = {
            "round": rnd,
            "seconds": round(time.monotonic() - started, 2),
            "accepted": sorted(r.client for r in replies if isinstance(r, FitResult)),
            "failures": {r.client: r.reason for r in replies if isinstance(r, ClientFailure)},
        }
        print(json.dumps(record), flush=True)
    gateway.finish(linger_s=2.0)
    print(json.dumps(memory()), flush=True)
    gateway.stop(0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
