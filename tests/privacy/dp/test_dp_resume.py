"""Crash-safe accounting: a run killed with SIGKILL and resumed keeps one privacy account.

The checkpoint carries the accountants' composed events (JSON, per organisation at record level)
and the ledger charges; a resumed run continues the same account, so its ε equals the
uninterrupted run's, `rounds[].epsilon` never decreases, the ledger is charged once, and the
randomness after the resume is fresh.
"""

from __future__ import annotations

import itertools
import json
import math
import signal
import sqlite3
import subprocess
import sys
import textwrap
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import veil
from support import ReservedPort, spawn_veil, wait_for_port
from veil.config import RunConfig, load_config
from veil.errors import ConfigError, StoreError
from veil.federation import RoundRecord, Strategy, TrainingPlan
from veil.privacy.dp.accountant import Accountant, dpsgd_epsilon
from veil.privacy.dp.ledger import PrivacyLedger
from veil.privacy.dp.policy import ClientLevelPrivacy, RecordLevelPrivacy, random_source
from veil.privacy.dp.randomness import SecureRandom
from veil.store import Checkpoint, load_checkpoint, save_checkpoint
from veil.tensors import NamedArrays

ROUNDS = 10
KILL_AFTER = 4
PLAN = TrainingPlan(epochs=1, batch_size=32, learning_rate=0.1)

RECORD = """
name = "resume-record"
seed = 3
[data]
dataset = "breast_cancer"
scaling = "bounds"
validation_fraction = 0.0
[model]
name = "logistic"
[federation]
clients = 3
rounds = 10
batch_size = 32
learning_rate = 0.5
fraction_evaluate = 0.0
[privacy]
unit = "record"
epsilon = 2.0
delta = 1e-5
ledger = "ledger.db"
dataset_id = "hospitals"
"""

CLIENT = """
name = "resume-client"
seed = 3
[data]
dataset = "breast_cancer"
scaling = "bounds"
validation_fraction = 0.0
[model]
name = "logistic"
[federation]
clients = 8
rounds = 10
fraction_fit = 0.5
learning_rate = 0.5
fraction_evaluate = 0.0
[privacy]
unit = "client"
epsilon = 5.0
delta = 1e-5
"""

DEPLOYED = """
name = "resume-deployed"
mode = "deployment"
seed = 3
[data]
dataset = "breast_cancer"
scaling = "bounds"
validation_fraction = 0.0
[model]
name = "logistic"
[federation]
clients = 3
rounds = 10
fraction_fit = 0.7
learning_rate = 0.5
fraction_evaluate = 0.0
[privacy]
unit = "client"
epsilon = 5.0
delta = 1e-5
ledger = "ledger.db"
[deployment]
round_deadline_s = 60
reconnect_timeout_s = 120
"""

