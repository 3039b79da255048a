"""`audit_run`: run the configured attacks against a finished run and record what they measured.

For a run folder (see `veil.privacy.audit.target`) the audit runs, as `AuditSettings` selects:

- **membership**: the loss-threshold attack and LiRA against the final global model; members are
  the clients' training records, non-members the held-out test records and the clients'
  validation records. Every figure (AUC, TPR at 1 % and 0.1 % FPR, the FPR reached) comes with
  a two-sided confidence interval at the audit's `confidence`. LiRA's shadow models are
  trained on random halves of that population with the run's model, plan, rounds and DP-SGD
  mechanism, on pooled data (the centralized baseline's recipe): cheaper than re-running the
  federation, and a mismatch that can only weaken the attack.
- **inversion**: Inverting Gradients (Geiping et al. 2020) on what the server held after round 1
  (`AuditedRun.server_view`): one client's update with plain aggregation, only the sum with
  SecAgg. Quality: relative error per record (tabular) or SSIM (images).
- **canaries**: the one-run canary audit (`veil.privacy.audit.canaries`) of the organisation
  with the largest ε, retrained with its DP-SGD mechanism, giving `epsilon_lower` at
  `confidence` next to the accountant's ε. The input canaries are raw held-out records that go
  through that organisation's own preprocessing (clamping into the declared feature bounds,
  then its scaling), and all canaries through the run's `DPSGDTrainer` and clipping norm. Runs
  with client-level DP are not canary-audited in this version (the canaries would have to be
  whole clients).

The findings go into `result.json` as its `audit` section (written atomically); everything else
in the file is kept.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from torch import nn

from veil.assembly.audit import load_run
from veil.atomic import atomic_write_text
from veil.errors import ConfigError
from veil.federation.training import as_tensors, torch_threads
from veil.privacy.audit.canaries import audit_with_canaries
from veil.privacy.audit.inversion import infer_labels, inverting_gradients
from veil.privacy.audit.membership import lira, loss_threshold
from veil.privacy.audit.quality import image_quality, tabular_quality
from veil.privacy.audit.target import AuditedRun
from veil.result import RESULT_FILE
from veil.seeding import Purpose, derive_seed

__all__ = ["ATTACKS", "AuditProgress", "AuditSettings", "audit_run"]

ATTACKS: tuple[str, ...] = ("membership", "inversion", "canaries")

#: Settings of (quick, full) audits.
_SHADOWS = (8, 32)
_GRADIENT_CANARIES = (500, 1000)
_INPUT_CANARIES = (50, 200)
_INVERSION_ITERATIONS = (200, 1000)
#: Most records an inversion attempts at once (the server's sum can span thousands).
_INVERSION_MAX_RECORDS = 512


class AuditProgress(Protocol):
    """Where an audit reports progress (e.g. a rich progress bar)."""

    def start(self, task: str, total: int) -> None: ...

    def advance(self, task: str) -> None: ...


class _Silent:
    def start(self, task: str, total: int) -> None:
        pass

    def advance(self, task: str) -> None:
        pass


@dataclass(frozen=True)
class AuditSettings:
    """Which attacks run and how hard they try; None picks the quick or the full default."""

    attacks: Sequence[str] = ATTACKS
    quick: bool = False
    shadows: int | None = None
    gradient_canaries: int | None = None
    input_canaries: int | None = None
    inversion_iterations: int | None = None
    confidence: float = 0.95
    #: Seeds the canaries, shadow splits and attack initialisations (default: fresh entropy).
    seed: int | None = None
    #: Key file of a sealed checkpoint (default: the run config's `checkpoint.key_file`).
    key_file: Path | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.attacks) - set(ATTACKS))
        if unknown or not self.attacks:
            raise ConfigError(
                f"unknown attack(s) {unknown or '(none given)'}; choose from {', '.join(ATTACKS)}"
            )
        if not 0 < self.confidence < 1:
            raise ConfigError(f"confidence = {self.confidence}: use a value in (0, 1), e.g. 0.95")
        if self.shadows is not None and (self.shadows < 2 or self.shadows % 2):
            raise ConfigError(f"shadows = {self.shadows}: LiRA needs an even number >= 2")
        for name in ("gradient_canaries", "input_canaries", "inversion_iterations"):
            value = getattr(self, name)
            if value is not None and value < (1 if name == "inversion_iterations" else 0):
                raise ConfigError(f"{name} = {value}: use a non-negative number")
        if self.gradient_canaries == 0 and self.input_canaries == 0:
            raise ConfigError("no canaries: give gradient_canaries or input_canaries above 0")

    def pick(self, value: int | None, defaults: tuple[int, int]) -> int:
        return value if value is not None else defaults[0 if self.quick else 1]


def audit_run(
    run_dir: str | Path,
    settings: AuditSettings = AuditSettings(),
    *,
    progress: AuditProgress | None = None,
) -> dict[str, Any]:
    """Audit the finished run in `run_dir`, add the `audit` section to its result.json and
    return that section. `UserError` (with what to do) for a folder that is not a finished run."""
    started = time.perf_counter()
    run = load_run(run_dir, key_file=settings.key_file)
    seed = settings.seed if settings.seed is not None else secrets.randbits(63)
    report = progress or _Silent()
    section: dict[str, Any] = {
        "audited_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": settings.quick,
        "seed": seed,
        "epsilon": run.result.privacy.epsilon,
        "delta": run.result.privacy.delta,
        "unit": run.unit,
        "epsilon_lower": None,
        "confidence": settings.confidence,
        "exceeds_epsilon": None,
    }
    with torch_threads(run.config.federation.torch_threads):
        if "membership" in settings.attacks:
            section["membership"] = _membership(run, settings, seed, report)
        if "inversion" in settings.attacks:
            section["inversion"] = _inversion(run, settings, seed, report)
        if "canaries" in settings.attacks:
            canaries = _canaries(run, settings, seed, report)
            section["canaries"] = canaries
            if canaries.get("epsilon_lower") is not None:
                section["epsilon_lower"] = canaries["epsilon_lower"]
                # Against the run's ε and the retrained mechanism's own (they differ only by
                # the few records the canaries add to the sampling rate).
                claims = [
                    e for e in (run.result.privacy.epsilon, canaries["epsilon"]) if e is not None
                ]
                section["exceeds_epsilon"] = (
                    any(canaries["epsilon_lower"] > e for e in claims) if claims else None
                )
    section["duration_s"] = time.perf_counter() - started
    # `audit` stays an open field of result.json (readers find it among the extra fields).
    result = run.result.model_copy(update={"audit": section})
    atomic_write_text(run.path / RESULT_FILE, result.to_json())
    return section


def _population(run: AuditedRun) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, y, is_member): the clients' training records, then the records no client trained on
    (the test set and the clients' validation splits)."""
    fed = run.fed
    members = fed.pooled_train()
    outside_x = [fed.x_test, *(c.x_val for c in fed.clients)]
    outside_y = [fed.y_test, *(c.y_val for c in fed.clients)]
    x = np.concatenate([members[0], *outside_x]).astype(np.float32)
    y = np.concatenate([members[1], *outside_y]).astype(np.int64)
    is_member = np.zeros(y.size, dtype=bool)
    is_member[: members[1].size] = True
    return x, y, is_member


