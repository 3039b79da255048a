"""Where a client learns its peers' identity keys: never from the server that relays their keys.

A `Roster` turns a peer's name and the credential that came with its key advertisement into the
Ed25519 identity key the advertisement must be signed with. In a deployment the credential is
the peer's certificate, checked against the federation's CA (which the server does not hold):
the CA's signature binds the identity key to the name (`veil.crypto.pki.certificate_identity`).
In a simulation the run hands every client the same table of keys, standing in for the PKI.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Protocol

from cryptography import x509

from veil.crypto import pki
from veil.crypto.identity import IdentityPublicKey
from veil.crypto.trust import TrustStore
from veil.privacy.secagg.errors import KeySubstitution


class Roster(Protocol):
    """The trusted source of peers' identity keys."""

    def credential(self) -> bytes:
        """What this client attaches to its own key advertisement for its peers to check."""
        ...

    def identity(self, name: str, credential: bytes) -> IdentityPublicKey:
        """Peer `name`'s identity key, or KeySubstitution if `credential` does not prove it."""
        ...


class StaticRoster:
    """A fixed table of identity keys given to every client by the run (simulation)."""

    def __init__(self, identities: Mapping[str, IdentityPublicKey]) -> None:
        self._identities = dict(identities)

    def credential(self) -> bytes:
        return b""

    def identity(self, name: str, credential: bytes) -> IdentityPublicKey:
        try:
            return self._identities[name]
        except KeyError:
            raise KeySubstitution(f"{name!r} is not in this federation's roster") from None


class CertificateRoster:
    """Peers prove their identity keys with certificates issued by the federation's CA.

    With a `trust` store (a member's own `veil.crypto.trust.TrustStore`), a peer's key is also
    checked against the newest revocation list the member has seen and against the key pinned
    for its name: a second certificate minted by the CA for a peer, with another key, is
    refused unless the pinned certificate was revoked."""

    def __init__(
        self,
        ca_certificate: bytes,
        own_certificate: bytes,
        *,
        revoked: Collection[int] = (),
        trust: TrustStore | None = None,
    ) -> None:
        self._ca = x509.load_pem_x509_certificate(ca_certificate)
        self._own = own_certificate
        self._revoked = frozenset(revoked)
        self._trust = trust

    def credential(self) -> bytes:
        return self._own

    def identity(self, name: str, credential: bytes) -> IdentityPublicKey:
        try:
            cert = x509.load_pem_x509_certificate(credential)
        except ValueError:
            raise KeySubstitution(f"the certificate relayed for {name!r} is not PEM") from None
        try:
            if self._trust is not None:
                return self._trust.check_peer(name, cert, role="client")
            pki.verify_certificate(cert, self._ca, role="client", revoked=self._revoked)
            if pki.certificate_name(cert) != name:
                raise KeySubstitution(
                    f"the certificate relayed for {name!r} names {pki.certificate_name(cert)!r}"
                )
            return pki.certificate_identity(cert)
        except pki.CertificateRejected as exc:
            raise KeySubstitution(f"peer {name!r}: {exc}") from None
