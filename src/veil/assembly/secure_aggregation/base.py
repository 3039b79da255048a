"""The secure-aggregation interface: what a backend gives a run, whichever backend it is.

A backend (`SecureAggregation`) is found by the name in `secure_aggregation = "NAME"` through
the registry (`veil.assembly.secure_aggregation.registry`). The runtime, a deployment's server
and members, and the audit call only these verbs and flags, never a backend by its name:

- `start(ServerInputs) -> Session`: the server side of one run (simulation, Ray, or a
  deployment server). The `Session` gives the round's aggregator (`server_aggregator`), each
  client's half when the clients run in process (`participant`), and its entry in result.json's
  privacy record (`record` under `record_name`, and `attestation`).
- `member(MemberInputs) -> Member`: a deployment member's half, from its own keys and folder.
- `upload_reference(...)`: what each client's upload looks like (the gateway checks uploads
  against it before it parses them; result.json measures it).
- Hooks with defaults: `check` (refuse a config the backend cannot run), `server_tls` (a TLS key
  the backend makes in the server process), `checkpoint_key` (seal checkpoints), and
  `prepare_deployment` (a key ceremony before the processes start).
- Flags: `hides_updates` (the server never holds one client's update), `distributed_noise`
  (under client-level DP the clients add the noise), `encodes_updates` (the backend encodes
  uploads itself, so no compression stage runs).

Adding a backend takes a module with a `SecureAggregation` subclass (and a `Session` if the
default one does not do) and one `registry.register("NAME", Backend())`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from veil.config import RunConfig
from veil.federation.pipeline import Aggregator, ClientProtocol
from veil.privacy.dp.policy import PrivacyPolicy
from veil.tensors import NamedArrays, Payload

if TYPE_CHECKING:
    from veil.crypto.pki import NodeFiles
    from veil.crypto.trust import TrustStore

__all__ = [
    "DeploymentFolders",
    "Member",
    "MemberInputs",
    "SecureAggregation",
    "ServerInputs",
    "ServerTls",
    "Session",
]


@dataclass(frozen=True)
class ServerInputs:
    """What the server side of one run is built from."""

    config: RunConfig
    #: The global model's initial parameters (the layout every upload follows).
    initial: NamedArrays
    #: Every member of the federation, by name.
    clients: list[str]
    privacy: PrivacyPolicy | None
    #: A deployment server's own PKI folder; None when the clients run in process (simulation,
    #: Ray), where a backend stands in for the PKI and any key ceremony itself.
    pki_dir: Path | None = None
    #: The public key (DER SubjectPublicKeyInfo) of the TLS key the server serves, when the
    #: backend made it in this process (`SecureAggregation.server_tls`).
    tls_public_key: bytes | None = None


@dataclass(frozen=True)
class MemberInputs:
    """What a deployment member's half is built from: its own folder and keys only."""

    config: RunConfig
    name: str
    #: The member's model parameters (the layout its uploads follow).
    initial: NamedArrays
    privacy: PrivacyPolicy | None
    pki_dir: Path
    files: NodeFiles
    #: The member's trust state (pinned peer keys, newest revocation list); None when it runs
    #: with --insecure-dev (no TLS).
    trust: TrustStore | None


@dataclass(frozen=True)
class Member:
    """A deployment member's half of secure aggregation."""

    participant: ClientProtocol | None = None
    #: Checks the certificate (DER) the server presents and returns the PEM the member's channel
    #: trusts exactly (an attested aggregator's in-process key); None: any certificate the
    #: federation's CA issued to the server.
    accept_server: Callable[[bytes], bytes] | None = field(default=None, repr=False)


class ServerTls(Protocol):
    """A TLS key a backend made in the server process (held in memory, never on disk)."""

    @property
    def certificate_pem(self) -> bytes:
        """The certificate the server presents."""

    @property
    def private_key_pem(self) -> bytes:
        """Its private key (PKCS#8 PEM)."""

    @property
    def tls_public_key(self) -> bytes:
        """Its public key (DER SubjectPublicKeyInfo)."""