def _membership(
    run: AuditedRun, settings: AuditSettings, seed: int, progress: AuditProgress
) -> dict[str, Any]:
    x, y, is_member = _population(run)
    target = run.model()
    shadows = settings.pick(settings.shadows, _SHADOWS)
    recipe = run.recipe()

    def train_shadow(mask: np.ndarray, index: int) -> nn.Module:
        model = run.fresh_model()
        xt, yt = as_tensors(x[mask], y[mask])
        recipe.train(
            model,
            xt,
            yt,
            seed=derive_seed(seed, Purpose.BASELINE, index),
            source=run.noise_source(20_011, index) if recipe.dp else None,
        )
        return model

    progress.start("membership: shadow models", shadows)
    lira_metrics = lira(
        target,
        x,
        y,
        is_member,
        train_shadow=train_shadow,
        shadows=shadows,
        rng=np.random.default_rng(derive_seed(seed, Purpose.SELECT_FIT)),
        on_shadow=lambda: progress.advance("membership: shadow models"),
        confidence=settings.confidence,
    )
    return {
        "target": "final global model",
        "members": int(is_member.sum()),
        "non_members": int((~is_member).sum()),
        "confidence": settings.confidence,
        "loss_threshold": loss_threshold(
            target, x, y, is_member, confidence=settings.confidence
        ).to_dict(),
        "lira": {**lira_metrics.to_dict(), "shadows": shadows},
        "shadow_training": "pooled data, the run's model, plan and rounds"
        + (", DP-SGD with the run's σ and C" if recipe.dp else ""),
    }


