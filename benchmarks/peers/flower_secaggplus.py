"""Peer benchmark: Flower's own SecAgg+ round time, driven in-process (no simulation engine).

Standalone on purpose: it imports nothing from ``veil`` and runs in its own virtual
environment (see ``README.md`` beside this file), so Flower never enters Veil's venv.

What runs: Flower's REAL server workflow ``flwr.server.workflow.SecAggPlusWorkflow`` and its
REAL client mod ``flwr.client.mod.secaggplus_mod`` (wrapped around a legacy ``NumPyClient``
in a ``ClientApp``, as Flower's SecAgg+ example does), all four stages (setup, share_keys,
collect_masked_vectors, unmask) with Flower's own crypto (ECDH on SECP384R1, Fernet, Shamir
shares, NumPy ``RandomState`` masks). Nothing of the protocol is re-implemented here.

How it is driven: ``DirectGrid`` is a minimal in-memory ``flwr.serverapp.Grid``. Its
``send_and_receive`` hands each message straight to the destination client's ``ClientApp``
(with that client's own persistent ``Context``) and returns the replies synchronously: no
SuperLink, no LinkState, no Ray, no 0.1 s polling. Clients run one after another in this
one process. Each message (out and back) is isolated with ``copy.deepcopy`` (``--transport
copy``, default; needed anyway: the setup stage shares one ``RecordDict`` between all
messages and the mod pops from it) or with a protobuf round trip through Flower's
``message_to_proto`` / ``message_from_proto`` (``--transport proto``, roughly the
serialisation a deployment pays, without the network). The server side (sampling via
``FedAvg.configure_fit``, message building, summing masked vectors, Shamir reconstruction,
mask regeneration for survivors and dropouts, dequantisation, and ``FedAvg.aggregate_fit``
that the workflow calls for backward compatibility) is Flower's code, timed as is.

Setup: N clients (``--clients``), each holding one float32 vector of D parameters drawn
from ``U(-1, 1)`` (deterministic per client), returned unchanged by ``fit`` with
``num_examples = --num-examples`` (default 1000 = Flower's default ``max_weight``, so the
weight factor is 1 and every value keeps the full 22-bit quantisation resolution; a
smaller weight scales values down before quantisation and loses precision, by Flower's
design). SecAgg+ parameters: Flower's defaults, stated explicitly -- ``clipping_range=8.0``,
``quantization_range=2**22``, ``modulus_range=2**32`` (32-bit masking ring),
``max_weight=1000``; ``num_shares = degree + 1`` (Flower counts the client itself; an even
``num_shares`` below N is bumped by Flower's server to the next odd number after the
clients were told the old one, and they then fail, so an odd degree must be N - 1; the
degree read back from the clients' state is reported as ``degree_effective``);
``reconstruction_threshold`` defaults to a majority of each neighbourhood (itself
included), ``(degree + 1) // 2 + 1`` (Veil's is higher: ⌊2(degree + 1)/3⌋ + 1, which
withstands a malicious server).

Dropouts (``--dropouts K``): K fixed clients answer setup and share_keys, then stay silent
(no reply to collect_masked_vectors or unmask), so the server reconstructs their secret
keys and removes their pairwise masks. In the plain round the same K clients do not reply.

Timing (``time.perf_counter``; 1 warm-up round discarded, then the median of ``--rounds``):

- ``secagg_round_s``: wall time of one ``SecAggPlusWorkflow.__call__`` (one full round).
- ``client_s``: time inside the clients' ``ClientApp`` calls (all clients, serial sum);
  ``client_per_client_s`` its mean per client, ``client_max_s`` the slowest client.
- ``transport_s``: message isolation (deepcopy or protobuf round trips).
- ``server_s``: the rest = round - client - transport (Flower's server-side work).
- ``parallel_clients_round_s``: an estimate with clients running in parallel:
  server + transport + per stage the slowest client.
- ``plain_round_s``: one round of Flower's plain ``default_fit_workflow`` with the same
  ``FedAvg``, the same ``DirectGrid`` and the same clients (the apples-to-apples baseline);
  ``plain_aggregate_s``: ``flwr.server.strategy.aggregate.aggregate`` alone on the same
  surviving vectors. ``ratio_secure_over_plain`` = secagg_round_s / plain_round_s and
  ``ratio_secure_over_plain_aggregate`` = secagg_round_s / plain_aggregate_s.
- ``*_cpu_s``: the same rounds in this process's CPU time (``time.process_time``, all
  threads), less sensitive than wall time to other processes sharing the cores;
  ``load_avg_1min`` (taken after the size's runs) tells whether they did.

The global model is reset to the same float32 zeros before each round (untimed), so every
round is identical: otherwise the SecAgg+ rounds would broadcast Flower's float64 result.

Correctness: after each round the aggregate is checked against the exact (float64) mean of
the surviving clients' vectors. Flower's SecAgg+ returns the weighted MEAN (it divides by
the total weight), so the check is on the mean; the sum is the survivors' count times it.
With stochastic rounding each client's quantised value is off by less than one step
``2 * clip / 2**22``, so the mean is off by less than one step (3.8e-6); the script
asserts that.

Usage (from the isolated venv, repository root)::

    /work/flower-venv/bin/python benchmarks/peers/flower_secaggplus.py \\
        --clients 10 --sizes 100000 1000000 --degree 9 --rounds 3 --dropouts 0

The result is one JSON object on stdout's last line (and in ``--json PATH`` if given); a
human summary goes to stderr.
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # offline machine: never phone home

import argparse
import copy
import json
import logging
import random
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast
from uuid import uuid4

import flwr
import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client import Client, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import (
    FitRes,
    NDArrays,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
    Stage,
)
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611
from flwr.server import LegacyContext, ServerConfig, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.strategy.aggregate import aggregate
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.default_workflows import default_fit_workflow
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

CLIPPING_RANGE = 8.0  # Flower's default
QUANTIZATION_RANGE = 2**22  # Flower's default
MODULUS_RANGE = 2**32  # Flower's default: a 32-bit masking ring
MAX_WEIGHT = 1000.0  # Flower's default
PLAIN_STAGE = "plain_fit"  # label of the plain round's only exchange
SILENT_STAGES = frozenset({Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK, PLAIN_STAGE})
FIRST_NODE_ID = 1001  # above Flower's reserved ids (SUPERLINK_NODE_ID = 1)
DATA_NOTE = "synthetic: each client's vector ~ U(-1, 1) float32, fixed per client"


def make_vectors(clients: int, size: int, seed: int) -> dict[int, np.ndarray]:
    """Return each client's SYNTHETIC float32 vector of ``size`` values, keyed by node id."""
    return {
        FIRST_NODE_ID + cid: np.random.default_rng([seed, cid])
        .uniform(-1.0, 1.0, size)
        .astype(np.float32)
        for cid in range(clients)
    }


