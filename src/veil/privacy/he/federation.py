"""CKKS aggregation wired for one run: the server's aggregator and each client's participant.

`ckks_federation` checks the overflow bound for the worst case (every client selected) before
anything starts. In a simulation (`keys=None`) it generates the run's key set in memory and
hands each client the secret set, standing in for the key ceremony of a deployment; a new key
per run (rotation); it also generates an Ed25519 identity key per client and gives every client
the same table of their public halves (standing in for the PKI), with which decryptors check
the members' signed confirmations. In a deployment the server passes the public key set from
the ceremony and clients build their participants from their own sealed key, their identity
key and the federation's CA (`participant_from_pki`): a decryptor learns its peers' identity
keys from CA-signed certificates, never from the server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from veil.config import CkksConfig
from veil.crypto import pki
from veil.crypto.identity import IdentityKey
from veil.crypto.trust import TrustStore
from veil.privacy.he import keys as he_keys
from veil.privacy.he.aggregator import CkksAggregator, encrypted_reference
from veil.privacy.he.keys import PublicKeySet, SecretKeySet
from veil.privacy.he.participant import CkksParticipant
from veil.privacy.he.settings import CkksSettings, settings_from_config
from veil.privacy.secagg.layout import UpdateLayout
from veil.privacy.secagg.roster import CertificateRoster, StaticRoster
from veil.tensors import NamedArrays

__all__ = ["CkksFederation", "ckks_federation", "encrypted_reference", "participant_from_pki"]


@dataclass
class CkksFederation:
    aggregator: CkksAggregator
    settings: CkksSettings
    layout: UpdateLayout
    #: Simulation only: the run's secret key set, given to every client.
    secret: SecretKeySet | None = None
    #: Simulation only: each client's identity key (its public half in every client's roster).
    identities: dict[str, IdentityKey] = field(default_factory=dict)

    def participant(self, name: str) -> CkksParticipant | None:
        """Client `name`'s participant in a simulation; None on a deployment's server, which
        holds no secret key (its clients load their own: `participant_from_pki`)."""
        if self.secret is None:
            return None
        roster = StaticRoster({n: k.public_key() for n, k in self.identities.items()})
        return CkksParticipant(
            name, self.secret, self.settings, self.layout, self.identities[name], roster
        )

    def record(self, mode: str) -> dict[str, Any]:
        """What `result.json` says about the encryption (`privacy.homomorphic_encryption`)."""
        return {
            "scheme": "CKKS (TenSEAL)",
            **self.settings.report(),
            "key_id": self.aggregator.keys.key_id,
            "server_context": "parameters only: no secret, public, relinearisation or Galois key",
            "keys": "sealed to each client's X25519 key by `veil he keygen` (HPKE)"
            if mode == "deployment"
            else "generated per run and given to every client (simulation)",
            "decryption": "only of a sum every member confirmed with its signature, of at "
            f"least {self.settings.quorum} distinct members, added by the decryptors themselves",
            "threat": "every client holds the secret key: a client colluding with the server "
            "can decrypt any client's update",
        }


def ckks_federation(
    config: CkksConfig | None,
    initial: NamedArrays,
    clients: list[str],
    *,
    keys: PublicKeySet | None = None,
) -> CkksFederation:
    """The run's CKKS aggregation; OverflowRisk if the worst-case sum could wrap around."""
    settings = settings_from_config(config)
    settings.check_capacity(len(clients))
    layout = UpdateLayout.of(initial, settings.sum_bounds)
    secret, identities = None, {}
    if keys is None:
        secret, keys = he_keys.generate(settings.params)
        identities = {name: IdentityKey.generate() for name in clients}
    aggregator = CkksAggregator(settings, layout, keys)
    return CkksFederation(aggregator, settings, layout, secret, identities)


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


def reference(config: CkksConfig | None, initial: NamedArrays) -> dict[str, Any]:
    """What each client's encrypted upload must look like (for the gRPC gateway)."""
    settings = settings_from_config(config)
    return encrypted_reference(settings, UpdateLayout.of(initial, settings.sum_bounds))