def _inversion(
    run: AuditedRun, settings: AuditSettings, seed: int, progress: AuditProgress
) -> dict[str, Any]:
    view = run.server_view()
    fed = run.fed
    iterations = settings.pick(settings.inversion_iterations, _INVERSION_ITERATIONS)
    n = min(view.n_examples, _INVERSION_MAX_RECORDS)
    model = run.fresh_model()
    image = fed.image_shape
    bounds = None
    if image is not None:
        pooled = fed.pooled_train()[0]
        bounds = (float(pooled.min()), float(pooled.max()))
    progress.start("inversion: attack steps", iterations)
    rec = inverting_gradients(
        model,
        run.initial,
        view.gradient,
        n_examples=n,
        n_features=fed.n_features,
        n_classes=fed.n_classes,
        labels=infer_labels(model, view.gradient) if n == 1 else None,
        image_shape=image,
        bounds=bounds,
        tv_weight=1e-2 if image is not None else 0.0,
        iterations=iterations,
        seed=derive_seed(seed, Purpose.DROPOUT),
        on_step=lambda: progress.advance("inversion: attack steps"),
    )
    truth = view.x_true[:n]
    quality = (
        image_quality(truth, rec.x, image, data_range=bounds[1] - bounds[0])
        if image is not None and bounds is not None
        else tabular_quality(truth, rec.x)
    )
    return {
        "attack": rec.attack,
        "server_sees": view.description,
        "client": view.client,
        "client_records": int(view.x_true.shape[0]),
        "records_in_view": view.n_examples,
        "reconstructed": n,
        "iterations": iterations,
        **quality,
    }


def _canaries(
    run: AuditedRun, settings: AuditSettings, seed: int, progress: AuditProgress
) -> dict[str, Any]:
    if run.unit == "client":
        return {
            "epsilon_lower": None,
            "skipped": "client-level DP: canaries would have to be whole clients, which this "
            "version does not audit",
        }
    index, organisation = run.organisation()
    client = run.fed.clients[index]
    recipe = run.recipe(organisation)
    # Input canaries: raw held-out records through the organisation's own preprocessing (the
    # declared bounds clamp them as they clamped its records); without the raw records (data
    # built elsewhere), the test set as the run scaled it.
    raw = run.fed.x_test_raw
    pool_x, pool_y = (run.fed.x_test if raw is None else raw), run.fed.y_test
    preprocess = None if raw is None else client.preprocessing
    path = (
        f"raw held-out records through {client.name}'s preprocessing: "
        f"{client.preprocessing.describe()}"
        if preprocess is not None
        else "held-out records as the run scaled its test set"
    )
    trainer = (
        f"DPSGDTrainer: per-example clipping to C = {recipe.dp.clip_norm:g}, Poisson sampling, "
        f"noise multiplier {recipe.dp.noise_multiplier:.4g}"
        if recipe.dp is not None
        else "SGDTrainer (no DP)"
    )
    inputs = min(settings.pick(settings.input_canaries, _INPUT_CANARIES), int(pool_y.size))
    progress.start("canaries: training rounds", recipe.rounds)
    audit = audit_with_canaries(
        run.fresh_model,
        client.x_train,
        client.y_train,
        n_classes=run.fed.n_classes,
        recipe=recipe,
        rng=np.random.default_rng(derive_seed(seed, Purpose.PARTITION)),
        gradient_canaries=settings.pick(settings.gradient_canaries, _GRADIENT_CANARIES),
        input_pool=(pool_x, pool_y),
        input_canaries=inputs,
        confidence=settings.confidence,
        seed=derive_seed(seed, Purpose.LOCAL_TRAINING),
        source=run.noise_source(30_011) if recipe.dp else None,
        on_round=lambda: progress.advance("canaries: training rounds"),
        preprocess=preprocess,
        preprocessing=path,
    )
    return {
        "organisation": client.name,
        "run_epsilon": organisation["epsilon"] if organisation else None,
        **audit.to_dict(),
        "trainer": trainer,
    }
