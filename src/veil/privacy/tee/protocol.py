"""Attested aggregation: clients verify the aggregator's evidence before releasing an update.

Two protocol steps run through the round's `ProtocolChannel` before training (the channel is
server → client first, so the client's challenge comes back as a reply):

=================  ======================================  ====================================
stage              server → client                         client → server
=================  ======================================  ====================================
``tee/challenge``  empty                                   a fresh 32-byte nonce (os.urandom)
``tee/evidence``   `Evidence` for that nonce and round     ``ok``, or a refusal (a VeilError,
                                                           which the transport records)
(fit)              the global model                        the plaintext update, only if this
                                                           round's evidence verified
=================  ======================================  ====================================

`TeeAggregator` wraps the aggregator that runs "inside the enclave" (the weighted sum, or a
robust rule): only clients that accepted the evidence take part in the round. `TeeParticipant`
is the client half; its `seal` refuses to release an update unless this round's evidence
verified against its policy and named the TLS key of the channel it talks on — in a deployment
the key of the certificate its channel pins (`veil.privacy.tee.channel.ServerPin`), so evidence
relayed from another process is refused.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Any, Protocol

from veil.federation.messages import FitResult, ProtocolInstruction
from veil.federation.pipeline import (
    Accumulator,
    Aggregate,
    Aggregator,
    ProtocolChannel,
    RoundContext,
    require_channel,
)
from veil.privacy.tee.attestation import (
    NONCE_BYTES,
    AttestationRefused,
    Attester,
    Claims,
    Evidence,
    Policy,
    Verifier,
    attest,
    describe,
    verify,
)
from veil.privacy.tee.channel import fingerprint
from veil.tensors import NamedArrays

__all__ = ["CHALLENGE", "EVIDENCE", "OK", "ChannelKey", "TeeAggregator", "TeeParticipant"]

CHALLENGE = "tee/challenge"
EVIDENCE = "tee/evidence"
OK = b"ok"

_log = logging.getLogger("veil.tee")


class ChannelKey(Protocol):
    """The TLS key of the connection a client talks on, which may change when it reconnects
    (`veil.privacy.tee.channel.ServerPin`); None before it has connected."""

    @property
    def tls_public_key(self) -> bytes | None: ...


class TeeAggregator:
    """Answers each selected client's challenge with evidence, then aggregates with `inner`
    over the clients that accepted it."""

    name = "tee"

    def __init__(
        self, inner: Aggregator, attester: Attester, tls_public_key: bytes, *, hardware: bool
    ) -> None:
        self.inner = inner
        self.attester = attester
        self.tls_public_key = tls_public_key
        self.hardware = hardware

    def start(
        self,
        reference: NamedArrays,
        context: RoundContext,
        channel: ProtocolChannel | None = None,
    ) -> Accumulator:
        channel = require_channel(channel, "attested aggregation")
        nonces = channel.exchange(CHALLENGE, {c: b"" for c in context.clients})
        bodies = {
            client: attest(self.attester, self.tls_public_key, nonce, context.round).to_bytes()
            for client, nonce in nonces.items()
            if len(nonce) == NONCE_BYTES  # a malformed challenge drops that client
        }
        replies = channel.exchange(EVIDENCE, bodies)
        attested = tuple(c for c in context.clients if replies.get(c) == OK)
        report = {
            "attestation": describe(self.attester.backend, hardware=self.hardware),
            "attested": len(attested),
            "refused": len(context.clients) - len(attested),
        }
        _log.info(
            "round %d: %s; %d of %d clients accepted the evidence",
            context.round,
            report["attestation"],
            len(attested),
            len(context.clients),
        )
        inner = self.inner.start(reference, replace(context, clients=attested), channel)
        return _Attested(inner, report)


class _Attested:
    def __init__(self, inner: Accumulator, report: dict[str, Any]) -> None:
        self.inner = inner
        self.participants = inner.participants
        self.report = report

    def add(self, result: FitResult) -> None:
        self.inner.add(result)

    def finish(self) -> Aggregate:
        aggregate = self.inner.finish()
        aggregate.report = {**aggregate.report, **self.report}
        return aggregate


class TeeParticipant:
    """One client's half: draws the nonce, verifies the evidence, gates its update.

    `channel_tls_key` is the DER SubjectPublicKeyInfo of the server's TLS key on the channel this
    client talks on, or a `ChannelKey` that gives the current one (in a deployment: the
    `ServerPin` whose certificate the client's channel trusts, and nothing else; the TLS
    handshake then proves the server holds that key).
    """

    name = "tee"

    def __init__(
        self,
        client: str,
        policy: Policy,
        channel_tls_key: bytes | ChannelKey,
        *,
        verifiers: list[Verifier] | None = None,
    ) -> None:
        self.client = client
        self.policy = policy
        self._channel = channel_tls_key
        self.verifiers = verifiers
        self._nonce: tuple[int, bytes] | None = None
        self._verified: Claims | None = None

    @property
    def channel_tls_key(self) -> bytes | None:
        """The TLS key of the channel this client talks on now."""
        if isinstance(self._channel, bytes):
            return self._channel
        return self._channel.tls_public_key

    def handle(self, instruction: ProtocolInstruction) -> bytes:
        if instruction.stage == CHALLENGE:
            nonce = os.urandom(NONCE_BYTES)
            self._nonce, self._verified = (instruction.round, nonce), None
            return nonce
        if instruction.stage == EVIDENCE:
            self._verified = None
            try:
                self._verified = self._check(instruction)
            except AttestationRefused as exc:
                _log.warning("client %s refused the aggregator: %s", self.client, exc)
                raise
            _log.info(
                "client %s: round %d evidence verified: %s, measurement %s",
                self.client, instruction.round, self._verified.describe(),
                self._verified.measurement,
            )  # fmt: skip
            return OK
        raise AttestationRefused(f"unknown attestation step '{instruction.stage}'")

    def _check(self, instruction: ProtocolInstruction) -> Claims:
        if self._nonce is None or self._nonce[0] != instruction.round:
            raise AttestationRefused(
                f"evidence for round {instruction.round} without this client's challenge"
            )
        evidence = Evidence.from_bytes(instruction.body)
        if evidence.round != instruction.round:
            raise AttestationRefused(
                f"evidence for round {evidence.round} offered in round {instruction.round}"
            )
        claims = verify(evidence, self.policy, self._nonce[1], verifiers=self.verifiers)
        channel = self.channel_tls_key
        if channel is None:
            raise AttestationRefused("this client has not pinned the server's TLS certificate")
        if claims.tls_public_key != channel:
            raise AttestationRefused(
                f"the attested TLS key ({fingerprint(claims.tls_public_key)}) is not the key "
                f"of this client's channel ({fingerprint(channel)}): the evidence comes from "
                "another process than the server this client talks to (relayed), refused"
            )
        return claims

    def seal(self, result: FitResult, context: RoundContext) -> FitResult:
        """The update unchanged (TLS protects it in transit), if this round's evidence
        verified; AttestationRefused otherwise."""
        claims = self._verified
        if claims is None or claims.round != context.round:
            raise AttestationRefused(
                f"no verified attestation for round {context.round}: this client does not "
                "release its update to an unattested aggregator"
            )
        if claims.tls_public_key != self.channel_tls_key:
            raise AttestationRefused(
                "the server's TLS certificate changed after this round's evidence verified (a "
                "reconnection to another process): this client withholds its update"
            )
        return result
