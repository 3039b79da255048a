"""The update pipeline: the stages an update passes between local training and the global step.

    client: train → [client stages: clip → noise → quantize → mask | encrypt] → send
    server: receive → verify → sum (the aggregator) → [server stages: unmask | decrypt →
            dequantize → noise] → strategy step

Privacy mechanisms plug in as stages or as a different aggregator; strategies never see which ones
ran. The aggregator accumulates updates one at a time, so the server holds one running sum rather
than one copy of the model per client. Plain aggregation can also be told of updates that arrive
stacked (`StackedUpdates`, clients trained together in simulation): it then checks a stack with
the same rules in one vectorised pass and sums it with one weighted product per parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from veil.errors import VeilError
from veil.federation.messages import FitResult, ProtocolInstruction, TrainingPlan
from veil.tensors import NamedArrays, add_scaled_, check_compatible, zeros_like


@dataclass(frozen=True)
class RoundContext:
    """What a stage may know about the round it works in."""

    run_id: str
    round: int
    #: The round's training plan (on the client side; None on the server).
    plan: TrainingPlan | None = None
    #: The clients selected for the round (on the server side).
    clients: tuple[str, ...] = ()


@dataclass
class Aggregate:
    """The server's view of a round: a weighted sum of updates, not the updates themselves."""

    total: NamedArrays
    weight: float
    count: int
    #: Σ over accepted clients of each `FitResult.sums` entry.
    sums: dict[str, float] = field(default_factory=dict)
    #: What the aggregator reports about the round (e.g. SecAgg's clipped values and recovered
    #: dropouts); it goes into the round's record.
    report: dict[str, Any] = field(default_factory=dict)

    def mean(self) -> NamedArrays:
        """The weighted mean update, Σ wᵢ·Δᵢ / Σ wᵢ."""
        if self.weight <= 0:
            raise ValueError("the aggregate is empty: no update was accepted this round")
        scale = np.float32(1.0 / self.weight)
        return {name: arr * scale for name, arr in self.total.items()}


#: The largest aggregation weight an update may carry. An honest weight is a number of examples
#: (or 1 under client-level DP); this bound keeps `np.float32(weight)` and a sum of weights far
#: from float32's 3.4e38, so a weight such as 1e39 cannot become inf in the float32 sum.
MAX_WEIGHT = 1e12


def nonfinite(arrays: Mapping[str, np.ndarray]) -> str | None:
    """The name of the first floating-point array in `arrays` holding a NaN or an Inf, or None."""
    for name, arr in arrays.items():
        if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
            return name
    return None


def check_aggregate(aggregate: Aggregate) -> str | None:
    """Why `aggregate` cannot move the model (a non-finite weight or sum), or None."""
    if not (np.isfinite(aggregate.weight) and 0 < aggregate.weight <= MAX_WEIGHT * 2**20):
        return f"the summed weight {aggregate.weight} is not a finite positive number"
    name = nonfinite(aggregate.total)
    if name is not None:
        return f"the summed update of '{name}' is not finite (NaN or Inf)"
    if not all(np.isfinite(v) for v in aggregate.sums.values()):
        return "a summed scalar is not finite (NaN or Inf)"
    return None


class UpdateRejected(VeilError, ValueError):
    """An update that cannot be used (wrong names, shapes or dtype, non-finite values, a second
    upload): the server drops it from the round, a member refuses to send it. The message is
    the reason, then what happens and what to do (`NEXT`). Also a `ValueError`, as before."""

    NEXT = (
        "the round goes on without this update; if one member's updates keep being rejected, "
        "check its data, its Veil version and its config against the coordinator's"
    )

    def __str__(self) -> str:
        return f"{super().__str__()} ({self.NEXT})"


class ProtocolMismatch(VeilError, ValueError):
    """A protocol step this party cannot take: the coordinator and this member (or the round's
    aggregator and its server) disagree on how updates are summed. A member refuses the step
    with this reason instead of crashing. Also a `ValueError`, as before."""


