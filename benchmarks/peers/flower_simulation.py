# ruff: noqa: E402  (Flower reads FLWR_TELEMETRY_ENABLED at import time; it is set first)
"""Peer benchmark: FedAvg rounds on Flower's simulation engine (Ray backend).

Standalone on purpose: it imports nothing from ``veil`` and runs in its own virtual
environment (see ``README.md`` beside this file), so Flower never enters Veil's venv.

Setup, matching Veil's benchmark: N clients, each holding 50 examples of SYNTHETIC
two-class tabular data (20 features); a logistic regression (20 features, 2 logits,
cross-entropy) trained for one local epoch with batch size 32 and SGD (lr 0.1); FedAvg over
all N clients every round; Ray backend resources of 1 CPU per client. Two clients
(``--client``):

- ``torch`` (default), the TYPICAL Flower client, as Flower's docs write one: ``nn.Linear``,
  a ``DataLoader`` over a ``TensorDataset``, ``torch.optim.SGD``, the loss summed with
  ``.item()``; each call draws its client's data from ``default_rng(seed + client_id)``.
- ``numpy``, the SAME-WORK client: exactly the per-client work of the ``numpy_loop`` floor of
  ``benchmarks/simulation.py`` (a uniform permutation of the 50 rows, consecutive batches of
  32, the softmax-cross-entropy gradient and the SGD step written in numpy, no loss, no
  DataLoader, no optimiser), on the very data Veil's benchmark uses (the same generator as
  ``veil.data.make_synthetic_logistic``, reproduced here), drawn once per Ray actor.

Timing: a round runs from the strategy's ``configure_train`` call to the end of its
``aggregate_train`` call (server-side hooks), so it leaves out the engine's start-up (Ray
start, actor pool, node registration), which a warm-up message before round 1 absorbs.
``total_s`` is the wall time of the whole ``run_simulation`` call, start-up and shut-down
included. The result is one JSON object on the last line of stdout; Flower's and Ray's
logs go to stderr.

Usage (from the isolated venv)::

    /work/flower-venv/bin/python benchmarks/peers/flower_simulation.py --clients 100
    /work/flower-venv/bin/python benchmarks/peers/flower_simulation.py --clients 100 --client numpy
"""

from __future__ import annotations

import os
import time

START = time.perf_counter()
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # offline machine: never phone home

import argparse
import json
import statistics
import sys
from collections.abc import Iterable

import flwr
import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

N_EXAMPLES = 50
N_FEATURES = 20
N_CLASSES = 2
BATCH_SIZE = 32
LOCAL_EPOCHS = 1
LR = 0.1
TEACHER_STREAM = 0x7EAC4E  # second seed word, so the teacher's stream != any client's
DATA_NOTE = "synthetic: x ~ N(0, I_20), y ~ Bernoulli(sigmoid(w.x + b)), fixed (w, b)"
# veil.data.make_synthetic_logistic's fixed teacher: seed words and weight norm.
VEIL_MODEL_SEED = 20_240_601
VEIL_WEIGHT_NORM = 3.0
CLIENT_NOTES = {
    "torch": "typical Flower client: nn.Linear, DataLoader, torch.optim.SGD, loss.item()",
    "numpy": "same work as Veil's numpy_loop floor: numpy SGD on Veil's benchmark data",
}


