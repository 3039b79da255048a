"""`secure_aggregation = "ckks"`: homomorphic encryption of updates (TenSEAL), from `[ckks]`.

The session checks the overflow bound for the worst case (every client selected) before anything
starts. In a simulation it generates the run's key set in memory and hands each client the
secret set, standing in for the key ceremony of a deployment; a new key per run (rotation); it
also generates an Ed25519 identity key per client and gives every client the same table of
their public halves (standing in for the PKI), with which decryptors check the members' signed
confirmations. In a deployment the server loads the public key set from the ceremony (refused if
it holds a secret key) and each member builds its participant from its own sealed key, its
identity key and the federation's CA (`participant_from_pki`): a decryptor learns its peers'
identity keys from CA-signed certificates, never from the server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from veil.assembly.secure_aggregation.base import (
    DeploymentFolders,
    Member,
    MemberInputs,
    SecureAggregation,
    ServerInputs,
    Session,
)
from veil.atomic import atomic_write_bytes
from veil.config import CkksConfig, RunConfig
from veil.crypto import pki
from veil.crypto.identity import IdentityKey
from veil.crypto.trust import TrustStore
from veil.federation.pipeline import Aggregator
from veil.privacy.dp.policy import PrivacyPolicy
from veil.privacy.he import keys as he_keys
from veil.privacy.he.aggregator import CkksAggregator, encrypted_reference
from veil.privacy.he.ckks import CkksParams
from veil.privacy.he.keys import PublicKeySet, SecretKeySet
from veil.privacy.he.participant import CkksParticipant
from veil.privacy.he.settings import CkksSettings
from veil.privacy.secagg.layout import UpdateLayout
from veil.privacy.secagg.roster import CertificateRoster, StaticRoster
from veil.tensors import NamedArrays, Payload

__all__ = [
    "BACKEND",
    "Ckks",
    "CkksSession",
    "ckks_params",
    "ckks_session",
    "participant_from_pki",
    "reference",
    "settings_from_config",
]


def ckks_params(config: CkksConfig | None) -> CkksParams:
    """The encryption parameters of a run's `[ckks]` (defaults when it is absent)."""
    c = config or CkksConfig()
    return CkksParams(c.poly_modulus_degree, tuple(c.coeff_modulus_bits), c.scale_bits)


def settings_from_config(config: CkksConfig | None) -> CkksSettings:
    """The settings of a run's `[ckks]` section (defaults when it is absent)."""
    c = config or CkksConfig()
    return CkksSettings(
        params=ckks_params(c),
        decryptors=c.decryptors,
        clip_range=c.clip_range,
        max_weight=c.max_weight,
        flood_bits=c.flood_bits,
    )


@dataclass
class CkksSession(Session):
    """A run's CKKS aggregation: the server's aggregator and, in a simulation, every client's
    participant."""

    aggregator: CkksAggregator
    settings: CkksSettings
    layout: UpdateLayout
    #: Simulation only: the run's secret key set, given to every client.
    secret: SecretKeySet | None = None
    #: Simulation only: each client's identity key (its public half in every client's roster).
    identities: dict[str, IdentityKey] = field(default_factory=dict)
    mode: str = "simulation"

    def server_aggregator(self, inner: Aggregator) -> Aggregator:
        """The encrypted sum replaces the clear rule (the config refuses `[robust]` here)."""
        return self.aggregator

    def participant(self, name: str) -> CkksParticipant | None:
        """Client `name`'s participant in a simulation; None on a deployment's server, which
        holds no secret key (its clients load their own: `participant_from_pki`)."""
        if self.secret is None:
            return None
        roster = StaticRoster({n: k.public_key() for n, k in self.identities.items()})
        return CkksParticipant(
            name, self.secret, self.settings, self.layout, self.identities[name], roster
        )

    record_name = "homomorphic_encryption"

    def record(self) -> dict[str, Any]:
        """`privacy.homomorphic_encryption` of result.json."""
        return {
            "scheme": "CKKS (TenSEAL)",
            **self.settings.report(),
            "key_id": self.aggregator.keys.key_id,
            "server_context": "parameters only: no secret, public, relinearisation or Galois key",
            "keys": "sealed to each client's X25519 key by `veil he keygen` (HPKE)"
            if self.mode == "deployment"
            else "generated per run and given to every client (simulation)",
            "decryption": "only of a sum every member confirmed with its signature, of at "
            f"least {self.settings.quorum} distinct members, added by the decryptors themselves",
            "threat": "every client holds the secret key: a client colluding with the server "
            "can decrypt any client's update",
        }


