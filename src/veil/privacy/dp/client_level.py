"""Client-level DP-FedAvg: each organisation's whole contribution is protected.

McMahan, Ramage, Talwar, Zhang 2018, "Learning Differentially Private Recurrent Language Models":
each sampled client clips its update to norm C and sends it with weight 1; the server adds
N(0, (zC)²) to the sum once and divides by the *expected* number of clients q·N (a fixed
denominator, so one client changes the mean by at most C/(qN)). Clients are Poisson-sampled with
rate q, which the accountant composes as a subsampled Gaussian per round.

Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially Private Learning
with Adaptive Clipping"): each client also sends bᵢ − ½ with bᵢ = 1[‖Δᵢ‖ ≤ C] as a sum-only
scalar (centred, so one client moves the sum by at most ½); the server releases the sum with
noise N(0, σ_b²), estimates the unclipped fraction b̃ = noisy sum / (qN) + ½ and moves C
geometrically towards the target quantile γ: C ← C·exp(−η(b̃ − γ)). Both releases together are
one Gaussian mechanism with noise multiplier z = (z_Δ⁻² + (2σ_b)⁻²)^(−1/2) (the bit's
sensitivity is ½), so the update noise is raised to z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) to keep the
accounted z.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from veil.federation.messages import FitResult, TrainingPlan
from veil.federation.pipeline import Aggregate, RoundContext
from veil.privacy.dp.randomness import RandomSource, require_secure
from veil.tensors import l2_norm

UNCLIPPED = "dp/unclipped"

#: Clipping factors at least this large are applied in float32 (exact to rounding); smaller ones,
#: from huge updates, would lose precision as float32 subnormals and are applied in float64.
_FLOAT32_FACTOR = 1e-30


class ClipUpdate:
    """Client stage: clip the whole update to the round's `update_clip_norm`, weight 1.

    With `report_unclipped` (for adaptive clipping) it also sends the centred bit
    1[‖Δ‖ ≤ C] − ½ as a sum-only scalar.
    """

    name = "clip-update"

    def __init__(self, *, report_unclipped: bool = True) -> None:
        self.report_unclipped = report_unclipped

    def apply(self, result: FitResult, context: RoundContext) -> FitResult:
        clip = context.plan.update_clip_norm if context.plan is not None else None
        if clip is None:
            raise ValueError(
                "client-level DP needs the round's clipping norm in the training plan; "
                "the server did not send one"
            )
        norm = l2_norm(result.update)  # a float64 that no finite entry overflows
        factor = min(1.0, clip / norm) if norm > 0 else 1.0
        if factor >= _FLOAT32_FACTOR:
            update = {name: arr * np.float32(factor) for name, arr in result.update.items()}
        else:  # C/‖Δ‖ is (near) subnormal in float32: scale in float64, then round once
            update = {
                name: (arr.astype(np.float64) * factor).astype(arr.dtype)
                for name, arr in result.update.items()
            }
        sums = dict(result.sums)
        if self.report_unclipped:
            sums[UNCLIPPED] = 0.5 if norm <= clip else -0.5
        return replace(result, update=update, weight=1.0, sums=sums, metrics={})


class GaussianSumNoise:
    """Server stage: add N(0, (z_Δ·C)²) to the summed update; fix the denominator to q·N.

    With `target_quantile`, also release the noisy count of unclipped clients and adapt C.
    With `distributed`, the clients have already added the noise in the integer domain under
    secure aggregation (`veil.privacy.secagg.distributed_dp`): this stage only fixes the
    denominator. In `production` (the default) a seeded `source` is refused with a
    `ConfigError` (`require_secure`); tests pass ``production=False``.
    """

    name = "gaussian-sum-noise"

    def __init__(
        self,
        *,
        noise_multiplier: float,
        clip_norm: float,
        expected_clients: float,
        source: RandomSource,
        target_quantile: float | None = None,
        clip_learning_rate: float = 0.2,
        clip_count_stddev: float | None = None,
        distributed: bool = False,
        production: bool = True,
    ) -> None:
        require_secure(source, production=production, what="client-level Gaussian noise")
        if distributed and target_quantile is not None:
            raise ValueError(
                "adaptive clipping (target_quantile) is not available with distributed noise"
            )
        self.distributed = distributed
        if expected_clients <= 0:
            raise ValueError(f"expected_clients must be > 0, got {expected_clients}")
        self.noise_multiplier = noise_multiplier
        self.clip_norm = clip_norm
        self.expected_clients = expected_clients
        self.source = source
        self.target_quantile = target_quantile
        self.clip_learning_rate = clip_learning_rate
        self.count_stddev = (
            clip_count_stddev if clip_count_stddev is not None else expected_clients / 20
        )
        self.update_noise_multiplier = (
            update_noise_multiplier(noise_multiplier, self.count_stddev)
            if target_quantile is not None
            else noise_multiplier
        )
        self.clip_history: list[float] = [clip_norm]
        #: The clipping norm the last aggregated round used (before adapting it).
        self.last_clip_norm = clip_norm

    def configure_plan(self, plan: TrainingPlan) -> TrainingPlan:
        return replace(plan, update_clip_norm=self.clip_norm)

    def apply(self, aggregate: Aggregate, context: RoundContext) -> Aggregate:
        if self.distributed:
            sums = {k: v for k, v in aggregate.sums.items() if k != UNCLIPPED}
            return Aggregate(
                total=aggregate.total,
                weight=self.expected_clients,
                count=aggregate.count,
                sums=sums,
                report=aggregate.report,
            )
        std = self.update_noise_multiplier * self.clip_norm
        sizes = [a.size for a in aggregate.total.values()]
        noise = self.source.standard_normal(sum(sizes)) * std
        total = {}
        offset = 0
        for (name, arr), size in zip(aggregate.total.items(), sizes, strict=True):
            chunk = noise[offset : offset + size].reshape(arr.shape)
            total[name] = (arr + chunk).astype(np.float32)
            offset += size
        sums = dict(aggregate.sums)
        centred = sums.pop(UNCLIPPED, 0.0)
        self.last_clip_norm = self.clip_norm
        if self.target_quantile is not None:
            noisy = centred + float(self.source.standard_normal(1)[0]) * self.count_stddev
            fraction = noisy / self.expected_clients + 0.5
            self.clip_norm *= math.exp(-self.clip_learning_rate * (fraction - self.target_quantile))
            self.clip_history.append(self.clip_norm)
        return Aggregate(
            total=total,
            weight=self.expected_clients,
            count=aggregate.count,
            sums=sums,
            report=aggregate.report,
        )


def update_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2): the update noise that keeps the overall multiplier z when
    the unclipped count is released with noise σ_b (Andrew et al. 2021, Theorem 1)."""
    residual = noise_multiplier**-2 - (2 * count_stddev) ** -2
    if residual <= 0:
        raise ValueError(
            f"clip_count_stddev = {count_stddev} is too small for noise_multiplier = "
            f"{noise_multiplier}: it must exceed {noise_multiplier / 2}; raise clip_count_stddev"
        )
    return float(residual**-0.5)