class AggregationFailed(VeilError, RuntimeError):
    """A round's aggregate cannot be formed (e.g. too few SecAgg survivors to unmask); the
    round leaves the global model unchanged and records the reason. The message is the reason,
    then what happens and what to do (`NEXT`). Also a `RuntimeError`, as before."""

    NEXT = (
        "the model stays as it was and the next round tries again; if rounds keep failing, "
        "the round's failures name the members that did not answer"
    )

    def __str__(self) -> str:
        return f"{super().__str__()} ({self.NEXT})"


class ProtocolChannel(Protocol):
    """A round's extra messages between an aggregator and its clients (e.g. SecAgg's key
    exchange and unmasking), carried by the transport that carries the round.

    `exchange` sends each named client its message for `stage` and returns the replies that
    arrived in time; a client missing from the result dropped out of that step.
    """

    def exchange(self, stage: str, bodies: Mapping[str, bytes]) -> dict[str, bytes]: ...


class ClientStage(Protocol):
    """A transformation of a client's update before it leaves the client."""

    name: str

    def apply(self, result: FitResult, context: RoundContext) -> FitResult: ...


def require_channel(channel: ProtocolChannel | None, what: str) -> ProtocolChannel:
    """The round's channel, for an aggregator that talks to its clients (`what`, e.g.
    "secure aggregation"); `ProtocolMismatch` if the server gave it none."""
    if channel is None:
        raise ProtocolMismatch(
            f"{what} needs a protocol channel to the clients, and this transport gives none; "
            "run it in simulation or deployment"
        )
    return channel


class ClientProtocol(Protocol):
    """The client half of an aggregator that talks to its clients (e.g. SecAgg).

    `handle` answers the aggregator's steps before training; `seal` is the last thing a client
    does to its update (e.g. encode and mask it), after every client stage.
    """

    name: str

    def handle(self, instruction: ProtocolInstruction) -> bytes: ...

    def seal(self, result: FitResult, context: RoundContext) -> FitResult: ...


class ServerStage(Protocol):
    """A transformation of the aggregate on the server, before the strategy's step."""

    name: str

    def apply(self, aggregate: Aggregate, context: RoundContext) -> Aggregate: ...


class Accumulator(Protocol):
    """One round's running aggregation: `add` each accepted update, then `finish` once.

    `participants` are the clients that may train this round: the selected ones, less those
    that dropped out of the aggregator's own set-up. `finish` raises `AggregationFailed` when
    no aggregate can be formed.
    """

    participants: list[str]

    def add(self, result: FitResult) -> None: ...

    def finish(self) -> Aggregate: ...


class Aggregator(Protocol):
    """How updates are summed: in the clear, or under masking / encryption.

    `start` may talk to the selected clients (`context.clients`) through `channel` before they
    train, and `Accumulator.finish` after they have.
    """

    name: str

    def start(
        self,
        reference: NamedArrays,
        context: RoundContext,
        channel: ProtocolChannel | None = None,
    ) -> Accumulator: ...


@dataclass(frozen=True)
class StackedUpdates:
    """Many clients' plaintext updates of one round, held stacked (e.g. trained together by
    `veil.federation.vectorised`): row i of each array is `results[i]`'s update, weight and
    summed scalars. The results' own `update` arrays may be views of those rows; neither may be
    changed once the stack is built."""

    results: tuple[FitResult, ...]
    #: Per parameter, the updates with a leading client axis: (clients, *shape).
    update: NamedArrays
    #: (clients,) the aggregation weights.
    weights: np.ndarray
    #: Per `FitResult.sums` key, (clients,) the scalars.
    sums: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def of_one(cls, result: FitResult) -> StackedUpdates:
        """`result` as a stack of one row (views of its arrays)."""
        return cls(
            results=(result,),
            update={name: np.asarray(arr)[np.newaxis] for name, arr in result.update.items()},
            weights=np.asarray([result.weight], dtype=np.float64),
            sums={key: np.asarray([v], dtype=np.float64) for key, v in result.sums.items()},
        )


def _incompatibility(reference: NamedArrays, update: Mapping[str, np.ndarray]) -> str | None:
    """Why `update` does not have the names, shapes and dtype of `reference`, or None."""
    try:
        check_compatible(reference, update)
    except ValueError as exc:
        return str(exc)
    return None


