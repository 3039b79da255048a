"""Tests for `veil.federation.server` and `veil.transport.local` on small hand-built federations."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import replace

import numpy as np
import pytest
from torch import nn

from veil.data import ClientData
from veil.errors import VeilError
from veil.federation import (
    ClientFailure,
    ClientRunner,
    EvaluateInstruction,
    EvaluateResult,
    FedAvg,
    FederatedServer,
    FitInstruction,
    FitResult,
    RoundRecord,
    Strategy,
    TrainingPlan,
    UpdatePipeline,
)
from veil.federation.messages import ProtocolInstruction
from veil.federation.pipeline import require_channel
from veil.models import LogisticRegression, get_parameters
from veil.tensors import NamedArrays, total_bytes
from veil.transport import LocalTransport

N_FEATURES, N_CLASSES = 3, 2
PLAN = TrainingPlan(epochs=1, batch_size=8, learning_rate=0.1)


def model_factory() -> nn.Module:
    return LogisticRegression(N_FEATURES, N_CLASSES)


def client_data(index: int, n: int = 12) -> ClientData:
    rng = np.random.default_rng(100 + index)
    y = rng.integers(0, N_CLASSES, size=n).astype(np.int64)
    x = (rng.normal(size=(n, N_FEATURES)) + y[:, None]).astype(np.float32)
    return ClientData(f"c{index}", x[: n - 4], y[: n - 4], x[n - 4 :], y[n - 4 :])


def make_runners(n_clients: int) -> dict[str, ClientRunner]:
    pipeline = UpdatePipeline()
    runners = {}
    for i in range(n_clients):
        data = client_data(i, n=12 + i)  # different sizes, so weights differ
        runners[data.name] = ClientRunner(
            data.name, data, n_classes=N_CLASSES, pipeline=pipeline, seed=1000 + i
        )
    return runners


def initial_parameters() -> NamedArrays:
    rng = np.random.default_rng(0)
    return {
        "linear.weight": rng.normal(size=(N_CLASSES, N_FEATURES)).astype(np.float32),
        "linear.bias": np.zeros(N_CLASSES, np.float32),
    }


def make_server(
    gateway: object,
    clients: Sequence[str],
    *,
    strategy: Strategy | None = None,
    **kwargs: object,
) -> FederatedServer:
    return FederatedServer(
        run_id="test-run",
        clients=clients,
        parameters=initial_parameters(),
        strategy=strategy or FedAvg(fraction_evaluate=0.0),
        gateway=gateway,  # type: ignore[arg-type]
        plan=PLAN,
        seed=5,
        **kwargs,  # type: ignore[arg-type]
    )


def assert_params_equal(a: NamedArrays, b: NamedArrays) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


class FakeGateway:
    """Wraps a LocalTransport and lets a test replace or drop some replies."""

    def __init__(
        self,
        inner: LocalTransport,
        *,
        fail: Sequence[str] = (),
        stale: Sequence[str] = (),
        nan: Sequence[str] = (),
    ) -> None:
        self.inner = inner
        self.fail, self.stale, self.nan = set(fail), set(stale), set(nan)
        self.fit_calls: list[list[str]] = []
        self.evaluate_calls: list[list[str]] = []

    def fit(
        self, clients: Sequence[str], instruction: FitInstruction
    ) -> Iterator[FitResult | ClientFailure]:
        self.fit_calls.append(list(clients))
        for name in clients:
            if name in self.fail:
                yield ClientFailure(name, instruction.round, "fake crash")
                continue
            [reply] = self.inner.fit([name], instruction)
            assert isinstance(reply, FitResult)
            if name in self.stale:
                reply = replace(reply, round=instruction.round - 1)
            if name in self.nan:
                update = {k: v.copy() for k, v in reply.update.items()}
                update["linear.bias"][0] = np.nan
                reply = replace(reply, update=update)
            yield reply

    def evaluate(
        self, clients: Sequence[str], instruction: EvaluateInstruction
    ) -> Iterator[EvaluateResult | ClientFailure]:
        self.evaluate_calls.append(list(clients))
        yield from self.inner.evaluate(clients, instruction)


def expected_fedavg(
    runners: dict[str, ClientRunner], names: Sequence[str], parameters: NamedArrays, rnd: int
) -> NamedArrays:
    """The FedAvg step computed directly from the named clients' updates, in float64."""
    transport = LocalTransport(runners, model_factory)
    instruction = FitInstruction("test-run", rnd, parameters, PLAN)
    replies = [r for r in transport.fit(list(names), instruction) if isinstance(r, FitResult)]
    weight = sum(r.weight for r in replies)
    return {
        k: parameters[k] + sum(r.weight * r.update[k].astype(np.float64) for r in replies) / weight
        for k in parameters
    }


