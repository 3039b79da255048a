"""Ray: the same client code on a Ray cluster, in a fixed pool of worker actors.

`RayTransport` is a `ClientGateway` (`mode = "ray"`). It starts `workers` actors once, each
reserving the resources one client needs (CPUs, GPUs, memory), and gives each a fixed shard of the
clients (client i goes to worker i mod W), whose `ClientRunner`s it ships once. A round sends the
global parameters to the object store once, then asks each worker to train its selected clients,
`clients_per_task` at a time, with at most two calls queued per worker; updates stream back to the
server as calls finish. So at most W clients train at once, memory holds W models, and the pool
never grows with the number of clients: no actor per client, nothing to leak. `close()` kills the
pool and stops the Ray instance if this transport started it.

Simulated dropouts and stragglers (`veil.transport.simulated`) are decided on the server before a
client is dispatched, exactly as in the in-process simulation, so a run gives the same metrics
with either transport for the same seed (up to the order in which float32 updates are summed).

Trust: Ray moves Python objects between its processes with pickle, and anyone who can reach a Ray
cluster can run code on it. A Ray cluster is therefore one trust domain: `mode = "ray"` simulates
a federation on machines you control. Organisations that do not trust each other use
`mode = "deployment"` (gRPC with mutual TLS and signed uploads).
"""

from __future__ import annotations

import copy
import logging
import math
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from veil.errors import UserError, VeilError
from veil.federation.client import ClientRunner
from veil.federation.messages import (
    ClientFailure,
    EvaluateInstruction,
    EvaluateResult,
    FitInstruction,
    FitResult,
    ProtocolInstruction,
    ProtocolReply,
)
from veil.federation.pipeline import UpdatePipeline
from veil.transport.simulated import SimulatedFaults, Stragglers

_log = logging.getLogger("veil.ray")

#: Calls queued per worker: one running, one waiting, so a worker never idles between calls.
_IN_FLIGHT_PER_WORKER = 2
#: How many times a lost worker is replaced before its clients keep failing.
_REPLACEMENTS = 3


@dataclass(frozen=True)
class RaySettings:
    """Where the cluster is and what each client gets (the `[ray]` config section)."""

    #: None: start a local instance; "auto" or "ray://HOST:PORT": connect to a cluster.
    address: str | None = None
    #: Pool size (None: the cluster's CPUs / num_cpus), at most one worker per client.
    workers: int | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory_mb: int | None = None
    clients_per_task: int = 8
    local_cpus: int | None = None
    object_store_mb: int | None = None
    #: torch threads in each worker.
    torch_threads: int = 1


def import_ray() -> Any:
    """The `ray` module, or a `UserError` that says how to install it."""
    try:
        import ray
    except ImportError:
        raise UserError(
            "mode = 'ray' needs Ray, an optional dependency: pip install 'veil[ray]'"
        ) from None
    return ray


class _Worker:
    """One actor of the pool: a shard of the clients and one model they train in turn."""

    def __init__(
        self,
        runners: list[ClientRunner],
        model_factory: Callable[[], nn.Module],
        torch_threads: int,
    ) -> None:
        torch.set_num_threads(torch_threads)
        self.runners = {r.name: r for r in runners}
        self.model = model_factory()

    def fit(self, names: list[str], instruction: FitInstruction) -> list[FitResult | ClientFailure]:
        out: list[FitResult | ClientFailure] = []
        for name in names:
            try:
                out.append(self.runners[name].fit(self.model, instruction))
            except VeilError as exc:
                out.append(ClientFailure(name, instruction.round, f"refused fit: {exc}"))
        return out

    def evaluate(
        self, names: list[str], instruction: EvaluateInstruction
    ) -> list[EvaluateResult | ClientFailure]:
        return [self.runners[name].evaluate(self.model, instruction) for name in names]

    def peak_rss_bytes(self) -> int:
        """This worker process's peak resident memory (VmHWM)."""
        return _peak_rss_bytes()


