"""The server loop: select clients, send the global model, collect and aggregate, step, evaluate.

The server talks to clients through a `ClientGateway`; transports (in-process simulation, gRPC,
Ray) implement it, so the loop does not know how messages travel.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import numpy as np

from veil.federation.messages import (
    ClientFailure,
    EvaluateInstruction,
    EvaluateResult,
    FitInstruction,
    FitResult,
    ProtocolInstruction,
    ProtocolReply,
    TrainingPlan,
)
from veil.federation.pipeline import (
    Accumulator,
    Aggregate,
    AggregationFailed,
    RoundContext,
    StackedUpdates,
    UpdatePipeline,
    UpdateRejected,
    check_aggregate,
    nonfinite,
)
from veil.federation.strategy import Strategy
from veil.seeding import Purpose, numpy_rng
from veil.tensors import NamedArrays


class ClientGateway(Protocol):
    """How the server reaches clients. Results may arrive in any order; a client that returns
    nothing yields a `ClientFailure`.

    `exchange` carries an aggregation protocol's extra steps (one instruction per client, each
    with its own body); only aggregators that need it (SecAgg) call it.
    """

    def fit(
        self, clients: Sequence[str], instruction: FitInstruction
    ) -> Iterator[FitResult | ClientFailure]: ...

    def evaluate(
        self, clients: Sequence[str], instruction: EvaluateInstruction
    ) -> Iterator[EvaluateResult | ClientFailure]: ...

    def exchange(
        self, instructions: Mapping[str, ProtocolInstruction]
    ) -> Iterator[ProtocolReply | ClientFailure]: ...


@runtime_checkable
class StackingGateway(Protocol):
    """A `ClientGateway` that trains some clients together and can hand their updates over
    stacked (`LocalTransport` with a `VectorisedTrainer`)."""

    def fit_stacked(
        self, clients: Sequence[str], instruction: FitInstruction
    ) -> tuple[list[StackedUpdates], Iterator[FitResult | ClientFailure]]: ...


class _RoundChannel:
    """The `ProtocolChannel` of one round: carries an aggregator's steps through the gateway,
    counting bytes and recording the clients that drop out of a step."""

    def __init__(self, gateway: ClientGateway, run_id: str, round_: int) -> None:
        self.gateway = gateway
        self.run_id = run_id
        self.round = round_
        self.bytes_up = 0
        self.bytes_down = 0
        self.failures: list[ClientFailure] = []

    def exchange(self, stage: str, bodies: Mapping[str, bytes]) -> dict[str, bytes]:
        instructions = {
            name: ProtocolInstruction(self.run_id, self.round, stage, body)
            for name, body in bodies.items()
        }
        self.bytes_down += sum(i.nbytes for i in instructions.values())
        replies: dict[str, bytes] = {}
        for reply in self.gateway.exchange(instructions):
            if reply.client not in instructions or reply.client in replies:
                continue
            if isinstance(reply, ClientFailure):
                self.failures.append(replace(reply, reason=f"{stage}: {reply.reason}"))
            elif reply.round != self.round or reply.stage != stage:
                reason = f"{stage}: answer to another step ({reply.stage}, round {reply.round})"
                self.failures.append(ClientFailure(reply.client, self.round, reason))
            else:
                self.bytes_up += reply.nbytes
                replies[reply.client] = reply.body
        return replies


#: The clients' validation metrics the server averages into ``federated_<name>``:
#: classification's loss and accuracy, regression's loss, MSE, MAE and R².
FEDERATED_METRICS: tuple[str, ...] = ("loss", "accuracy", "mse", "mae", "r2")


@dataclass
class RoundRecord:
    """What happened in one round."""

    round: int
    selected: int
    completed: int
    dropped: int
    applied: bool
    metrics: dict[str, float]
    bytes_up: int
    bytes_down: int
    duration_s: float
    failures: list[ClientFailure] = field(default_factory=list)
    epsilon: float | None = None
    #: The clients asked to train (all may have touched their data, even those that failed).
    selected_clients: list[str] = field(default_factory=list)
    #: What the aggregator reported (e.g. SecAgg's clipped values and recovered dropouts).
    aggregation: dict[str, Any] = field(default_factory=dict)
    #: Why the round's aggregate was not applied although enough clients answered (it, or the
    #: model it would give, was not finite); also in `aggregation["discarded"]`.
    discarded: str | None = None


class ServerObserver(Protocol):
    """Hooks for progress display, run stores and checkpoints."""

    def on_round_start(self, round_: int, selected: int) -> None: ...

    def on_client_done(self, round_: int, client: str) -> None: ...

    def on_round_end(
        self, record: RoundRecord, parameters: NamedArrays, strategy: Strategy
    ) -> None: ...


#: Centralized evaluation on the server's held-out data: parameters -> metrics.
Evaluator = Callable[[NamedArrays], dict[str, float]]


class FederatedServer:
    """Runs rounds of federated training to completion.

    Selection and other server-side random choices are derived from `seed` and the round number,
    so a run is reproducible and a resumed run selects what the uninterrupted one would have.
    """

    def __init__(
        self,
        *,
        run_id: str,
        clients: Sequence[str],
        parameters: NamedArrays,
        strategy: Strategy,
        gateway: ClientGateway,
        plan: TrainingPlan,
        pipeline: UpdatePipeline | None = None,
        min_clients: int = 1,
        learning_rate_decay: float = 1.0,
        evaluate_every: int = 1,
        evaluator: Evaluator | None = None,
        observers: Sequence[ServerObserver] = (),
        seed: int = 0,
    ) -> None:
        if not clients:
            raise ValueError("a federation needs at least one client")
        self.run_id = run_id
        self.clients = list(clients)
        self.parameters = parameters
        self.strategy = strategy
        self.gateway = gateway
        self.plan = plan
        self.pipeline = pipeline or UpdatePipeline()
        self.min_clients = min_clients
        if not 0 < learning_rate_decay <= 1:
            raise ValueError(f"learning_rate_decay must be in (0, 1], got {learning_rate_decay}")
        self.learning_rate_decay = learning_rate_decay
        self.evaluate_every = evaluate_every
        self.evaluator = evaluator
        self.observers = list(observers)
        self.seed = seed

    def run(
        self, rounds: int, *, start_round: int = 1, stop: Callable[[], bool] | None = None
    ) -> list[RoundRecord]:
        """Run rounds `start_round` .. `rounds` and return their records; fewer when `stop`
        returns True before a round starts (a signal asked the run to stop)."""
        records = []
        for rnd in range(start_round, rounds + 1):
            if stop is not None and stop():
                break
            records.append(
                self.run_round(rnd, evaluate=rnd % self.evaluate_every == 0 or rnd == rounds)
            )
        return records

    def run_round(self, rnd: int, *, evaluate: bool = True) -> RoundRecord:
        """One round: fit, aggregate, step (if enough clients answered), evaluate."""
        started = time.perf_counter()
        context = RoundContext(self.run_id, rnd)
        selected, plan = self._configure_round(rnd)
        for obs in self.observers:
            obs.on_round_start(rnd, len(selected))
        context = replace(context, clients=tuple(selected))
        channel = _RoundChannel(self.gateway, self.run_id, rnd)
        accumulator = self.pipeline.aggregator.start(self.parameters, context, channel)
        participants = set(accumulator.participants)
        training = [c for c in selected if c in participants]
        instruction = FitInstruction(self.run_id, rnd, self.parameters, plan)
        tally = _FitTally(failures=list(channel.failures))
        self._collect_fits(rnd, training, instruction, accumulator, tally)
        aggregate = _finish_aggregate(accumulator, channel, tally.failures)
        bytes_up = tally.bytes_up + channel.bytes_up
        bytes_down = instruction.nbytes * len(training) + channel.bytes_down
        aggregate, applied, discarded = self._apply_aggregate(aggregate, context)
        metrics: dict[str, float] = {}
        if tally.train_weight:
            metrics["train_loss"] = tally.train_loss / tally.train_weight
        if evaluate:
            eval_metrics, eval_bytes = self._evaluate(rnd)
            metrics.update(eval_metrics)
            bytes_down += eval_bytes
        record = RoundRecord(
            round=rnd,
            selected=len(selected),
            completed=aggregate.count,
            dropped=len(selected) - aggregate.count,
            applied=applied,
            metrics=metrics,
            bytes_up=bytes_up,
            bytes_down=bytes_down,
            duration_s=time.perf_counter() - started,
            failures=tally.failures,
            selected_clients=list(selected),
            aggregation=aggregate.report,
            discarded=discarded,
        )
        for obs in self.observers:
            obs.on_round_end(record, self.parameters, self.strategy)
        return record

    def _configure_round(self, rnd: int) -> tuple[list[str], TrainingPlan]:
        """The strategy's selection for round `rnd` and its plan (with the decayed learning
        rate, then the pipeline's changes)."""
        base = self.plan
        if self.learning_rate_decay != 1.0:
            rate = base.learning_rate * self.learning_rate_decay ** max(rnd - 1, 0)
            base = replace(base, learning_rate=rate)
        selected, plan = self.strategy.configure_fit(
            rnd, self.clients, numpy_rng(self.seed, Purpose.SELECT_FIT, rnd), base
        )
        return selected, self.pipeline.configure_plan(plan)

    def _collect_fits(
        self,
        rnd: int,
        training: list[str],
        instruction: FitInstruction,
        accumulator: Accumulator,
        tally: _FitTally,
    ) -> None:
        """Send `instruction` to `training` and add each valid reply to `accumulator`, counting
        bytes, training loss and failures in `tally`; at most one reply counts per client."""
        pending = set(training)
        for reply in self._fit_replies(training, instruction, accumulator):
            if reply.client not in pending:
                # Not selected, or a second reply: never let one client count twice.
                reason = "reply from a client that was not selected or has already replied"
                tally.failures.append(ClientFailure(reply.client, rnd, reason))
                continue
            pending.discard(reply.client)
            if isinstance(reply, ClientFailure):
                tally.failures.append(reply)
            elif reply.round != rnd:
                tally.failures.append(
                    ClientFailure(reply.client, rnd, f"stale update for round {reply.round}")
                )
            else:
                tally.bytes_up += reply.nbytes
                try:
                    accumulator.add(reply)
                except UpdateRejected as exc:
                    tally.failures.append(
                        ClientFailure(reply.client, rnd, f"update rejected: {exc}")
                    )
                else:
                    loss = reply.metrics.get("train_loss")
                    if loss is not None and math.isfinite(loss):
                        tally.train_loss += loss * reply.num_examples
                        tally.train_weight += reply.num_examples
            for obs in self.observers:
                obs.on_client_done(rnd, reply.client)

    def _fit_replies(
        self, training: list[str], instruction: FitInstruction, accumulator: Accumulator
    ) -> Iterable[FitResult | ClientFailure]:
        """The gateway's fit replies to `instruction`. Where the gateway hands over the updates
        it trained together as stacks (`StackingGateway`) and the round sums in the clear with
        no server stage (the accumulator can `expect` a stack: `WeightedSum`, unwrapped), the
        accumulator is told of the stacks first, to check and sum each in one pass; every
        reply still goes through `_collect_fits`, so each client is counted or rejected as it
        would be alone."""
        if not training:
            return ()
        expect = getattr(accumulator, "expect", None)
        gateway = self.gateway
        if expect is None or self.pipeline.server_stages:
            return gateway.fit(training, instruction)
        if not isinstance(gateway, StackingGateway):
            return gateway.fit(training, instruction)
        stacks, replies = gateway.fit_stacked(training, instruction)
        for stack in stacks:
            expect(stack)
        return replies

    def _apply_aggregate(
        self, aggregate: Aggregate, context: RoundContext
    ) -> tuple[Aggregate, bool, str | None]:
        """Step with `aggregate` if enough clients answered: (the aggregate, whether it was
        applied, why it was discarded although enough clients answered, or None)."""
        applied = aggregate.count >= self.min_clients and aggregate.weight > 0
        discarded: str | None = None
        if applied:
            aggregate, discarded = self._step(aggregate, context)
            if discarded is not None:
                applied = False
                aggregate.report = {**aggregate.report, "discarded": discarded}
        return aggregate, applied, discarded

    def _step(self, aggregate: Aggregate, context: RoundContext) -> tuple[Aggregate, str | None]:
        """Apply the round's aggregate to the global model, unless the aggregate, the server
        stages' output, the new global model or the strategy's new state would be non-finite:
        then the model and the strategy's state stay as they were, and the reason is returned.
        The global model can never become NaN or Inf."""
        problem = check_aggregate(aggregate)
        if problem is not None:
            return aggregate, f"round discarded: {problem}"
        saved = {k: v.copy() for k, v in self.strategy.state().items()}
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            aggregate = self.pipeline.on_server(aggregate, context)
            problem = check_aggregate(aggregate)
            if problem is not None:
                return aggregate, f"round discarded after the server stages: {problem}"
            parameters = self.strategy.update_global(self.parameters, aggregate)
        name = nonfinite(parameters)
        state = nonfinite(self.strategy.state())
        if name is not None or state is not None:
            self.strategy.load_state(saved)
            what = f"parameter '{name}'" if name is not None else f"strategy state '{state}'"
            return aggregate, f"round discarded: the new global model's {what} is not finite"
        self.parameters = parameters
        return aggregate, None

    def _evaluate(self, rnd: int) -> tuple[dict[str, float], int]:
        """Centralized and federated metrics of the current global model, and bytes sent."""
        metrics: dict[str, float] = {}
        if self.evaluator is not None:
            metrics.update(self.evaluator(self.parameters))
        chosen = self.strategy.configure_evaluate(
            rnd, self.clients, numpy_rng(self.seed, Purpose.SELECT_EVALUATE, rnd)
        )
        if not chosen:
            return metrics, 0
        instruction = EvaluateInstruction(self.run_id, rnd, self.parameters)
        sums: dict[str, float] = {}
        weights: dict[str, int] = {}
        for reply in self.gateway.evaluate(chosen, instruction):
            if isinstance(reply, ClientFailure) or reply.num_examples == 0:
                continue
            # Example-weighted means over the clients that report the metric; for regression
            # federated_r2 is the weighted mean of the clients' own R² (each against its own
            # validation mean), not the R² of the pooled validation data.
            for key in FEDERATED_METRICS:
                if key in reply.metrics:
                    sums[key] = sums.get(key, 0.0) + reply.metrics[key] * reply.num_examples
                    weights[key] = weights.get(key, 0) + reply.num_examples
        metrics.update({f"federated_{k}": v / weights[k] for k, v in sums.items()})
        return metrics, instruction.nbytes * len(chosen)


@dataclass
class _FitTally:
    """The running counts of one round's fit replies."""

    failures: list[ClientFailure]
    bytes_up: int = 0
    train_loss: float = 0.0
    train_weight: float = 0.0


def _finish_aggregate(
    accumulator: Accumulator, channel: _RoundChannel, failures: list[ClientFailure]
) -> Aggregate:
    """The round's aggregate (empty, with the error in its report, if none can be formed);
    the clients that dropped out of the aggregator's final steps are added to `failures`."""
    setup_failures = len(channel.failures)
    try:
        aggregate = accumulator.finish()
    except AggregationFailed as exc:
        aggregate = Aggregate(total={}, weight=0.0, count=0, report={"error": str(exc)})
    failures.extend(channel.failures[setup_failures:])
    return aggregate
