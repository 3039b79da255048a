"""The server half of CKKS aggregation: an `Aggregator` that relays ciphertexts it cannot read.

`CkksAggregator.start` needs nothing from the clients before they train. Its accumulator
parses each client's encrypted vector (fixed size, checked before parsing) and keeps it, as
sent. `finish` runs the two decryption steps through the round's `ProtocolChannel`
(`veil.privacy.he.wire`): every member confirms, with a signature, the round's member set
(each name and the SHA-256 of its upload); then `decryptors` members chosen at random receive
every member's upload with the signatures, verify them, add the ciphertexts themselves and
release the flooded sum (`veil.privacy.he.participant`). The server checks that their answers
agree and that the count slot decrypts to the number of members (the precision check), and
decodes the `Aggregate`, including the sums of the clipped-fraction and weight-capped slots: no
per-client metric reaches it in the clear.

The server holds a context without keys: it never holds the secret key, an individual update
in the clear, or anything it could decrypt on its own, and a decryptor releases only a sum it
verified. The cost of that verification: the server keeps every upload of the round until it
finishes, and each decryptor downloads all of them (n uploads instead of one sum). A member
that drops out between its upload and the confirmation fails the round (the model is
unchanged): a member confirms one set per round, so the round cannot be retried without it.
"""

from __future__ import annotations

import secrets
from typing import Any

import numpy as np
import numpy.typing as npt

from veil.federation.messages import FitResult
from veil.federation.pipeline import (
    Accumulator,
    Aggregate,
    AggregationFailed,
    ProtocolChannel,
    RoundContext,
    UpdateRejected,
    require_channel,
)
from veil.privacy.he.ckks import CkksError, Packing, load_public_context, read_frames
from veil.privacy.he.keys import PublicKeySet
from veil.privacy.he.settings import TAIL, CkksSettings
from veil.privacy.he.wire import (
    CONFIRM,
    DECRYPT,
    Confirmation,
    ConfirmRequest,
    DecryptReply,
    DecryptRequest,
    Member,
    SignedMember,
    upload_digest,
)
from veil.privacy.secagg.layout import UpdateLayout
from veil.tensors import NamedArrays

#: The name of the one tensor an encrypted upload carries (uint8: the frames).
ENCRYPTED = "ckks/encrypted"


def encrypted_reference(settings: CkksSettings, layout: UpdateLayout) -> dict[str, np.ndarray]:
    """What an encrypted upload must look like (for a transport's checks), as a zero-stride
    stand-in: one uint8 vector of exactly the frames' size."""
    packing = Packing(settings.params, settings.vector_length(layout))
    return {ENCRYPTED: np.broadcast_to(np.uint8(0), (packing.nbytes,))}


class CkksAggregator:
    """Homomorphic aggregation under CKKS (Cheon et al. 2017) with a decryptor quorum."""

    name = "ckks"

    def __init__(self, settings: CkksSettings, layout: UpdateLayout, keys: PublicKeySet) -> None:
        self.settings = settings
        self.layout = layout
        self.keys = keys
        # Refuses a context with a secret key before the first round.
        self.context = load_public_context(keys.context, settings.params)
        self.packing = Packing(settings.params, settings.vector_length(layout))

    def start(
        self,
        reference: NamedArrays,
        context: RoundContext,
        channel: ProtocolChannel | None = None,
    ) -> Accumulator:
        channel = require_channel(channel, "CKKS aggregation")
        self.layout.check_reference(reference, "CKKS")
        return _CkksAccumulator(self, context, channel)