class RayTransport:
    """A `ClientGateway` that runs `ClientRunner`s in a fixed pool of Ray actors.

    `runners` must be picklable (Ray ships them once); their pipelines' client stages travel
    with them, the aggregator and server stages stay on the server. `model_factory` must be
    picklable too (e.g. a `functools.partial`, not a closure over the data).
    """

    def __init__(
        self,
        runners: Mapping[str, ClientRunner],
        model_factory: Callable[[], nn.Module],
        *,
        settings: RaySettings = RaySettings(),
        dropout: float = 0.0,
        seed: int = 0,
        stragglers: Stragglers | None = None,
    ) -> None:
        if not runners:
            raise ValueError("a Ray federation needs at least one client")
        if any(r.protocol is not None for r in runners.values()):
            raise ValueError(
                "mode = 'ray' carries no aggregation protocol steps (e.g. SecAgg) in this version"
            )
        self._ray = import_ray()
        self.settings = settings
        self._model_factory = model_factory
        sizes = {name: r.num_train_examples for name, r in runners.items()}
        self.faults = SimulatedFaults(
            list(runners),
            seed=seed,
            dropout=dropout,
            stragglers=stragglers,
            examples=sizes.__getitem__,
        )
        self._runners: dict[str, ClientRunner] | None = dict(runners)
        self._owner: dict[str, int] = {}
        self._started = False
        self._shards: list[Any] = []
        self.workers: list[Any] = []
        self._replaced: dict[int, int] = {}

    def start(self) -> None:
        """Connect to Ray (or start a local instance) and start the pool; the first round does
        this by itself, so that nothing starts for a run refused before its first round."""
        if self._runners is None:
            return
        ray = self._ray
        runners, self._runners = self._runners, None
        if not ray.is_initialized():
            self._init(self.settings)
            self._started = True
        try:
            count = self._pool_size(len(runners))
            shards: list[list[ClientRunner]] = [[] for _ in range(count)]
            for i, (name, runner) in enumerate(runners.items()):
                shards[i % count].append(_for_worker(runner))
                self._owner[name] = i % count
            # The shards stay in the object store, so a replaced worker gets its clients back.
            self._shards = [ray.put(shard) for shard in shards]
            self.workers = [self._new_worker(w) for w in range(count)]
            self._replaced = dict.fromkeys(range(count), 0)
        except BaseException:
            self.close()
            raise

    def _new_worker(self, index: int) -> Any:
        options: dict[str, Any] = {"num_cpus": self.settings.num_cpus}
        if self.settings.num_gpus:
            options["num_gpus"] = self.settings.num_gpus
        if self.settings.memory_mb is not None:
            options["memory"] = self.settings.memory_mb * 1024 * 1024
        actor = self._ray.remote(_Worker).options(**options)
        return actor.remote(self._shards[index], self._model_factory, self.settings.torch_threads)

    def _replace_worker(self, index: int) -> None:
        """A lost worker's clients fail the call that was running; a new worker takes its
        shard for the next calls, at most `_REPLACEMENTS` times per worker."""
        if self._replaced[index] >= _REPLACEMENTS:
            return
        self._replaced[index] += 1
        self.workers[index] = self._new_worker(index)

    def _init(self, s: RaySettings) -> None:
        kwargs: dict[str, Any] = {
            "include_dashboard": False,
            "log_to_driver": False,
            "logging_level": logging.WARNING,
        }
        if s.address is not None:
            kwargs["address"] = s.address
        if s.local_cpus is not None:
            kwargs["num_cpus"] = s.local_cpus
        if s.object_store_mb is not None:
            kwargs["object_store_memory"] = s.object_store_mb * 1024 * 1024
        try:
            self._ray.init(**kwargs)
        except ConnectionError as exc:
            raise UserError(
                f"cannot reach the Ray cluster at ray.address = '{s.address}' ({exc}); start it "
                "(`ray start --head`) or remove address for a local instance"
            ) from None

    def _pool_size(self, n_clients: int) -> int:
        if self.settings.workers is not None:
            return min(self.settings.workers, n_clients)
        cpus = float(self._ray.cluster_resources().get("CPU", 1.0))
        return max(1, min(n_clients, math.floor(cpus / self.settings.num_cpus)))

    def fit(
        self, clients: Sequence[str], instruction: FitInstruction
    ) -> Iterator[FitResult | ClientFailure]:
        self.start()
        dispatched: list[str] = []
        for name in clients:
            self._check_known(name)
            reason = self.faults.failure(name, instruction.round, epochs=instruction.plan.epochs)
            if reason is not None:
                yield ClientFailure(name, instruction.round, reason)
            else:
                dispatched.append(name)
        yield from self._dispatch("fit", dispatched, instruction)

    def evaluate(
        self, clients: Sequence[str], instruction: EvaluateInstruction
    ) -> Iterator[EvaluateResult | ClientFailure]:
        self.start()
        for name in clients:
            self._check_known(name)
        yield from self._dispatch("evaluate", list(clients), instruction)

    def exchange(
        self, instructions: Mapping[str, ProtocolInstruction]
    ) -> Iterator[ProtocolReply | ClientFailure]:
        for name, instruction in instructions.items():
            reason = "mode = 'ray' carries no aggregation protocol steps in this version"
            yield ClientFailure(name, instruction.round, reason)

    def _dispatch(self, method: str, names: list[str], instruction: Any) -> Iterator[Any]:
        """Run `method` for `names` on their workers; yield results as calls finish."""
        if not names:
            return
        if not self.workers:
            raise RuntimeError("this Ray transport is closed; build a new one")
        ray = self._ray
        shared = ray.put(instruction)  # the global parameters go to the object store once
        chunk = self.settings.clients_per_task
        queues: list[deque[list[str]]] = [deque() for _ in self.workers]
        by_worker: list[list[str]] = [[] for _ in self.workers]
        for name in names:
            by_worker[self._owner[name]].append(name)
        for w, own in enumerate(by_worker):
            queues[w].extend(own[i : i + chunk] for i in range(0, len(own), chunk))
        pending: dict[Any, tuple[int, Any, list[str]]] = {}

        def submit(w: int) -> None:
            if queues[w]:
                batch = queues[w].popleft()
                actor = self.workers[w]
                pending[getattr(actor, method).remote(batch, shared)] = (w, actor, batch)

        for w in range(len(self.workers)):
            for _ in range(_IN_FLIGHT_PER_WORKER):
                submit(w)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            w, actor, batch = pending.pop(done[0])
            try:
                results = ray.get(done[0])
            except ray.exceptions.RayActorError as exc:
                _log.warning("Ray worker %d lost while running %s: %s", w, batch, exc)
                reason = f"Ray worker lost: {str(exc).splitlines()[0]}"
                results = [ClientFailure(name, instruction.round, reason) for name in batch]
                if self.workers[w] is actor:
                    self._replace_worker(w)
            submit(w)
            yield from results

    def _check_known(self, name: str) -> None:
        if name not in self._owner:
            raise ValueError(f"unknown client '{name}'")

    def worker_peak_rss_bytes(self) -> list[int]:
        """Each worker process's peak resident memory, in pool order."""
        self.start()
        ray = self._ray
        return [int(b) for b in ray.get([w.peak_rss_bytes.remote() for w in self.workers])]

    def close(self) -> None:
        """Kill the pool; stop the Ray instance if this transport started it."""
        ray = self._ray
        self._runners = None
        for worker in self.workers:
            ray.kill(worker)
        self.workers = []
        self._shards = []
        if self._started and ray.is_initialized():
            ray.shutdown()
        self._started = False

    def __enter__(self) -> RayTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _for_worker(runner: ClientRunner) -> ClientRunner:
    """A copy of `runner` whose pipeline holds only the client stages: the aggregator and the
    server stages (which may hold secure noise sources) never leave the server."""
    shipped = copy.copy(runner)
    shipped.pipeline = UpdatePipeline(client_stages=list(runner.pipeline.client_stages))
    return shipped


def _peak_rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0
