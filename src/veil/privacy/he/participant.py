"""The client half of CKKS aggregation: encrypts the update and, as a decryptor, releases sums.

`CkksParticipant` is a `veil.federation.pipeline.ClientProtocol`. `seal` clips and weights the
update, lays it out as [w·Δ | w | sums | clipped | capped | 1] (the `UpdateLayout` SecAgg
uses, then the clipped fraction, the weight-capped flag and the count slot) and encrypts it
under the run's secret key; only the ciphertext frames leave the client, with no per-client
metric beside them.

`handle` answers the server's two decryption steps:

- ``ckks/confirm``: the server names the round's member set (each member's name and the
  SHA-256 of its upload). A member signs it with its Ed25519 identity key only if its own
  upload of this round is in it unchanged and the set holds at least the quorum of distinct
  members; and it confirms one set per round, never a second one.
- ``ckks/decrypt``: a decryptor receives every member's upload with its signature and
  credential. It releases a sum only if it can verify that the sum is genuine: the set is the
  one it confirmed itself this round, every member's identity key comes from this client's own
  roster (never from the server) and signed the set, names and uploads are distinct, there are
  at least `settings.quorum` of them (its own settings, never the server's request), each
  upload hashes to its signed digest; it then adds the uploads itself, checks that the count
  slot equals the number of members, and answers once per round, after noise flooding and
  rounding (`veil.privacy.he.release`).

A ciphertext added to itself, scaled, replayed from another round, or a set of fewer members
than the quorum is refused. Because every member of a released sum must have confirmed it and
a member confirms one set per round, two sets a malicious server gets decrypted in one round
share no member: it cannot learn one client's update as the difference of two sums. The cost:
each decryptor downloads every member's ciphertexts (n uploads) instead of one sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from veil.crypto.identity import IdentityKey, IdentityPublicKey, SignatureRejected
from veil.errors import VeilError
from veil.federation.messages import FitResult, ProtocolInstruction
from veil.federation.pipeline import RoundContext
from veil.privacy.he.aggregator import ENCRYPTED
from veil.privacy.he.ckks import (
    CkksError,
    Packing,
    add_frames,
    decrypt_frames,
    encrypt_frames,
    load_secret_context,
    read_frames,
    write_frames,
)
from veil.privacy.he.keys import SecretKeySet
from veil.privacy.he.release import flood_and_round
from veil.privacy.he.settings import CkksSettings
from veil.privacy.he.wire import (
    CONFIRM,
    DECRYPT,
    Confirmation,
    ConfirmRequest,
    DecryptReply,
    DecryptRequest,
    Member,
    confirmation_payload,
    member_set_digest,
    upload_digest,
)
from veil.privacy.secagg.layout import UpdateLayout


class Roster(Protocol):
    """Where a member learns its peers' identity keys (never from the server): the run's table
    in a simulation, CA-signed certificates in a deployment
    (`veil.privacy.secagg.roster.StaticRoster` and `CertificateRoster` fit)."""

    def credential(self) -> bytes:
        """What this client attaches to its confirmation for its peers to check."""
        ...

    def identity(self, name: str, credential: bytes) -> IdentityPublicKey:
        """Peer `name`'s identity key, or a VeilError if `credential` does not prove it."""
        ...


@dataclass
class _Round:
    """What a member remembers of the one round it last uploaded to."""

    run_id: str
    round: int
    digest: bytes
    confirmed: bytes | None = None
    answered: bool = False


