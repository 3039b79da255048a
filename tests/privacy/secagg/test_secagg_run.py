"""SecAgg inside a federation: the server's view, dropouts and thresholds, weighted FedAvg,
refused key substitution, overflow refused before the run, and distributed DP."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats

import veil
from support import EXAMPLES
from veil.assembly.data import federated_data as _federated_data
from veil.assembly.model import model as _model
from veil.assembly.model import training_plan as _training_plan
from veil.assembly.secure_aggregation.secagg import session as _secure_aggregation
from veil.config import RunConfig, load_config
from veil.errors import UserError
from veil.federation.client import ClientRunner
from veil.federation.messages import (
    ClientFailure,
    FitInstruction,
    FitResult,
    ProtocolInstruction,
    ProtocolReply,
)
from veil.federation.pipeline import AggregationFailed, RoundContext, UpdatePipeline
from veil.federation.server import _RoundChannel
from veil.models import get_parameters
from veil.privacy.secagg.layout import MASKED
from veil.privacy.secagg.wire import SHARE, KeyBundle
from veil.seeding import Purpose, derive_seed
from veil.transport import LocalTransport


def config(**overrides: Any) -> RunConfig:
    raw: dict[str, Any] = {
        "seed": 3,
        "secure_aggregation": "secagg",
        "data": {"dataset": "breast_cancer", "scaling": "bounds"},
        "model": {"name": "logistic"},
        "federation": {"clients": 6, "rounds": 2, "learning_rate": 0.1},
        "secagg": {"clip_range": 4.0, "max_weight": 1000},
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            raw[key] = {**raw.get(key, {}), **value}
        else:
            raw[key] = value
    return RunConfig.from_dict(raw)


class Recorder:
    """A gateway around `LocalTransport` that keeps everything the server receives and can drop
    clients from the fit or tamper with the key bundles."""

    def __init__(
        self,
        inner: LocalTransport,
        *,
        drop: Sequence[str] = (),
        substitute_key_of: str | None = None,
    ) -> None:
        self.inner = inner
        self.drop = set(drop)
        self.substitute_key_of = substitute_key_of
        self.fit_results: list[FitResult] = []
        self.protocol_replies: list[ProtocolReply] = []
        self.refusals: list[ClientFailure] = []

    def fit(
        self, clients: Sequence[str], instruction: FitInstruction
    ) -> Iterator[FitResult | ClientFailure]:
        for reply in self.inner.fit([c for c in clients if c not in self.drop], instruction):
            if isinstance(reply, FitResult):
                self.fit_results.append(reply)
            yield reply
        for name in sorted(self.drop & set(clients)):
            yield ClientFailure(name, instruction.round, "test dropout")

    def evaluate(self, clients: Sequence[str], instruction: Any) -> Iterator[Any]:
        yield from self.inner.evaluate(clients, instruction)

    def exchange(
        self, instructions: Mapping[str, ProtocolInstruction]
    ) -> Iterator[ProtocolReply | ClientFailure]:
        if self.substitute_key_of is not None:
            instructions = {n: self._tamper(i) for n, i in instructions.items()}
        for reply in self.inner.exchange(instructions):
            if isinstance(reply, ProtocolReply):
                self.protocol_replies.append(reply)
            else:
                self.refusals.append(reply)
            yield reply

    def _tamper(self, instruction: ProtocolInstruction) -> ProtocolInstruction:
        """A server that swaps one client's masking key for its own (keeping the signature)."""
        if instruction.stage != SHARE:
            return instruction
        bundle = KeyBundle.from_bytes(instruction.body).advertisements
        victim = self.substitute_key_of
        if victim not in bundle:
            return instruction
        advertised = bundle[victim]
        forged = replace(advertised.advertisement, masking_public=bytes(range(1, 33)))
        bundle = {**bundle, victim: replace(advertised, advertisement=forged)}  # type: ignore[dict-item]
        return replace(instruction, body=KeyBundle(bundle).to_bytes())