def make_client_data(cid: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return client ``cid``'s SYNTHETIC data set: 50 rows, 20 features, labels in {0, 1}.

    Features come from ``np.random.default_rng(seed + cid)``; labels are drawn from a fixed
    logistic "teacher" model shared by all clients, so the task is learnable.
    """
    teacher = np.random.default_rng([seed, TEACHER_STREAM])
    weights = teacher.normal(size=N_FEATURES)
    bias = teacher.normal()
    rng = np.random.default_rng(seed + cid)
    x = rng.normal(size=(N_EXAMPLES, N_FEATURES)).astype(np.float32)
    prob = 1.0 / (1.0 + np.exp(-(x @ weights + bias)))
    y = (rng.random(N_EXAMPLES) < prob).astype(np.int64)
    return x, y


def veil_benchmark_data(clients: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return Veil's benchmark data for ``clients`` clients, shaped (clients, 50, 20) and
    (clients, 50): ``make_synthetic_logistic(clients * 50, 20, seed)`` cut into consecutive
    blocks of 50 rows, as ``benchmarks/simulation.py`` cuts it (same generator, same draws)."""
    model_rng = np.random.default_rng([VEIL_MODEL_SEED, N_FEATURES])
    weights = model_rng.standard_normal(N_FEATURES)
    weights *= VEIL_WEIGHT_NORM / np.linalg.norm(weights)
    bias = 0.5 * model_rng.standard_normal()
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((clients * N_EXAMPLES, N_FEATURES))
    prob = 1.0 / (1.0 + np.exp(-(x @ weights + bias)))
    y = (rng.random(clients * N_EXAMPLES) < prob).astype(np.int64)
    shape = (clients, N_EXAMPLES)
    return x.astype(np.float32).reshape(*shape, N_FEATURES), y.reshape(shape)


def actor_data(clients: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``veil_benchmark_data`` drawn once per process (per Ray actor), as Veil's clients hold
    their data before the first round. The cache lives in ``sys.modules`` because Ray ships
    this script's functions by value with every call, so a plain global would start empty."""
    cache = sys.modules.setdefault("_flower_peer_data", type(sys)("_flower_peer_data"))
    key = f"d{clients}_{seed}"
    if not hasattr(cache, key):
        setattr(cache, key, veil_benchmark_data(clients, seed))
    data: tuple[np.ndarray, np.ndarray] = getattr(cache, key)
    return data


def make_model() -> nn.Module:
    """Return the logistic-regression model: one linear layer, two logits."""
    return nn.Linear(N_FEATURES, N_CLASSES)


def fit(
    model: nn.Module, x: np.ndarray, y: np.ndarray, seed: int, epochs: int = LOCAL_EPOCHS
) -> float:
    """Train ``model`` in place with mini-batch SGD; return the mean training loss."""
    loader = DataLoader(
        TensorDataset(torch.from_numpy(x), torch.from_numpy(y)),
        batch_size=BATCH_SIZE,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    loss_sum = 0.0
    for _ in range(epochs):
        for xb, yb in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(yb)
    return loss_sum / (len(y) * epochs)


def numpy_epoch(
    w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray, rng: np.random.Generator
) -> None:
    """One epoch of mini-batch SGD on the softmax cross-entropy, updating ``w`` (classes,
    features) and ``b`` (classes,) in place: line for line the client loop of
    ``numpy_loop_round`` in ``benchmarks/simulation.py``."""
    order = rng.permutation(len(y))
    for start in range(0, len(y), BATCH_SIZE):
        idx = order[start : start + BATCH_SIZE]
        xb, yb = x[idx], y[idx]
        z = xb @ w.T + b
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        p[np.arange(len(yb)), yb] -= 1
        p /= len(yb)
        w -= np.float32(LR) * (p.T @ xb)
        b -= np.float32(LR) * p.sum(axis=0)


torch_app = ClientApp()


@torch_app.train()
def train_torch(msg: Message, context: Context) -> Message:
    """Train the received global model for one local epoch on this client's data."""
    torch.set_num_threads(1)  # the client is granted one CPU by the Ray backend
    seed = int(msg.content["config"]["seed"])
    cid = int(context.node_config["partition-id"])
    model = make_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = make_client_data(cid, seed)
    loss = fit(model, x, y, seed + cid)
    metrics = MetricRecord({"train_loss": loss, "num-examples": len(y)})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@torch_app.query()
def warm_up_torch(msg: Message, context: Context) -> Message:
    """Warm a Ray actor up: one throwaway local epoch pays torch's lazy first-call costs."""
    torch.set_num_threads(1)
    fit(make_model(), *make_client_data(int(context.node_config["partition-id"]), 0), 0)
    return Message(content=RecordDict(), reply_to=msg)


numpy_app = ClientApp()


def _numpy_local_epoch(
    config: ConfigRecord, cid: int, arrays: list[np.ndarray]
) -> list[np.ndarray]:
    """This client's epoch from the received [weight, bias]; return the trained pair. The
    batch order comes from the client's own stream for this round (the rule of the floor: one
    uniform permutation per client and epoch)."""
    seed, clients = int(config["seed"]), int(config["clients"])
    x, y = actor_data(clients, seed)
    w, b = (np.array(a, dtype=np.float32) for a in arrays)  # writable copies
    rng = np.random.default_rng([seed, cid, int(config.get("server-round", 0))])
    numpy_epoch(w, b, x[cid], y[cid], rng)
    return [w, b]


@numpy_app.train()
def train_numpy(msg: Message, context: Context) -> Message:
    """Train the received global model for one local epoch, the floor's way, in numpy."""
    cid = int(context.node_config["partition-id"])
    arrays = msg.content["arrays"].to_numpy_ndarrays()
    trained = _numpy_local_epoch(msg.content["config"], cid, arrays)
    metrics = MetricRecord({"num-examples": N_EXAMPLES})
    content = RecordDict({"arrays": ArrayRecord(trained), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@numpy_app.query()
def warm_up_numpy(msg: Message, context: Context) -> Message:
    """Warm a Ray actor up: draw its data and run one throwaway epoch."""
    cid = int(context.node_config["partition-id"])
    zeros = [np.zeros((N_CLASSES, N_FEATURES), np.float32), np.zeros(N_CLASSES, np.float32)]
    _numpy_local_epoch(msg.content["config"], cid, zeros)
    return Message(content=RecordDict(), reply_to=msg)


CLIENT_APPS = {"torch": torch_app, "numpy": numpy_app}


class TimedFedAvg(FedAvg):
    """FedAvg that times each round from ``configure_train`` to ``aggregate_train``'s end."""

    def __init__(self, clients: int) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=0.0,  # the benchmark round is training + aggregation only
            min_train_nodes=clients,
            min_available_nodes=clients,
        )
        self.clients = clients
        self.round_s: list[float] = []
        self._round_start = 0.0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Stamp the round's start, then sample and build messages as FedAvg does."""
        self._round_start = time.perf_counter()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate as FedAvg does, check every client answered, stamp the round's end."""
        replies = list(replies)
        ok = sum(not reply.has_error() for reply in replies)
        if ok != self.clients:
            raise RuntimeError(f"round {server_round}: {ok}/{self.clients} clients answered")
        result = super().aggregate_train(server_round, replies)
        self.round_s.append(time.perf_counter() - self._round_start)
        return result


def initial_arrays(client: str) -> ArrayRecord:
    """The global model before round 1: a freshly initialised ``nn.Linear(20, 2)``, as a
    torch state dict for the torch client, as the list [weight, bias] for the numpy one."""
    state = make_model().state_dict()
    if client == "numpy":
        return ArrayRecord([t.detach().numpy() for t in state.values()])
    return ArrayRecord(state)


def make_server_app(
    clients: int, rounds: int, seed: int, strategy: TimedFedAvg, client: str
) -> ServerApp:
    """Build the ServerApp: wait for the engine to be ready, then run ``rounds`` rounds."""
    server_app = ServerApp()
    config = ConfigRecord({"seed": seed, "clients": clients})

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        # Start-up, not timed as a round: wait until every node is registered, then send
        # one warm-up message per CPU, so that before round 1 Ray is up, the actor pool
        # built, the ClientApp loaded and (very likely) every actor has trained once.
        while len(node_ids := list(grid.get_node_ids())) < clients:
            time.sleep(0.01)
        warm = [
            Message(
                RecordDict({"config": config}),
                dst_node_id=node_id,
                message_type=MessageType.QUERY,
            )
            for node_id in node_ids[: min(clients, os.cpu_count() or 1)]
        ]
        list(grid.send_and_receive(warm, timeout=600))

        torch.manual_seed(seed)
        strategy.start(
            grid=grid,
            initial_arrays=initial_arrays(client),
            num_rounds=rounds,
            train_config=config,
        )

    return server_app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, required=True, help="number of clients N")
    parser.add_argument("--rounds", type=int, default=3, help="federated rounds (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="base seed for the synthetic data")
    parser.add_argument(
        "--client",
        choices=sorted(CLIENT_APPS),
        default="torch",
        help="torch: the typical Flower client (default); numpy: the same work as Veil's floor",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the simulation and print the JSON result as stdout's last line."""
    args = parse_args(argv)
    # Everything Flower, Ray and their subprocesses write to fd 1 goes to stderr; the JSON
    # line is written to the saved stdout at the very end.
    sys.stdout.flush()
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    strategy = TimedFedAvg(args.clients)
    start = time.perf_counter()
    run_simulation(
        server_app=make_server_app(args.clients, args.rounds, args.seed, strategy, args.client),
        client_app=CLIENT_APPS[args.client],
        num_supernodes=args.clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    total_s = time.perf_counter() - start
    if len(strategy.round_s) != args.rounds:
        raise SystemExit(f"expected {args.rounds} timed rounds, got {len(strategy.round_s)}")

    result = {
        "peer": "flower",
        "flower_version": flwr.__version__,
        "client": args.client,
        "client_note": CLIENT_NOTES[args.client],
        "clients": args.clients,
        "rounds": args.rounds,
        "round_s_median": round(statistics.median(strategy.round_s), 4),
        "round_s": [round(s, 4) for s in strategy.round_s],
        "total_s": round(total_s, 4),
        "process_s": round(time.perf_counter() - START, 4),
        "data": DATA_NOTE if args.client == "torch" else "Veil's: make_synthetic_logistic",
        "examples_per_client": N_EXAMPLES,
        "cpus": os.cpu_count(),
    }
    sys.stdout.flush()
    json_out.write(json.dumps(result) + "\n")
    json_out.flush()


if __name__ == "__main__":
    main()