def test_byte_accounting_matches_parameter_bytes_times_clients() -> None:
    runners = make_runners(4)
    server = make_server(LocalTransport(runners, model_factory), list(runners))
    payload = total_bytes(initial_parameters())
    assert payload == (N_CLASSES * N_FEATURES + N_CLASSES) * 4
    record = server.run_round(1, evaluate=False)
    assert record.selected == 4
    assert record.completed == 4
    assert record.dropped == 0
    assert record.applied
    assert record.bytes_down == payload * 4
    assert record.bytes_up == payload * 4


def test_byte_accounting_includes_federated_evaluation() -> None:
    runners = make_runners(4)
    server = make_server(
        LocalTransport(runners, model_factory),
        list(runners),
        strategy=FedAvg(fraction_evaluate=0.5),
    )
    payload = total_bytes(initial_parameters())
    record = server.run_round(1, evaluate=True)
    # 4 fit instructions + 2 evaluate instructions go down; 4 updates come up.
    assert record.bytes_down == payload * (4 + 2)
    assert record.bytes_up == payload * 4
    assert "federated_accuracy" in record.metrics
    assert "federated_loss" in record.metrics


def test_fedavg_round_equals_weighted_mean_of_client_updates() -> None:
    runners = make_runners(3)
    server = make_server(LocalTransport(runners, model_factory), list(runners))
    expected = expected_fedavg(runners, list(runners), initial_parameters(), 1)
    record = server.run_round(1, evaluate=False)
    assert record.applied
    for k in expected:
        np.testing.assert_allclose(server.parameters[k], expected[k], rtol=1e-5, atol=1e-6)
    assert not np.allclose(
        server.parameters["linear.weight"], initial_parameters()["linear.weight"]
    )
    assert "train_loss" in record.metrics


def test_failures_are_counted_as_dropped() -> None:
    runners = make_runners(4)
    gateway = FakeGateway(LocalTransport(runners, model_factory), fail=["c1", "c3"])
    server = make_server(gateway, list(runners), min_clients=2)
    record = server.run_round(1, evaluate=False)
    assert record.selected == 4
    assert record.completed == 2
    assert record.dropped == 2
    assert record.applied
    assert sorted(f.client for f in record.failures) == ["c1", "c3"]
    payload = total_bytes(initial_parameters())
    assert record.bytes_up == payload * 2
    assert record.bytes_down == payload * 4
    expected = expected_fedavg(runners, ["c0", "c2"], initial_parameters(), 1)
    for k in expected:
        np.testing.assert_allclose(server.parameters[k], expected[k], rtol=1e-5, atol=1e-6)


def test_too_few_survivors_leave_parameters_unchanged() -> None:
    runners = make_runners(4)
    gateway = FakeGateway(LocalTransport(runners, model_factory), fail=["c0", "c1", "c2"])
    server = make_server(gateway, list(runners), min_clients=2)
    record = server.run_round(1, evaluate=False)
    assert not record.applied
    assert record.completed == 1
    assert record.dropped == 3
    assert_params_equal(server.parameters, initial_parameters())


def test_all_clients_failing_leaves_parameters_unchanged() -> None:
    runners = make_runners(2)
    gateway = FakeGateway(LocalTransport(runners, model_factory), fail=["c0", "c1"])
    server = make_server(gateway, list(runners))
    record = server.run_round(1, evaluate=False)
    assert not record.applied
    assert record.completed == 0
    assert record.dropped == 2
    assert record.bytes_up == 0
    assert "train_loss" not in record.metrics
    assert_params_equal(server.parameters, initial_parameters())