def update_problems(reference: NamedArrays, stack: StackedUpdates) -> list[str | None]:
    """For each row of `stack`, why the server cannot use it, or None: the names, shapes and
    float32 dtype of `reference`, then a positive weight of at most `MAX_WEIGHT`, then finite
    values (the first non-finite parameter is named), then finite summed scalars. Checked in
    one vectorised pass over the client axis; `check_update` applies the same rules to one
    update, so a row is rejected exactly when, and for the reason, it would be alone."""
    count = len(stack.results)
    if count == 0:
        return []
    shape = _incompatibility(reference, {name: arr[0] for name, arr in stack.update.items()})
    if shape is not None:
        return [shape] * count
    weights = stack.weights
    weight_ok = np.isfinite(weights) & (weights > 0) & (weights <= MAX_WEIGHT)
    finite: dict[str, np.ndarray] = {
        name: np.logical_and.reduce(np.isfinite(arr.reshape(count, -1)), axis=1)
        for name, arr in stack.update.items()
    }
    sums_ok = np.ones(count, dtype=bool)
    for values in stack.sums.values():
        sums_ok &= np.isfinite(values)
    good = weight_ok & sums_ok
    for row_ok in finite.values():
        good &= row_ok
    problems: list[str | None] = [None] * count
    for i in np.flatnonzero(~good).tolist():
        if not weight_ok[i]:
            weight = stack.results[i].weight
            problems[i] = (
                f"weight must be a positive number of at most {MAX_WEIGHT:g}, got {weight}"
            )
        else:
            bad = next((name for name, ok in finite.items() if not ok[i]), None)
            problems[i] = (
                f"parameter '{bad}' contains NaN or Inf"
                if bad is not None
                else "a summed scalar is NaN or Inf"
            )
    return problems


def check_update(reference: NamedArrays, result: FitResult) -> None:
    """Raise `UpdateRejected` unless `result` is a plaintext update the server can use: the
    names, shapes and float32 dtype of `reference`, finite values, a positive weight of at most
    `MAX_WEIGHT` and finite summed scalars (the rules of `update_problems`)."""
    problem = _incompatibility(reference, result.update)
    if problem is None:
        problem = update_problems(reference, StackedUpdates.of_one(result))[0]
    if problem is not None:
        raise UpdateRejected(problem)


class WeightedSum:
    """Plain aggregation: Σ wᵢ·Δᵢ and Σ wᵢ in float32, after checking each update.

    The server sees every individual update: this mode offers no confidentiality of updates.
    """

    name = "plain"

    def start(
        self,
        reference: NamedArrays,
        context: RoundContext,
        channel: ProtocolChannel | None = None,
    ) -> Accumulator:
        return _WeightedSumAccumulator(reference, list(context.clients))


@dataclass
class _ExpectedStack:
    """A stack announced to an accumulator: its rows' verdicts and the rows `add` accepted."""

    stack: StackedUpdates
    problems: list[str | None]
    accepted: list[int] = field(default_factory=list)