def round_once(cfg: RunConfig, **recorder: Any) -> tuple[Any, Recorder, dict[str, Any]]:
    """One round of the run's SecAgg aggregator with every client in process; returns the
    aggregate (or the AggregationFailed), the recorder and the clients' plain updates."""
    fed = _federated_data(cfg)
    model = _model(cfg, fed, seed=1)
    initial = get_parameters(model)
    secure = _secure_aggregation(cfg, None, initial, [c.name for c in fed.clients])
    assert secure is not None
    plain_runners = {
        c.name: ClientRunner(
            c.name,
            c,
            n_classes=fed.n_classes,
            pipeline=UpdatePipeline(),
            seed=derive_seed(cfg.seed, Purpose.LOCAL_TRAINING, i),
        )
        for i, c in enumerate(fed.clients)
    }
    runners = {
        name: ClientRunner(
            name,
            c,
            n_classes=fed.n_classes,
            pipeline=UpdatePipeline(),
            seed=derive_seed(cfg.seed, Purpose.LOCAL_TRAINING, i),
            protocol=secure.participant(name),
        )
        for i, (name, c) in enumerate(zip(plain_runners, fed.clients, strict=True))
    }
    gateway = Recorder(LocalTransport(runners, lambda: _model(cfg, fed)), **recorder)
    names = tuple(runners)
    context = RoundContext("run-1", 1, clients=names)
    channel = _RoundChannel(gateway, "run-1", 1)  # type: ignore[arg-type]
    accumulator = secure.aggregator.start(initial, context, channel)
    instruction = FitInstruction("run-1", 1, initial, _training_plan(cfg))
    for reply in gateway.fit(accumulator.participants, instruction):
        if isinstance(reply, FitResult):
            accumulator.add(reply)
    plain = {
        n: plain_runners[n].fit(_model(cfg, fed), instruction)
        for n in names
        if n not in gateway.drop
    }
    try:
        outcome: Any = accumulator.finish()
    except AggregationFailed as exc:
        outcome = exc
    return outcome, gateway, plain


def plain_sum(plain: Mapping[str, FitResult], max_weight: float) -> tuple[dict[str, Any], float]:
    total: dict[str, Any] = {}
    weight = 0.0
    for r in plain.values():
        w = min(r.weight, max_weight)
        weight += w
        for k, v in r.update.items():
            total[k] = total.get(k, 0.0) + w * v.astype(np.float64)
    return total, weight


def test_weighted_secure_sum_equals_plain_sum_and_server_sees_only_masked_vectors() -> None:
    cfg = config()
    aggregate, gateway, plain = round_once(cfg)
    expected, weight = plain_sum(plain, 1000)
    step = aggregate.report["step"]
    assert aggregate.weight == pytest.approx(weight, abs=6 * step)
    for name, value in expected.items():
        np.testing.assert_allclose(aggregate.total[name], value, atol=6 * step + 1e-5)
    assert aggregate.count == 6 and aggregate.report["recovered_dropouts"] == 0
    # What the server received: one uint32 vector per client, nothing in float.
    assert len(gateway.fit_results) == 6
    for received in gateway.fit_results:
        assert set(received.update) == {MASKED}
        masked = received.update[MASKED]
        assert masked.dtype == np.uint32
        assert received.num_examples == 0 and received.weight == 0.0 and not received.sums
        # On its own, a masked vector says nothing about the update: unmasked, every entry
        # would decode to within one step of w·Δ (stochastic rounding); masked, an entry lands
        # that close with probability 3/2^32, so none of the 62 does.
        mine = plain[received.client]
        own = min(mine.weight, 1000) * np.concatenate([v.reshape(-1) for v in mine.update.values()])
        decoded = masked[: own.size].view(np.int32).astype(np.float64) * step
        assert np.all(np.abs(decoded - own) > 1.5 * step)
    # The protocol replies hold keys, ciphertexts and shares: never the model's bytes.
    raw_updates = [
        np.concatenate([v.reshape(-1) for v in r.update.values()]).tobytes() for r in plain.values()
    ]
    for reply in gateway.protocol_replies:
        assert not any(u[:64] in reply.body for u in raw_updates)


def test_masked_bytes_are_uniform() -> None:
    cfg = config(model={"name": "mlp", "hidden": [256]})
    _, gateway, _ = round_once(cfg)
    masked = gateway.fit_results[0].update[MASKED]
    counts = np.bincount(masked.view(np.uint8), minlength=256)
    # Chi-square goodness of fit to uniform bytes; a correct masking fails at 1e-4 once in
    # ten thousand runs.
    assert stats.chisquare(counts).pvalue > 1e-4


def test_exactly_threshold_survivors_complete_and_one_fewer_fails_clearly() -> None:
    cfg = config(secagg={"threshold": 5})
    names = [f"client-{i}" for i in range(6)]
    aggregate, _, plain = round_once(cfg, drop=names[:1])
    assert aggregate.count == 5 and aggregate.report["recovered_dropouts"] == 1
    expected, _ = plain_sum(plain, 1000)
    step = aggregate.report["step"]
    for name, value in expected.items():
        np.testing.assert_allclose(aggregate.total[name], value, atol=6 * step + 1e-5)
    failed, _, _ = round_once(cfg, drop=names[:2])
    assert isinstance(failed, AggregationFailed)
    assert "fewer than the threshold 5" in str(failed)


