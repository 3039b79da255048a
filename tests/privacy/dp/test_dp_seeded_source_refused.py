"""A seeded (reproducible) noise source is refused in production mode, at every component that
adds DP noise or draws DP sampling.

A configuration is validated when it is loaded (`PrivacyConfig` refuses ``noise_seed`` with
``production = true``), but a configuration object can change after that without being
validated again (``model_copy(update=...)`` does not validate). So each component takes its
source from `random_source`, which calls `require_secure` itself: the DP-SGD trainers of record
level (fresh and after a resume), the server's noise and the client sampler of client level
(fresh and after a resume), and the retraining of a privacy audit. Each test hands one of them
the production configuration with a seed and expects the refusal; the same seed with
``production = false`` (a test run) is accepted, so the refusal comes from the mode alone.

The components themselves refuse too, whoever builds them: `DPSGDTrainer`, `GaussianSumNoise`,
`train_split` and `SecAggParticipant` call `require_secure` when built (`train_split` on entry)
with ``production`` true unless the caller says otherwise, so a seeded source handed to one
built by hand is refused with a `ConfigError` naming the component; with
``production=False`` or a `SecureRandom` it runs.

The other noise-adding code takes no `RandomSource`: the SecAgg clients' distributed discrete
Gaussian comes from OpenDP's sampler and the OS CSPRNG (`DistributedGaussian.noise`),
`veil query` from OpenDP, the CKKS release's flooding from a key only the clients hold.
Compression's stochastic rounding is post-processing of an already noised update, and the
audit's retraining is a measurement that is never released (`veil.privacy.audit.recipe`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from veil.config import PrivacyConfig, RunConfig
from veil.crypto.identity import IdentityKey
from veil.errors import ConfigError
from veil.federation import Aggregate, RoundContext, RoundRecord, TrainingPlan
from veil.models import LogisticRegression
from veil.privacy.audit.target import AuditedRun
from veil.privacy.dp.client_level import GaussianSumNoise
from veil.privacy.dp.dpsgd import DPSGDTrainer
from veil.privacy.dp.policy import ClientLevelPrivacy, RecordLevelPrivacy, random_source
from veil.privacy.dp.randomness import RandomSource, SecureRandom, SeededRandom, require_secure
from veil.privacy.secagg.layout import UpdateLayout
from veil.privacy.secagg.participant import SecAggParticipant
from veil.privacy.secagg.roster import StaticRoster
from veil.privacy.secagg.settings import SecAggSettings
from veil.vertical.split import SplitSettings, train_split

PLAN = TrainingPlan(epochs=1, batch_size=16, learning_rate=0.1)
REFUSED = "seeded random source is refused in production mode"


def test_validation_refuses_a_seed_in_production_but_a_copy_skips_validation() -> None:
    with pytest.raises(ValueError, match="noise_seed is refused in production mode"):
        PrivacyConfig(unit="record", epsilon=1.0, delta=1e-5, noise_seed=3)
    # After validation, nothing stops a copy from turning production back on.
    seeded = PrivacyConfig(unit="record", epsilon=1.0, delta=1e-5, production=False, noise_seed=3)
    assert production(seeded).production and production(seeded).noise_seed == 3


def production(config: PrivacyConfig) -> PrivacyConfig:
    """`config` with production mode turned on after validation (as a program could)."""
    return config.model_copy(update={"production": True})


def seeded(unit: str) -> PrivacyConfig:
    return PrivacyConfig(unit=unit, epsilon=2.0, delta=1e-5, production=False, noise_seed=3)  # type: ignore[arg-type]


def record_level(config: PrivacyConfig) -> RecordLevelPrivacy:
    return RecordLevelPrivacy.plan(
        config, clients=[("a", 200), ("b", 150)], training=PLAN, rounds=4
    )


def client_level(config: PrivacyConfig) -> ClientLevelPrivacy:
    return ClientLevelPrivacy.plan(config, n_clients=40, fraction_fit=0.25, rounds=4)


def after_round_2(policy: RecordLevelPrivacy | ClientLevelPrivacy) -> dict[str, Any]:
    """The policy's account after two rounds, as a checkpoint carries it."""
    for r in (1, 2):
        record = RoundRecord(r, 2, 2, 0, True, {}, 0, 0, 0.0, selected_clients=["a", "b"])
        policy.on_round_end(record, {}, None)  # type: ignore[arg-type]
    return dict(json.loads(json.dumps(policy.state())))


def dp_sgd(config: PrivacyConfig) -> object:
    return record_level(config).trainer("a", 0).source


def in_test_mode(config: PrivacyConfig) -> PrivacyConfig:
    """`config` in test mode: the run that wrote the checkpoint a resume starts from."""
    return config.model_copy(update={"production": False})


def dp_sgd_resumed(config: PrivacyConfig) -> object:
    state = after_round_2(record_level(in_test_mode(config)))
    policy = record_level(in_test_mode(config))
    policy.config = config  # the resumed process's configuration
    policy.restore(state, round_=2)
    return policy.trainer("a", 0).source


def client_noise_and_sampler(config: PrivacyConfig) -> object:
    policy = client_level(config)
    return policy.server_stage.source, policy.sampler


def client_resumed(config: PrivacyConfig) -> object:
    state = after_round_2(client_level(in_test_mode(config)))
    policy = client_level(in_test_mode(config))
    policy.config = config  # the resumed process's configuration
    policy.restore(state, round_=2)
    return policy.server_stage.source, policy.sampler


