"""The server half of SecAgg in a federation: an `Aggregator` that sees only masked vectors.

`SecAggAggregator.start` runs the key exchange with the round's selected clients through the
round's `ProtocolChannel` before they train; its accumulator adds masked vectors as they arrive
(one running sum mod 2^k); `finish` asks the survivors for the shares that remove the masks and
decodes the sum into the `Aggregate` the strategy steps with. The server process never holds an
individual unmasked update, only masked vectors and the final sum.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

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
from veil.privacy.secagg.errors import SecAggError
from veil.privacy.secagg.layout import MASKED, UpdateLayout
from veil.privacy.secagg.messages import ConsistencySignature, EncryptedShares, UnmaskReply
from veil.privacy.secagg.protocol import RoundParams, ServerSession
from veil.privacy.secagg.settings import (
    CLIPPED_FRACTION,
    WEIGHT_CAPPED,
    SecAggSettings,
    params_to_bytes,
)
from veil.privacy.secagg.wire import (
    DELIVER,
    SETUP,
    SHARE,
    SIGN,
    UNMASK,
    Advertised,
    KeyBundle,
    shares_to_bytes,
)
from veil.tensors import NamedArrays


class SecAggAggregator:
    """Secure aggregation by masking (Bonawitz et al. 2017; SecAgg+ of Bell et al. 2020)."""

    name = "secagg"

    def __init__(self, settings: SecAggSettings, layout: UpdateLayout) -> None:
        settings.check_layout(layout)
        self.settings = settings
        self.layout = layout

    def start(
        self,
        reference: NamedArrays,
        context: RoundContext,
        channel: ProtocolChannel | None = None,
    ) -> Accumulator:
        channel = require_channel(channel, "secure aggregation")
        self.layout.check_reference(reference, "secure aggregation")
        return _SecAggAccumulator(context, self.settings, self.layout, channel)


class _SecAggAccumulator:
    def __init__(
        self,
        context: RoundContext,
        settings: SecAggSettings,
        layout: UpdateLayout,
        channel: ProtocolChannel,
    ) -> None:
        self.layout = layout
        self.channel = channel
        self.participants: list[str] = []
        self._report: dict[str, Any] = {
            "protocol": settings.protocol,
            "threshold": settings.round_threshold,
            "neighbours": settings.neighbours,
            "modulus_bits": settings.modulus_bits,
        }
        self._error: str | None = None
        try:
            self.params: RoundParams = settings.plan_round(
                context.run_id, context.round, context.clients, layout
            )
            self.session = ServerSession(self.params)
            self._report["step"] = self.params.fixed_point.step
            self._key_exchange()
        except SecAggError as exc:
            self._error = str(exc)
            self.participants = []

    def _key_exchange(self) -> None:
        """Set-up, key sharing and share delivery; `participants` are the clients that got
        their shares and may now train."""
        clients = self.params.clients
        announcement = params_to_bytes(self.params)
        replies = self.channel.exchange(SETUP, {c: announcement for c in clients})
        credentials = _accepted(
            replies,
            Advertised.from_bytes,
            lambda a: a.advertisement.client,
            lambda a: self.session.collect(a.advertisement),
        )
        self.session.advertisements()  # closes key collection
        # Every client gets every advertisement: each checks all views, and derives the graph.
        bundle = KeyBundle(credentials).to_bytes()
        shared = _accepted(
            self.channel.exchange(SHARE, dict.fromkeys(credentials, bundle)),
            EncryptedShares.from_bytes,
            lambda s: s.sender,
            self.session.route,
        )
        # Only clients whose own shares went out may mask: their peers mask with them.
        routed = {client: self.session.shares_for(client) for client in shared}
        deliveries = {c: shares_to_bytes(s) for c, s in routed.items()}
        self.participants = sorted(self.channel.exchange(DELIVER, deliveries))

    def add(self, result: FitResult) -> None:
        if self._error is not None:
            raise UpdateRejected(f"the round's key exchange failed: {self._error}")
        if set(result.update) != {MASKED}:
            raise UpdateRejected(
                f"a secure aggregation update carries one masked vector '{MASKED}', got "
                f"{sorted(result.update)}"
            )
        try:
            self.session.add_masked(result.client, result.update[MASKED])
        except SecAggError as exc:
            raise UpdateRejected(str(exc)) from None

    def finish(self) -> Aggregate:
        if self._error is not None:
            raise AggregationFailed(f"secure aggregation: {self._error}")
        try:
            request = self.session.unmask_request()
            body = request.to_bytes()
            signed = self.channel.exchange(SIGN, dict.fromkeys(sorted(request.survivors), body))
            _accepted(
                signed,
                ConsistencySignature.from_bytes,
                lambda m: m.client,
                self.session.add_signature,
            )
            check = self.session.consistency_check()
            body = check.to_bytes()
            replies = self.channel.exchange(UNMASK, dict.fromkeys(sorted(check.signatures), body))
            _accepted(
                replies, UnmaskReply.from_bytes, lambda m: m.client, self.session.add_unmask_reply
            )
            total = self.session.finish()
        except SecAggError as exc:
            raise AggregationFailed(f"secure aggregation: {exc}") from None
        summary = self.session.summary()
        update, weight, sums = self.layout.split(self.params.fixed_point.decode(total))
        clipped = sums.pop(CLIPPED_FRACTION) * self.layout.parameter_count
        capped = sums.pop(WEIGHT_CAPPED)
        self._report.update(
            # Sums over the survivors, decoded from the masked vector (stochastic rounding:
            # within a few quantisation steps of the true counts).
            clipped=max(0, round(clipped)),
            weights_capped=max(0, round(capped)),
            survivors=len(summary.survivors),
            recovered_dropouts=len(summary.dropped),
            dropped_before_masking=len(summary.dropped_early),
        )
        return Aggregate(
            total=update,
            weight=weight,
            count=len(summary.survivors),
            sums=sums,
            report=self._report,
        )


_M = TypeVar("_M")


def _accepted(
    replies: Mapping[str, bytes],
    parse: Callable[[bytes], _M],
    author: Callable[[_M], str],
    accept: Callable[[_M], object],
) -> dict[str, _M]:
    """The replies the session accepted, by client. A malformed reply, one in another client's
    name, or one the session refuses drops that client from the step (and so from the round)."""
    accepted = {}
    for client, body in replies.items():
        try:
            message = parse(body)
            if author(message) != client:
                raise SecAggError(f"{client!r} answered in another client's name")
            accept(message)
        except SecAggError:
            continue
        accepted[client] = message
    return accepted