class VectorClient(NumPyClient):
    """A legacy client whose ``fit`` returns its fixed vector (no training)."""

    def __init__(self, vector: np.ndarray, num_examples: int) -> None:
        self.vector = vector
        self.num_examples = num_examples

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """Return the client's vector as its update."""
        return [self.vector], self.num_examples, {}


def make_client_app(vectors: dict[int, np.ndarray], num_examples: int, secure: bool) -> ClientApp:
    """Build the ClientApp: a legacy ``client_fn``, wrapped in ``secaggplus_mod`` if secure."""

    def client_fn(context: Context) -> Client:
        return VectorClient(vectors[context.node_id], num_examples).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod] if secure else [])


@dataclass
class RoundTimer:
    """What the grid measured during one round."""

    client_by_stage: dict[str, dict[int, float]] = field(default_factory=lambda: defaultdict(dict))
    transport_s: float = 0.0
    exchanges: list[tuple[float, float]] = field(default_factory=list)  # (enter, exit)

    @property
    def client_s(self) -> float:
        """Time inside all ClientApp calls."""
        return sum(sum(d.values()) for d in self.client_by_stage.values())

    def per_client_s(self) -> dict[int, float]:
        """Total ClientApp time of each client in the round."""
        totals: dict[int, float] = defaultdict(float)
        for per_node in self.client_by_stage.values():
            for node, sec in per_node.items():
                totals[node] += sec
        return totals

    def slowest_client_per_stage_s(self) -> float:
        """Sum over stages of the slowest client's time (critical path if parallel)."""
        return sum(max(d.values()) for d in self.client_by_stage.values() if d)