class _WeightedSumAccumulator:
    def __init__(self, reference: NamedArrays, participants: list[str]) -> None:
        self.participants = participants
        self._reference = reference
        self._total = zeros_like(reference)
        self._weight = 0.0
        self._count = 0
        self._sums: dict[str, float] = {}
        self._expected: dict[str, tuple[_ExpectedStack, int]] = {}
        self._stacks: list[_ExpectedStack] = []

    def expect(self, stack: StackedUpdates) -> None:
        """Check every row of `stack` now, in one vectorised pass (`update_problems`): `add` of
        one of its results (the very object) then raises the row's `UpdateRejected` or records
        the row, and `finish` sums the recorded rows with one weighted reduction per parameter.
        The outcome is that of adding each result alone, to float32 rounding."""
        expected = _ExpectedStack(stack, update_problems(self._reference, stack))
        self._stacks.append(expected)
        for row, result in enumerate(stack.results):
            self._expected[result.client] = (expected, row)

    def add(self, result: FitResult) -> None:
        announced = self._expected.pop(result.client, None)
        if announced is not None and announced[0].stack.results[announced[1]] is result:
            expected, row = announced
            problem = expected.problems[row]
            if problem is not None:
                raise UpdateRejected(problem)
            expected.accepted.append(row)
            return
        check_update(self._reference, result)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is caught in finish
            add_scaled_(self._total, result.update, result.weight)
        self._weight += result.weight
        self._count += 1
        for key, value in result.sums.items():
            self._sums[key] = self._sums.get(key, 0.0) + value

    def finish(self) -> Aggregate:
        for expected in self._stacks:
            self._add_rows(expected.stack, expected.accepted)
        self._stacks, self._expected = [], {}
        return Aggregate(total=self._total, weight=self._weight, count=self._count, sums=self._sums)

    def _add_rows(self, stack: StackedUpdates, rows: list[int]) -> None:
        """Σ wᵢ·Δᵢ over `rows` of `stack` into the total, as one float32 product per parameter
        (weights cast to float32, as `add_scaled_` scales)."""
        if not rows:
            return
        every = len(rows) == len(stack.results)  # rows are distinct: each client adds once
        index = np.asarray(rows)
        weights = stack.weights if every else stack.weights[index]
        scale = weights.astype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is caught in finish
            for name, total in self._total.items():
                stacked = stack.update[name] if every else stack.update[name][index]
                total += (scale @ stacked.reshape(len(rows), -1)).reshape(total.shape)
        self._weight += float(weights.sum())
        self._count += len(rows)
        for key, values in stack.sums.items():
            picked = values if every else values[index]
            self._sums[key] = self._sums.get(key, 0.0) + float(picked.sum())


@dataclass
class UpdatePipeline:
    """Client stages, an aggregator and server stages, in the order the update meets them."""

    client_stages: Sequence[ClientStage] = ()
    aggregator: Aggregator = field(default_factory=WeightedSum)
    server_stages: Sequence[ServerStage] = ()

    def on_client(self, result: FitResult, context: RoundContext) -> FitResult:
        """Run the client stages on a freshly trained update."""
        for stage in self.client_stages:
            result = stage.apply(result, context)
        return result

    def on_server(self, aggregate: Aggregate, context: RoundContext) -> Aggregate:
        """Run the server stages on the round's aggregate."""
        for stage in self.server_stages:
            aggregate = stage.apply(aggregate, context)
        return aggregate

    def configure_plan(self, plan: TrainingPlan) -> TrainingPlan:
        """Let server stages set what clients must know this round (e.g. a clipping norm)."""
        for stage in self.server_stages:
            configure = getattr(stage, "configure_plan", None)
            if configure is not None:
                plan = configure(plan)
        return plan

    def describe(self) -> list[str]:
        """Stage names in order, for logs and reports."""
        return [
            *(f"client:{s.name}" for s in self.client_stages),
            f"aggregate:{self.aggregator.name}",
            *(f"server:{s.name}" for s in self.server_stages),
        ]


class UpdateMap(Protocol):
    """One round's step applied to each update before a wrapped aggregator adds it (e.g.
    decompress it, bound its norm); `report` joins the round's aggregation report."""

    def apply(self, result: FitResult) -> FitResult: ...

    def report(self) -> dict[str, Any]: ...


class MappedAggregator:
    """Any aggregator, after a per-round `UpdateMap` of each update: `make_map(reference)` builds
    the round's map in `start`, and every update passes through it, one at a time, so the
    server still holds only the inner aggregator's state."""

    def __init__(
        self, inner: Aggregator, name: str, make_map: Callable[[NamedArrays], UpdateMap]
    ) -> None:
        self.inner = inner
        self.name = name
        self._make_map = make_map

    def start(
        self,
        reference: NamedArrays,
        context: RoundContext,
        channel: ProtocolChannel | None = None,
    ) -> Accumulator:
        inner = self.inner.start(reference, context, channel)
        return _MappedAccumulator(inner, self._make_map(reference))


class _MappedAccumulator:
    def __init__(self, inner: Accumulator, update_map: UpdateMap) -> None:
        self._inner = inner
        self._map = update_map
        self.participants = inner.participants

    def add(self, result: FitResult) -> None:
        self._inner.add(self._map.apply(result))

    def finish(self) -> Aggregate:
        aggregate = self._inner.finish()
        aggregate.report = {**aggregate.report, **self._map.report()}
        return aggregate
