"""Canary auditing in one training run: an empirical ε lower bound next to the accountant's ε.

The procedure of Steinke, Nasr & Jagielski 2023 ("Privacy Auditing with One (1) Training Run"),
run on the audited mechanism itself:

1. Build m canaries and include each in the training data independently with probability 1/2.
   - **Gradient-space** canaries (white-box; the "Dirac" canaries of Nasr et al. 2023): the model
     gets one extra input coordinate per canary, feeding a bias-free linear head that no real
     record touches (real records hold 0 there). Canary i is the input A·eᵢ on that coordinate
     (0 elsewhere) with a random label: its gradient lies, up to the base model's small share,
     on its own column of the head. DP's guarantee does not depend on the model, so auditing
     the mechanism on this widened model audits the mechanism.
   - **Input-space** canaries (black-box): real records the training never saw, with a wrong
     label. Given the audited run's `preprocess` (its raw-record-to-input transform: clamping
     into the declared feature bounds, then the fixed scaling), they are drawn as raw records
     and pass through it, exactly as the run's own records did, so an extreme value in a canary
     is clamped as it would be in training.
2. Train once with the audited recipe (Veil's `DPSGDTrainer` with the run's per-example
   clipping norm, Poisson sampling and CSPRNG noise; or plain SGD for a run without DP): the
   canaries take the run's clipping path, not a re-implementation of it.
3. Score every canary: gradient canaries by how far the final head column moved towards the
   canary's label, input canaries by their negated loss.
4. Guess "in" for the k highest and "out" for the k lowest scores, for k in a grid fixed in
   advance, count the correct guesses and turn them into an ε lower bound (`bounds`). Every
   (kind, k) test runs at confidence 1 − (1 − confidence)/tests (Bonferroni), so the reported
   maximum holds at `confidence`.

The batch size is scaled with the number of records so that the sampling rate q, and with it the
steps per epoch, stay those of the audited run, and the accountant's ε reported next to the bound
is the one for the mechanism that actually ran (σ, q, steps, δ). Under DP the learning rate is
lowered so that noise cannot saturate a gradient canary's softmax (`_unsaturated`); the
guarantee does not depend on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from veil.federation.training import as_tensors
from veil.privacy.audit.bounds import epsilon_lower_bound
from veil.privacy.audit.recipe import TrainingRecipe
from veil.privacy.dp.randomness import RandomSource

__all__ = [
    "GRADIENT_AMPLITUDE",
    "GUESS_FRACTIONS",
    "CanaryAudit",
    "CanaryModel",
    "GuessTest",
    "audit_with_canaries",
    "guess_tests",
]

CanaryKind = Literal["gradient", "input"]

#: The value A on a gradient canary's own coordinate: its unclipped gradient norm is about A, far
#: above any sensible clipping norm, so a missing clip shows at once.
GRADIENT_AMPLITUDE = 1e3

#: Guesses per kind, as fractions of the canaries: k = fraction·m/2 "in" and k "out" guesses.
GUESS_FRACTIONS: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)


class CanaryModel(nn.Module):
    """The audited model plus a bias-free linear head on one private input coordinate per
    gradient canary: logits = base(x[:, :d]) + head(x[:, d:])."""

    def __init__(self, base: nn.Module, n_features: int, n_canaries: int, n_classes: int) -> None:
        super().__init__()
        self.base = base
        self.n_features = n_features
        self.head = nn.Linear(n_canaries, n_classes, bias=False)
        nn.init.zeros_(self.head.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        base: torch.Tensor = self.base(x[:, : self.n_features])
        head: torch.Tensor = self.head(x[:, self.n_features :])
        return base + head


@dataclass(frozen=True)
class GuessTest:
    """One guessing rule's outcome: r guesses on m canaries of a kind, v of them correct, and
    the ε lower bound they give at `confidence`."""

    kind: str
    canaries: int
    guesses: int
    correct: int
    confidence: float
    epsilon_lower: float


@dataclass(frozen=True)
class CanaryAudit:
    """The outcome of a canary audit.

    `epsilon_lower` holds with probability at least `confidence`; `epsilon` is the accountant's
    ε for the mechanism that ran (None without DP). `exceeds` flags a measured lower bound above
    the claimed upper bound: the implementation does not deliver what the accountant reports.
    """

    epsilon_lower: float
    confidence: float
    delta: float
    epsilon: float | None
    best: GuessTest
    tests: list[GuessTest]
    canaries: dict[str, int]
    included: dict[str, int]
    examples: int
    mechanism: dict[str, float] | None
    hazard: str | None = None
    scores: dict[str, list[float]] = field(default_factory=dict, repr=False)
    #: How the input canaries reached the model ("raw ... through the run's preprocessing").
    preprocessing: str | None = None
    #: The input canaries' features as the model received them (``{"input": (m, d)}``): what
    #: the trainer saw, for checking the path.
    inputs: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def exceeds(self) -> bool:
        return self.epsilon is not None and self.epsilon_lower > self.epsilon

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (without the per-canary scores)."""
        return {
            "epsilon_lower": self.epsilon_lower,
            "confidence": self.confidence,
            "delta": self.delta,
            "epsilon": self.epsilon,
            "exceeds_epsilon": self.exceeds,
            "best": asdict(self.best),
            "tests": [asdict(t) for t in self.tests],
            "canaries": self.canaries,
            "included": self.included,
            "examples": self.examples,
            "mechanism": self.mechanism,
            "hazard": self.hazard,
            "preprocessing": self.preprocessing,
        }


