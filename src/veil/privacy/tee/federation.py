"""Attested aggregation wired for one run: the server's aggregator and each client's participant.

In a simulation the server's "TLS key" is a P-256 key generated for the run (there is no TLS
in-process) and each client is given its public key, standing in for the certificate it would
verify. In a deployment the server generates its TLS key inside the attested process at
start-up (`veil.privacy.tee.channel.attested_server_key`: in memory, never on disk, endorsed by
the server's CA-certified identity key, start-up evidence in its certificate), and each client
pins the certificate of the very connection it talks on (`channel.server_pin` with
`veil.transport.grpc.client.PinnedChannel`): evidence relayed from another process names
another key and is refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from veil.config import RunConfig
from veil.crypto import pki
from veil.federation.pipeline import Aggregator
from veil.privacy.tee.attestation import Policy, describe
from veil.privacy.tee.channel import generated_in_process
from veil.privacy.tee.measurement import measure, policy_from_config
from veil.privacy.tee.protocol import TeeAggregator, TeeParticipant
from veil.privacy.tee.software_dev import SoftwareDevAttester

__all__ = ["TeeFederation", "policy_from_config", "tee_federation"]

SERVER_NAME = "server"

_log = logging.getLogger("veil.tee")


@dataclass
class TeeFederation:
    """The run's attester and policy, and the TLS key the evidence binds."""

    config: RunConfig
    attester: SoftwareDevAttester
    policy: Policy
    tls_public_key: bytes

    def aggregator(self, inner: Aggregator) -> TeeAggregator:
        """`inner` (the weighted sum or a robust rule) run behind attestation."""
        return TeeAggregator(inner, self.attester, self.tls_public_key, hardware=False)

    def participant(self, name: str) -> TeeParticipant:
        """Client `name`'s half, with the run's policy and the server's TLS key."""
        return TeeParticipant(name, self.policy, self.tls_public_key)

    def record(self) -> dict[str, Any]:
        """What result.json says under `privacy.tee`."""
        return {
            "backend": self.attester.backend,
            "attestation": self.description(),
            "measurement": self.attester.measurement,
            "allowed_measurements": sorted(self.policy.allowed_measurements),
            "min_security_version": self.policy.min_security_version,
            "allow_insecure_dev": self.policy.allow_insecure_dev,
            "binding": "SHA-256(server TLS public key | client nonce | round) in the report data",
            "tls_key": self._tls_key_origin(),
        }

    def _tls_key_origin(self) -> str:
        if generated_in_process(self.tls_public_key):
            return (
                "the server certificate's key, generated inside the attested process at "
                "start-up (never on disk) and endorsed by the server's identity; each client "
                "pins the certificate of its own connection (channel binding)"
            )
        if self.config.mode == "deployment":
            return "the server certificate's key, verified against the CA by each client"
        return "generated per run (simulation)"

    def description(self) -> str:
        return describe(self.attester.backend, hardware=False)


def tee_federation(config: RunConfig, *, tls_public_key: bytes | None = None) -> TeeFederation:
    """The run's attested aggregation; a simulation passes no TLS key and gets a fresh one."""
    if tls_public_key is None:
        tls_public_key = pki.spki(ec.generate_private_key(ec.SECP256R1()).public_key())
    attester = SoftwareDevAttester(measure(config))
    _log.warning(
        "attested aggregation with %s: development evidence only, it proves nothing about "
        "the server's hardware or the code it runs",
        describe(attester.backend, hardware=False),
    )
    return TeeFederation(config, attester, policy_from_config(config), tls_public_key)
