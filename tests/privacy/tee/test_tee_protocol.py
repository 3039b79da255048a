"""Attested aggregation: the challenge/evidence steps, the client's refusals, and a full run."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

import veil
from veil.config import RunConfig
from veil.federation.messages import FitResult, ProtocolInstruction
from veil.federation.pipeline import RoundContext, WeightedSum
from veil.privacy.tee.attestation import AttestationRefused, Policy, attest
from veil.privacy.tee.protocol import CHALLENGE, EVIDENCE, OK, TeeAggregator, TeeParticipant
from veil.privacy.tee.software_dev import SoftwareDevAttester
from veil.report.console import privacy_table

MEASUREMENT = "ab" * 32
TLS = b"server-tls-spki"
DEV = Policy(frozenset({MEASUREMENT}), 0, allow_insecure_dev=True)
REFERENCE = {"w": np.zeros(3, np.float32)}


class Channel:
    """The round's protocol channel as a transport runs it: a refusal drops the client."""

    def __init__(self, participants: Mapping[str, TeeParticipant], round_: int = 1) -> None:
        self.participants = participants
        self.round = round_
        self.refusals: dict[str, str] = {}

    def exchange(self, stage: str, bodies: Mapping[str, bytes]) -> dict[str, bytes]:
        replies = {}
        for client, body in bodies.items():
            try:
                instruction = ProtocolInstruction("run", self.round, stage, body)
                replies[client] = self.participants[client].handle(instruction)
            except AttestationRefused as exc:
                self.refusals[client] = str(exc)
        return replies


def update(client: str, value: float) -> FitResult:
    return FitResult(client, 1, {"w": np.full(3, value, np.float32)}, 1.0, 1)


def aggregator(tls: bytes = TLS, measurement: str = MEASUREMENT) -> TeeAggregator:
    return TeeAggregator(WeightedSum(), SoftwareDevAttester(measurement), tls, hardware=False)


def test_clients_that_verify_the_evidence_take_part_and_release_updates() -> None:
    clients = {n: TeeParticipant(n, DEV, TLS) for n in ("a", "b")}
    context = RoundContext("run", 1, clients=("a", "b"))
    accumulator = aggregator().start(REFERENCE, context, Channel(clients))
    assert accumulator.participants == ["a", "b"]
    for name, value in (("a", 1.0), ("b", 3.0)):
        accumulator.add(clients[name].seal(update(name, value), context))
    aggregate = accumulator.finish()
    np.testing.assert_allclose(aggregate.mean()["w"], 2.0)
    assert aggregate.report["attestation"] == "software_dev (no hardware root of trust)"
    assert aggregate.report["attested"] == 2


@pytest.mark.parametrize(
    ("policy", "tls", "reason"),
    [
        (Policy(frozenset({MEASUREMENT}), 0, False), TLS, "no hardware root of trust"),
        (Policy(frozenset({"cd" * 32}), 0, True), TLS, "not in the policy's allowed"),
        (DEV, b"another-server", "not the key of this client's channel"),
    ],
)
def test_a_client_refuses_and_withholds_its_update(policy: Policy, tls: bytes, reason: str) -> None:
    clients = {"a": TeeParticipant("a", DEV, TLS), "b": TeeParticipant("b", policy, tls)}
    context = RoundContext("run", 1, clients=("a", "b"))
    channel = Channel(clients)
    accumulator = aggregator().start(REFERENCE, context, channel)
    assert accumulator.participants == ["a"]
    assert reason in channel.refusals["b"]
    with pytest.raises(AttestationRefused, match="does not release its update"):
        clients["b"].seal(update("b", 1.0), context)


def test_evidence_answering_another_clients_nonce_is_refused() -> None:
    a, b = TeeParticipant("a", DEV, TLS), TeeParticipant("b", DEV, TLS)
    attester = SoftwareDevAttester(MEASUREMENT)
    nonce_a = a.handle(ProtocolInstruction("run", 1, CHALLENGE, b""))
    b.handle(ProtocolInstruction("run", 1, CHALLENGE, b""))
    replayed = attest(attester, TLS, nonce_a, 1).to_bytes()
    assert a.handle(ProtocolInstruction("run", 1, EVIDENCE, replayed)) == OK
    with pytest.raises(AttestationRefused, match="another nonce"):
        b.handle(ProtocolInstruction("run", 1, EVIDENCE, replayed))
    # Last round's evidence does not open next round's update.
    context = RoundContext("run", 2)
    with pytest.raises(AttestationRefused, match="round 2"):
        a.seal(update("a", 1.0), context)
    with pytest.raises(AttestationRefused, match="without this client's challenge"):
        a.handle(ProtocolInstruction("run", 2, EVIDENCE, replayed))


def tee_config(**extra: object) -> RunConfig:
    return RunConfig.from_dict(
        {
            "seed": 5,
            "secure_aggregation": "tee",
            "data": {"dataset": "breast_cancer"},
            "model": {"name": "logistic"},
            "federation": {"clients": 4, "rounds": 3, "learning_rate": 0.1},
            "tee": {"allow_insecure_dev": True},
            **extra,
        }
    )


def test_a_tee_run_reaches_plain_accuracy_and_says_software_dev(tmp_path: Path) -> None:
    config = tee_config()
    plain = RunConfig.from_dict({**config.to_dict(), "secure_aggregation": "plain", "tee": None})
    result = veil.run(config, tmp_path)
    reference = veil.run(plain)
    assert result.final["accuracy"] == pytest.approx(reference.final["accuracy"], abs=1e-6)
    on_disk = json.loads((tmp_path / "result.json").read_text())
    assert on_disk["privacy"]["aggregation"] == "tee"
    assert on_disk["privacy"]["attestation"] == "software_dev (no hardware root of trust)"
    assert on_disk["privacy"]["tee"]["allow_insecure_dev"] is True
    assert all(r["aggregation"]["attested"] == r["clients"] for r in on_disk["rounds"])
    assert "aggregate:tee" in on_disk["pipeline"]
    console = Console(record=True, width=200)
    console.print(privacy_table(result))
    assert "software_dev (no hardware root of trust)" in console.export_text()


def test_robust_aggregation_runs_behind_attestation() -> None:
    result = veil.run(tee_config(robust={"method": "median"}))
    assert result.final["accuracy"] > 0.85
    assert all(r.aggregation["attested"] == 4 for r in result.rounds)