# A simulation run that SIGKILLs itself right after round KILL_AFTER is recorded (observers
# given to `veil.run` run after the run's own recorder has written the round and checkpoint).
KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys
    import veil

    class KillAfter:
        def on_round_start(self, round_, selected): pass
        def on_client_done(self, round_, client): pass
        def on_round_end(self, record, parameters, strategy):
            if record.round == int(sys.argv[3]):
                os.kill(os.getpid(), signal.SIGKILL)

    veil.run(sys.argv[1], sys.argv[2], observers=[KillAfter()])
    """
)


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def set_budgets(ledger: Path, *dataset_ids: str) -> None:
    with PrivacyLedger(ledger) as book:
        for dataset_id in dataset_ids:
            book.set_budget(dataset_id, epsilon=100.0, delta=1e-2)


def without_ledger(config: RunConfig) -> RunConfig:
    raw = config.to_dict()
    raw["mode"] = "simulation"
    raw["privacy"]["ledger"] = None
    return RunConfig.from_dict(raw)


def kill_run_after(config_path: Path, out: Path, round_: int) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(config_path), str(out), str(round_)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def epsilons(result: dict[str, Any]) -> list[float]:
    return [r["epsilon"] for r in result["rounds"]]


def assert_same_account(resumed: dict[str, Any], reference: veil.Result) -> None:
    """The resumed run's ε per round and in total equal the uninterrupted run's."""
    assert [r["round"] for r in resumed["rounds"]] == list(range(1, ROUNDS + 1))
    eps = epsilons(resumed)
    assert all(b >= a for a, b in itertools.pairwise(eps)), eps  # never decreases
    expected = [r.epsilon for r in reference.rounds]
    assert eps == pytest.approx(expected, abs=1e-6, rel=0)
    assert reference.privacy.epsilon is not None
    assert resumed["privacy"]["epsilon"] == pytest.approx(reference.privacy.epsilon, abs=1e-6)
    assert resumed["privacy"]["mechanism"]["steps"] == reference.privacy.mechanism.steps  # type: ignore[union-attr]


# --------------------------------------------------------------------------- simulation


def test_record_level_run_killed_after_round_4_resumes_the_same_account(tmp_path: Path) -> None:
    config_path = write_config(tmp_path, RECORD)
    set_budgets(tmp_path / "ledger.db", *(f"hospitals/client-{i}" for i in range(3)))
    out = tmp_path / "out"
    kill_run_after(config_path, out, KILL_AFTER)

    checkpoint = load_checkpoint(out / "checkpoint.safetensors")
    assert checkpoint.round == KILL_AFTER and checkpoint.privacy is not None
    orgs = checkpoint.privacy["account"]["organisations"]
    assert [o["name"] for o in orgs] == ["client-0", "client-1", "client-2"]
    assert all(o["accountant"]["events"][0]["times"] == KILL_AFTER for o in orgs)
    with PrivacyLedger(tmp_path / "ledger.db") as book:
        charged = book.charges()
    assert len(charged) == 3 and all(c.released_at is None for c in charged)

    veil.run(config_path, out, resume=True)
    resumed = json.loads((out / "result.json").read_text())
    reference = veil.run(without_ledger(load_config(config_path)))
    assert_same_account(resumed, reference)
    per_org = {o["name"]: o for o in resumed["privacy"]["per_organisation"]}
    for org in reference.privacy.model_extra["per_organisation"]:  # type: ignore[index]
        assert per_org[org["name"]]["epsilon"] == pytest.approx(org["epsilon"], abs=1e-6)
        assert per_org[org["name"]]["mechanism"]["steps"] == org["mechanism"]["steps"]
    # The ledger was charged once per organisation, when the run started, and released now.
    with PrivacyLedger(tmp_path / "ledger.db") as book:
        after = book.charges()
    assert [c.id for c in after] == [c.id for c in charged]
    assert all(c.released_at is not None for c in after)


def test_client_level_run_killed_after_round_4_resumes_the_same_account(tmp_path: Path) -> None:
    config_path = write_config(tmp_path, CLIENT)
    out = tmp_path / "out"
    kill_run_after(config_path, out, KILL_AFTER)
    with closing(sqlite3.connect(out / "veil.db")) as db:
        killed = [r[0] for r in db.execute("SELECT round FROM rounds ORDER BY round")]
    assert killed == list(range(1, KILL_AFTER + 1))

    veil.run(config_path, out, resume=True)
    resumed = json.loads((out / "result.json").read_text())
    reference = veil.run(load_config(config_path))
    assert_same_account(resumed, reference)
    # The composition is the documented one: one subsampled Gaussian per round.
    m = resumed["privacy"]["mechanism"]
    assert m["steps"] == ROUNDS
    assert resumed["privacy"]["epsilon"] == pytest.approx(
        dpsgd_epsilon(m["noise_multiplier"], m["sampling_rate"], ROUNDS, 1e-5), abs=1e-6
    )


class _Crash(Exception):
    pass


class _CrashAfter:
    """An observer that makes the run fail after a round (recorded and checkpointed)."""

    def __init__(self, round_: int) -> None:
        self.round = round_

    def on_round_start(self, round_: int, selected: int) -> None:
        pass

    def on_client_done(self, round_: int, client: str) -> None:
        pass

    def on_round_end(
        self, record: RoundRecord, parameters: NamedArrays, strategy: Strategy
    ) -> None:
        if record.round == self.round:
            raise _Crash


def short_record_config(tmp_path: Path, **privacy: Any) -> RunConfig:
    config = load_config(write_config(tmp_path, RECORD)).to_dict()
    config["federation"]["rounds"] = 3
    config["privacy"].update(privacy)
    return RunConfig.from_dict(config)


def crash_after(config: RunConfig, out: Path, round_: int, *, resume: bool = False) -> None:
    with pytest.raises(_Crash):
        veil.run(config, out, observers=[_CrashAfter(round_)], resume=resume)


def test_a_resume_reuses_the_ledger_charge_or_charges_when_it_is_gone(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.db"
    names = [f"hospitals/client-{i}" for i in range(3)]
    set_budgets(ledger, *names)
    config = short_record_config(tmp_path)
    out = tmp_path / "out"
    crash_after(config, out, 1)
    with PrivacyLedger(ledger) as book:
        first = book.charges()
    assert len(first) == 3 and all(c.released_at is None for c in first)
    crash_after(config, out, 2, resume=True)  # resumed, crashed again: the same charges
    veil.run(config, out, resume=True)
    with PrivacyLedger(ledger) as book:
        after = book.charges()
        spent = book.budget(names[0]).epsilon_spent
    assert [c.id for c in after] == [c.id for c in first]  # never charged twice
    assert all(c.released_at is not None for c in after)
    assert spent == pytest.approx(first[0].epsilon)

    # A ledger that lost the charge (replaced by a fresh file) is charged again on resume:
    # the run is never left uncounted.
    out2 = tmp_path / "out2"
    crash_after(config, out2, 1)
    ledger.unlink()
    set_budgets(ledger, *names)
    veil.run(config, out2, resume=True)
    with PrivacyLedger(ledger) as book:
        recharged = book.charges()
    assert len(recharged) == 3 and all(c.released_at is not None for c in recharged)


def test_resume_refuses_a_checkpoint_that_does_not_match_the_configuration(
    tmp_path: Path,
) -> None:
    config = short_record_config(tmp_path, ledger=None)
    out = tmp_path / "out"
    crash_after(config, out, 2)

    def refusal(other: RunConfig) -> str:
        with pytest.raises(ConfigError) as info:  # a UserError: one line from the CLI
            veil.run(other, out, resume=True)
        message = str(info.value)
        assert "\n" not in message and message.startswith("cannot resume")
        return message

    raw = config.to_dict()
    raw["privacy"]["epsilon"] = 3.0
    assert "privacy.epsilon = 2.0" in refusal(RunConfig.from_dict(raw))
    raw = config.to_dict()
    raw["federation"]["rounds"] = 5
    assert "federation.rounds = 3" in refusal(RunConfig.from_dict(raw))
    raw = config.to_dict()
    raw["privacy"] = {"unit": "client", "epsilon": 2.0, "delta": 1e-5}
    assert "privacy.unit = 'record'" in refusal(RunConfig.from_dict(raw))
    raw = config.to_dict()
    del raw["privacy"]
    assert "has no [privacy]" in refusal(RunConfig.from_dict(raw))

    # A checkpoint without an account (an older Veil's) cannot continue a DP run.
    path = out / "checkpoint.safetensors"
    old = load_checkpoint(path)
    save_checkpoint(
        path,
        Checkpoint(old.run_id, old.round, old.parameters, old.strategy_state, old.meta),
    )
    assert "holds no privacy account" in refusal(config)
    # Nothing was touched by the refusals: the original configuration still resumes.
    save_checkpoint(path, old)
    result = veil.run(config, out, resume=True)
    eps = [r.epsilon or 0.0 for r in result.rounds]
    assert len(eps) == 3 and 0 < eps[0] <= eps[1] <= eps[2]


def test_a_tampered_account_is_refused_as_unreadable(tmp_path: Path) -> None:
    config = short_record_config(tmp_path, ledger=None)
    out = tmp_path / "out"
    crash_after(config, out, 2)
    path = out / "checkpoint.safetensors"
    old = load_checkpoint(path)
    assert old.privacy is not None
    account = json.loads(json.dumps(old.privacy))
    event = account["account"]["organisations"][0]["accountant"]["events"][0]
    event["event"]["class_name"] = "LaplaceDpEvent"
    save_checkpoint(
        path,
        Checkpoint(
            old.run_id, old.round, old.parameters, old.strategy_state, old.meta, privacy=account
        ),
    )
    with pytest.raises(StoreError, match=r"privacy account is unreadable.*LaplaceDpEvent"):
        veil.run(config, out, resume=True)


# --------------------------------------------------------------------------- randomness


def _draws(config: RunConfig, resume_at: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first draws of organisation 0's DP-SGD source, and of a client-level run's noise
    and sampler, fresh or after a restore at round `resume_at`."""
    assert config.privacy is not None
    record = RecordLevelPrivacy.plan(
        config.privacy, clients=[("a", 100), ("b", 120)], training=PLAN, rounds=10
    )
    client_cfg = config.privacy.model_copy(update={"unit": "client"})
    client = ClientLevelPrivacy.plan(client_cfg, n_clients=8, fraction_fit=0.5, rounds=10)
    if resume_at is not None:
        for policy in (record, client):
            for r in range(1, resume_at):
                policy.on_round_end(
                    RoundRecord(r, 2, 2, 0, True, {}, 0, 0, 0.0, selected_clients=["a", "b"]),
                    {},
                    None,  # type: ignore[arg-type]
                )
        record.restore(json.loads(json.dumps(record.state())), round_=resume_at - 1)
        client.restore(json.loads(json.dumps(client.state())), round_=resume_at - 1)
    return (
        record.trainer("a", 0).source.standard_normal(8),
        client.server_stage.source.standard_normal(8),
        client.sampler.uniform(8),
    )


