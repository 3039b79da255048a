"""Simulated malicious clients, and robust aggregation against them on the medical example."""

from __future__ import annotations

import tomllib
from typing import Any

import numpy as np
import pytest
import torch

from support import EXAMPLES
from veil.config import RunConfig
from veil.federation import FitResult, RoundContext, TrainingPlan
from veil.federation.attacks import LabelFlipTrainer, ModelPoisoning, malicious_clients
from veil.federation.training import TrainStats
from veil.run import run

CLIENTS = [f"c{i}" for i in range(50)]
PLAN = TrainingPlan(epochs=1, batch_size=4, learning_rate=0.1)


def update(value: float = 1.0) -> dict[str, np.ndarray]:
    return {"w": np.full((4, 3), value, np.float32), "b": np.full(3, -value, np.float32)}


def fit(client: str, rnd: int = 1) -> FitResult:
    return FitResult(client, rnd, update(0.5), 10.0, 10)


def test_malicious_clients_are_a_seeded_floor_of_the_fraction() -> None:
    chosen = malicious_clients(CLIENTS, 0.25, seed=3)
    assert len(chosen) == 12  # ⌊0.25 · 50⌋
    assert chosen == malicious_clients(CLIENTS, 0.25, seed=3)
    assert chosen != malicious_clients(CLIENTS, 0.25, seed=4)
    assert all(CLIENTS[i] == name for name, i in chosen.items())
    assert len(malicious_clients(CLIENTS[:5], 0.2, seed=0)) == 1


@pytest.mark.parametrize(
    ("kind", "scale", "factor"),
    [("sign_flip", 1.0, -1.0), ("sign_flip", 4.0, -4.0), ("scale", 10.0, 10.0)],
)
def test_model_poisoning_changes_only_malicious_updates(
    kind: Any, scale: float, factor: float
) -> None:
    stage = ModelPoisoning(kind, {"c1": 1}, scale=scale, seed=0)
    ctx = RoundContext("run", 1, PLAN)
    honest = stage.apply(fit("c0"), ctx)
    np.testing.assert_array_equal(honest.update["w"], update(0.5)["w"])
    bad = stage.apply(fit("c1"), ctx)
    for name in ("w", "b"):
        np.testing.assert_array_equal(bad.update[name], update(0.5)[name] * np.float32(factor))
        assert bad.update[name].dtype == np.float32
    assert bad.weight == 10.0  # the weight is what the client would honestly report
    assert stage.name == f"attack:{kind}"


def test_gaussian_attack_sends_seeded_noise_of_the_given_scale() -> None:
    stage = ModelPoisoning("gaussian", {"c1": 1, "c2": 2}, scale=3.0, seed=5)
    big = FitResult("c1", 1, {"w": np.zeros(40_000, np.float32)}, 1.0, 1)
    ctx = RoundContext("run", 1, PLAN)
    noise = stage.apply(big, ctx).update["w"]
    # 40 000 N(0, 9) draws: the sample sd is within 2% of 3 with overwhelming probability
    # (its standard error is 3/sqrt(80 000) = 0.011, and 0.06 is 5.7 of them).
    assert abs(float(noise.std()) - 3.0) < 0.06
    assert abs(float(noise.mean())) < 0.06
    np.testing.assert_array_equal(noise, stage.apply(big, ctx).update["w"])  # reproducible
    other_round = stage.apply(big, RoundContext("run", 2, PLAN)).update["w"]
    other_client = stage.apply(FitResult("c2", 1, big.update, 1.0, 1), ctx).update["w"]
    assert not np.array_equal(noise, other_round) and not np.array_equal(noise, other_client)


class Recording:
    name = "recording"

    def __init__(self) -> None:
        self.labels: torch.Tensor | None = None

    def train(self, model, x, y, plan, generator) -> TrainStats:  # type: ignore[no-untyped-def]
        self.labels = y.clone()
        return TrainStats(loss=0.0, steps=1)


def test_label_flipping_trains_on_mirrored_labels() -> None:
    inner = Recording()
    trainer = LabelFlipTrainer(inner, n_classes=3)
    y = torch.tensor([0, 1, 2, 2, 0])
    trainer.train(torch.nn.Linear(2, 3), torch.zeros(5, 2), y, PLAN, torch.Generator())
    assert inner.labels is not None
    assert inner.labels.tolist() == [2, 1, 0, 0, 2]
    assert trainer.name == "label_flip+recording"


# --- 20% sign-flipping clients on the medical example ----------------------------------------

ATTACK = {"kind": "sign_flip", "fraction": 0.2, "scale": 10.0}
DEFENCES = {
    "median": {"method": "median"},
    "trimmed_mean": {"method": "trimmed_mean", "trim_fraction": 0.2},
    "multi_krum": {"method": "multi_krum", "byzantine": 1},
}


def medical(**sections: Any) -> RunConfig:
    raw = tomllib.loads((EXAMPLES / "medical_diagnosis.toml").read_text())
    raw["federation"]["centralized_baseline"] = False
    return RunConfig.from_dict({**raw, **sections})


@pytest.fixture(scope="module")
def clean_accuracy() -> float:
    return run(medical()).final["accuracy"]


def test_sign_flipping_clients_degrade_fedavg(clean_accuracy: float) -> None:
    attacked = run(medical(attack=ATTACK))
    assert attacked.pipeline == ["client:attack:sign_flip", "aggregate:plain"]
    assert attacked.attack["malicious_clients"] == 1  # type: ignore[attr-defined]
    assert attacked.final["accuracy"] < clean_accuracy - 0.1


@pytest.mark.parametrize("defence", sorted(DEFENCES))
def test_robust_aggregation_keeps_the_clean_accuracy(clean_accuracy: float, defence: str) -> None:
    result = run(medical(attack=ATTACK, robust=DEFENCES[defence]))
    assert result.pipeline == ["client:attack:sign_flip", f"aggregate:{defence}"]
    assert result.final["accuracy"] >= clean_accuracy - 0.03
    last = result.rounds[-1].aggregation
    assert last["method"] == defence and last["updates"] == 5
    if defence == "multi_krum":
        # Multi-Krum leaves out the one attacker (its flipped, 10x update is far from the rest).
        assert last["left_out"] == 1


def test_label_flipping_clients_train_on_flipped_labels_in_a_run() -> None:
    clean = run(medical(federation={**medical().federation.model_dump(), "rounds": 3}))
    flipped = run(
        medical(
            federation={**medical().federation.model_dump(), "rounds": 3},
            attack={"kind": "label_flip", "fraction": 0.4},
        )
    )
    assert flipped.pipeline == ["aggregate:plain"]  # data poisoning: no stage, a trainer
    assert flipped.attack["malicious_clients"] == 2  # type: ignore[attr-defined]
    assert flipped.rounds[-1].metrics["train_loss"] > clean.rounds[-1].metrics["train_loss"]
    assert flipped.final["accuracy"] < clean.final["accuracy"] - 0.1