def message_stage(msg: Message) -> str:
    """Return the SecAgg+ stage a message asks for, or ``PLAIN_STAGE`` for a plain fit."""
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is None:
        return PLAIN_STAGE
    return str(configs[Key.STAGE])


def copy_transport(msg: Message) -> Message:
    """Isolate a message in memory."""
    return copy.deepcopy(msg)


def proto_transport(msg: Message) -> Message:
    """Isolate a message by a protobuf round trip through Flower's serde."""
    wire = message_to_proto(msg).SerializeToString()
    return message_from_proto(ProtoMessage.FromString(wire))


TRANSPORTS: dict[str, Callable[[Message], Message]] = {
    "copy": copy_transport,
    "proto": proto_transport,
}


class DirectGrid(Grid):
    """In-memory ``Grid`` delivering each message straight to its client, synchronously.

    No SuperLink, no polling: ``push_messages`` runs the destination's ``ClientApp`` on a
    copy of the message and keeps the reply; ``pull_messages`` hands the replies back.
    Clients in ``dropped`` stay silent from collect_masked_vectors on (and in plain rounds).
    """

    def __init__(
        self,
        contexts: dict[int, Context],
        transport: Callable[[Message], Message],
        dropped: set[int],
    ) -> None:
        self.contexts = contexts
        self.transport = transport
        self.dropped = dropped
        self.app: ClientApp | None = None
        self.timer = RoundTimer()
        self._replies: dict[str, Message] = {}
        self._run = Run.create_empty(run_id=0)

    def set_run(self, run: Run) -> None:
        """Set the run this grid operates in."""
        self._run = run

    @property
    def run(self) -> Run:
        """Run information."""
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Create a message (deprecated in Flower; kept for the abstract interface)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """Return the clients' node ids."""
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message to its client now; keep the replies for ``pull_messages``."""
        if self.app is None:
            raise RuntimeError("DirectGrid.app is not set")
        ids: list[str] = []
        for msg in messages:
            msg_id = str(uuid4())
            msg.metadata.__dict__["_message_id"] = msg_id  # as Flower's InMemoryGrid does
            ids.append(msg_id)
            node = msg.metadata.dst_node_id
            stage = message_stage(msg)
            if node in self.dropped and stage in SILENT_STAGES:
                continue  # a dropped client never answers
            t0 = time.perf_counter()
            inbound = self.transport(msg)
            t1 = time.perf_counter()
            reply = self.app(inbound, self.contexts[node])
            t2 = time.perf_counter()
            reply.metadata.__dict__["_message_id"] = str(uuid4())
            self._replies[msg_id] = self.transport(reply)
            t3 = time.perf_counter()
            self.timer.client_by_stage[stage][node] = t2 - t1
            self.timer.transport_s += (t1 - t0) + (t3 - t2)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Return (and forget) the replies to the given messages."""
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Deliver the messages and return every reply at once (``timeout`` is moot)."""
        enter = time.perf_counter()
        replies = list(self.pull_messages(self.push_messages(messages)))
        self.timer.exchanges.append((enter, time.perf_counter()))
        return replies


class TimedFedAvg(FedAvg):
    """FedAvg over all clients that records the time of its ``aggregate_fit`` calls."""

    def __init__(self, clients: int) -> None:
        super().__init__(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=clients,
            min_available_clients=clients,
        )
        self.aggregate_fit_s = 0.0
        self.aggregate_fit_calls = 0

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Any, dict[str, Scalar]]:
        """Aggregate as FedAvg does, timing it."""
        start = time.perf_counter()
        out = super().aggregate_fit(server_round, results, failures)
        self.aggregate_fit_s += time.perf_counter() - start
        self.aggregate_fit_calls += 1
        return out


@dataclass
class RoundResult:
    """One timed round."""

    round_s: float
    round_cpu_s: float
    client_s: float
    client_per_client_s: float
    client_max_s: float
    transport_s: float
    server_s: float
    parallel_clients_round_s: float
    aggregate_fit_s: float
    client_by_stage_s: dict[str, float]
    server_after_exchange_s: list[float]
    max_abs_error: float


def run_round(
    workflow: Callable[[Grid, Context], None],
    grid: DirectGrid,
    context: LegacyContext,
    strategy: TimedFedAvg,
    server_round: int,
    initial: RecordDict,
    expected_mean: np.ndarray,
) -> RoundResult:
    """Run and time one round of ``workflow``; check its aggregate against the exact mean."""
    context.state.array_records[MAIN_PARAMS_RECORD] = copy.deepcopy(
        initial.array_records[MAIN_PARAMS_RECORD]
    )
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: server_round}
    )
    grid.timer = RoundTimer()
    strategy.aggregate_fit_s = 0.0
    strategy.aggregate_fit_calls = 0

    cpu_start = time.process_time()
    start = time.perf_counter()
    workflow(grid, context)
    end = time.perf_counter()
    cpu_s = time.process_time() - cpu_start

    if strategy.aggregate_fit_calls != 1:
        raise RuntimeError(
            f"round {server_round}: the workflow halted before aggregating "
            "(too few survivors for the threshold?)"
        )
    timer = grid.timer
    round_s = end - start
    client_s = timer.client_s
    per_client = timer.per_client_s()
    server_s = round_s - client_s - timer.transport_s
    # Server-side gaps: after each exchange until the next one (or the round's end).
    marks = [exit_ for _, exit_ in timer.exchanges]
    nexts = [enter for enter, _ in timer.exchanges[1:]] + [end]
    aggregated = parameters_to_ndarrays(
        compat.arrayrecord_to_parameters(
            context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True
        )
    )
    if len(aggregated) != 1 or aggregated[0].shape != expected_mean.shape:
        raise RuntimeError(f"round {server_round}: no aggregate was produced")
    error = float(np.max(np.abs(aggregated[0].astype(np.float64) - expected_mean)))
    return RoundResult(
        round_s=round_s,
        round_cpu_s=cpu_s,
        client_s=client_s,
        client_per_client_s=client_s / len(grid.contexts),
        client_max_s=max(per_client.values()),
        transport_s=timer.transport_s,
        server_s=server_s,
        parallel_clients_round_s=round_s - client_s + timer.slowest_client_per_stage_s(),
        aggregate_fit_s=strategy.aggregate_fit_s,
        client_by_stage_s={s: sum(d.values()) for s, d in timer.client_by_stage.items()},
        server_after_exchange_s=[b - a for a, b in zip(marks, nexts, strict=True)],
        max_abs_error=error,
    )


def effective_degree(contexts: dict[int, Context]) -> int:
    """Read the neighbour count back from the clients' SecAgg+ state (minimum over clients)."""
    degrees = []
    for ctx in contexts.values():
        state = ctx.state.config_records[RECORD_KEY_STATE]
        degrees.append(
            len(cast(list[int], state["public_keys_dict:K"])) - 1
        )  # the client itself is listed
    return min(degrees)