def ckks_session(
    config: CkksConfig | None,
    initial: NamedArrays,
    clients: list[str],
    *,
    keys: PublicKeySet | None = None,
    mode: str = "simulation",
) -> CkksSession:
    """The run's CKKS aggregation; OverflowRisk if the worst-case sum could wrap around. Without
    `keys` (a simulation) it generates the run's key set and the clients' identities."""
    settings = settings_from_config(config)
    settings.check_capacity(len(clients))
    layout = UpdateLayout.of(initial, settings.sum_bounds)
    secret, identities = None, {}
    if keys is None:
        secret, keys = he_keys.generate(settings.params)
        identities = {name: IdentityKey.generate() for name in clients}
    aggregator = CkksAggregator(settings, layout, keys)
    return CkksSession(aggregator, settings, layout, secret, identities, mode)


def participant_from_pki(
    config: CkksConfig | None,
    name: str,
    initial: NamedArrays,
    pki_dir: Path,
    *,
    trust: TrustStore | None = None,
) -> CkksParticipant:
    """A deployment client's participant, with its key set opened from ``PKI/he/sealed``, its
    identity key, and its peers' identity keys taken from their CA-signed certificates."""
    settings = settings_from_config(config)
    layout = UpdateLayout.of(initial, settings.sum_bounds)
    secret = he_keys.load_secret(pki_dir, name, settings.params)
    files = pki.node_files(pki_dir, name)
    roster = CertificateRoster(
        files.ca_cert.read_bytes(),
        files.cert.read_bytes(),
        revoked=pki.revoked_serials(pki_dir),
        trust=trust,
    )
    identity = IdentityKey.load(files.identity_key)
    return CkksParticipant(name, secret, settings, layout, identity, roster)


def reference(config: CkksConfig | None, initial: NamedArrays) -> Payload:
    """What each client's encrypted upload must look like (for the gRPC gateway)."""
    settings = settings_from_config(config)
    return encrypted_reference(settings, UpdateLayout.of(initial, settings.sum_bounds))


def _copy_public(source: Path, target: Path, *, mode: int = 0o644) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, source.read_bytes(), mode=mode)


class Ckks(SecureAggregation):
    """The server adds ciphertexts it cannot read; the members decrypt only the sum."""

    encodes_updates = True

    def start(self, inputs: ServerInputs) -> CkksSession:
        """A deployment server loads the ceremony's public key set from its folder (refused if
        it holds a secret key) before it opens a port; a simulation makes its own keys."""
        config = inputs.config
        keys = (
            he_keys.load_public(inputs.pki_dir, ckks_params(config.ckks))
            if inputs.pki_dir is not None
            else None
        )
        return ckks_session(
            config.ckks, inputs.initial, inputs.clients, keys=keys, mode=config.mode
        )

    def member(self, inputs: MemberInputs) -> Member:
        """The member's participant, with the secret key set sealed to it by the ceremony."""
        participant = participant_from_pki(
            inputs.config.ckks, inputs.name, inputs.initial, inputs.pki_dir, trust=inputs.trust
        )
        return Member(participant)

    def upload_reference(
        self, config: RunConfig, initial: NamedArrays, privacy: PrivacyPolicy | None
    ) -> Payload:
        """One vector of CKKS ciphertext frames."""
        return reference(config.ckks, initial)

    def prepare_deployment(self, config: RunConfig, folders: DeploymentFolders) -> None:
        """The CKKS key ceremony, run by the CA operator on the members' certificates (public):
        a fresh key sealed to each member; the coordinator gets the public set only."""
        he_dir = folders.ca_dir / he_keys.HE_DIR
        if not he_dir.is_dir():
            he_keys.ceremony(folders.ca_dir, ckks_params(config.ckks), clients=folders.clients)
        for own in [folders.server_dir, *(folders.org_dir(n) for n in folders.clients)]:
            for public in (he_keys.PUBLIC_CONTEXT, he_keys.KEYSET):
                _copy_public(he_dir / public, own / he_keys.HE_DIR / public)
        for name in folders.clients:
            box = Path(he_keys.SEALED) / f"{name}.box"
            _copy_public(he_dir / box, folders.org_dir(name) / he_keys.HE_DIR / box, mode=0o600)


BACKEND = Ckks()