def test_stale_round_result_is_refused() -> None:
    runners = make_runners(3)
    gateway = FakeGateway(LocalTransport(runners, model_factory), stale=["c1"])
    server = make_server(gateway, list(runners))
    record = server.run_round(1, evaluate=False)
    assert record.completed == 2
    assert record.dropped == 1
    [failure] = record.failures
    assert failure.client == "c1"
    assert failure.round == 1
    assert "stale" in failure.reason
    # The stale update was not summed, nor counted as received bytes.
    assert record.bytes_up == total_bytes(initial_parameters()) * 2
    expected = expected_fedavg(runners, ["c0", "c2"], initial_parameters(), 1)
    for k in expected:
        np.testing.assert_allclose(server.parameters[k], expected[k], rtol=1e-5, atol=1e-6)


def test_nan_update_is_refused_while_others_aggregate() -> None:
    runners = make_runners(3)
    gateway = FakeGateway(LocalTransport(runners, model_factory), nan=["c2"])
    server = make_server(gateway, list(runners))
    record = server.run_round(1, evaluate=False)
    assert record.applied
    assert record.completed == 2
    assert record.dropped == 1
    [failure] = record.failures
    assert failure.client == "c2"
    assert "rejected" in failure.reason
    assert all(np.isfinite(v).all() for v in server.parameters.values())
    expected = expected_fedavg(runners, ["c0", "c1"], initial_parameters(), 1)
    for k in expected:
        np.testing.assert_allclose(server.parameters[k], expected[k], rtol=1e-5, atol=1e-6)


class RecordingObserver:
    def __init__(self) -> None:
        self.events: list[tuple[object, ...]] = []

    def on_round_start(self, round_: int, selected: int) -> None:
        self.events.append(("start", round_, selected))

    def on_client_done(self, round_: int, client: str) -> None:
        self.events.append(("client", round_, client))

    def on_round_end(
        self, record: RoundRecord, parameters: NamedArrays, strategy: Strategy
    ) -> None:
        self.events.append(("end", record.round, record.applied))
        self.last_parameters = parameters


def test_observers_are_called_in_order() -> None:
    runners = make_runners(3)
    gateway = FakeGateway(LocalTransport(runners, model_factory), fail=["c1"])
    observers = [RecordingObserver(), RecordingObserver()]
    server = make_server(gateway, list(runners), observers=observers)
    records = server.run(2)
    assert [r.round for r in records] == [1, 2]
    expected = [
        ("start", 1, 3),
        ("client", 1, "c0"),
        ("client", 1, "c1"),  # failures are reported as done too
        ("client", 1, "c2"),
        ("end", 1, True),
        ("start", 2, 3),
        ("client", 2, "c0"),
        ("client", 2, "c1"),
        ("client", 2, "c2"),
        ("end", 2, True),
    ]
    for obs in observers:
        assert obs.events == expected
        assert_params_equal(obs.last_parameters, server.parameters)


def test_run_honours_start_round_and_evaluate_every() -> None:
    runners = make_runners(2)
    gateway = FakeGateway(LocalTransport(runners, model_factory))
    server = make_server(
        gateway, list(runners), strategy=FedAvg(fraction_evaluate=1.0), evaluate_every=2
    )
    records = server.run(5, start_round=2)
    assert [r.round for r in records] == [2, 3, 4, 5]
    # Rounds 2 and 4 by evaluate_every, round 5 because it is the last.
    assert [("federated_accuracy" in r.metrics) for r in records] == [True, False, True, True]
    assert len(gateway.evaluate_calls) == 3


def test_server_needs_clients() -> None:
    with pytest.raises(ValueError, match="client"):
        make_server(FakeGateway(LocalTransport({}, model_factory)), [])


def test_same_federation_twice_gives_identical_parameters() -> None:
    def run_once() -> NamedArrays:
        runners = make_runners(5)
        transport = LocalTransport(runners, model_factory, dropout=0.2, seed=9)
        server = make_server(
            transport, list(runners), strategy=FedAvg(fraction_fit=0.6, fraction_evaluate=0.0)
        )
        server.run(4)
        return server.parameters

    first, second = run_once(), run_once()
    assert_params_equal(first, second)
    assert not np.array_equal(first["linear.weight"], initial_parameters()["linear.weight"])


# --- LocalTransport simulated dropout ---------------------------------------------------------


class CheapRunner:
    """Stands in for a ClientRunner when only the dropout decision matters."""

    def __init__(self, name: str) -> None:
        self.name = name

    def fit(self, model: nn.Module, instruction: FitInstruction) -> FitResult:
        return FitResult(self.name, instruction.round, {}, 1.0, 1)