def _unsaturated(recipe: TrainingRecipe, n_examples: int) -> TrainingRecipe:
    """The recipe with a learning rate at which DP noise cannot saturate a gradient canary.

    A canary's logit is A times its head column, which collects noise of standard deviation
    lr·σC/b per step; once A·lr·σC·√T/b grows past 1 the noise alone drives the canary's softmax
    to 0 or 1, its gradient vanishes, and its signal is lost. DP-SGD's guarantee does not depend
    on the learning rate (the parameters are a post-processing of the noisy clipped sums), so the
    audit lowers it until that noise stays at 0.1 on the logit scale.
    """
    mechanism = recipe.mechanism(n_examples)
    if recipe.dp is None or mechanism is None or mechanism["steps"] == 0:
        return recipe
    noise = recipe.dp.noise_multiplier * recipe.dp.clip_norm * math.sqrt(mechanism["steps"])
    expected_batch = mechanism["sampling_rate"] * n_examples
    rate = min(recipe.plan.learning_rate, 0.1 * expected_batch / (GRADIENT_AMPLITUDE * noise))
    return replace(recipe, plan=replace(recipe.plan, learning_rate=rate))


def guess_tests(
    kind: str,
    scores: np.ndarray,
    included: np.ndarray,
    *,
    delta: float,
    confidence: float,
    fractions: Sequence[float] = GUESS_FRACTIONS,
) -> list[GuessTest]:
    """Top-k "in" / bottom-k "out" guesses for each fraction, each with its ε lower bound at
    `confidence` (the caller divides its error level among the tests it runs)."""
    m = int(scores.size)
    order = np.argsort(-scores, kind="stable")
    tests = []
    for fraction in fractions:
        k = max(1, int(fraction * m) // 2)
        if 2 * k > m:
            continue
        correct = int(included[order[:k]].sum()) + int((~included[order[m - k :]]).sum())
        tests.append(
            GuessTest(
                kind=kind,
                canaries=m,
                guesses=2 * k,
                correct=correct,
                confidence=confidence,
                epsilon_lower=epsilon_lower_bound(
                    m, 2 * k, correct, delta=delta, confidence=confidence
                ),
            )
        )
    return tests


def audit_with_canaries(
    base_model: Callable[[], nn.Module],
    x_train: np.ndarray,
    y_train: np.ndarray,
    *,
    n_classes: int,
    recipe: TrainingRecipe,
    rng: np.random.Generator,
    gradient_canaries: int = 1000,
    input_pool: tuple[np.ndarray, np.ndarray] | None = None,
    input_canaries: int = 0,
    confidence: float = 0.95,
    delta: float | None = None,
    seed: int = 0,
    source: RandomSource | None = None,
    on_round: Callable[[], None] | None = None,
    preprocess: Callable[[np.ndarray], np.ndarray] | None = None,
    preprocessing: str | None = None,
) -> CanaryAudit:
    """Train once with canaries inserted and bound ε from below (see the module docstring).

    Args:
        base_model: Builds a fresh model of the audited kind (flat inputs of `x_train`'s width).
        x_train, y_train: The records the audited organisation trains on.
        recipe: How it trains (the run's plan, rounds and DP-SGD mechanism).
        rng: Draws the canaries and their inclusion; must not be known to the trainer.
        gradient_canaries, input_canaries: How many of each (input canaries come from
            `input_pool`, records that are not in `x_train`).
        preprocess: The run's transform from raw records to model inputs (e.g. a client's
            `veil.data.Preprocessing`); `input_pool` then holds raw records, and each input
            canary passes through it as the run's records did. None: the pool is already in
            model-input space. `preprocessing` describes it for the record.
        delta: δ of the tested hypothesis; default the recipe's δ, or 1e-5 without DP.
        seed, source: Shuffling seed and DP noise source of the training run.
        on_round: Called after every training round (progress).
    """
    if delta is None:
        delta = recipe.dp.delta if recipe.dp is not None else 1e-5
    n_features = int(np.prod(x_train.shape[1:]))
    x_flat = x_train.reshape(x_train.shape[0], n_features).astype(np.float32)
    kinds, included = _draw_canaries(
        rng,
        n_features,
        n_classes,
        gradient=gradient_canaries,
        inputs=input_canaries,
        pool=input_pool,
        preprocess=preprocess,
    )

    x_all, y_all = _training_set(x_flat, y_train, kinds, included, gradient_canaries)
    n_all = int(x_all.shape[0])
    recipe = _audit_recipe(recipe, int(x_flat.shape[0]), n_all, gradient_canaries > 0)
    model = CanaryModel(base_model(), n_features, gradient_canaries, n_classes)
    x_t, y_t = as_tensors(x_all, y_all)
    recipe.train(model, x_t, y_t, seed=seed, source=source, on_round=on_round)

    scores = _canary_scores(model, kinds, n_classes)
    tests = _bonferroni_tests(scores, included, delta=delta, confidence=confidence)
    best = max(tests, key=lambda t: t.epsilon_lower)
    accounted = recipe.accounted(n_all)
    return CanaryAudit(
        epsilon_lower=best.epsilon_lower,
        confidence=confidence,
        delta=delta,
        epsilon=accounted.epsilon if accounted is not None else None,
        best=best,
        tests=tests,
        canaries={k: len(y) for k, (_, y) in kinds.items()},
        included={k: int(v.sum()) for k, v in included.items()},
        examples=n_all,
        mechanism=recipe.mechanism(n_all),
        hazard=_hazard(recipe),
        scores={k: v.tolist() for k, v in scores.items()},
        preprocessing=preprocessing,
        inputs={"input": kinds["input"][0][:, :n_features].copy()} if "input" in kinds else {},
    )


def _audit_recipe(
    recipe: TrainingRecipe, n_base: int, n_all: int, has_gradient_canaries: bool
) -> TrainingRecipe:
    """The recipe for `n_all` records (the `n_base` audited ones and the included canaries):
    the batch size scaled to keep the audited run's sampling rate (and steps per epoch), and,
    with gradient canaries, a learning rate that noise cannot saturate (`_unsaturated`)."""
    recipe = recipe.with_batch_size(round(recipe.plan.batch_size * n_all / max(n_base, 1)))
    return _unsaturated(recipe, n_all) if has_gradient_canaries else recipe


def _draw_canaries(
    rng: np.random.Generator,
    n_features: int,
    n_classes: int,
    *,
    gradient: int,
    inputs: int,
    pool: tuple[np.ndarray, np.ndarray] | None,
    preprocess: Callable[[np.ndarray], np.ndarray] | None,
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, np.ndarray]]:
    """`gradient` gradient and `inputs` input canaries, by kind (features at the widened width
    ``n_features + gradient``, labels), and for each kind which are included (probability 1/2
    each); ValueError if there are none, or the pool is too small."""
    kinds: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if gradient > 0:
        kinds["gradient"] = _gradient_canaries(gradient, n_features, n_classes, rng)
    if inputs > 0:
        kinds["input"] = _input_canaries(
            pool,
            inputs,
            n_features=n_features,
            width=n_features + gradient,
            n_classes=n_classes,
            rng=rng,
            preprocess=preprocess,
        )
    if not kinds:
        raise ValueError("a canary audit needs at least one canary")
    included = {kind: rng.random(len(y)) < 0.5 for kind, (_, y) in kinds.items()}
    return kinds, included