def test_seeded_randomness_after_a_resume_is_not_a_replay(tmp_path: Path) -> None:
    config = short_record_config(tmp_path, ledger=None, production=False, noise_seed=7)
    start = _draws(config, None)
    again = _draws(config, None)
    resumed = _draws(config, 3)
    for first, same, after in zip(start, again, resumed, strict=True):
        np.testing.assert_array_equal(first, same)  # a seeded source is reproducible...
        assert not np.isin(after, first).any()  # ...but a resumed one does not replay it


def test_production_randomness_after_a_resume_comes_from_the_csprng(tmp_path: Path) -> None:
    config = short_record_config(tmp_path, ledger=None)
    assert config.privacy is not None and config.privacy.noise_seed is None
    assert isinstance(random_source(config.privacy, 0, resumed_at=5), SecureRandom)
    policy = RecordLevelPrivacy.plan(config.privacy, clients=[("a", 100)], training=PLAN, rounds=3)
    policy.resumed_at = 5
    assert isinstance(policy.trainer("a", 0).source, SecureRandom)


# --------------------------------------------------------------------------- accountant


def test_accountant_state_is_json_and_composes_back_to_the_same_epsilon() -> None:
    acc = Accountant()
    for r in range(5):
        acc.compose_subsampled_gaussian(1.3, 0.25, 6)
        if r == 2:
            acc.compose_gaussian(4.0, 2)
    state = json.loads(json.dumps(acc.state(), allow_nan=False))
    assert [e["times"] for e in state["events"]] == [3, 1, 2]
    assert state["events"][0]["event"] == {
        "class_name": "SelfComposedDpEvent",
        "count": 6,
        "event": {
            "class_name": "PoissonSampledDpEvent",
            "sampling_probability": 0.25,
            "event": {"class_name": "GaussianDpEvent", "noise_multiplier": 1.3},
        },
    }
    back = Accountant.from_state(state)
    assert back.steps == acc.steps == 32
    assert back.events == acc.events and len(acc.events) == 6
    assert back.epsilon(1e-5) == acc.epsilon(1e-5)  # bit for bit
    acc.compose_subsampled_gaussian(1.3, 0.25, 6)
    back.compose_subsampled_gaussian(1.3, 0.25, 6)
    assert back.epsilon(1e-5) == acc.epsilon(1e-5)
    rdp = Accountant("rdp", neighbouring="replace")
    rdp.compose_subsampled_gaussian(1.1, 0.1, 50)
    assert Accountant.from_state(rdp.state()).epsilon(1e-5) == rdp.epsilon(1e-5)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda s: s.update(version=2),
        lambda s: s.update(steps=31),
        lambda s: s.update(kind="moments"),
        lambda s: s["events"][0].update(times=-1),
        lambda s: s["events"][0]["event"].update(count=1.5),
        lambda s: s["events"][0]["event"]["event"].update(sampling_probability=math.nan),
        lambda s: s["events"][0]["event"]["event"]["event"].update(noise_multiplier=0),
        lambda s: s["events"][0]["event"].update(class_name="ComposedDpEvent"),
    ],
)
def test_accountant_refuses_a_state_it_cannot_read(corrupt: Any) -> None:
    acc = Accountant()
    acc.compose_subsampled_gaussian(1.3, 0.25, 32)
    state = acc.state()
    corrupt(state)
    with pytest.raises(ValueError, match="accountant state"):
        Accountant.from_state(state)