def dropped_by_round(transport: LocalTransport, clients: list[str], rounds: int) -> list[set[str]]:
    out = []
    for rnd in range(1, rounds + 1):
        instruction = FitInstruction("r", rnd, {}, PLAN)
        out.append(
            {r.client for r in transport.fit(clients, instruction) if isinstance(r, ClientFailure)}
        )
    return out


def cheap_transport(n_clients: int, dropout: float, seed: int) -> tuple[LocalTransport, list[str]]:
    names = [f"c{i}" for i in range(n_clients)]
    runners = {n: CheapRunner(n) for n in names}
    return LocalTransport(runners, model_factory, dropout=dropout, seed=seed), names  # type: ignore[arg-type]


def test_dropout_is_deterministic_for_a_seed() -> None:
    a, names = cheap_transport(10, 0.3, seed=1)
    b, _ = cheap_transport(10, 0.3, seed=1)
    c, _ = cheap_transport(10, 0.3, seed=2)
    assert dropped_by_round(a, names, 30) == dropped_by_round(b, names, 30)
    assert dropped_by_round(a, names, 30) != dropped_by_round(c, names, 30)
    # The decision for a client does not depend on who else was asked in the same call.
    alone = dropped_by_round(a, ["c3"], 30)
    together = dropped_by_round(a, names, 30)
    assert [s & {"c3"} for s in together] == alone


@pytest.mark.parametrize("probability", [0.1, 0.3, 0.7])
def test_dropout_rate_is_close_to_configured(probability: float) -> None:
    n_clients, rounds = 20, 250
    transport, names = cheap_transport(n_clients, probability, seed=3)
    dropped = sum(len(s) for s in dropped_by_round(transport, names, rounds))
    trials = n_clients * rounds
    # Binomial(5000, p): 5 standard deviations is ≤ 0.033 in rate; a fixed seed makes it exact.
    sigma = math.sqrt(trials * probability * (1 - probability))
    assert abs(dropped - trials * probability) <= 5 * sigma


def test_no_dropout_means_every_client_answers() -> None:
    transport, names = cheap_transport(10, 0.0, seed=0)
    assert all(s == set() for s in dropped_by_round(transport, names, 20))


@pytest.mark.parametrize("dropout", [-0.1, 1.0])
def test_dropout_out_of_range_is_refused(dropout: float) -> None:
    with pytest.raises(ValueError, match="dropout"):
        LocalTransport({}, model_factory, dropout=dropout)


def test_unknown_client_is_refused() -> None:
    transport, _ = cheap_transport(2, 0.0, seed=0)
    with pytest.raises(ValueError, match="unknown client 'zz'"):
        list(transport.fit(["zz"], FitInstruction("r", 1, {}, PLAN)))


def test_client_runner_update_is_local_minus_global() -> None:
    runners = make_runners(1)
    runner = runners["c0"]
    model = model_factory()
    params = initial_parameters()
    reply = runner.fit(model, FitInstruction("r", 4, params, PLAN))
    local = get_parameters(model)
    assert reply.client == "c0"
    assert reply.round == 4
    assert reply.weight == reply.num_examples == runner.num_train_examples == 8
    for k in params:
        np.testing.assert_array_equal(reply.update[k], local[k] - params[k])
    assert math.isfinite(reply.metrics["train_loss"])
    # The instruction's parameters are not modified by training.
    assert_params_equal(params, initial_parameters())
    evaluation = runner.evaluate(model, EvaluateInstruction("r", 4, params))
    assert evaluation.num_examples == 4
    assert set(evaluation.metrics) >= {"loss", "accuracy"}


def test_a_protocol_step_sent_to_a_member_without_a_protocol_is_a_refusal_not_a_crash() -> None:
    """A coordinator that sends a SecAgg step to a member whose config sums in the clear: the
    member raises a VeilError, which its transport sends back as a signed refusal (any
    VeilError is, `tests/transport/test_grpc_veil_errors.py`), never a crash."""
    runner = make_runners(1)["c0"]
    step = ProtocolInstruction("run", 1, "advertise", b"")
    with pytest.raises(VeilError, match="make its secure_aggregation match the coordinator's"):
        runner.handle(step)
    with pytest.raises(VeilError, match="needs a protocol channel"):
        require_channel(None, "secure aggregation")