class DeploymentFolders(Protocol):
    """A loopback deployment's folders as `prepare_deployment` sees them
    (`veil.deployment.DeploymentFiles`)."""

    @property
    def ca_dir(self) -> Path:
        """The CA operator's folder."""

    @property
    def clients(self) -> list[str]:
        """The members' names."""

    @property
    def server_dir(self) -> Path:
        """The coordinator's own folder."""

    def org_dir(self, name: str) -> Path:
        """Member `name`'s own folder."""


class Session:
    """One run's secure aggregation on the server, and in process each client's half.

    The defaults sum in the clear with no protocol steps, which is what `plain` does."""

    def server_aggregator(self, inner: Aggregator) -> Aggregator:
        """The round's aggregator. `inner` is the rule the run would use in the clear (the
        weighted sum, or `[robust]`'s rule, decompressing compressed uploads): a backend that
        sums in the clear returns it, one that runs it elsewhere wraps it (TEE), one that sums
        protected updates replaces it (SecAgg, CKKS; the config refuses a robust rule there)."""
        return inner

    def participant(self, name: str) -> ClientProtocol | None:
        """Client `name`'s half when the clients run in this process; None when the backend
        has no client steps, and on a deployment server (its members build their own:
        `SecureAggregation.member`)."""
        return None

    #: The field of result.json's privacy record that `record` fills: one `PrivacyRecord`
    #: declares (`secure_aggregation`, `homomorphic_encryption`, `tee`) or, for a backend of
    #: your own, a key of its own; None: the backend records nothing.
    record_name: ClassVar[str | None] = None

    def record(self) -> dict[str, Any]:
        """This backend's entry in result.json's privacy record (under `record_name`)."""
        return {}

    def attestation(self) -> str | None:
        """What the aggregator's attestation proves, in words (`privacy.attestation`); None
        without attestation."""
        return None

    def dp_dimension(self) -> int | None:
        """Under distributed DP, the number of update coordinates each client encodes (the
        privacy record's `distributed_dp` needs it); None otherwise."""
        return None


class SecureAggregation(ABC):
    """A way to sum the clients' updates, found by name (`registry.backend`)."""

    #: The server never holds one client's update, only what the protocol releases (the sum).
    hides_updates: ClassVar[bool] = True
    #: Under client-level DP the clients add the noise (distributed DP) and the server only
    #: divides; otherwise the server adds it to the sum.
    distributed_noise: ClassVar[bool] = False
    #: The backend encodes each upload itself (fixed point, ciphertexts): no compression stage
    #: runs, and `upload_reference` describes the encoded upload.
    encodes_updates: ClassVar[bool] = False

    def check(self, config: RunConfig) -> None:
        """Refuse (`ConfigError`, one line with what to change) a configuration this backend
        cannot run; called before anything is built. The default accepts every config (the
        built-ins' rules live beside their config sections)."""
        return None

    @abstractmethod
    def start(self, inputs: ServerInputs) -> Session:
        """The server side of one run; refuse a run that cannot work (e.g. an encoding that
        could overflow) before anything starts."""

    def member(self, inputs: MemberInputs) -> Member:
        """A deployment member's half (default: none)."""
        return Member()

    def upload_reference(
        self, config: RunConfig, initial: NamedArrays, privacy: PrivacyPolicy | None
    ) -> Payload:
        """What each client's upload must look like (default: the parameters, or their
        compressed form under `[compression]`; under LoRA stacking without the merged deltas,
        which never go up)."""
        from veil.assembly.stages import update_compressor
        from veil.federation.compression import upload_reference
        from veil.federation.lora_aggregation import is_merged

        if config.model.lora.aggregation == "stack":
            initial = {n: a for n, a in initial.items() if not is_merged(n)}
        return upload_reference(update_compressor(config), initial)

    def server_tls(self, config: RunConfig, pki_dir: Path) -> ServerTls | None:
        """A TLS key this backend makes in the deployment server's process, which the server
        then serves instead of its key file (default: None, the key file)."""
        return None

    def checkpoint_key(self, config: RunConfig, key: bytes) -> bytes:
        """The key that seals the run's checkpoints, from the key file's `key` (default: it)."""
        return key

    def prepare_deployment(self, config: RunConfig, folders: DeploymentFolders) -> None:
        """What a loopback deployment needs before its processes start (a key ceremony, say);
        default: nothing."""
        return None