def _hazard(recipe: TrainingRecipe) -> str | None:
    """A warning for the record when the audited recipe is a deliberately broken test one."""
    if recipe.dp is not None and recipe.dp.hazard_clipping_disabled:
        return "per-example clipping disabled (audit test configuration)"
    return None


def _gradient_canaries(
    count: int, n_features: int, n_classes: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """`count` Dirac canaries on the inputs widened by one coordinate each: canary i is
    `GRADIENT_AMPLITUDE` on coordinate ``n_features + i`` and 0 elsewhere, with a random label."""
    x = np.zeros((count, n_features + count), dtype=np.float32)
    x[np.arange(count), n_features + np.arange(count)] = GRADIENT_AMPLITUDE
    return x, rng.integers(0, n_classes, count)


def _input_canaries(
    input_pool: tuple[np.ndarray, np.ndarray] | None,
    count: int,
    *,
    n_features: int,
    width: int,
    n_classes: int,
    rng: np.random.Generator,
    preprocess: Callable[[np.ndarray], np.ndarray] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """`count` records drawn from `input_pool` without replacement, passed through `preprocess`
    (if given) into their first `n_features` of `width` columns (the rest 0), each with a random
    wrong label."""
    if input_pool is None or input_pool[0].shape[0] < count:
        available = 0 if input_pool is None else input_pool[0].shape[0]
        raise ValueError(f"{count} input canaries need as many pool records, got {available}")
    pick = rng.choice(input_pool[0].shape[0], count, replace=False)
    raw = input_pool[0][pick].reshape(count, n_features)
    x = np.zeros((count, width), dtype=np.float32)
    x[:, :n_features] = raw if preprocess is None else preprocess(raw)
    true = input_pool[1][pick].astype(np.int64)
    wrong = (true + rng.integers(1, n_classes, count)) % n_classes
    return x, wrong


def _training_set(
    x_flat: np.ndarray,
    y_train: np.ndarray,
    kinds: dict[str, tuple[np.ndarray, np.ndarray]],
    included: dict[str, np.ndarray],
    gradient_canaries: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The audited records (widened by `gradient_canaries` zero columns) followed by the
    included canaries of each kind."""
    x_all = np.concatenate(
        [np.pad(x_flat, ((0, 0), (0, gradient_canaries)))]
        + [x[included[kind]] for kind, (x, _) in kinds.items()]
    )
    y_all = np.concatenate(
        [y_train.astype(np.int64)] + [y[included[k]] for k, (_, y) in kinds.items()]
    )
    return x_all, y_all


def _canary_scores(
    model: CanaryModel, kinds: dict[str, tuple[np.ndarray, np.ndarray]], n_classes: int
) -> dict[str, np.ndarray]:
    """Each canary's membership score in the trained `model`: a gradient canary's head column's
    lead of its label over the other classes, an input canary's negated loss."""
    scores: dict[str, np.ndarray] = {}
    with torch.no_grad():
        model.train(False)
        if "gradient" in kinds:
            labels = torch.from_numpy(kinds["gradient"][1].astype(np.int64))
            w = model.head.weight.detach().T  # (canaries, classes)
            own = w.gather(1, labels[:, None]).squeeze(1)
            others = (w.sum(1) - own) / max(n_classes - 1, 1)
            scores["gradient"] = (own - others).numpy().astype(np.float64)
        if "input" in kinds:
            xi, yi = as_tensors(*kinds["input"])
            loss = nn.functional.cross_entropy(model(xi), yi, reduction="none")
            scores["input"] = (-loss).numpy().astype(np.float64)
    return scores


def _bonferroni_tests(
    scores: dict[str, np.ndarray],
    included: dict[str, np.ndarray],
    *,
    delta: float,
    confidence: float,
) -> list[GuessTest]:
    """Every kind's `guess_tests`, each at confidence 1 − (1 − `confidence`)/tests, so that
    all of them hold together at `confidence`."""
    n_tests = len(scores) * len(GUESS_FRACTIONS)
    per_test = 1.0 - (1.0 - confidence) / n_tests
    return [
        t
        for kind, s in scores.items()
        for t in guess_tests(kind, s, included[kind], delta=delta, confidence=per_test)
    ]