class _CkksAccumulator:
    def __init__(
        self, aggregator: CkksAggregator, context: RoundContext, channel: ProtocolChannel
    ) -> None:
        self.agg = aggregator
        self.round = context
        self.channel = channel
        self.participants = list(context.clients)
        self._uploads: dict[str, bytes] = {}
        self._report: dict[str, Any] = {
            **aggregator.settings.report(),
            "key_id": aggregator.keys.key_id,
            "ciphertexts_per_client": aggregator.packing.ciphertexts,
        }

    def add(self, result: FitResult) -> None:
        if set(result.update) != {ENCRYPTED}:
            raise UpdateRejected(
                f"a CKKS update carries one encrypted vector '{ENCRYPTED}', got "
                f"{sorted(result.update)}"
            )
        if result.client in self._uploads:
            raise UpdateRejected(f"a second CKKS upload from {result.client!r} this round")
        blob = result.update[ENCRYPTED]
        try:
            read_frames(self.agg.context, blob, self.agg.packing)
        except CkksError as exc:
            raise UpdateRejected(str(exc)) from None
        self._uploads[result.client] = blob.tobytes()

    def finish(self) -> Aggregate:
        s = self.agg.settings
        count = len(self._uploads)
        if count < s.quorum:
            raise AggregationFailed(
                f"CKKS: {count} encrypted update(s) arrived; the decryptors release only sums "
                f"of at least {s.quorum} members (a sum of one would be one client's update)"
            )
        run_id, rnd, key_id = self.round.run_id, self.round.round, self.agg.keys.key_id
        names = sorted(self._uploads)
        members = tuple(Member(n, upload_digest(self._uploads[n])) for n in names)
        signed = self._confirm(members)
        request = DecryptRequest(
            run_id, rnd, key_id, signed, b"".join(self._uploads[n] for n in names)
        ).to_bytes()
        chosen = secrets.SystemRandom().sample(names, s.decryptors)
        replies = self.channel.exchange(DECRYPT, {c: request for c in chosen})
        values = self._agree(replies, count)
        tail = values[-len(TAIL) :]
        self._report.update(
            decryptors_asked=sorted(chosen),
            decryptors_answered=sorted(replies),
            flood_std=s.flood_std(count),
            release_step=s.release_step(count),
            tolerance=s.tolerance(count),
            count_slot_error=float(abs(tail[2] - count)),
            clipped=max(0, round(float(tail[0]) * self.agg.layout.parameter_count)),
            weights_capped=max(0, round(float(tail[1]))),
        )
        update, weight, sums = self.agg.layout.split(values[: -len(TAIL)])
        return Aggregate(total=update, weight=weight, count=count, sums=sums, report=self._report)

    def _confirm(self, members: tuple[Member, ...]) -> tuple[SignedMember, ...]:
        """Every member's signed confirmation of the member set; AggregationFailed if one is
        missing (a decryptor releases a sum only when every member of it has confirmed)."""
        request = ConfirmRequest(
            self.round.run_id, self.round.round, self.agg.keys.key_id, members
        ).to_bytes()
        replies = self.channel.exchange(CONFIRM, {m.name: request for m in members})
        signed, missing = [], []
        for m in members:
            try:
                reply = Confirmation.from_bytes(replies[m.name])
            except (KeyError, CkksError):
                missing.append(m.name)
                continue
            if reply.client != m.name:
                missing.append(m.name)
                continue
            signed.append(SignedMember(m.name, m.digest, reply.signature, reply.credential))
        if missing:
            raise AggregationFailed(
                f"CKKS: {sorted(missing)} did not confirm the round's member set, so no "
                "decryptor will release its sum (a member confirms one set per round)"
            )
        return tuple(signed)

    def _agree(self, replies: dict[str, bytes], count: int) -> npt.NDArray[np.float64]:
        """The decryptors' common answer, after the quorum and precision checks."""
        s = self.agg.settings
        answers = []
        for client, body in sorted(replies.items()):
            try:
                reply = DecryptReply.from_bytes(body)
            except CkksError:
                continue
            if reply.client == client and reply.key_id == self.agg.keys.key_id:
                answers.append(reply.values)
        if len(answers) < s.decryptors:
            raise AggregationFailed(
                f"CKKS: {len(answers)} of the {s.decryptors} decryptors returned a usable sum"
            )
        expected = self.agg.packing.length
        if any(a.shape != (expected,) for a in answers):
            raise AggregationFailed(f"CKKS: a decrypted sum does not have {expected} values")
        tolerance = s.tolerance(count)
        first = answers[0]
        spread = max(float(np.max(np.abs(a - first))) for a in answers)
        if spread > tolerance:
            raise AggregationFailed(
                f"CKKS: the decryptors' answers differ by {spread:.3g}, more than the tolerance "
                f"{tolerance:.3g}: a decryptor is faulty or holds another key"
            )
        if abs(first[-1] - count) > tolerance:
            raise AggregationFailed(
                f"CKKS precision check failed: the count slot decrypts to {first[-1]:.6g} for "
                f"{count} ciphertexts (tolerance {tolerance:.3g}); the sum wrapped around or the "
                "keys do not match"
            )
        return first