def audit_retraining(config: PrivacyConfig) -> object:
    """The source an audit retrains with (`AuditedRun.noise_source`), for a run of `config`;
    only the run's configuration matters to it, the other fields stay empty."""
    run_config = RunConfig.from_dict(
        {
            "data": {"dataset": "breast_cancer", "scaling": "bounds"},
            "federation": {"clients": 2, "rounds": 1, "fraction_evaluate": 0.0},
            "privacy": in_test_mode(config).model_dump(),
        }
    ).model_copy(update={"privacy": config})
    run = AuditedRun(
        path=Path("."),
        result=None,  # type: ignore[arg-type]
        config=run_config,
        fed=None,  # type: ignore[arg-type]
        final={},
        initial={},
        plan=PLAN,
    )
    return run.noise_source(20_011, 0)


COMPONENTS: dict[str, tuple[str, Callable[[PrivacyConfig], object]]] = {
    "DP-SGD trainer": ("record", dp_sgd),
    "DP-SGD trainer after a resume": ("record", dp_sgd_resumed),
    "client-level noise and sampler": ("client", client_noise_and_sampler),
    "client-level noise and sampler after a resume": ("client", client_resumed),
    "privacy audit retraining": ("record", audit_retraining),
}


@pytest.mark.parametrize("component", list(COMPONENTS))
def test_each_component_refuses_a_seeded_source_in_production(component: str) -> None:
    unit, build = COMPONENTS[component]
    test_run = seeded(unit)
    sources = build(test_run)
    for source in sources if isinstance(sources, tuple) else (sources,):
        assert isinstance(source, SeededRandom)  # accepted in a test run
    with pytest.raises(ConfigError, match=REFUSED):
        build(production(test_run))


@pytest.mark.parametrize("component", list(COMPONENTS))
def test_without_a_seed_each_component_draws_from_the_csprng(component: str) -> None:
    unit, build = COMPONENTS[component]
    config = PrivacyConfig(unit=unit, epsilon=2.0, delta=1e-5)  # type: ignore[arg-type]
    sources = build(config)
    for source in sources if isinstance(sources, tuple) else (sources,):
        assert isinstance(source, SecureRandom)


def test_require_secure_itself() -> None:
    with pytest.raises(ConfigError, match=f"the thing: a {REFUSED}"):
        require_secure(SeededRandom(0), production=True, what="the thing")
    require_secure(SeededRandom(0), production=False, what="the thing")
    require_secure(SecureRandom(), production=True, what="the thing")
    assert isinstance(
        random_source(PrivacyConfig(unit="record", epsilon=1, delta=1e-5)), SecureRandom
    )


# --------------------------------------------------------------------------- built by hand


def dpsgd_trainer(source: RandomSource, **production: bool) -> None:
    """Build a `DPSGDTrainer` on `source` and train one epoch of a small model with it."""
    trainer = DPSGDTrainer(noise_multiplier=1.0, clip_norm=1.0, source=source, **production)
    x = torch.as_tensor(np.random.default_rng(0).normal(size=(32, 3)), dtype=torch.float32)
    model = LogisticRegression(3, 2)
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train(model, x, (x[:, 0] > 0).long(), PLAN, torch.Generator())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def client_level_noise(source: RandomSource, **production: bool) -> None:
    """Build a `GaussianSumNoise` on `source` and noise one round's sum with it."""
    stage = GaussianSumNoise(
        noise_multiplier=1.0, clip_norm=1.0, expected_clients=2.0, source=source, **production
    )
    out = stage.apply(Aggregate({"w": np.zeros(64, np.float32)}, 2.0, 2), RoundContext("r", 1))
    assert np.count_nonzero(out.total["w"]) == 64


def split_learning(source: RandomSource, **production: bool) -> None:
    """Train one epoch of split learning with embedding and label DP drawn from `source`."""
    rng = np.random.default_rng(1)
    bank, payment = rng.normal(size=(40, 3)), rng.normal(size=(40, 2))
    labels = (bank[:, 0] > 0).astype(np.int64)
    settings = SplitSettings(epochs=1, batch_size=20, embedding_noise=1.0, gradient_noise=1.0)
    result = train_split(
        bank.astype(np.float32),
        labels,
        payment.astype(np.float32),
        settings,
        random=source,
        **production,
    )
    assert result.epsilon_embeddings is not None and result.epsilon_labels is not None


def secagg_participant(source: RandomSource, **production: bool) -> None:
    """Build a client's `SecAggParticipant` whose fixed-point rounding draws from `source`."""
    settings = SecAggSettings()
    names = ["org-0", "org-1"]
    keys = {name: IdentityKey.generate() for name in names}
    participant = SecAggParticipant(
        names[0],
        keys[names[0]],
        StaticRoster({name: key.public_key() for name, key in keys.items()}),
        settings,
        UpdateLayout.of({"w": np.zeros(8, np.float32)}, settings.sum_bounds),
        random=source,
        **production,
    )
    assert participant.random is source


BUILT_BY_HAND: dict[str, tuple[str, Callable[..., None]]] = {
    "DPSGDTrainer": ("DP-SGD trainer", dpsgd_trainer),
    "GaussianSumNoise": ("client-level Gaussian noise", client_level_noise),
    "train_split": ("split learning's DP noise", split_learning),
    "SecAggParticipant": ("secure aggregation's rounding", secagg_participant),
}


@pytest.mark.parametrize("component", list(BUILT_BY_HAND))
def test_a_component_built_by_hand_refuses_a_seeded_source_unless_told_it_is_a_test(
    component: str,
) -> None:
    what, use = BUILT_BY_HAND[component]
    # Production is the default: nothing said, a seeded source is refused, naming the component.
    with pytest.raises(ConfigError, match=f"^{what}: a {REFUSED}"):
        use(SeededRandom(0))
    with pytest.raises(ConfigError, match=f"^{what}: a {REFUSED}"):
        use(SeededRandom(0), production=True)
    use(SeededRandom(0), production=False)  # a test run
    use(SecureRandom())  # the production source, in production
