"""The client half of SecAgg in a federation: answers the protocol's steps and masks the update.

`SecAggParticipant` is a `veil.federation.pipeline.ClientProtocol`: the `ClientRunner` passes it
the server's steps (`handle`) and, after local training and every client stage, its update
(`seal`), which leaves the client only as a masked integer vector.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from veil.crypto.identity import IdentityKey
from veil.federation.messages import FitResult, ProtocolInstruction
from veil.federation.pipeline import RoundContext
from veil.privacy.dp.randomness import RandomSource, SecureRandom, require_secure
from veil.privacy.secagg.errors import ProtocolError
from veil.privacy.secagg.layout import MASKED, UpdateLayout
from veil.privacy.secagg.messages import ConsistencyCheck, UnmaskRequest
from veil.privacy.secagg.protocol import ClientSession
from veil.privacy.secagg.quantize import UIntArray
from veil.privacy.secagg.roster import Roster
from veil.privacy.secagg.settings import (
    CLIPPED_FRACTION,
    WEIGHT_CAPPED,
    SecAggSettings,
    params_from_bytes,
)
from veil.privacy.secagg.wire import (
    DELIVER,
    SETUP,
    SHARE,
    SIGN,
    UNMASK,
    Advertised,
    KeyBundle,
    shares_from_bytes,
)
from veil.tensors import check_compatible


class SecAggParticipant:
    """One client's SecAgg: one `ClientSession` per round, driven by the server's steps.

    `random` draws the stochastic rounding of the fixed-point encoding (default: a fresh
    `SecureRandom`), which is part of the privacy argument when the clients add distributed DP
    noise on the integers; in `production` (the default) a seeded source is refused with a
    `ConfigError`. Tests pass ``production=False``.
    """

    name = "secagg"

    def __init__(
        self,
        client: str,
        identity: IdentityKey,
        roster: Roster,
        settings: SecAggSettings,
        layout: UpdateLayout,
        *,
        random: RandomSource | None = None,
        production: bool = True,
    ) -> None:
        random = random if random is not None else SecureRandom()
        require_secure(random, production=production, what="secure aggregation's rounding")
        settings.check_layout(layout)
        self.client = client
        self.identity = identity
        self.roster = roster
        self.settings = settings
        self.layout = layout
        self.random = random
        self._session: ClientSession | None = None

    def handle(self, instruction: ProtocolInstruction) -> bytes:
        stage, body = instruction.stage, instruction.body
        if stage == SETUP:
            params = params_from_bytes(body)
            if params.run_id != instruction.run_id or params.round != instruction.round:
                raise ProtocolError("the round announcement names another run or round")
            self.settings.check_round(params, self.layout)
            # A new round replaces the last one's session: its secrets are gone for good.
            self._session = ClientSession(self.client, self.identity, params)
            advertised = Advertised(self._session.advertise(), self.roster.credential())
            return advertised.to_bytes()
        session = self._current(instruction)
        if stage == SHARE:
            bundle = KeyBundle.from_bytes(body).advertisements
            identities = {
                peer: self.roster.identity(peer, a.credential)
                for peer, a in bundle.items()
                if peer != self.client
            }
            ads = {peer: a.advertisement for peer, a in bundle.items()}
            return session.share_keys(ads, identities).to_bytes()
        if stage == DELIVER:
            session.receive_shares(shares_from_bytes(body))
            return b""
        if stage == SIGN:
            return session.sign_request(UnmaskRequest.from_bytes(body)).to_bytes()
        if stage == UNMASK:
            return session.unmask(ConsistencyCheck.from_bytes(body)).to_bytes()
        raise ProtocolError(f"unknown secure aggregation step '{stage}'")

    def seal(self, result: FitResult, context: RoundContext) -> FitResult:
        """Encode the update (weight folded in) and mask it; only the masked vector leaves (the
        clipping and weight-cap counters travel inside it, summed)."""
        session = self._session
        if session is None or session.params.round != context.round:
            raise ProtocolError(
                f"no secure aggregation set-up for round {context.round}: the server must run "
                "the key exchange before asking for an update"
            )
        masked = session.mask(self._encode(result, session))
        return FitResult(
            client=result.client,
            round=result.round,
            update={MASKED: masked},
            weight=0.0,
            num_examples=0,
        )

    def _current(self, instruction: ProtocolInstruction) -> ClientSession:
        session = self._session
        if session is None or session.params.round != instruction.round:
            raise ProtocolError(
                f"'{instruction.stage}' for round {instruction.round} without its set-up"
            )
        return session

    def _encode(self, result: FitResult, session: ClientSession) -> UIntArray:
        """[w·Δ | w | sums] as residues, each parameter encoded straight into its slice of the
        vector; under distributed DP with this client's noise added. The sums include the
        fraction of coordinates clipped and whether the weight was capped."""
        s, params, layout = self.settings, session.params, self.layout
        fixed = params.fixed_point
        check_compatible(layout.reference_view(), result.update)
        noise = s.noise(layout, len(params.clients))
        if noise is not None:
            weight, capped, bound = 1.0, False, noise.clip_norm
        else:
            weight = min(float(result.weight), s.max_weight)
            capped = float(result.weight) > s.max_weight
            bound = max(weight, 1e-12) * s.clip_range
        vector = np.empty(layout.length, fixed.dtype)
        clipped, offset = 0, 0
        for name in layout.names:
            values = result.update[name].reshape(-1)
            part = vector[offset : offset + values.size]
            clipped += fixed.encode(values, bound, self.random, scale=weight, out=part).clipped
            offset += values.size
        if noise is not None:
            # Each client's share of the noise, added in the integer domain mod 2^k, scaled to
            # the round's actual step (`check_round` refused a step finer than planned).
            actual = replace(noise, fixed_point=fixed)
            fixed.add_mod(vector[:offset], actual.noise(params.threshold).astype(fixed.dtype))
        weight_bound = 1.0 if noise is not None else s.max_weight
        fixed.encode(np.array([weight]), weight_bound, self.random, out=vector[offset : offset + 1])
        if layout.sum_keys:
            bounds = np.array([s.sum_bounds[k] for k in layout.sum_keys], np.float64)
            counters = {CLIPPED_FRACTION: clipped / max(offset, 1), WEIGHT_CAPPED: float(capped)}
            sums = layout.sums_vector({**result.sums, **counters})
            fixed.encode(sums, bounds, self.random, out=vector[offset + 1 :])
        return vector
