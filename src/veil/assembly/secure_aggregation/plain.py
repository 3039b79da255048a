"""`secure_aggregation = "plain"`: the server sums the clients' updates in the clear."""

from __future__ import annotations

from veil.assembly.secure_aggregation.base import SecureAggregation, ServerInputs, Session


class Plain(SecureAggregation):
    """The weighted sum (or `[robust]`'s rule) over updates the server reads."""

    hides_updates = False

    def start(self, inputs: ServerInputs) -> Session:
        """The default session: the clear aggregator, no client steps, nothing to record."""
        return Session()


BACKEND = Plain()