def test_secagg_plus_with_dropouts_sums_the_survivors() -> None:
    cfg = config(federation={"clients": 10}, secagg={"neighbours": 6})  # threshold 5 of 7
    aggregate, _, plain = round_once(cfg, drop=["client-2", "client-5"])
    assert aggregate.report["protocol"] == "secagg+" and aggregate.count == 8
    expected, _ = plain_sum(plain, 1000)
    step = aggregate.report["step"]
    for name, value in expected.items():
        np.testing.assert_allclose(aggregate.total[name], value, atol=6 * step + 1e-5)


def test_a_substituted_key_is_refused_by_the_clients() -> None:
    failed, gateway, _ = round_once(config(), substitute_key_of="client-3")
    # Every client refuses the forged advertisement (client-3 sees its own keys altered), so
    # nobody sends shares and the round cannot go on.
    assert isinstance(failed, AggregationFailed)
    assert not [r for r in gateway.protocol_replies if r.stage == SHARE]
    reasons = {f.client: f.reason for f in gateway.refusals}
    assert len(reasons) == 6
    assert "'client-3' is not signed by 'client-3''s roster identity" in reasons["client-0"]
    assert "own key advertisement" in reasons["client-3"]


def test_overflow_is_refused_before_the_run(tmp_path: Path) -> None:
    cfg = config(secagg={"step": 1e-9, "max_weight": 1e6})
    with pytest.raises(UserError, match=r"overflow|wrap"):
        veil.run(cfg, tmp_path / "out")
    assert not (tmp_path / "out" / "veil.db").exists()


def test_clipping_is_counted_not_silent() -> None:
    aggregate, _, _ = round_once(config(secagg={"clip_range": 1e-4}))
    assert aggregate.report["clipped"] > 0


@pytest.mark.parametrize("neighbours", [None, 2], ids=["secagg", "secagg+"])
def test_medical_example_matches_plain_aggregation(neighbours: int | None) -> None:
    example = load_config(EXAMPLES / "medical_diagnosis_secagg.toml")
    assert example.secagg is not None
    secagg = example.secagg.model_copy(update={"neighbours": neighbours})
    secure = veil.run(example.model_copy(update={"secagg": secagg}))
    plain_cfg = example.model_copy(update={"secure_aggregation": "plain", "secagg": None})
    plain = veil.run(plain_cfg)
    assert abs(secure.final["accuracy"] - plain.final["accuracy"]) <= 0.01
    assert secure.privacy.aggregation == "secagg"
    assert all(r.aggregation["survivors"] == 5 for r in secure.rounds)
    # A masked upload is the size of a float32 update (plus one weight entry).
    assert secure.rounds[0].bytes_up <= 1.25 * plain.rounds[0].bytes_up + 20_000


def test_distributed_dp_noise_is_added_by_clients_and_accounted() -> None:
    cfg = config(
        data={"validation_fraction": 0.0},
        federation={"clients": 6, "rounds": 3, "fraction_evaluate": 0.0},
        privacy={
            "unit": "client",
            "epsilon": 8.0,
            "delta": 1e-5,
            "clip_norm": 0.5,
            "production": True,
        },
    )
    result = veil.run(cfg)
    assert result.privacy.aggregation == "secagg"
    assert result.privacy.mechanism is not None
    assert "distributed discrete Gaussian" in str(result.privacy.model_dump())
    assert 0 < (result.privacy.epsilon or 0) <= 8.0 + 1e-6
    assert all(r.applied for r in result.rounds)


def test_adaptive_clipping_with_secagg_is_refused() -> None:
    with pytest.raises(UserError, match="target_quantile"):
        config(
            data={"validation_fraction": 0.0},
            federation={"fraction_evaluate": 0.0},
            privacy={"unit": "client", "epsilon": 8.0, "delta": 1e-5, "target_quantile": 0.5},
        )


def test_secagg_plus_auto_parameters_run_with_a_dropout() -> None:
    cfg = config(federation={"clients": 12}, secagg={"neighbours": "auto"})
    aggregate, _, plain = round_once(cfg, drop=["client-4"])
    report = aggregate.report
    assert report["protocol"] == "secagg+" and report["neighbours"] < 11
    assert 3 * report["threshold"] > 2 * (report["neighbours"] + 1)
    assert aggregate.count == 11
    expected, _ = plain_sum(plain, 1000)
    for name, value in expected.items():
        np.testing.assert_allclose(aggregate.total[name], value, atol=6 * report["step"] + 1e-5)
