"""The server half of CKKS aggregation: an `Aggregator` that adds ciphertexts it cannot read.

`CkksAggregator.start` needs nothing from the clients before they train. Its accumulator
parses each client's encrypted vector (fixed size, checked before parsing), and adds it to one
running encrypted sum; `finish` sends the sum to a quorum of decryptor clients through the
round's `ProtocolChannel`, checks that their answers agree and that the count slot decrypts to
the number of ciphertexts added (the precision check), and decodes the `Aggregate`. The server
holds a context without keys: it never holds the secret key, an individual update, or anything
it could decrypt on its own.
"""

from __future__ import annotations

import secrets
from typing import Any

import numpy as np
import numpy.typing as npt
import tenseal as ts

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
from veil.privacy.he.ckks import (
    CkksError,
    Packing,
    join_frames,
    load_public_context,
    read_frames,
)
from veil.privacy.he.keys import PublicKeySet
from veil.privacy.he.settings import CkksSettings
from veil.privacy.he.wire import DECRYPT, DecryptReply, DecryptRequest
from veil.privacy.secagg.layout import UpdateLayout
from veil.tensors import NamedArrays

#: The name of the one tensor an encrypted upload carries (uint8: the frames).
ENCRYPTED = "ckks/encrypted"
#: Per-client metrics (counts, not values): clipped coordinates, capped weight.
CLIPPED = "ckks_clipped"
WEIGHT_CAPPED = "ckks_weight_capped"


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
        self._sum: list[ts.CKKSVector] | None = None
        self._added: list[str] = []
        self._report: dict[str, Any] = {
            **aggregator.settings.report(),
            "key_id": aggregator.keys.key_id,
            "ciphertexts_per_client": aggregator.packing.ciphertexts,
            "clipped": 0,
            "weights_capped": 0,
        }

    def add(self, result: FitResult) -> None:
        if set(result.update) != {ENCRYPTED}:
            raise UpdateRejected(
                f"a CKKS update carries one encrypted vector '{ENCRYPTED}', got "
                f"{sorted(result.update)}"
            )
        try:
            frames = read_frames(self.agg.context, result.update[ENCRYPTED], self.agg.packing)
        except CkksError as exc:
            raise UpdateRejected(str(exc)) from None
        if self._sum is None:
            self._sum = frames
        else:
            for total, frame in zip(self._sum, frames, strict=True):
                total.add_(frame)
        self._added.append(result.client)
        self._report["clipped"] += int(result.metrics.get(CLIPPED, 0))
        self._report["weights_capped"] += int(result.metrics.get(WEIGHT_CAPPED, 0))

    def finish(self) -> Aggregate:
        s = self.agg.settings
        count = len(self._added)
        if self._sum is None or count < 2:
            raise AggregationFailed(
                f"CKKS: {count} encrypted update(s) arrived; a sum of fewer than 2 is never "
                "decrypted (it would be one client's update)"
            )
        if count < s.decryptors:
            raise AggregationFailed(
                f"CKKS: {count} clients contributed, fewer than the {s.decryptors} decryptors"
            )
        frames = join_frames([v.serialize() for v in self._sum])
        request = DecryptRequest(
            self.round.run_id, self.round.round, self.agg.keys.key_id, count, frames
        ).to_bytes()
        chosen = secrets.SystemRandom().sample(self._added, s.decryptors)
        replies = self.channel.exchange(DECRYPT, {c: request for c in chosen})
        values = self._agree(replies, count)
        self._report.update(
            decryptors_asked=sorted(chosen),
            decryptors_answered=sorted(replies),
            flood_std=s.flood_std(count),
            release_step=s.release_step(count),
            tolerance=s.tolerance(count),
            count_slot_error=float(abs(values[-1] - count)),
        )
        update, weight, sums = self.agg.layout.split(values[:-1])
        return Aggregate(total=update, weight=weight, count=count, sums=sums, report=self._report)

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