def median(values: list[float]) -> float:
    """Median, rounded for the report."""
    return round(statistics.median(values), 6)


def bench_size(args: argparse.Namespace, size: int) -> dict[str, Any]:
    """Benchmark SecAgg+ and plain rounds for one vector size; return the JSON entry."""
    n = args.clients
    vectors = make_vectors(n, size, args.seed)
    node_ids = sorted(vectors)
    dropped = set(random.Random(args.seed).sample(node_ids, args.dropouts))
    survivors = [nid for nid in node_ids if nid not in dropped]
    expected_mean = np.mean([vectors[nid].astype(np.float64) for nid in survivors], axis=0)

    contexts = {
        nid: Context(run_id=0, node_id=nid, node_config={}, state=RecordDict(), run_config={})
        for nid in node_ids
    }
    grid = DirectGrid(contexts, TRANSPORTS[args.transport], dropped)
    strategy = TimedFedAvg(n)
    client_manager = SimpleClientManager()
    for nid in node_ids:
        client_manager.register(GridClientProxy(node_id=nid, grid=grid, run_id=0))
    context = LegacyContext(
        Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=args.rounds),
        strategy=strategy,
        client_manager=client_manager,
    )
    initial = RecordDict(
        {
            MAIN_PARAMS_RECORD: compat.parameters_to_arrayrecord(
                ndarrays_to_parameters([np.zeros(size, dtype=np.float32)]), keep_input=True
            )
        }
    )
    threshold = args.threshold or (args.degree + 1) // 2 + 1
    secagg = SecAggPlusWorkflow(
        num_shares=args.degree + 1,
        reconstruction_threshold=threshold,
        max_weight=MAX_WEIGHT,
        clipping_range=CLIPPING_RANGE,
        quantization_range=QUANTIZATION_RANGE,
        modulus_range=MODULUS_RANGE,
        timeout=None,
    )
    step = 2 * CLIPPING_RANGE / QUANTIZATION_RANGE
    bound = step * (1 + 1e-6) + 1e-9

    def timed(workflow: Callable[[Grid, Context], None], secure: bool) -> list[RoundResult]:
        grid.app = make_client_app(vectors, args.num_examples, secure)
        results = []
        for r in range(args.rounds + 1):  # round 0 is the warm-up, discarded
            res = run_round(workflow, grid, context, strategy, r + 1, initial, expected_mean)
            if secure and res.max_abs_error > bound:
                raise AssertionError(
                    f"SecAgg+ aggregate off by {res.max_abs_error:.3g} > bound {bound:.3g}"
                )
            if r > 0:
                results.append(res)
        return results

    sec = timed(secagg, secure=True)
    degree = effective_degree(contexts)
    plain = timed(default_fit_workflow, secure=False)

    survivor_updates = [([vectors[nid]], args.num_examples) for nid in survivors]
    plain_agg_s = []
    for r in range(args.rounds + 1):
        start = time.perf_counter()
        aggregate(survivor_updates)
        if r > 0:
            plain_agg_s.append(time.perf_counter() - start)

    def med(attr: str, rows: list[RoundResult]) -> float:
        return median([getattr(row, attr) for row in rows])

    stages = sorted({s for row in sec for s in row.client_by_stage_s}, key=Stage.all().index)
    secagg_round_s = med("round_s", sec)
    plain_round_s = med("round_s", plain)
    plain_aggregate_s = median(plain_agg_s)
    return {
        "clients": n,
        "params": size,
        "degree": args.degree,
        "degree_effective": degree,
        "threshold": threshold,
        "dropouts": args.dropouts,
        "rounds": args.rounds,
        "secagg_round_s": secagg_round_s,
        "secagg_round_s_all": [round(row.round_s, 6) for row in sec],
        "secagg_round_cpu_s": med("round_cpu_s", sec),
        "client_s": med("client_s", sec),
        "client_per_client_s": med("client_per_client_s", sec),
        "client_max_s": med("client_max_s", sec),
        "server_s": med("server_s", sec),
        "transport_s": med("transport_s", sec),
        "server_aggregate_fit_s": med("aggregate_fit_s", sec),
        "parallel_clients_round_s": med("parallel_clients_round_s", sec),
        "client_s_by_stage": {
            s: median([row.client_by_stage_s.get(s, 0.0) for row in sec]) for s in stages
        },
        "server_s_after_stage": {
            s: median([row.server_after_exchange_s[i] for row in sec])
            for i, s in enumerate(Stage.all())
        },
        "plain_round_s": plain_round_s,
        "plain_round_s_all": [round(row.round_s, 6) for row in plain],
        "plain_round_cpu_s": med("round_cpu_s", plain),
        "plain_client_s": med("client_s", plain),
        "plain_aggregate_s": plain_aggregate_s,
        "ratio_secure_over_plain": round(secagg_round_s / plain_round_s, 3),
        "ratio_secure_over_plain_aggregate": round(secagg_round_s / plain_aggregate_s, 3),
        "ratio_secure_over_plain_cpu": round(
            med("round_cpu_s", sec) / med("round_cpu_s", plain), 3
        ),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "max_abs_error": max(row.max_abs_error for row in sec),
        "error_bound": step,
        "plain_max_abs_error": max(row.max_abs_error for row in plain),
        "flwr_version": flwr.__version__,
    }


