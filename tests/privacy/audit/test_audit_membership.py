"""Membership inference: the loss-threshold attack and LiRA, against an overfitted model and
against the same model trained with DP-SGD at ε = 1."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

from veil.config import ModelConfig
from veil.data import fit_scaler, load_dataset
from veil.federation.messages import TrainingPlan
from veil.federation.training import as_tensors
from veil.federation.training import torch_threads as _torch_threads
from veil.models import build_model
from veil.privacy.audit.membership import (
    AttackMetrics,
    attack_metrics,
    lira,
    logit_confidence,
    loss_threshold,
)
from veil.privacy.audit.recipe import DPSGDMechanism, TrainingRecipe
from veil.privacy.dp.accountant import calibrate_noise_multiplier
from veil.privacy.dp.dpsgd import poisson_schedule
from veil.privacy.dp.randomness import SeededRandom

POPULATION = 300
EPOCHS = 60


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    with _torch_threads(1):
        yield


def test_metrics_of_perfect_random_and_inverted_scores() -> None:
    truth = np.array([True] * 50 + [False] * 50)
    perfect = attack_metrics(truth.astype(float), truth)
    assert perfect.auc == 1.0 and perfect.tpr_at_0_1_percent_fpr == 1.0
    inverted = attack_metrics(-truth.astype(float), truth)
    assert inverted.auc == 0.0 and inverted.tpr_at_1_percent_fpr == 0.0
    assert (perfect.members, perfect.non_members) == (50, 50)
    with pytest.raises(ValueError, match="both members and non-members"):
        attack_metrics(np.zeros(3), np.ones(3, dtype=bool))


def test_logit_confidence_is_the_log_odds_of_the_true_class() -> None:
    torch.manual_seed(0)  # the weights: the same in any test order
    model = nn.Linear(4, 3)
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    y = np.array([0, 1, 2, 1, 0])
    with torch.no_grad():
        # The reference in float64 too: from a float32 softmax, log(p/(1 − p)) near p = 1/2
        # loses about 3e-5 of its relative precision, which failed the test in some orders.
        logits = model(torch.from_numpy(x)).double()
        p = torch.softmax(logits, dim=1).numpy()[np.arange(5), y]
    assert logit_confidence(model, x, y) == pytest.approx(np.log(p / (1 - p)), rel=1e-7)


def _experiment(dp: bool) -> tuple[AttackMetrics, AttackMetrics]:
    """Digits (real data): 300 records, a random half of them members; an MLP trained for 60
    epochs without DP memorises its members (train accuracy 1.0, test about 0.88)."""
    ds = load_dataset("digits")
    rng = np.random.default_rng(0)
    pick = rng.permutation(ds.n_examples)[:POPULATION]
    x = fit_scaler(ds.features[pick]).transform(ds.features[pick])
    y = ds.labels[pick]
    member = rng.random(POPULATION) < 0.5
    if dp:
        q, steps = poisson_schedule(int(member.sum()), 32, EPOCHS)
        sigma = calibrate_noise_multiplier(1.0, 1e-5, q, steps)
        plan = TrainingPlan(epochs=EPOCHS, batch_size=32, learning_rate=0.5)
        recipe = TrainingRecipe(plan, dp=DPSGDMechanism(sigma, 1.0, 1e-5))
    else:
        plan = TrainingPlan(epochs=EPOCHS, batch_size=32, learning_rate=0.1, momentum=0.9)
        recipe = TrainingRecipe(plan)

    def train(mask: np.ndarray, index: int) -> nn.Module:
        model = build_model(
            ModelConfig(name="mlp", hidden=[64]), n_features=64, n_classes=10, seed=1
        )
        recipe.train(model, *as_tensors(x[mask], y[mask]), seed=index, source=SeededRandom(index))
        return model

    target = train(member, 1000)
    shadows = lira(
        target, x, y, member, train_shadow=train, shadows=8, rng=np.random.default_rng(1)
    )
    return loss_threshold(target, x, y, member), shadows


def test_membership_inference_succeeds_without_dp_and_fails_with_dp_at_epsilon_1() -> None:
    """With ~150 members and ~150 non-members the AUC of an attack that is no better than chance
    has standard deviation sqrt((n₁+n₂+1)/(12·n₁·n₂)) ≈ 0.033. Measured without DP: loss
    threshold 0.64, LiRA (8 shadows) 0.74; with DP-SGD at ε = 1 loss threshold 0.55, LiRA 0.47.
    Asserted: without DP loss AUC ≥ 0.57 and LiRA AUC ≥ 0.65 (2 and 3σ above chance, and 2-3σ
    below what was measured); with DP both within 0.5 ± 0.1 (3σ), and LiRA's AUC at least 0.1
    below the non-private one. The runs are seeded, so the outcome is deterministic."""
    plain_loss, plain_lira = _experiment(dp=False)
    dp_loss, dp_lira = _experiment(dp=True)
    assert plain_loss.auc >= 0.57
    assert plain_lira.auc >= 0.65
    assert abs(dp_loss.auc - 0.5) <= 0.1
    assert abs(dp_lira.auc - 0.5) <= 0.1
    assert dp_lira.auc <= plain_lira.auc - 0.1
    # A confident attack finds some members at 1 % false positives without DP.
    assert plain_lira.tpr_at_1_percent_fpr > dp_lira.tpr_at_1_percent_fpr


def test_lira_needs_an_even_number_of_shadows() -> None:
    with pytest.raises(ValueError, match="even number"):
        lira(
            nn.Linear(2, 2),
            np.zeros((4, 2), dtype=np.float32),
            np.zeros(4, dtype=np.int64),
            np.array([True, False, True, False]),
            train_shadow=lambda mask, i: nn.Linear(2, 2),
            shadows=3,
            rng=np.random.default_rng(0),
        )