class CkksParticipant:
    """One client's CKKS: encrypts its updates, confirms and decrypts a round's sum when asked."""

    name = "ckks"

    def __init__(
        self,
        client: str,
        keys: SecretKeySet,
        settings: CkksSettings,
        layout: UpdateLayout,
        identity: IdentityKey,
        roster: Roster,
    ) -> None:
        if keys.params != settings.params:
            raise CkksError("the client's CKKS key set was made for other parameters")
        self.client = client
        self.keys = keys
        self.settings = settings
        self.layout = layout
        self.identity = identity
        self.roster = roster
        self.context = load_secret_context(keys.context, settings.params)
        self.packing = Packing(settings.params, settings.vector_length(layout))
        self._round: _Round | None = None
        self._sealed: set[tuple[str, int]] = set()

    def seal(self, result: FitResult, context: RoundContext) -> FitResult:
        """Clip, weight and encrypt the update; only the ciphertext frames leave. One upload per
        round: a second one would let a server hold two ciphertexts of this client to pair
        with different members."""
        slot = (context.run_id, context.round)
        if slot in self._sealed:
            raise CkksError(f"a second CKKS upload for round {context.round}: refused")
        s = self.settings
        weight = min(float(result.weight), s.max_weight)
        values = self.layout.flatten(result.update)
        clipped = int(np.count_nonzero(np.abs(values) > s.clip_range))
        np.clip(values, -s.clip_range, s.clip_range, out=values)
        values *= weight
        parts = [values, np.array([weight])]
        if self.layout.sum_keys:
            bounds = np.array([s.sum_bounds[k] for k in self.layout.sum_keys], np.float64)
            parts.append(np.clip(self.layout.sums_vector(result.sums), -bounds, bounds))
        # The tail (settings.TAIL): clipped fraction, capped flag, count; summed, never sent.
        capped = float(float(result.weight) > s.max_weight)
        parts.append(np.array([clipped / max(self.layout.parameter_count, 1), capped, 1.0]))
        blob = write_frames(encrypt_frames(self.context, np.concatenate(parts)), self.packing)
        self._sealed.add(slot)
        self._round = _Round(context.run_id, context.round, upload_digest(blob.tobytes()))
        return FitResult(
            client=result.client,
            round=result.round,
            update={ENCRYPTED: blob},
            weight=0.0,
            num_examples=0,
        )

    def handle(self, instruction: ProtocolInstruction) -> bytes:
        if instruction.stage == CONFIRM:
            return self._confirm(instruction)
        if instruction.stage == DECRYPT:
            return self._decrypt(instruction)
        raise CkksError(f"unknown CKKS step '{instruction.stage}'")

    def _confirm(self, instruction: ProtocolInstruction) -> bytes:
        request = ConfirmRequest.from_bytes(instruction.body)
        current = self._check_set(
            instruction, request.run_id, request.round, request.key_id, request.members
        )
        digest = member_set_digest(request.run_id, request.round, request.key_id, request.members)
        if current.confirmed is not None and current.confirmed != digest:
            raise CkksError(
                f"the server asks to confirm a second, different member set for round "
                f"{request.round}: refused (two overlapping sums would reveal their difference)"
            )
        current.confirmed = digest
        payload = confirmation_payload(
            request.run_id, request.round, request.key_id, self.client, digest
        )
        signature = self.identity.sign(payload)
        return Confirmation(self.client, signature, self.roster.credential()).to_bytes()

    def _decrypt(self, instruction: ProtocolInstruction) -> bytes:
        request = DecryptRequest.from_bytes(instruction.body)
        members = tuple(Member(m.name, m.digest) for m in request.members)
        current = self._check_set(
            instruction, request.run_id, request.round, request.key_id, members
        )
        if current.answered:
            raise CkksError(
                f"a second decryption request for round {request.round}: refused (averaging "
                "several releases would strip the flooding noise)"
            )
        current.answered = True
        digest = member_set_digest(request.run_id, request.round, request.key_id, members)
        if current.confirmed != digest:
            raise CkksError(
                "refusing to decrypt: this is not the member set this client confirmed for "
                f"round {request.round}"
            )
        uploads = request.split_uploads(self.packing.nbytes)
        for member, upload in zip(request.members, uploads, strict=True):
            if upload_digest(upload) != member.digest:
                raise CkksError(
                    f"refusing to decrypt: the upload given for {member.name!r} is not the one "
                    "it signed (altered, scaled or swapped)"
                )
            try:
                key = self.roster.identity(member.name, member.credential)
                key.verify(
                    member.signature,
                    confirmation_payload(
                        request.run_id, request.round, request.key_id, member.name, digest
                    ),
                )
            except SignatureRejected:
                raise CkksError(
                    f"refusing to decrypt: {member.name!r} did not sign this member set "
                    "(forged, or made for another set, round, run or key)"
                ) from None
            except VeilError as exc:
                raise CkksError(f"refusing to decrypt: member {member.name!r}: {exc}") from None
        total = None
        for upload in uploads:
            frames = read_frames(self.context, np.frombuffer(upload, np.uint8), self.packing)
            if total is None:
                total = frames
            else:
                add_frames(self.context, total, frames)
        assert total is not None  # _check_set: at least the quorum (>= 2) of members
        values = decrypt_frames(self.context, total, self.packing)
        count = len(members)
        if abs(float(values[-1]) - count) >= 0.5:
            raise CkksError(
                f"refusing to release a sum whose count slot says {values[-1]:.3f} for "
                f"{count} members: the ciphertexts are not genuine uploads of this key"
            )
        s = self.settings
        released = flood_and_round(
            values,
            release_key=self.keys.release_key,
            run_id=request.run_id,
            round_=request.round,
            digest=digest,
            std=s.flood_std(count),
            step=s.release_step(count),
        )
        return DecryptReply(self.client, self.keys.key_id, released).to_bytes()

    def _check_set(
        self,
        instruction: ProtocolInstruction,
        run_id: str,
        round_: int,
        key_id: str,
        members: tuple[Member, ...],
    ) -> _Round:
        """This client's record of the round, if the member set is one it may confirm or
        decrypt: this run, round and key; distinct names and uploads; at least the quorum of
        its own settings; its own upload of this round among them, unchanged."""
        if (run_id, round_) != (instruction.run_id, instruction.round):
            raise CkksError("the request names another run or round")
        if key_id != self.keys.key_id:
            raise CkksError(
                f"the sum is encrypted under key {key_id!r}, this client holds {self.keys.key_id!r}"
            )
        current = self._round
        if current is None or (current.run_id, current.round) != (run_id, round_):
            raise CkksError(f"this client sent no CKKS upload in round {round_}")
        names = [m.name for m in members]
        if len(set(names)) != len(names):
            raise CkksError("refusing a member set that names a member twice")
        if len({m.digest for m in members}) != len(members):
            raise CkksError("refusing a member set that holds the same ciphertext twice")
        quorum = self.settings.quorum
        if len(members) < quorum:
            raise CkksError(
                f"refusing a sum of {len(members)} member(s): this client releases only sums "
                f"of at least {quorum} distinct members"
            )
        own = [m for m in members if m.name == self.client]
        if not own or own[0].digest != current.digest:
            raise CkksError(
                f"refusing a member set without this client's own upload of round {round_}"
            )
        return current