def test_checkpoint_carries_the_privacy_account_sealed(tmp_path: Path) -> None:
    key = bytes(range(32))
    path = tmp_path / "c.safetensors"
    params = {"w": np.ones((2, 2), np.float32)}
    account = {"account": {"unit": "client", "epsilon": 1.5}, "ledger": []}
    row = {"round": 3, "clients": 2, "dropped": 0, "metrics": {"loss": 0.5}, "epsilon": 1.5}
    save_checkpoint(
        path, Checkpoint("r", 3, params, {}, {}, privacy=account, round_result=row), key=key
    )
    assert b"epsilon" not in path.read_bytes()  # sealed with the rest
    loaded = load_checkpoint(path, key=key)
    assert loaded.privacy == account and loaded.round_result == row
    save_checkpoint(path, Checkpoint("r", 3, params, {}, {}))
    loaded = load_checkpoint(path)
    assert loaded.privacy is None and loaded.round_result is None


# --------------------------------------------------------------------------- deployment


@pytest.mark.slow
@pytest.mark.parametrize("unit", ["client", "record"])
def test_deployed_server_killed_after_round_4_resumes_the_same_account(
    tmp_path: Path, unit: str
) -> None:
    from veil.deployment import prepare_deployment

    text = DEPLOYED if unit == "client" else DEPLOYED.replace('unit = "client"', 'unit = "record"')
    config_path = write_config(tmp_path, text)
    ids = (
        ["resume-deployed"]
        if unit == "client"
        else [f"resume-deployed/client-{i}" for i in range(3)]
    )
    set_budgets(tmp_path / "ledger.db", *ids)
    config = load_config(config_path)
    files = prepare_deployment(config, tmp_path / "out", config_path=config_path)
    out, logs = files.run_dir, files.logs
    # The server kills itself right after writing round KILL_AFTER's checkpoint, and comes back
    # at the same address (reserved meanwhile), which the members keep retrying.
    port = ReservedPort()
    args = [port.address() if a == "127.0.0.1:0" else a for a in files.server_args()]
    server = spawn_veil(args, logs / "server.log", die=("checkpoint", KILL_AFTER))
    clients: list[subprocess.Popen[bytes]] = []
    try:
        wait_for_port(files.port_file, server, 120)
        clients = [
            spawn_veil(files.client_args(n, f"localhost:{port.port}"), logs / f"{n}.log")
            for n in files.clients
        ]
        assert server.wait(timeout=300) == -signal.SIGKILL, (logs / "server.log").read_text()
        with closing(sqlite3.connect(out / "veil.db")) as db:
            stored = [r[0] for r in db.execute("SELECT round FROM rounds ORDER BY round")]
        server = spawn_veil([*args, "--resume"], logs / "server.log")
        assert server.wait(timeout=300) == 0, (logs / "server.log").read_text()
        for proc in clients:
            assert proc.wait(timeout=60) == 0
    finally:
        port.close()
        for proc in [server, *clients]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    resumed = json.loads((out / "result.json").read_text())
    reference = veil.run(without_ledger(config))
    assert_same_account(resumed, reference)
    with PrivacyLedger(tmp_path / "ledger.db") as book:
        charges = book.charges()
    # Charged once (per organisation at record level), and released.
    assert len(charges) == len(ids) and all(c.released_at is not None for c in charges)
    if unit == "record":
        per_org = {o["name"]: o for o in resumed["privacy"]["per_organisation"]}
        for org in reference.privacy.model_extra["per_organisation"]:  # type: ignore[index]
            assert per_org[org["name"]]["epsilon"] == pytest.approx(org["epsilon"], abs=1e-6)
    # Killed after round 4's checkpoint, before its row reached the run store: the resumed
    # server wrote that row from the checkpoint (result.json has every round, checked above).
    assert stored == list(range(1, KILL_AFTER))
