"""`secure_aggregation = "secagg"`: masking (SecAgg, SecAgg+), from `[secagg]`.

In a simulation the run generates an Ed25519 identity key per client and gives every client the
table of their public halves (standing in for the federation's PKI); a deployment member takes
its own identity key and its peers' from their CA-signed certificates (`CertificateRoster`),
never from the server. Under client-level DP the clients add the noise (distributed discrete
Gaussian): the settings carry the noise plan every client re-derives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from veil.assembly.secure_aggregation.base import (
    Member,
    MemberInputs,
    SecureAggregation,
    ServerInputs,
    Session,
)
from veil.config import RunConfig, SecAggConfig
from veil.crypto import pki
from veil.crypto.identity import IdentityKey
from veil.federation.compression import SECAGG_COMPRESSED_BITS
from veil.federation.pipeline import Aggregator
from veil.privacy.dp.policy import ClientLevelPrivacy, PrivacyPolicy
from veil.privacy.secagg.aggregator import SecAggAggregator
from veil.privacy.secagg.layout import UpdateLayout, masked_reference
from veil.privacy.secagg.parameters import secagg_plus_parameters
from veil.privacy.secagg.participant import SecAggParticipant
from veil.privacy.secagg.quantize import FixedPoint
from veil.privacy.secagg.roster import CertificateRoster, StaticRoster
from veil.privacy.secagg.settings import DistributedNoise, SecAggSettings
from veil.selection import sample_size
from veil.tensors import NamedArrays, Payload

__all__ = [
    "BACKEND",
    "SecAgg",
    "SecAggSession",
    "modulus_bits",
    "planned_round_size",
    "secagg_settings",
    "session",
    "settings_from_config",
]


def settings_from_config(
    config: SecAggConfig | None,
    *,
    round_size: int,
    distributed_dp: DistributedNoise | None = None,
    modulus_bits: int | None = None,
) -> SecAggSettings:
    """The settings of a run's `[secagg]` section (defaults when it is absent) for rounds of at
    most `round_size` clients; `modulus_bits` overrides the section's (int8 compression
    narrows the ring)."""
    c = config or SecAggConfig()
    neighbours, threshold = c.neighbours, c.threshold
    if neighbours == "auto":
        chosen = secagg_plus_parameters(round_size, c.dropout_rate, c.corruption_rate)
        neighbours, threshold = chosen.degree, chosen.threshold
    return SecAggSettings(
        round_size=round_size,
        clip_range=c.clip_range,
        max_weight=c.max_weight,
        modulus_bits=c.modulus_bits if modulus_bits is None else modulus_bits,
        step=c.step,
        threshold=threshold,
        neighbours=neighbours,
        distributed_dp=distributed_dp,
    )


def modulus_bits(config: RunConfig) -> int:
    """SecAgg's ring: `SECAGG_COMPRESSED_BITS` under int8 compression unless `[secagg]` sets
    modulus_bits itself; else the `[secagg]` setting (default 32)."""
    s = config.secagg or SecAggConfig()
    compressed = config.compression is not None and config.compression.kind == "int8"
    if compressed and "modulus_bits" not in s.model_fields_set:
        return SECAGG_COMPRESSED_BITS
    return s.modulus_bits


def planned_round_size(config: RunConfig, *, poisson: bool) -> int:
    """The most clients a round of this configuration selects, for SecAgg's threshold: the
    fraction's count, or under Poisson sampling (client-level DP) the 99.9 % quantile of
    Binomial(clients, fraction_fit)."""
    fed = config.federation
    if not poisson or fed.fraction_fit >= 1:
        return sample_size(fed.fraction_fit, fed.clients)
    from scipy.stats import binom

    return max(2, int(binom.ppf(0.999, fed.clients, fed.fraction_fit)))


def secagg_settings(config: RunConfig, privacy: PrivacyPolicy | None) -> SecAggSettings:
    """The run's SecAgg settings; with client-level DP the clients add the noise (distributed
    discrete Gaussian)."""
    client_level = isinstance(privacy, ClientLevelPrivacy)
    noise = None
    if isinstance(privacy, ClientLevelPrivacy):
        noise = DistributedNoise(privacy.noise_multiplier, privacy.config.clip_norm)
    return settings_from_config(
        config.secagg,
        round_size=planned_round_size(config, poisson=client_level),
        distributed_dp=noise,
        modulus_bits=modulus_bits(config),
    )


@dataclass
class SecAggSession(Session):
    """A run's SecAgg on the server: its aggregator and, in process, each client's participant,
    with identity keys generated for the run (standing in for the federation's PKI)."""

    aggregator: SecAggAggregator
    settings: SecAggSettings
    layout: UpdateLayout
    identities: dict[str, IdentityKey]
    mode: str = "simulation"

    def server_aggregator(self, inner: Aggregator) -> Aggregator:
        """The masked sum replaces the clear rule (the config refuses `[robust]` here)."""
        return self.aggregator

    def participant(self, name: str) -> SecAggParticipant:
        """Client `name`'s participant in process, with the run's generated identities."""
        roster = StaticRoster({n: k.public_key() for n, k in self.identities.items()})
        return SecAggParticipant(name, self.identities[name], roster, self.settings, self.layout)

    record_name = "secure_aggregation"

    def record(self) -> dict[str, Any]:
        """`privacy.secure_aggregation` of result.json."""
        s = self.settings
        return {
            "protocol": s.protocol,
            "threshold": s.round_threshold,
            "neighbours": s.neighbours,
            "modulus_bits": s.modulus_bits,
            "clip_range": None if s.distributed_dp else s.clip_range,
            "max_weight": None if s.distributed_dp else s.max_weight,
            "identities": "node certificates signed by the federation's CA"
            if self.mode == "deployment"
            else "generated per run (simulation)",
        }

    def dp_dimension(self) -> int:
        """The update coordinates each client encodes (distributed DP's d)."""
        return self.layout.parameter_count


def session(
    config: RunConfig,
    privacy: PrivacyPolicy | None,
    initial: NamedArrays,
    clients: list[str],
) -> SecAggSession:
    """The run's SecAgg session; OverflowRisk (a ConfigError) for an encoding that could
    overflow with every client selected (the worst case, also under Poisson sampling)."""
    settings = secagg_settings(config, privacy)
    layout = UpdateLayout.of(initial, settings.sum_bounds)
    settings.fixed_point(layout, len(clients))
    return SecAggSession(
        aggregator=SecAggAggregator(settings, layout),
        settings=settings,
        layout=layout,
        identities={name: IdentityKey.generate() for name in clients},
        mode=config.mode,
    )


class SecAgg(SecureAggregation):
    """Masking: the server learns only the sum of the selected clients' updates."""

    distributed_noise = True
    encodes_updates = True

    def start(self, inputs: ServerInputs) -> SecAggSession:
        """The run's session (`session`)."""
        return session(inputs.config, inputs.privacy, inputs.initial, inputs.clients)

    def member(self, inputs: MemberInputs) -> Member:
        """The member's participant: its identity key, and its peers' identity keys taken from
        their CA-signed certificates (never from the server)."""
        settings = secagg_settings(inputs.config, inputs.privacy)
        files = inputs.files
        roster = CertificateRoster(
            files.ca_cert.read_bytes(),
            files.cert.read_bytes(),
            revoked=pki.revoked_serials(inputs.pki_dir),
            trust=inputs.trust,
        )
        layout = UpdateLayout.of(inputs.initial, settings.sum_bounds)
        identity = IdentityKey.load(files.identity_key)
        return Member(SecAggParticipant(inputs.name, identity, roster, settings, layout))

    def upload_reference(
        self, config: RunConfig, initial: NamedArrays, privacy: PrivacyPolicy | None
    ) -> Payload:
        """One vector of masked residues."""
        settings = secagg_settings(config, privacy)
        layout = UpdateLayout.of(initial, settings.sum_bounds)
        return masked_reference(layout, FixedPoint(settings.modulus_bits, 1.0).dtype)


BACKEND = SecAgg()
