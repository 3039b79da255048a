"""Benchmark: ECDH PSI time and bytes for n x n customer ids (issue 9), with OpenMined's
`openmined-psi` (same protocol family, C++) in the same run when it is importable.

Veil's PSI (`veil.vertical.psi`) runs both parties in this one process, one core, stage by
stage; `critical_path_s` is the wall time when each party has its own core and the sender
blinds its own set (`PsiSender.prepare`, as `veil psi serve` does) before the request arrives:
max(receiver request, sender own set) + sender answer + receiver finish. Ids are SYNTHETIC
(`cust-<i>`), half of each set in common. `openmined-psi` pins protobuf 6 while Veil needs
protobuf 7, so it is not a Veil dependency; `pip install --no-deps openmined-psi` (it works with
protobuf 7) gives the peer column.

    python benchmarks/psi.py [--quick] [--sizes 10000 100000]

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from veil.vertical.psi import PsiReceiver, PsiSender


def _ids(n: int, offset: int) -> list[str]:
    return [f"cust-{i}" for i in range(offset, offset + n)]


def veil_psi(n: int) -> dict[str, Any]:
    bank, payment = _ids(n, 0), _ids(n, n // 2)
    t0 = time.perf_counter()
    receiver = PsiReceiver(bank)
    request = receiver.request()
    t1 = time.perf_counter()
    sender = PsiSender(payment)
    sender.prepare()
    t2 = time.perf_counter()
    response = sender.respond(request)
    t3 = time.perf_counter()
    result = receiver.finish(response)
    t4 = time.perf_counter()
    assert result.size == n - n // 2, result.size
    return {
        "n": n,
        "receiver_request_s": round(t1 - t0, 2),
        "sender_own_set_s": round(t2 - t1, 2),
        "sender_answer_s": round(t3 - t2, 2),
        "receiver_finish_s": round(t4 - t3, 2),
        "total_one_core_s": round(t4 - t0, 2),
        "critical_path_s": round(max(t1 - t0, t2 - t1) + (t3 - t2) + (t4 - t3), 2),
        "bytes_receiver_to_sender": len(request),
        "bytes_sender_to_receiver": len(response),
    }


def openmined_psi(n: int) -> dict[str, Any] | None:
    try:
        import private_set_intersection.python as psi  # type: ignore[import-not-found]
    except ImportError:
        return None
    bank, payment = _ids(n, 0), _ids(n, n // 2)
    t0 = time.perf_counter()
    client = psi.client.CreateWithNewKey(True)
    server = psi.server.CreateWithNewKey(True)
    request = client.CreateRequest(bank)
    setup = server.CreateSetupMessage(0.0, n, payment, psi.DataStructure.RAW)
    response = server.ProcessRequest(request)
    common = client.GetIntersection(setup, response)
    elapsed = time.perf_counter() - t0
    assert len(common) == n - n // 2
    wire = len(request.SerializeToString()) + len(setup.SerializeToString())
    wire += len(response.SerializeToString())
    return {"n": n, "total_one_core_s": round(elapsed, 2), "bytes": wire}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1k and 10k ids only")
    parser.add_argument("--sizes", type=int, nargs="*", default=None)
    args = parser.parse_args()
    sizes = args.sizes or ([1_000, 10_000] if args.quick else [10_000, 100_000])
    rows = []
    for n in sizes:
        veil = veil_psi(n)
        peer = openmined_psi(n)
        row = {"veil": veil, "openmined_psi": peer}
        if peer is not None:
            row["ratio_veil_over_openmined"] = round(
                veil["total_one_core_s"] / max(peer["total_one_core_s"], 1e-9), 2
            )
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(json.dumps({"benchmark": "psi", "results": rows}))


if __name__ == "__main__":
    main()