def summary_line(entry: dict[str, Any]) -> str:
    """One human-readable line per size."""
    return (
        f"N={entry['clients']} D={entry['params']:>9,} degree={entry['degree_effective']} "
        f"t={entry['threshold']} drop={entry['dropouts']}: "
        f"secagg {entry['secagg_round_s']:.3f} s/round "
        f"(clients {entry['client_s']:.3f}, server {entry['server_s']:.3f}, "
        f"transport {entry['transport_s']:.3f}; parallel-clients est. "
        f"{entry['parallel_clients_round_s']:.3f}) | plain round {entry['plain_round_s']:.4f} s "
        f"-> x{entry['ratio_secure_over_plain']:.1f} | aggregate() "
        f"{entry['plain_aggregate_s']:.4f} s -> x{entry['ratio_secure_over_plain_aggregate']:.0f}"
        f" | CPU {entry['secagg_round_cpu_s']:.3f} vs {entry['plain_round_cpu_s']:.4f} s -> "
        f"x{entry['ratio_secure_over_plain_cpu']:.1f}"
        f" | max err {entry['max_abs_error']:.2e} (bound {entry['error_bound']:.2e})"
        f" | load {entry['load_avg_1min']}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--clients", type=int, default=10, help="number of clients N")
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="vector sizes D"
    )
    parser.add_argument(
        "--degree", type=int, default=None, help="neighbours per client (default N - 1)"
    )
    parser.add_argument(
        "--threshold", type=int, default=None, help="Shamir threshold (default: majority)"
    )
    parser.add_argument("--dropouts", type=int, default=0, help="clients dropping after keys")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (plus 1 warm-up)")
    parser.add_argument("--num-examples", type=int, default=int(MAX_WEIGHT))
    parser.add_argument("--transport", choices=sorted(TRANSPORTS), default="copy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=str, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.degree is None:
        args.degree = args.clients - 1
    if not 2 <= args.degree < args.clients:
        parser.error("--degree must be in [2, clients - 1]")
    if args.degree % 2 and args.degree != args.clients - 1:
        # Flower 1.41 bumps an even num_shares (< N) to the next odd number on the server
        # only after it sent the old one to the clients, which then fail in share_keys.
        parser.error("--degree must be even, or clients - 1 (Flower cannot run an odd one)")
    if not 0 <= args.dropouts < args.clients - 1:
        parser.error("--dropouts must be in [0, clients - 2]")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run every size and print the JSON result as stdout's last line."""
    args = parse_args(argv)
    logging.getLogger("flwr").setLevel(logging.ERROR)  # no per-stage INFO/WARNING lines
    random.seed(args.seed)  # the workflow shuffles node ids with `random`
    np.random.seed(args.seed)  # Flower's stochastic rounding draws from NumPy's global RNG
    # What Flower's legacy ServerApp runner sets before a workflow builds its messages.
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 0
    TaskIdentity.node_id = SUPERLINK_NODE_ID

    entries = []
    for size in args.sizes:
        entry = bench_size(args, size)
        print(summary_line(entry), file=sys.stderr, flush=True)
        entries.append(entry)

    result = {
        "peer": "flower-secaggplus",
        "flwr_version": flwr.__version__,
        "driver": "SecAggPlusWorkflow + secaggplus_mod over an in-memory synchronous Grid",
        "transport": args.transport,
        "clipping_range": CLIPPING_RANGE,
        "quantization_range": QUANTIZATION_RANGE,
        "modulus_range": MODULUS_RANGE,
        "max_weight": MAX_WEIGHT,
        "num_examples": args.num_examples,
        "seed": args.seed,
        "cpus": os.cpu_count(),
        "data": DATA_NOTE,
        "results": entries,
    }
    text = json.dumps(result)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    print(text, flush=True)


if __name__ == "__main__":
    main()
