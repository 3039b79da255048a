"""A site's policy: loading it, the rules a job breaks, the site's own planned charges, and the
guard that checks every task (also over the real gRPC transport)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import asdict, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from support import client_credentials, issue_federation, wait_until
from veil.assembly.model import training_plan
from veil.assembly.privacy import privacy_policy
from veil.config import RunConfig
from veil.errors import UserError
from veil.privacy.dp.ledger import PrivacyLedger
from veil.privacy.dp.policy import Charge
from veil.sites.policy import (
    PolicyRefusal,
    SitePolicy,
    TaskGuard,
    job_charges,
    job_refusals,
    load_policy,
    member_guard,
    year_spent,
)

POLICY = """
datasets = ["loans.csv"]
submitters = ["risk-team"]
require_secure_aggregation = true
allowed_secure_aggregation = ["secagg", "ckks", "tee"]
require_dp = true
max_epsilon_per_job = 3.0
max_delta_per_job = 1e-5
total_epsilon_per_year = 10.0
min_clients_per_round = 3
allowed_models = ["logistic", "mlp"]
max_rounds = 50
send_evaluation_metrics = false
"""


def raw_job(**changes: Any) -> dict[str, Any]:
    """A job that complies with POLICY; `changes` replace whole top-level keys or sections."""
    raw: dict[str, Any] = {
        "secure_aggregation": "secagg",
        "data": {"dataset": "breast_cancer", "scaling": "bounds"},
        "model": {"name": "logistic"},
        "federation": {
            "clients": 4,
            "rounds": 5,
            "min_clients": 3,
            "fraction_evaluate": 0.0,
            "local_epochs": 1,
            "batch_size": 4,
            "learning_rate": 0.1,
        },
        "privacy": {"unit": "record", "epsilon": 2.0, "delta": 1e-5},
    }
    raw.update(changes)
    return raw


def job(**changes: Any) -> RunConfig:
    return RunConfig.from_dict(raw_job(**changes))


def federation(**changes: Any) -> dict[str, Any]:
    return {**raw_job()["federation"], **changes}


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> SitePolicy:
    path = tmp_path_factory.mktemp("policy") / "policy.toml"
    path.write_text(POLICY)
    return load_policy(path)


def refusals(
    policy: SitePolicy,
    config: RunConfig,
    *,
    submitter: str = "risk-team",
    data_file: str = "loans.csv",
    epsilon: float = 2.0,
    delta: float = 1e-5,
    spent: float = 0.0,
) -> list[str]:
    charges = [Charge("loans.csv", epsilon, delta, {})] if config.privacy is not None else []
    return job_refusals(
        policy,
        config,
        submitter=submitter,
        data_file=data_file,
        charges=charges,
        spent_this_year=spent,
    )


# -- load ----------------------------------------------------------------------------------


def test_a_good_policy_loads_with_every_key(policy: SitePolicy) -> None:
    assert policy.datasets == ("loans.csv",)
    assert policy.submitters == ("risk-team",)
    assert policy.require_secure_aggregation and policy.require_dp
    assert policy.allowed_secure_aggregation == ("secagg", "ckks", "tee")
    assert policy.max_epsilon_per_job == 3.0 and policy.max_delta_per_job == 1e-5
    assert policy.total_epsilon_per_year == 10.0
    assert policy.min_clients_per_round == 3 and policy.max_rounds == 50
    assert policy.allowed_models == ("logistic", "mlp")
    assert policy.send_evaluation_metrics is False and policy.allow_test_noise is False


def test_a_minimal_policy_limits_nothing_but_the_data_and_evaluation(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('datasets = ["a.csv"]\n')
    policy = load_policy(path)
    config = job(
        secure_aggregation="plain",
        privacy=None,
        model={"name": "mlp"},
        federation=federation(rounds=500, min_clients=1),
    )
    assert (
        job_refusals(
            policy, config, submitter="anyone", data_file="a.csv", charges=[], spent_this_year=0
        )
        == []
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (POLICY + "max_epsilon = 2\n", "unknown key 'max_epsilon'"),
        (POLICY.replace("max_rounds = 50", 'max_rounds = "50"'), "max_rounds = '50'"),
        (POLICY.replace("require_dp = true", 'require_dp = "yes"'), "require_dp = 'yes'"),
        (POLICY.replace("max_epsilon_per_job = 3.0", "max_epsilon_per_job = -1"), "max_epsilon"),
        (POLICY.replace('"logistic", "mlp"', '"logistik"'), "'logistik' names no model"),
        (POLICY.replace('"secagg", "ckks"', '"secagg+"'), "'secagg+' names no backend"),
        (POLICY.replace('["loans.csv"]', '["../loans.csv"]'), "not a plain file name"),
        (POLICY.replace('datasets = ["loans.csv"]', ""), "missing required key 'datasets'"),
        (POLICY + "max_rounds = 3\n", "invalid TOML"),
    ],
)
def test_a_bad_policy_is_refused_naming_the_file_and_the_key(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(UserError) as refused:
        load_policy(path)
    message = str(refused.value)
    assert message.startswith(str(path)) and expected in message, message
    assert "\n" not in message


def test_a_missing_policy_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"site policy not found: '.*nope\.toml'; pass"):
        load_policy(tmp_path / "nope.toml")


# -- the job -------------------------------------------------------------------------------


def test_a_compliant_job_is_accepted(policy: SitePolicy) -> None:
    assert refusals(policy, job()) == []


@pytest.mark.parametrize(
    ("config_changes", "call_changes", "expected"),
    [
        ({}, {"data_file": "patients.csv"}, 'policy datasets = ["loans.csv"]: the job asks'),
        ({}, {"submitter": "marketing"}, "policy submitters = [\"risk-team\"]: 'marketing'"),
        (
            {"secure_aggregation": "plain"},
            {"policy": {"allowed_secure_aggregation": None}},
            "policy require_secure_aggregation = true: the job's secure_aggregation is 'plain'",
        ),
        (
            {},
            {"policy": {"allowed_secure_aggregation": ("ckks", "tee")}},
            'policy allowed_secure_aggregation = ["ckks", "tee"]: the job\'s secure_aggregation '
            "is 'secagg'",
        ),
        (
            {"privacy": None},
            {
                "policy": {
                    "max_epsilon_per_job": None,
                    "max_delta_per_job": None,
                    "total_epsilon_per_year": None,
                }
            },
            "policy require_dp = true: the job has no [privacy]",
        ),
        (
            {"model": {"name": "cnn"}, "data": {"dataset": "digits", "scaling": "bounds"}},
            {},
            'policy allowed_models = ["logistic", "mlp"]: the job trains model \'cnn\'',
        ),
        (
            {"federation": federation(rounds=51)},
            {},
            "policy max_rounds = 50: the job plans 51 rounds",
        ),
        (
            {"federation": federation(min_clients=2)},
            {},
            "policy min_clients_per_round = 3: the job may aggregate a round of 2 clients",
        ),
        ({}, {"epsilon": 4.12}, "policy max_epsilon_per_job = 3: this job would spend ε = 4.12"),
        ({}, {"delta": 2e-5}, "policy max_delta_per_job = 1e-05: this job would spend δ = 2e-05"),
        (
            {},
            {"spent": 8.5},
            "policy total_epsilon_per_year = 10: loans.csv was charged ε = 8.5 in the last 365 "
            "days and this job would add ε = 2 (total 10.5)",
        ),
        (
            {
                "federation": federation(fraction_evaluate=0.5),
                "data": {
                    "dataset": "breast_cancer",
                    "scaling": "bounds",
                    "validation_fraction": 0.0,
                },
            },
            {},
            "policy send_evaluation_metrics = false: the job asks for federated evaluation "
            "(fraction_evaluate = 0.5)",
        ),
        (
            {
                "privacy": {
                    "unit": "record",
                    "epsilon": 2.0,
                    "delta": 1e-5,
                    "production": False,
                    "noise_seed": 3,
                }
            },
            {},
            "policy allow_test_noise = false: the job's [privacy] production = false",
        ),
    ],
)
def test_each_rule_refuses_on_its_own_naming_its_key(
    policy: SitePolicy,
    config_changes: dict[str, Any],
    call_changes: dict[str, Any],
    expected: str,
) -> None:
    policy = policy.model_copy(update=call_changes.pop("policy", {}))
    found = refusals(policy, job(**config_changes), **call_changes)
    assert len(found) == 1, found
    assert found[0].startswith(expected), found[0]
    assert "; ask" in found[0]  # and what to ask for instead


def test_a_job_within_the_yearly_total_to_the_last_bit_is_accepted(policy: SitePolicy) -> None:
    assert refusals(policy, job(), spent=8.0) == []  # 8 + 2 = 10


def test_a_job_without_dp_breaks_every_rule_about_privacy(policy: SitePolicy) -> None:
    found = refusals(policy, job(privacy=None))
    keys = [line.split(" = ")[0] for line in found]
    assert keys == [
        "policy require_dp",
        "policy max_epsilon_per_job",
        "policy max_delta_per_job",
        "policy total_epsilon_per_year",
    ]


def test_several_broken_rules_are_listed_in_the_order_of_the_file(policy: SitePolicy) -> None:
    config = job(secure_aggregation="plain", federation=federation(rounds=60))
    found = refusals(policy, config, submitter="marketing", epsilon=5.0)
    keys = [line.split(" = ")[0] for line in found]
    assert keys == [
        "policy submitters",
        "policy require_secure_aggregation",
        "policy allowed_secure_aggregation",
        "policy max_epsilon_per_job",
        "policy max_rounds",
    ]


def test_the_yearly_total_counts_only_the_last_365_days_of_this_data_set(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    now = datetime(2025, 6, 1, 12, tzinfo=UTC)
    with PrivacyLedger(path) as ledger:
        for dataset in ("loans.csv", "other.csv"):
            ledger.set_budget(dataset, epsilon=100.0, delta=0.1)
        ages = {1: 400, 2: 366, 3: 364, 4: 10}  # charge id -> days old
        for epsilon in (1.0, 2.0, 3.0, 4.0):
            ledger.charge(
                "loans.csv",
                epsilon=epsilon,
                delta=0.0,
                who="t",
                what="t",
                mechanism="t",
                parameters={},
            )
        ledger.charge(
            "other.csv", epsilon=50.0, delta=0.0, who="t", what="t", mechanism="t", parameters={}
        )
    with sqlite3.connect(path) as db:
        for charge_id, days in ages.items():
            at = (now - timedelta(days=days)).isoformat(timespec="microseconds")
            db.execute("UPDATE charges SET charged_at = ? WHERE id = ?", (at, charge_id))
    with PrivacyLedger(path) as ledger:
        assert year_spent(ledger, "loans.csv", now=now) == pytest.approx(7.0, abs=1e-12)
        assert year_spent(ledger, "loans.csv", now=now + timedelta(days=2)) == 7.0 - 3.0
        assert year_spent(ledger, "nothing.csv", now=now) == 0.0
        spent = year_spent(ledger, "loans.csv", now=now)
    policy = SitePolicy(datasets=("loans.csv",), total_epsilon_per_year=10.0)
    over = refusals(policy, job(), epsilon=3.5, spent=spent)
    assert len(over) == 1 and over[0].startswith("policy total_epsilon_per_year = 10:"), over
    assert refusals(policy, job(), epsilon=3.0, spent=spent) == []


# -- the site's own charges ----------------------------------------------------------------


@pytest.mark.parametrize("unit", ["record", "client"])
def test_job_charges_are_what_the_coordinator_accounts_for_the_member(unit: str) -> None:
    config = job(privacy={"unit": unit, "epsilon": 2.0, "delta": 1e-5})
    members = [("alice", 300), ("bob", 120), ("carol", 80), ("dave", 50)]
    coordinator = privacy_policy(config, members, training_plan(config))
    assert coordinator is not None
    accounted = coordinator.charges("run")
    if unit == "record":
        (expected,) = [c for c in accounted if c.dataset_id == "run/bob"]
    else:
        (expected,) = accounted
    (own,) = job_charges(config, "bob", 120, "loans.csv")
    assert own.dataset_id == "loans.csv"
    assert own.epsilon == pytest.approx(expected.epsilon, abs=1e-12)
    assert own.delta == expected.delta
    assert own.parameters == expected.parameters
    assert 0 < own.epsilon <= 2.0 + 1e-9


def test_a_job_without_privacy_charges_nothing() -> None:
    assert job_charges(job(privacy=None), "bob", 120, "loans.csv") == []


# -- every task ----------------------------------------------------------------------------


def fit(config: RunConfig, round_: int, **plan_changes: Any) -> dict[str, Any]:
    guard_plan = TaskGuard(SitePolicy(datasets=("x",)), config).expected_plan(round_)
    return {"round": round_, "plan": {**asdict(guard_plan), **plan_changes}}


def test_the_guard_passes_the_tasks_of_the_job_as_accepted(policy: SitePolicy) -> None:
    config = job(
        federation=federation(learning_rate_decay=0.5),
        strategy={"name": "fedprox", "mu": 0.1},
        privacy={"unit": "client", "epsilon": 2.0, "delta": 1e-5},
    )
    guard = TaskGuard(policy, config)
    plan = fit(config, 3)["plan"]
    assert plan["learning_rate"] == pytest.approx(0.1 * 0.25)
    assert plan["proximal_mu"] == 0.1 and plan["update_clip_norm"] == 1.0
    for round_ in (1, 2, 3, 4, 5):
        guard("protocol", {"round": round_, "stage": "advertise"})
        guard("fit", fit(config, round_, base_model="abc"))
    assert guard.fitted_rounds == {1, 2, 3, 4, 5}


def test_a_round_already_fitted_may_be_fitted_again(policy: SitePolicy) -> None:
    guard = TaskGuard(policy, job())
    guard("fit", fit(job(), 2))
    guard("fit", fit(job(), 2))  # the coordinator restarted mid-round
    assert guard.fitted_rounds == {2}


@pytest.mark.parametrize("kind", ["fit", "protocol", "evaluate"])
def test_a_task_beyond_the_jobs_rounds_is_refused(kind: str) -> None:
    policy = SitePolicy(datasets=("x",), send_evaluation_metrics=True)
    guard = TaskGuard(policy, job())
    meta = fit(job(), 6) if kind == "fit" else {"round": 6}
    with pytest.raises(PolicyRefusal, match=r"^the job's \[federation\] rounds = 5: .* round 6"):
        guard(kind, meta)


def test_the_policys_max_rounds_binds_when_it_is_lower() -> None:
    guard = TaskGuard(SitePolicy(datasets=("x",), max_rounds=3), job())
    guard("fit", fit(job(), 3))
    with pytest.raises(PolicyRefusal, match=r"^policy max_rounds = 3: .* round 4"):
        guard("fit", fit(job(), 4))
    with pytest.raises(PolicyRefusal, match="round 0"):
        guard("fit", fit(job(), 0))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epochs", 2),
        ("batch_size", 2),
        ("learning_rate", 0.2),
        ("momentum", 0.9),
        ("proximal_mu", 0.5),
        ("update_clip_norm", 10.0),
    ],
)
def test_a_fit_whose_plan_departs_from_the_job_is_refused(
    policy: SitePolicy, field: str, value: object
) -> None:
    guard = TaskGuard(policy, job())
    with pytest.raises(PolicyRefusal, match=rf"round 2 asks for {field} = {value}, but the job"):
        guard("fit", fit(job(), 2, **{field: value}))
    assert guard.fitted_rounds == set()


def test_a_client_level_job_must_keep_clipping(policy: SitePolicy) -> None:
    config = job(privacy={"unit": "client", "epsilon": 2.0, "delta": 1e-5})
    with pytest.raises(PolicyRefusal, match="update_clip_norm = None"):
        TaskGuard(policy, config)("fit", fit(config, 1, update_clip_norm=None))


def test_a_malformed_plan_or_round_is_refused(policy: SitePolicy) -> None:
    guard = TaskGuard(policy, job())
    with pytest.raises(PolicyRefusal, match="malformed training plan"):
        guard("fit", {"round": 1, "plan": {**fit(job(), 1)["plan"], "epochs_bonus": 3}})
    with pytest.raises(PolicyRefusal, match="malformed training plan"):
        guard("fit", {"round": 1})
    with pytest.raises(PolicyRefusal, match="carries no round number"):
        guard("fit", {"round": "1", "plan": fit(job(), 1)["plan"]})


def test_evaluation_is_refused_when_the_policy_forbids_it(policy: SitePolicy) -> None:
    with pytest.raises(PolicyRefusal, match=r"^policy send_evaluation_metrics = false: .*round 2"):
        TaskGuard(policy, job())("evaluate", {"round": 2})
    allowed = SitePolicy(datasets=("x",), send_evaluation_metrics=True)
    TaskGuard(allowed, job())("evaluate", {"round": 2})


def test_an_unknown_task_kind_is_refused(policy: SitePolicy) -> None:
    with pytest.raises(PolicyRefusal, match="task kind 'export' is none that this site knows"):
        TaskGuard(policy, job())("export", {"round": 1})


def test_veil_client_with_a_policy_refuses_a_job_that_breaks_it(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    config = job(secure_aggregation="plain")
    with pytest.raises(PolicyRefusal) as refused:
        member_guard(path, config, data_file="loans.csv", privacy=None)
    message = str(refused.value)
    assert message.startswith(f"this site's policy '{path}' refuses the job: ")
    assert "policy require_secure_aggregation = true" in message
    assert "policy max_epsilon_per_job = 3: the job has no [privacy]" not in message
    guard = member_guard(path, job(), data_file="loans.csv", privacy=None)
    assert isinstance(guard, TaskGuard)


# -- over the real transport ---------------------------------------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return issue_federation(tmp_path_factory.mktemp("pki"), ["alice"])


@pytest.fixture
def gateway(root: Path) -> Iterator[tuple[Any, str]]:
    from veil.crypto import pki
    from veil.crypto.identity import IdentityPublicKey
    from veil.models import LogisticRegression, get_parameters
    from veil.transport.grpc.server import GrpcGateway, ServerCredentials

    server = pki.node_files(root, "server")
    gw = GrpcGateway(
        run_id="run-1",
        identities={"alice": IdentityPublicKey.load(pki.node_files(root, "alice").identity_pub)},
        reference=get_parameters(LogisticRegression(3, 2)),
        deadline_s=30.0,
    )
    credentials = ServerCredentials(
        server.cert.read_bytes(), server.key.read_bytes(), server.ca_cert.read_bytes()
    )
    address = f"localhost:{gw.start('127.0.0.1:0', credentials)}"
    yield gw, address
    gw.stop(0)


def test_a_guard_refusal_reaches_the_coordinator_with_its_reason(
    root: Path, gateway: tuple[Any, str], policy: SitePolicy
) -> None:
    import numpy as np

    from veil.crypto import pki
    from veil.crypto.identity import IdentityKey
    from veil.data import ClientData
    from veil.federation import (
        ClientFailure,
        ClientRunner,
        FitInstruction,
        FitResult,
        UpdatePipeline,
    )
    from veil.models import LogisticRegression, get_parameters
    from veil.transport.grpc.client import open_channel, run_client

    gw, address = gateway
    config = job()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 3)).astype(np.float32)
    y = rng.integers(0, 2, 16).astype(np.int64)
    data = ClientData("alice", x, y, x[:0], y[:0])
    runner = ClientRunner("alice", data, n_classes=2, pipeline=UpdatePipeline(), seed=1)
    guard = TaskGuard(policy, config)
    crashed: list[BaseException] = []

    def member() -> None:
        key = IdentityKey.load(pki.node_files(root, "alice").identity_key)
        try:
            with open_channel(address, client_credentials(root, "alice")) as channel:
                model = LogisticRegression(3, 2)
                run_client(
                    channel, runner, model, key, poll_s=1.0, heartbeat_s=None, task_guard=guard
                )
        except BaseException as exc:  # the test fails on it below
            crashed.append(exc)

    thread = threading.Thread(target=member, daemon=True)
    thread.start()
    wait_until(lambda: gw._clients["alice"].joined, 30, "alice to join")
    parameters = get_parameters(LogisticRegression(3, 2))
    plan = training_plan(config)
    greedy = FitInstruction("run-1", 1, parameters, replace(plan, epochs=5))
    (refusal,) = gw.fit(["alice"], greedy)
    honest = FitInstruction("run-1", 1, parameters, plan)
    (answer,) = gw.fit(["alice"], honest)
    gw.finish(linger_s=10.0)
    thread.join(timeout=30)

    assert not crashed, crashed
    assert isinstance(refusal, ClientFailure)
    assert refusal.reason.startswith(
        "refused fit: the fit task of round 1 asks for epochs = 5, but the job this site "
        "accepted plans 1"
    ), refusal.reason
    assert isinstance(answer, FitResult)
    assert guard.fitted_rounds == {1}
