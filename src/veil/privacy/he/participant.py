"""The client half of CKKS aggregation: encrypts the update and, as a decryptor, releases sums.

`CkksParticipant` is a `veil.federation.pipeline.ClientProtocol`. `seal` clips and weights the
update, lays it out as [w·Δ | w | sums | 1] (the `UpdateLayout` SecAgg uses, plus a count slot)
and encrypts it under the run's secret key; only the ciphertext frames leave the client.
`handle` answers the server's decryption request when this client is in the round's quorum:
at most once per round, never for a sum of fewer than 2 contributions, and only after noise
flooding and rounding (`veil.privacy.he.release`).
"""

from __future__ import annotations

import numpy as np

from veil.federation.messages import FitResult, ProtocolInstruction
from veil.federation.pipeline import RoundContext
from veil.privacy.he.aggregator import CLIPPED, ENCRYPTED, WEIGHT_CAPPED
from veil.privacy.he.ckks import (
    CkksError,
    Packing,
    decrypt_frames,
    encrypt_frames,
    load_secret_context,
    parse_frames,
    split_frames,
    write_frames,
)
from veil.privacy.he.keys import SecretKeySet
from veil.privacy.he.release import ciphertext_digest, flood_and_round
from veil.privacy.he.settings import CkksSettings
from veil.privacy.he.wire import DECRYPT, DecryptReply, DecryptRequest
from veil.privacy.secagg.layout import UpdateLayout


class CkksParticipant:
    """One client's CKKS: encrypts its updates, decrypts a round's sum when asked."""

    name = "ckks"

    def __init__(
        self, client: str, keys: SecretKeySet, settings: CkksSettings, layout: UpdateLayout
    ) -> None:
        if keys.params != settings.params:
            raise CkksError("the client's CKKS key set was made for other parameters")
        self.client = client
        self.keys = keys
        self.settings = settings
        self.layout = layout
        self.context = load_secret_context(keys.context, settings.params)
        self.packing = Packing(settings.params, settings.vector_length(layout))
        self._answered: set[tuple[str, int]] = set()

    def seal(self, result: FitResult, context: RoundContext) -> FitResult:
        """Clip, weight and encrypt the update; only the ciphertext frames leave."""
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
        parts.append(np.ones(1))
        blob = write_frames(encrypt_frames(self.context, np.concatenate(parts)), self.packing)
        return FitResult(
            client=result.client,
            round=result.round,
            update={ENCRYPTED: blob},
            weight=0.0,
            num_examples=0,
            metrics={
                CLIPPED: float(clipped),
                WEIGHT_CAPPED: float(float(result.weight) > s.max_weight),
            },
        )

    def handle(self, instruction: ProtocolInstruction) -> bytes:
        if instruction.stage != DECRYPT:
            raise CkksError(f"unknown CKKS step '{instruction.stage}'")
        request = DecryptRequest.from_bytes(instruction.body)
        if (request.run_id, request.round) != (instruction.run_id, instruction.round):
            raise CkksError("the decryption request names another run or round")
        if request.key_id != self.keys.key_id:
            raise CkksError(
                f"the sum is encrypted under key {request.key_id!r}, this client holds "
                f"{self.keys.key_id!r}"
            )
        slot = (request.run_id, request.round)
        if slot in self._answered:
            raise CkksError(
                f"a second decryption request for round {request.round}: refused (averaging "
                "several releases would strip the flooding noise)"
            )
        self._answered.add(slot)
        frames = parse_frames(self.context, split_frames(request.frames), self.packing)
        values = decrypt_frames(frames)
        count = round(float(values[-1]))
        if count < 2 or abs(count - request.count) > 0:
            raise CkksError(
                f"refusing to release a sum whose count slot says {values[-1]:.3f} "
                f"contributions (the server says {request.count}); a sum of fewer than 2 "
                "would be one client's update"
            )
        s = self.settings
        released = flood_and_round(
            values,
            release_key=self.keys.release_key,
            run_id=request.run_id,
            round_=request.round,
            digest=ciphertext_digest(request.frames),
            std=s.flood_std(count),
            step=s.release_step(count),
        )
        return DecryptReply(self.client, self.keys.key_id, released).to_bytes()
