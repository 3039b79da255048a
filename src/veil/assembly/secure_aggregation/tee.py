"""`secure_aggregation = "tee"`: attested aggregation, from `[tee]`.

The aggregator's measurement covers this Veil installation and the aggregation part of the
config (`aggregation_config`); a client holds it to the policy of `[tee]`, or with no allow-list
to exactly the measurement its own installation and config give (`policy_from_config`).

In a simulation the server's "TLS key" is a P-256 key generated for the run (there is no TLS
in-process) and each client is given its public key, standing in for the certificate it would
verify. In a deployment the server generates its TLS key inside the attested process at
start-up (`server_tls`: `veil.privacy.tee.channel.attested_server_key`, in memory, never on
disk, endorsed by the server's CA-certified identity key, start-up evidence in its certificate),
and each member pins the certificate of the very connection it talks on (`member`:
`channel.server_pin` with `veil.transport.grpc.client.PinnedChannel`): evidence relayed from
another process names another key and is refused. Checkpoints are sealed to the measurement.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from veil.assembly.secure_aggregation.base import (
    Member,
    MemberInputs,
    SecureAggregation,
    ServerInputs,
    Session,
)
from veil.config import RunConfig, TeeConfig
from veil.crypto import pki
from veil.errors import UserError
from veil.federation.pipeline import Aggregator
from veil.privacy.tee import measurement
from veil.privacy.tee.attestation import describe
from veil.privacy.tee.channel import (
    SERVER_NAME,
    AttestedTlsKey,
    ServerCheck,
    ServerPin,
    generated_in_process,
)
from veil.privacy.tee.channel import attested_server_key as attested_key
from veil.privacy.tee.channel import server_pin as pin_server
from veil.privacy.tee.policy import Policy
from veil.privacy.tee.protocol import TeeAggregator, TeeParticipant
from veil.privacy.tee.sealed import sealing_key
from veil.privacy.tee.software_dev import SoftwareDevAttester

__all__ = [
    "AGGREGATION_KEYS",
    "BACKEND",
    "Tee",
    "TeeSession",
    "aggregation_config",
    "attested_server_key",
    "checkpoint_sealing_key",
    "measure",
    "policy_from_config",
    "server_pin",
    "tee_federation",
]

_log = logging.getLogger("veil.tee")

#: The config keys that decide what the aggregator computes from the clients' updates.
AGGREGATION_KEYS = ("secure_aggregation", "strategy", "robust", "privacy")


def aggregation_config(config: RunConfig) -> dict[str, Any]:
    """The aggregation-relevant part of `config`, as plain JSON values."""
    raw = config.to_dict()
    return {key: raw.get(key) for key in AGGREGATION_KEYS}


def measure(config: RunConfig, *, package_dir: Path | None = None) -> str:
    """The measurement (hex SHA-256) of an aggregator running this Veil with `config`."""
    return measurement.measure(aggregation_config(config), package_dir=package_dir)


def policy_from_config(config: RunConfig) -> Policy:
    """The clients' policy: `[tee]`, or with no allow-list the measurement this Veil and this
    config give (a client trusts the aggregator to run exactly the code it runs itself)."""
    tee = config.tee or TeeConfig()
    allowed = frozenset(tee.allowed_measurements) or frozenset({measure(config)})
    return Policy(allowed, tee.min_security_version, tee.allow_insecure_dev)


def checkpoint_sealing_key(secret: bytes, config: RunConfig) -> bytes:
    """The checkpoint key of a `secure_aggregation = "tee"` run: the key file's key sealed to
    the aggregator's measurement (this Veil, this aggregation config)."""
    return sealing_key(secret, measure(config))


def attested_server_key(
    config: RunConfig, pki_dir: Path, *, name: str = SERVER_NAME
) -> AttestedTlsKey:
    """The deployment server's attested TLS key for this config's measurement, endorsed by
    node `name`'s identity key from `pki_dir`."""
    return attested_key(measure(config), pki_dir, name=name)


def server_pin(config: RunConfig, pki_dir: Path, *, trust: ServerCheck | None = None) -> ServerPin:
    """A deployment client's `ServerPin`: the config's policy, and the server's endorsement
    checked by `trust` (a member's `TrustStore`) or against ``pki_dir``'s CA."""
    return pin_server(policy_from_config(config), pki_dir, trust=trust)


@dataclass
class TeeSession(Session):
    """The run's attester and policy, and the TLS key the evidence binds."""

    config: RunConfig
    attester: SoftwareDevAttester
    policy: Policy
    tls_public_key: bytes

    def server_aggregator(self, inner: Aggregator) -> TeeAggregator:
        """`inner` (the weighted sum or a robust rule) run behind attestation."""
        return TeeAggregator(inner, self.attester, self.tls_public_key, hardware=False)

    def participant(self, name: str) -> TeeParticipant:
        """Client `name`'s half, with the run's policy and the server's TLS key."""
        return TeeParticipant(name, self.policy, self.tls_public_key)

    record_name = "tee"

    def record(self) -> dict[str, Any]:
        """`privacy.tee` of result.json."""
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

    def attestation(self) -> str:
        """`privacy.attestation` of result.json."""
        return self.description()

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
        """What the attestation proves, in words."""
        return describe(self.attester.backend, hardware=False)


def tee_federation(config: RunConfig, *, tls_public_key: bytes | None = None) -> TeeSession:
    """The run's attested aggregation; a simulation passes no TLS key and gets a fresh one."""
    if tls_public_key is None:
        tls_public_key = pki.spki(ec.generate_private_key(ec.SECP256R1()).public_key())
    attester = SoftwareDevAttester(measure(config))
    _log.warning(
        "attested aggregation with %s: development evidence only, it proves nothing about "
        "the server's hardware or the code it runs",
        describe(attester.backend, hardware=False),
    )
    return TeeSession(config, attester, policy_from_config(config), tls_public_key)


class Tee(SecureAggregation):
    """Updates go to an aggregator each client attests, bound to the TLS connection."""

    def start(self, inputs: ServerInputs) -> TeeSession:
        """The run's session (`tee_federation`), bound to the server's TLS key."""
        return tee_federation(inputs.config, tls_public_key=inputs.tls_public_key)

    def member(self, inputs: MemberInputs) -> Member:
        """The member's participant and its channel's pin: the server certificate of its own
        connection, checked (endorsed by the server's identity, which the member's trust state
        pins; evidence binding its key) and then pinned."""
        if inputs.trust is None:
            raise UserError(
                "attested aggregation binds its evidence to the TLS connection: it does not run "
                "with --insecure-dev"
            )
        pin = server_pin(inputs.config, inputs.pki_dir, trust=inputs.trust)
        return Member(
            TeeParticipant(inputs.name, policy_from_config(inputs.config), pin), pin.accept
        )

    def server_tls(self, config: RunConfig, pki_dir: Path) -> AttestedTlsKey:
        """The TLS key made here, inside the attested process, never written to disk."""
        return attested_server_key(config, pki_dir)

    def checkpoint_key(self, config: RunConfig, key: bytes) -> bytes:
        """Sealed to the aggregator: another code or aggregation config cannot open them."""
        return checkpoint_sealing_key(key, config)


BACKEND = Tee()
